"""Text from a trained checkpoint, on CPU or one GPU.

    python -m pretrain.generate outputs/default --prompt "The list"                         # greedy, 50 tokens
    python -m pretrain.generate outputs/default/checkpoint/step-30 --prompt "..." --temperature 0.8 --top-k 40 --seed 1

A run directory loads its newest complete checkpoint, a step folder that step; the model, tokenizer and BOS come
from the run's config.yaml. The prompt is prefilled in one forward, then one token per forward with a KV cache
(pretrain/generation/). stdout gets the prompt and its continuation; stderr one line on what ran. A bad path or a
broken checkpoint prints one line `error: ...` naming it and a fix, and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from pretrain.errors import ConfigError, exit_code_of


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretrain.generate", description=__doc__.split("\n")[0])
    parser.add_argument("path", help="a run directory (outputs/<job.name>) or a step folder (.../checkpoint/step-N)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate at most (default 50)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0: all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when present")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--config", help="the run's config.yaml (default: <run dir>/config.yaml)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} must be > 0. Fix: e.g. --max-new-tokens 50.")
    if args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature} must be >= 0 (0: greedy). Fix: e.g. --temperature 0.8.")
    if args.top_k < 0:
        raise ConfigError(f"--top-k {args.top_k} must be >= 0 (0: every token). Fix: e.g. --top-k 40.")


def run(args: argparse.Namespace) -> None:
    check_args(args)
    # lazy: `--help` and argument errors answer before torch loads
    import torch

    from pretrain.generation.load import load_model, open_run, pick_device
    from pretrain.generation.sampling import generate

    device = pick_device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    start = time.perf_counter()
    opened = open_run(args.path, args.config)
    tokenizer, job = opened.tokenizer, opened.job
    text = tokenizer.encode(args.prompt)
    prompt = ([tokenizer.bos_id] if job.data.bos else []) + text
    if not prompt:
        raise ConfigError("--prompt '' has no tokens and the run adds no BOS (data.bos=false). Fix: give some text.")
    total = len(prompt) + args.max_new_tokens
    if total > job.training.seq_len:
        print(f"warning: {total} positions, more than the {job.training.seq_len} the model was trained on "
              "(training.seq_len): RoPE beyond them is extrapolation", file=sys.stderr)
    model = load_model(opened, max(total, job.training.seq_len), device, dtype)
    loaded_s = time.perf_counter() - start
    start = time.perf_counter()
    new = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                   stop_ids=(tokenizer.eos_id,))
    seconds = time.perf_counter() - start
    print(tokenizer.decode(text + [t for t in new if t != tokenizer.eos_id]), flush=True)
    print(f"{opened.step_dir} ({job.model.name}/{job.model.flavor}, {device}, {str(dtype).removeprefix('torch.')}): "
          f"{len(prompt)} prompt + {len(new)} new tokens in {seconds:.2f} s ({len(new) / seconds:.1f} tokens/s; "
          f"loaded in {loaded_s:.1f} s)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code_of(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
