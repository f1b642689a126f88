"""Rules for the throughput features (compile, activation checkpointing, float8, async TP,
profiling), checked before launch. Hardware rules that need the device itself (float8 tensor
cores, CUDA for async TP) are checked again on the rank, before the first step. No torch import."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pretrain.errors import ConfigError, check_choice, check_positive

if TYPE_CHECKING:
    from pretrain.config.degrees import Degrees
    from pretrain.config.schema import JobConfig

AC_MODES = ("none", "full", "selective", "memory_budget")
FLOAT8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
COMPILE_COMPONENTS = ("model", "loss")


def compiles_model(job: JobConfig) -> bool:
    return job.compile.enable and "model" in job.compile.components


def selective_every_n(option: str) -> int:
    """The N of `selective_ac_option=N` (checkpoint every N-th block); 0 for the per-op policy."""
    if str(option) == "op":
        return 0
    try:
        n = int(option)
    except ValueError:
        n = 0
    if n <= 0:
        raise ConfigError(
            f"activation_checkpoint.selective_ac_option={option!r} is neither 'op' nor a positive integer. "
            "Fix: selective_ac_option=op (per-op policy) or e.g. selective_ac_option=2 (every 2nd block)."
        )
    return n


def check_features(job: JobConfig, dims: Degrees) -> None:
    check_compile(job)
    check_activation_checkpoint(job)
    check_float8(job)
    check_async_tp(job, dims)
    check_profiling(job)


def check_compile(job: JobConfig) -> None:
    c = job.compile
    for item in c.components:
        check_choice("compile.components", item, COMPILE_COMPONENTS)
    check_choice("compile.backend", c.backend, ("inductor", "aot_eager", "eager"))


def check_activation_checkpoint(job: JobConfig) -> None:
    ac = job.activation_checkpoint
    check_choice("activation_checkpoint.mode", ac.mode, AC_MODES)
    if ac.mode == "selective":
        selective_every_n(ac.selective_ac_option)
    if ac.mode == "memory_budget":
        if not 0.0 <= ac.memory_budget <= 1.0:
            raise ConfigError(
                f"activation_checkpoint.memory_budget={ac.memory_budget} must be in [0, 1]. "
                "Fix: e.g. activation_checkpoint.memory_budget=0.5."
            )
        if not compiles_model(job):
            raise ConfigError(
                "activation_checkpoint.mode=memory_budget is decided by the compiler's partitioner, but the model "
                "is not compiled. Fix: add compile.enable=true (with 'model' in compile.components), or use "
                "activation_checkpoint.mode=selective or full."
            )


def check_float8(job: JobConfig) -> None:
    f = job.float8
    check_choice("float8.recipe_name", f.recipe_name, FLOAT8_RECIPES)
    if not f.enable:
        return
    if f.enable_fsdp_float8_all_gather and f.recipe_name != "tensorwise":
        raise ConfigError(
            f"float8.enable_fsdp_float8_all_gather=true works with the tensorwise recipe only, not "
            f"float8.recipe_name={f.recipe_name}. Fix: float8=tensorwise, or "
            "float8.enable_fsdp_float8_all_gather=false."
        )
    if f.precompute_float8_dynamic_scale_for_fsdp and not f.enable_fsdp_float8_all_gather:
        raise ConfigError(
            "float8.precompute_float8_dynamic_scale_for_fsdp=true only applies with "
            "float8.enable_fsdp_float8_all_gather=true. Fix: enable both, or set the first to false."
        )
    tp = job.parallelism.tensor_parallel_degree
    if f.recipe_name == "tensorwise" and tp > 1 and job.cluster.device == "cpu":
        # checked again on the rank (pretrain.components.float8.float8_tp_styles) for cluster.device=auto
        raise ConfigError(
            f"float8.recipe_name=tensorwise with parallelism.tensor_parallel_degree={tp} sends float8 activations "
            "through the tensor-parallel collectives, and gloo (the CPU backend) has no float8 dtypes. "
            "Fix: float8=rowwise (its TP collectives run in the training dtype), tensor_parallel_degree=1, or CUDA."
        )


def check_async_tp(job: JobConfig, dims: Degrees) -> None:
    if not job.parallelism.enable_async_tensor_parallel:
        return
    key = "parallelism.enable_async_tensor_parallel=true"
    if not dims.tp_enabled:
        raise ConfigError(
            f"{key} overlaps tensor-parallel collectives, but parallelism.tensor_parallel_degree=1. "
            "Fix: set tensor_parallel_degree > 1, or enable_async_tensor_parallel=false."
        )
    if not compiles_model(job):
        raise ConfigError(
            f"{key} is done by the compiler (micro-pipelined TP), but the model is not compiled. "
            "Fix: add compile.enable=true, or set enable_async_tensor_parallel=false."
        )
    if job.cluster.device == "cpu":
        raise ConfigError(
            f"{key} needs CUDA (symmetric memory), but cluster.device=cpu. "
            "Fix: run on GPUs, or set enable_async_tensor_parallel=false."
        )


def check_profiling(job: JobConfig) -> None:
    p = job.profiling
    for key in ("profile_freq", "profiler_active"):
        check_positive(f"profiling.{key}", getattr(p, key))
    check_positive("profiling.profiler_warmup", p.profiler_warmup, allow_zero=True)
    if p.enable_profiling and p.profiler_warmup + p.profiler_active > p.profile_freq:
        raise ConfigError(
            f"profiling.profiler_warmup={p.profiler_warmup} + profiling.profiler_active={p.profiler_active} "
            f"exceeds profiling.profile_freq={p.profile_freq}: the windows would overlap. "
            "Fix: raise profile_freq or shorten the windows."
        )
