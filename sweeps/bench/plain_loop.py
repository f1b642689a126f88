"""A plain PyTorch training loop of the same model: the baseline that platform overhead is measured
against. No config system, no data pipeline (all tokens made up front), no metrics, no checkpoints.

    python sweeps/bench/plain_loop.py --seq-len 512 --batch 8 --steps 40 --warmup 5 [--compile] [--tokens embedded]

`--tokens random` (default): uniform random tokens. `--tokens embedded`: the first batches of the
embedded corpus, the very tokens `launch.py` trains on, prepared before anything is timed (real text
repeats tokens, which changes the embedding backward's work a little).

prints one JSON line: {"tokens_per_s": ...} over the steps after warm-up. `--compile` compiles what
`launch.py compile.enable=true` compiles: each transformer block (fullgraph) and the loss.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.models.llama3.model import Transformer


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def embedded_batches(cfg: ModelConfig, seq_len: int, batch: int, steps: int) -> list:
    """The (inputs, labels) of launch.py's first `steps` steps on the embedded corpus (default data config)."""
    from pretrain.config import DataConfig
    from pretrain.data.dataset import TokenWindowLoader
    from pretrain.data.tokenizer import build_tokenizer

    data = DataConfig()
    loader = TokenWindowLoader(data, build_tokenizer(data, cfg), seq_len, batch, batch)
    return [loader.next_step()[0] for _ in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed (compile, allocator warm-up)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--tokens", choices=("random", "embedded"), default="random")
    parser.add_argument("--compile", action="store_true",
                        help="per-block torch.compile(fullgraph=True) + compiled loss")
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be in [0, --steps)")
    if "OMP_NUM_THREADS" not in os.environ:  # the thread count launch.py uses for one CPU process
        torch.set_num_threads(os.cpu_count() or 1)

    cfg = ModelConfig()  # the debug flavor's dims are the schema defaults
    torch.manual_seed(0)
    model = Transformer(cfg, args.seq_len)
    model.init_weights()
    loss_fn = cross_entropy
    if args.compile:
        for block in model.layers.values():
            block.compile(fullgraph=True)
        loss_fn = torch.compile(cross_entropy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    if args.tokens == "embedded":
        batches = embedded_batches(cfg, args.seq_len, args.batch, args.steps)
    else:
        data = torch.randint(0, cfg.vocab_size, (args.steps, args.batch, args.seq_len + 1))
        batches = [(data[step, :, :-1], data[step, :, 1:]) for step in range(args.steps)]
    start = time.perf_counter()
    for step in range(args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        inputs, labels = batches[step]
        loss = loss_fn(model(inputs), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss.item()
    seconds = time.perf_counter() - start
    print(json.dumps({"tokens_per_s": (args.steps - args.warmup) * args.batch * args.seq_len / seconds}))


if __name__ == "__main__":
    main()
