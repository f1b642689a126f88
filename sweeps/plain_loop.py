"""A plain PyTorch training loop of the same model: the baseline that platform overhead is measured
against. No config system, no data pipeline (random tokens made up front), no metrics, no checkpoints.

    python sweeps/plain_loop.py --seq-len 256 --batch 8 --steps 40 --warmup 5
prints one JSON line: {"tokens_per_s": ...} over the steps after warm-up.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.models.llama3.model import Transformer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()

    cfg = ModelConfig()  # the debug flavor's dims are the schema defaults
    torch.manual_seed(0)
    model = Transformer(cfg, args.seq_len)
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    data = torch.randint(0, cfg.vocab_size, (args.steps, args.batch, args.seq_len + 1))
    start = 0.0
    for step in range(args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        inputs, labels = data[step, :, :-1], data[step, :, 1:]
        loss = F.cross_entropy(model(inputs).flatten(0, 1).float(), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss.item()
    seconds = time.perf_counter() - start
    print(json.dumps({"tokens_per_s": (args.steps - args.warmup) * args.batch * args.seq_len / seconds}))


if __name__ == "__main__":
    main()
