"""Shared test helpers: compose configs in-process, run launch.py as a user would, run a function on
several gloo ranks, read metrics, compare our logits with transformers'."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# A model small enough that several processes on 2 cores finish 10 steps in seconds.
TINY = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=512",
    "model.multiple_of=32",
    "training.seq_len=32",
    "training.local_batch_size=4",
    "training.steps=10",
    "training.deterministic=true",
    "lr_scheduler.warmup_steps=2",
    "optimizer.lr=3e-3",
    "metrics.log_freq=1",
    "metrics.enable_aim=false",
    "validation.enable=false",  # tests/test_validation.py runs it; the other runs keep their time
]


# Our model against transformers' in fp32 (each test file says what it measured): logits within this
# fraction of their largest magnitude, and launched runs' losses within this relative difference.
LOGIT_TOL = 1e-5
LOSS_RTOL = 1e-5


def compose(overrides: list[str]):
    """The composed DictConfig for these overrides, as launch.py would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pretrain.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def compose_full(overrides: list[str], config_name: str = "config", config_dir: Path | None = None):
    """The composed config with its `hydra` node, as `launch.py [-cd DIR] [-cn NAME]` would see it: a config
    outside conf/ (a sweep definition of sweeps/) finds conf/ on the search path, as launch.py's does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pretrain.config import register_configs

    register_configs()
    config_dir = config_dir or (CONF if config_name == "config" else REPO / "sweeps")
    search = [] if Path(config_dir).resolve() == CONF else [f"hydra.searchpath=[file://{CONF}]"]
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        return hydra_compose(config_name, overrides=[*search, *overrides], return_hydra_config=True)


def resolve_full(cfg):
    """resolve() of a config composed with its `hydra` node."""
    from omegaconf import open_dict

    from pretrain.config import resolve

    cfg = cfg.copy()
    with open_dict(cfg):
        del cfg["hydra"]
    return resolve(cfg)


# The test being set up or run, and whether it is marked slow (kept current by conftest.py; None outside
# pytest). Starting processes costs seconds on 2 cores, so only tests marked slow may do it.
running_test: tuple[str, bool] | None = None


def require_slow_mark(what: str) -> None:
    if running_test is not None and not running_test[1]:
        raise AssertionError(f"{running_test[0]} {what} but is not marked slow: add @pytest.mark.slow to it")


def run_launch(
    args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python launch.py ARGS` in `cwd`, with output captured."""
    require_slow_mark("runs launch.py")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def run_on_ranks(fn: Callable, world_size: int, *args, timeout: float = 600) -> list:
    """`fn(rank, world_size, *args)` on `world_size` spawned processes that share one gloo process group
    (a FileStore in a temporary directory); returns what fn returned, by rank. A rank that raises fails
    the call with its traceback, and the other ranks are stopped. fn must be defined at module level and
    args picklable (spawn sends them to fresh interpreters)."""
    import torch.multiprocessing as mp

    require_slow_mark("starts processes")
    with tempfile.TemporaryDirectory(prefix="gloo_ranks_") as tmp:
        ranks = mp.start_processes(_rank_main, args=(fn, world_size, tmp, args), nprocs=world_size, join=False)
        deadline = time.monotonic() + timeout
        while not ranks.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for process in ranks.processes:
                    process.kill()
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks took more than {timeout} s")
        results = []
        for rank in range(world_size):
            with open(os.path.join(tmp, f"result_{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results


def _rank_main(rank: int, fn: Callable, world_size: int, tmp: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share the machine's cores
    store = dist.FileStore(os.path.join(tmp, "store"), world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(tmp, f"result_{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


def val_losses(run_dir: Path) -> dict[int, float]:
    """step -> held-out loss of the steps that validated, the latest line winning."""
    return {m["step"]: m["val_loss"] for m in read_metrics(run_dir) if "val_loss" in m}


def with_validation(args: list[str], windows: int = 16, freq: int = 5) -> list[str]:
    """`args` plus a validation every `freq` steps (and at the last) over the first `windows` held-out windows.
    A validation batch is the local batch on each data-parallel rank, as in training; the number of batches is
    chosen so that every layout covers the same windows, so their held-out losses compare."""
    from pretrain.config import resolve
    from pretrain.config.degrees import Degrees

    job = resolve(compose(args))
    dp = Degrees.from_config(job.parallelism, job.world_size).dp
    batch = (job.validation.local_batch_size or job.training.local_batch_size) * dp
    assert windows % batch == 0, (windows, batch)
    return [*args, "validation.enable=true", f"validation.freq={freq}", f"validation.steps={windows // batch}"]


def aim_metric(repo_dir: str, run_hash: str, name: str) -> tuple[list[int], list[float]]:
    """Read one metric back through Aim's own read-only API."""
    import aim
    from aim.storage.context import Context

    run = aim.Run(run_hash, repo=repo_dir, read_only=True)
    metric = run.get_metric(name, Context({}))
    assert metric is not None, f"Aim run {run_hash} has no metric {name!r}"
    steps, (values, *_) = metric.data.items_list()
    return list(steps), list(values)


def logits(model, tokens):
    """Logits of our model or of a transformers one (no gradients)."""
    import torch

    with torch.no_grad():
        out = model(tokens)
    return getattr(out, "logits", out)


def relative_error(ours, theirs) -> float:
    """The largest |difference| as a fraction of the largest |logit| of ours."""
    return ((ours - theirs).abs().max() / ours.abs().max()).item()


def assert_logits_close(ours, theirs) -> float:
    scale = ours.abs().max().item()
    diff = (ours - theirs).abs().max().item()
    assert diff <= LOGIT_TOL * scale, f"max |diff| {diff:.3g} > {LOGIT_TOL} x max |logit| {scale:.3g}"
    return diff / scale


def spread_weights(model, seed: int, biases: bool = False) -> None:
    """Norm weights away from their init of ones (1 + 0.5 N(0, 1)), and with `biases` the biases and sinks away from
    zero (0.5 N(0, 1)): ones and zeros would hide a wrong element order in a comparison."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
            elif biases and name.endswith(("bias", "sinks", "b1", "b2", "b3")):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))


def logits_and_grads(spec, job, world_size: int, parallel: bool, biases: bool = False, after_parallelize=None):
    """(model, logits) of job's model seeded and spread (`spread_weights`), sharded by job's layout when
    `parallel` (then `after_parallelize(model)`), after the backward of (logits x a fixed probe) on fixed tokens:
    the same on every rank, so a layout's logits and gradients compare with the unsharded model's."""
    import torch

    from pretrain.distributed.parallel_dims import ParallelDims
    from pretrain.distributed.parallelize import parallelize_decoder

    cfg, T = job.model, job.training.seq_len
    tokens = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    probe = torch.randn(2, T, cfg.vocab_size, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = spec.build_model(cfg, T)
    model.init_weights()
    spread_weights(model, 0, biases)
    if parallel:
        dims = ParallelDims.from_config(job.parallelism, world_size)
        dims.build_mesh("cpu")
        parallelize_decoder(model, dims, job, spec.tp_plan_block)
        if after_parallelize:
            after_parallelize(model)
    out = model(tokens)
    (out * probe).sum().backward()
    return model, out
