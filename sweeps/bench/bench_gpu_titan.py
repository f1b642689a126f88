"""The torchtitan 0.3.0 half of sweeps/bench/bench_gpu.py: the same points through torchtitan on the same GPU,
parsed from its log, for the side-by-side table."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time

from bench_overhead import error_summary, repo_env
from gpu_points import POINTS, TITAN_FLOAT8_RECIPES, Point

# ----------------------------------------------------------------------------------------------------
# torchtitan 0.3.0
#
# 0.3.0 has no TOML job files: a run is a Python function returning a Trainer.Config, named by
# `--module <importable module> --config <function>` (plus tyro flags for single fields). The model
# is part of that config (model_spec, not settable from the command line), and its number of blocks
# is the length of model_spec.model.layers, so the module below cuts that list.

TITAN_MODULE = '''\
"""torchtitan configs written by sweeps/bench/bench_gpu.py: Llama 3 8B dims cut to {layers} blocks, seq {seq_len},
local batch {batch}, {steps} steps, the embedded corpus of pretrain through torchtitan's c4_test loader."""

from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.quantization import Float8LinearConverter
from torchtitan.config import CompileConfig
from torchtitan.distributed.activation_checkpoint import SelectiveAC
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
from torchtitan.models.llama3 import model_registry
from torchtitan.models.llama3.config_registry import llama3_8b
from torchtitan.tools.profiler import Profiler


def _config(compile_model, float8_recipe=None, selective_ac=False):
    converters = None
    if float8_recipe:  # the output projection stays in bf16, as pretrain's float8.filter_fqns keeps `output`
        converters = [Float8LinearConverter.Config(
            recipe_name=float8_recipe, filter_fqns=["lm_head"], model_compile_enabled=compile_model)]
    config = llama3_8b()
    spec = model_registry("8B", converters=converters)
    spec.model.layers = spec.model.layers[:{layers}]  # n_layers (and FLOPs/token) follow len(layers)
    config.model_spec = spec
    config.hf_assets_path = {tokenizer_dir!r}
    config.dump_folder = {dump_folder!r}
    config.dataloader = HuggingFaceTextDataLoader.Config(dataset="c4_test", dataset_path={corpus_dir!r})
    config.training.local_batch_size = {batch}
    config.training.seq_len = {seq_len}
    config.training.steps = {steps}
    config.training.disable_cuda_graphs = {disable_cuda_graphs}
    config.metrics = MetricsProcessor.Config(log_freq={log_freq}, disable_color_printing=True)
    config.profiler = Profiler.Config()
    config.checkpoint.enable = False
    config.validator.enable = False
    config.compile = CompileConfig(enable=compile_model, components=["model", "loss"])
    config.activation_checkpoint = SelectiveAC.Config() if selective_ac else None
    return config
