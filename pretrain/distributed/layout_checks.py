"""Rules that tie the parallel layout to the model and the batch, checked before launch.
Each failure names the keys and values and says how to fix it. No torch import."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pretrain.config import ConfigError

if TYPE_CHECKING:
    from pretrain.config import JobConfig
    from pretrain.distributed.parallel_dims import ParallelDims

PP_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble")
# schedules that run several stages per rank
MULTI_STAGE_SCHEDULES = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble")


def check_layout(job: "JobConfig", dims: "ParallelDims") -> None:
    m, t, p = job.model, job.training, job.parallelism
    kv = m.n_kv_heads or m.n_heads
    if dims.tp_enabled:
        for key, heads in (("n_heads", m.n_heads), ("n_kv_heads", kv)):
            if heads % dims.tp:
                raise ConfigError(
                    f"model.{key}={heads} is not divisible by parallelism.tensor_parallel_degree={dims.tp}: "
                    f"each TP rank must hold whole heads. Fix: use a tensor_parallel_degree that divides {heads}."
                )
    if p.enable_async_tensor_parallel:
        raise ConfigError(
            "parallelism.enable_async_tensor_parallel=true needs torch.compile and CUDA, and compile is not "
            "available in this version. Fix: set parallelism.enable_async_tensor_parallel=false."
        )
    # sequence parallel splits T over tp; load-balanced CP splits it into 2 x cp chunks, each over tp
    seq_factor = 2 * dims.cp * dims.tp if dims.cp_enabled else dims.tp
    if t.seq_len % seq_factor:
        what = "2 x context_parallel_degree x tensor_parallel_degree" if dims.cp_enabled else "tensor_parallel_degree"
        raise ConfigError(
            f"training.seq_len={t.seq_len} is not divisible by {what} = {seq_factor} "
            f"(cp={dims.cp}, tp={dims.tp}). Fix: use a seq_len that is a multiple of {seq_factor}."
        )
    _choice = ("allgather", "ring")
    if p.context_parallel_method not in _choice:
        raise ConfigError(
            f"parallelism.context_parallel_method={p.context_parallel_method!r} is not one of {', '.join(_choice)}. "
            "Fix: use allgather or ring."
        )
    if dims.pp_enabled or p.pipeline_parallel_schedule != "1F1B":
        check_pipeline(job, dims)
    if job.checkpoint.create_seed_checkpoint and dims.world_size != 1:
        raise ConfigError(
            f"checkpoint.create_seed_checkpoint=true runs on one process (world size is {dims.world_size}). "
            "Fix: add cluster.nproc_per_node=1 parallelism=single."
        )


def check_pipeline(job: "JobConfig", dims: "ParallelDims") -> None:
    m, t, p = job.model, job.training, job.parallelism
    if p.pipeline_parallel_schedule not in PP_SCHEDULES:
        raise ConfigError(
            f"parallelism.pipeline_parallel_schedule={p.pipeline_parallel_schedule!r} is not one of "
            f"{', '.join(PP_SCHEDULES)}. Fix: pick one of them (1F1B is a good default)."
        )
    if not dims.pp_enabled:
        return
    if p.pipeline_parallel_microbatch_size < 1 or t.local_batch_size % p.pipeline_parallel_microbatch_size:
        raise ConfigError(
            f"training.local_batch_size={t.local_batch_size} is not a multiple of "
            f"parallelism.pipeline_parallel_microbatch_size={p.pipeline_parallel_microbatch_size}. "
            "Fix: make the local batch a multiple of the pipeline micro-batch size."
        )
    if p.module_fqns_per_model_part is not None:
        n_parts = len(p.module_fqns_per_model_part)
    else:
        n_parts = pipeline_stage_count(job, dims)
        usable = m.n_layers + p.pipeline_parallel_first_stage_less_layers + p.pipeline_parallel_last_stage_less_layers
        if usable < n_parts:
            raise ConfigError(
                f"model.n_layers={m.n_layers} cannot fill {n_parts} pipeline stages "
                f"(pipeline_parallel_degree={dims.pp}). Fix: use fewer stages or a model with more layers."
            )
    if n_parts % dims.pp:
        raise ConfigError(
            f"{n_parts} pipeline stages do not divide evenly over pipeline_parallel_degree={dims.pp}. "
            "Fix: use a number of stages (layers per stage / explicit FQN lists) that is a multiple of the degree."
        )
    per_rank = n_parts // dims.pp
    if per_rank == 1 and p.pipeline_parallel_schedule in MULTI_STAGE_SCHEDULES:
        raise ConfigError(
            f"parallelism.pipeline_parallel_schedule={p.pipeline_parallel_schedule} runs several stages per rank, "
            f"but the split gives {n_parts} stages for {dims.pp} ranks. Fix: lower "
            "parallelism.pipeline_parallel_layers_per_stage, or use GPipe / 1F1B."
        )
    if per_rank > 1 and p.pipeline_parallel_schedule not in MULTI_STAGE_SCHEDULES:
        raise ConfigError(
            f"parallelism.pipeline_parallel_schedule={p.pipeline_parallel_schedule} runs one stage per rank, "
            f"but the split gives {per_rank} stages per rank. Fix: use Interleaved1F1B, or one stage per rank."
        )


def pipeline_stage_count(job: "JobConfig", dims: "ParallelDims") -> int:
    """Stages of the whole model: explicit, from layers per stage, or one (two for looped/V schedules) per rank."""
    p, m = job.parallelism, job.model
    if p.module_fqns_per_model_part is not None:
        return len(p.module_fqns_per_model_part)
    if p.pipeline_parallel_layers_per_stage is not None:
        total = m.n_layers + p.pipeline_parallel_first_stage_less_layers + p.pipeline_parallel_last_stage_less_layers
        return -(-total // p.pipeline_parallel_layers_per_stage)
    return dims.pp * (2 if p.pipeline_parallel_schedule in MULTI_STAGE_SCHEDULES else 1)