'''

TITAN_LINE = re.compile(
    r"step:\s*(?P<step>\d+)\s+loss:\s*(?P<loss>\S+)\s+grad_norm:\s*\S+\s+memory:\s*(?P<mem>[\d.]+)GiB\([\d.]+%\)\s+"
    r"tps:\s*(?P<tps>[\d,]+)\s+tflops:\s*(?P<tflops>[\d,.]+)\s+mfu:\s*(?P<mfu>\S+)"
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def titan_function(point: Point) -> str:
    return f"pt_{point.key}"


def titan_unsupported(point: Point) -> str:
    if point.float8 and point.float8 not in TITAN_FLOAT8_RECIPES:
        return (f"not in torchtitan 0.3.0: its Float8LinearConverter offers {' and '.join(TITAN_FLOAT8_RECIPES)} only "
                f"(no {point.float8})")
    return ""


def titan_module_source(points: list[Point], args, assets: dict[str, str]) -> str:
    source = TITAN_MODULE.format(
        layers=args.layers, seq_len=args.seq_len, batch=args.batch, steps=args.steps, log_freq=args.warmup,
        disable_cuda_graphs=not args.titan_cuda_graphs, **assets,
    )
    for p in points:
        if not titan_unsupported(p):
            recipe = repr(p.float8) if p.float8 else "None"
            source += (f"\n\ndef {titan_function(p)}():  # {p.label}\n"
                       f"    return _config({p.compile}, {recipe}, {p.selective_ac})\n")
    return source


def titan_notes(args) -> list[str]:
    return [
        "torchtitan 0.3.0 has no TOML job files: each point is a function of a module written for this run "
        "(`--module <it> --config <function>`); the layer count is set by cutting the 8B model's list of block "
        "configs, the only way 0.3.0 offers (n_layers is not a field; it is len(model.layers)).",
        "data: torchtitan's c4_test is not in the 0.3.0 wheel (tests/assets is not packaged), so its c4_test loader "
        "reads the embedded corpus of pretrain from a JSON-lines file, as documents of ~400k characters: torchtitan "
        "attends within documents only (block-causal), so long documents keep its attention work that of pretrain's "
        "causal attention over the whole sequence; tokenizer: a 2048-token byte-level BPE trained on the same corpus.",
        "what differs by design in 0.3.0's Llama 3: flex attention (pretrain: SDPA), fused QKV projection, chunked "
        "cross-entropy; its selective AC keeps the outputs of all compute-intensive ops (every matmul), pretrain's "
        "per-op policy every other matmul. MFU is N/A in its log with float8, so MFU here is its TFLOP/s over the "
        "same bf16 peak pretrain uses; memory is its peak reserved (it has no active-memory column in its log).",
        "CUDA graphs: " + ("on (torchtitan 0.3.0's default)" if args.titan_cuda_graphs else
                           "off (training.disable_cuda_graphs=true), as pretrain has none; --titan-cuda-graphs turns "
                           "them on (0.3.0's default)"),
        "float8 tensorwise: " + titan_unsupported(POINTS[2]),
    ]


def titan_available() -> tuple[bool, str]:
    if importlib.util.find_spec("torchtitan") is None:
        return False, "torchtitan is not installed (sweeps/bench/gpu_wheels.sh carries 0.3.0 and its deps)"
    proc = subprocess.run([sys.executable, "-c", "import torchtitan, torchtitan.train; print(torchtitan.__version__)"],
                          capture_output=True, text=True)
    if proc.returncode:
        return False, f"`import torchtitan.train` fails: {error_summary(proc.stderr, 1)}"
    version = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "?"
    if version != "0.3.0":
        return True, f"torchtitan {version} is installed; the config module is written for 0.3.0"
    return True, ""


def write_titan_assets(folder: str) -> dict[str, str]:
    """The embedded corpus as a c4-like JSON-lines dataset, and a tokenizer.json trained on it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pretrain.config import DataConfig
    from pretrain.data.embedded import embedded_documents

    documents = embedded_documents(DataConfig().cache_dir)
    text = "\n\n".join(documents)
    chunk = 400_000  # characters per document: ~16 windows of 8192 tokens
    corpus_dir = os.path.join(folder, "corpus")
    os.makedirs(corpus_dir, exist_ok=True)
    with open(os.path.join(corpus_dir, "train.jsonl"), "w") as f:
        for start in range(0, len(text), chunk):
            f.write(json.dumps({"text": text[start : start + chunk]}) + "\n")

    tokenizer_dir = os.path.join(folder, "tokenizer")
    os.makedirs(tokenizer_dir, exist_ok=True)
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=[bos, eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(documents, trainer)
    tokenizer.save(os.path.join(tokenizer_dir, "tokenizer.json"))
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": bos, "eos_token": eos, "add_bos_token": False, "add_eos_token": False}, f)
    return {"corpus_dir": corpus_dir, "tokenizer_dir": tokenizer_dir, "dump_folder": os.path.join(folder, "outputs")}


def titan_command(point: Point, module: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",  # = torchrun
            "-m", "torchtitan.train", "--module", module, "--config", titan_function(point)]


def titan_steady(rows: list[dict], warmup: int, peak_tflops: float) -> dict:
    """Throughput over the logged windows after step `warmup` (each window: the steps since the previous line)."""
    windows = [(prev["step"], row) for prev, row in zip([{"step": 0}, *rows], rows) if prev["step"] >= warmup]
    if not windows:
        raise ValueError(f"no logged window after step {warmup}; logged steps: {[r['step'] for r in rows]}")
    steps = sum(row["step"] - start for start, row in windows)
    tps = steps / sum((row["step"] - start) / row["tps"] for start, row in windows)
    tflops_per_tps = windows[-1][1]["tflops"] / windows[-1][1]["tps"]
    return {"tokens_per_s": tps, "mfu": 100.0 * tps * tflops_per_tps / peak_tflops,
            "memory_gib": max(r["mem"] for r in rows), "loss": rows[-1]["loss"]}


def run_titan(points: list[Point], args, workdir: str) -> dict[str, dict]:
    folder = os.path.join(workdir, "torchtitan")
    os.makedirs(folder, exist_ok=True)
    module = "pretrain_bench_titan"
    if args.dry:
        assets = {"corpus_dir": f"{folder}/corpus", "tokenizer_dir": f"{folder}/tokenizer",
                  "dump_folder": f"{folder}/outputs"}
    else:
        assets = write_titan_assets(folder)
    with open(os.path.join(folder, f"{module}.py"), "w") as f:
        f.write(titan_module_source(points, args, assets))
    env = repo_env({"PYTHONPATH": os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH", "")) if p),
                    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})  # local files only: never the hub
    if args.dry:
        print(f"\n# torchtitan: {folder}/{module}.py\n")
        print(titan_module_source(points, args, assets))
        for p in points:
            if titan_unsupported(p):
                print(f"# {p.label}: {titan_unsupported(p)}")
            else:
                command = " ".join(shlex.quote(c) for c in titan_command(p, module))
                print(f"cd {folder} && PYTHONPATH={folder}:$PYTHONPATH {command}")
        print("\nnotes:\n" + "\n".join(f"- {n}" for n in titan_notes(args)))
        return {}
    import torch

    from pretrain.components.peak_flops import peak_flops_for_name

    peak, peak_source = peak_flops_for_name(torch.cuda.get_device_name(), torch.bfloat16)
    args.titan_peak = f"{peak / 1e12:.1f} TFLOP/s ({peak_source})"
    results = {}
    for p in points:
        reason = titan_unsupported(p)
        if reason:
            results[p.key] = {"error": reason}
            continue
        start = time.perf_counter()
        try:
            proc = subprocess.run(titan_command(p, module), cwd=folder, env=env, capture_output=True, text=True,
                                  timeout=args.timeout)
            log = ANSI.sub("", proc.stdout + "\n" + proc.stderr)
            code = proc.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout or b""
            log = ANSI.sub("", out.decode(errors="replace") if isinstance(out, bytes) else out)
            code = 124
        with open(os.path.join(folder, f"{titan_function(p)}.log"), "w") as f:
            f.write(log)
        rows = [{"step": int(m["step"]), "loss": float(m["loss"]), "mem": float(m["mem"]),
                 "tps": float(m["tps"].replace(",", "")), "tflops": float(m["tflops"].replace(",", ""))}
                for m in TITAN_LINE.finditer(log)]
        try:
            results[p.key] = titan_steady(rows, args.warmup, peak / 1e12)
            if code:
                results[p.key]["error"] = f"exit code {code} after its last log line"
        except ValueError as e:
            results[p.key] = {"error": f"exit code {code}: {error_summary(log)}" if code else str(e)}
        results[p.key]["wall_s"] = time.perf_counter() - start
        r = results[p.key]
        print(f"  torchtitan {p.label}: " + (f"{r['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in r else r["error"]),
              file=sys.stderr, flush=True)
    if args.keep:
        print(f"\ntorchtitan logs: {folder}/pt_*.log")
    return results


def print_side_by_side(points: list[Point], ours: dict[str, dict], titan: dict[str, dict], args) -> None:
    print(f"\n## pretrain vs torchtitan 0.3.0 (same points)\n\nMFU of both against {args.titan_peak}\n")
    print("| point | pretrain tok/s | torchtitan tok/s | pretrain / torchtitan | pretrain MFU % | torchtitan MFU % "
          "| pretrain peak reserved GiB | torchtitan peak reserved GiB | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for p in points:
        a, b = ours.get(p.key, {}), titan.get(p.key, {})
        notes = [f"{side}: {r['error']}" for side, r in (("pretrain", a), ("torchtitan", b)) if "error" in r]

        def num(r, key, fmt):
            return format(r[key], fmt) if key in r else ""

        ratio = f"{a['tokens_per_s'] / b['tokens_per_s']:.3f}" if "tokens_per_s" in a and "tokens_per_s" in b else ""
        print(f"| {p.label} | {num(a, 'tokens_per_s', ',.0f')} | {num(b, 'tokens_per_s', ',.0f')} | {ratio} | "
              f"{num(a, 'mfu', '.1f')} | {num(b, 'mfu', '.1f')} | {num(a, 'memory_gib', '.2f')} | "
              f"{num(b, 'memory_gib', '.2f')} | {'; '.join(notes)} |")
    print("\nnotes:\n" + "\n".join(f"- {n}" for n in titan_notes(args)))
    sys.stdout.flush()
