"""Rules that tie the parallel layout to the model and the batch, checked before launch.
Each failure names the keys and values and says how to fix it. No torch import."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pretrain.errors import ConfigError

if TYPE_CHECKING:
    from pretrain.config.degrees import Degrees
    from pretrain.config.schema import JobConfig

PP_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble")
# schedules that run several stages per rank
MULTI_STAGE_SCHEDULES = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble")
# schedules that place a rank's two stages in a V (rank r holds stages r and 2 x pp - 1 - r)
V_SCHEDULES = ("ZBVZeroBubble",)


def check_layout(job: JobConfig, dims: Degrees) -> None:
    m, t, p = job.model, job.training, job.parallelism
    kv = m.n_kv_heads or m.n_heads
    if dims.tp_enabled:
        for key, heads in (("n_heads", m.n_heads), ("n_kv_heads", kv)):
            if heads % dims.tp:
                raise ConfigError(
                    f"model.{key}={heads} is not divisible by parallelism.tensor_parallel_degree={dims.tp}: "
                    f"each TP rank must hold whole heads. Fix: use a tensor_parallel_degree that divides {heads}."
                )
    check_experts(job, dims)
    # sequence parallel splits T over tp; load-balanced CP splits it into 2 x cp chunks, each over tp
    seq_factor = 2 * dims.cp * dims.tp if dims.cp_enabled else dims.tp
    if t.seq_len % seq_factor:
        what = "2 x context_parallel_degree x tensor_parallel_degree" if dims.cp_enabled else "tensor_parallel_degree"
        raise ConfigError(
            f"training.seq_len={t.seq_len} is not divisible by {what} = {seq_factor} "
            f"(cp={dims.cp}, tp={dims.tp}). Fix: use a seq_len that is a multiple of {seq_factor}."
        )
    methods = ("allgather", "ring")
    if p.context_parallel_method not in methods:
        raise ConfigError(
            f"parallelism.context_parallel_method={p.context_parallel_method!r} is not one of {', '.join(methods)}. "
            "Fix: use allgather or ring."
        )
    if dims.cp_enabled:
        check_context_parallel_masks(job, dims)
    if dims.pp_enabled or p.pipeline_parallel_schedule != "1F1B":
        check_pipeline(job, dims)


def check_context_parallel_masks(job: JobConfig, dims: Degrees) -> None:
    """CP's kernels (all-gathered K/V with a lower-right causal mask, or the ring's causal blocks) compute plain
    causal attention over the whole sequence: a chunked or sliding window, or attention sinks, would be dropped."""
    m = job.model
    if m.attention_window != "none":
        raise ConfigError(
            f"parallelism.context_parallel_degree={dims.cp} with model.attention_window={m.attention_window} "
            f"({m.name}/{m.flavor}): context parallelism computes plain causal attention over the gathered sequence, "
            "so the window would be ignored. Fix: parallelism.context_parallel_degree=1 (split the batch with "
            "data_parallel_shard_degree, or the heads with tensor_parallel_degree, instead)."
        )


def check_experts(job: JobConfig, dims: Degrees) -> None:
    """Expert parallelism needs experts to split; TP splits each expert's hidden units."""
    e = job.model.moe
    if dims.ep_enabled and not e.n_routed_experts:
        raise ConfigError(
            f"parallelism.expert_parallel_degree={dims.ep} but model {job.model.name}/{job.model.flavor} has no "
            "experts (model.moe.n_routed_experts=0). Fix: parallelism.expert_parallel_degree=1, or a MoE model."
        )
    if dims.ep_enabled and e.n_routed_experts % dims.ep:
        raise ConfigError(
            f"model.moe.n_routed_experts={e.n_routed_experts} is not divisible by parallelism.expert_parallel_degree="
            f"{dims.ep}: each expert rank holds the same number of experts. Fix: an expert_parallel_degree that "
            f"divides {e.n_routed_experts}."
        )
    if dims.tp_enabled and e.n_routed_experts:
        for key, hidden in (
            ("hidden_dim", e.hidden_dim),
            ("n_shared_experts x hidden_dim", e.n_shared_experts * e.hidden_dim),
        ):
            if hidden % dims.tp:
                raise ConfigError(
                    f"model.moe.{key}={hidden} is not divisible by parallelism.tensor_parallel_degree={dims.tp}: TP "
                    "splits each expert's hidden units. Fix: a tensor_parallel_degree that divides it."
                )


def check_pipeline(job: JobConfig, dims: Degrees) -> None:
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
    if m.tie_word_embeddings:
        raise ConfigError(
            "model.tie_word_embeddings=true shares one weight between the first and the last pipeline stage, "
            f"which live on different ranks (pipeline_parallel_degree={dims.pp}). "
            "Fix: set model.tie_word_embeddings=false, or parallelism.pipeline_parallel_degree=1."
        )
    for key in ("pipeline_parallel_first_stage_less_layers", "pipeline_parallel_last_stage_less_layers"):
        if getattr(p, key) < 0:
            raise ConfigError(f"parallelism.{key}={getattr(p, key)} must be >= 0. Fix: use 0 or more (default 1).")
    if p.pipeline_parallel_layers_per_stage is not None and p.pipeline_parallel_layers_per_stage < 1:
        raise ConfigError(
            f"parallelism.pipeline_parallel_layers_per_stage={p.pipeline_parallel_layers_per_stage} must be >= 1. "
            "Fix: set it to a positive number of layers, or null for one stage per rank."
        )
    n_parts = pipeline_stage_count(job, dims)
    if p.module_fqns_per_model_part is None:
        pipeline_layers_per_stage(
            m.n_layers, n_parts, p.pipeline_parallel_first_stage_less_layers, p.pipeline_parallel_last_stage_less_layers
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
    if per_rank != 2 and p.pipeline_parallel_schedule in V_SCHEDULES:
        raise ConfigError(
            f"parallelism.pipeline_parallel_schedule={p.pipeline_parallel_schedule} places exactly two stages per "
            f"rank (a V), but the split gives {per_rank}. Fix: set pipeline_parallel_layers_per_stage to null "
            f"(two stages per rank), or give {2 * dims.pp} explicit FQN lists."
        )
    check_microbatches(p.pipeline_parallel_schedule, t.local_batch_size // p.pipeline_parallel_microbatch_size, dims.pp)


def check_microbatches(schedule: str, n_microbatches: int, pp: int) -> None:
    """The micro-batch counts torch's schedules accept (they raise deep inside the ranks otherwise)."""
    fix = (
        "Fix: raise training.local_batch_size or lower parallelism.pipeline_parallel_microbatch_size "
        "(micro-batches = local_batch_size / pipeline_parallel_microbatch_size)."
    )
    if schedule == "1F1B" and n_microbatches < pp:
        raise ConfigError(
            f"the 1F1B schedule needs at least as many micro-batches as stages: {n_microbatches} micro-batches "
            f"for pipeline_parallel_degree={pp}. {fix}"
        )
    if schedule in ("Interleaved1F1B", "InterleavedZeroBubble"):
        rounds = max(1, n_microbatches // pp)
        if n_microbatches % rounds:
            raise ConfigError(
                f"the {schedule} schedule runs micro-batches in rounds of pipeline_parallel_degree={pp}: "
                f"{n_microbatches} micro-batches is not a multiple of {rounds} rounds. "
                f"Use fewer than {2 * pp} micro-batches or a multiple of {pp}. {fix}"
            )


def pipeline_layers_per_stage(n_layers: int, n_stages: int, first_less: int = 1, last_less: int = 1) -> list[int]:
    """Transformer blocks per stage. The first stage counts as holding `first_less` more blocks (for the
    embedding) and the last `last_less` more (for the norm and output); the total is spread evenly, the
    earlier stages taking the remainder (torchtitan's `generate_llm_fqn_per_model_part`). 1 stage: all."""
    if n_stages == 1:
        return [n_layers]
    total = n_layers + first_less + last_less
    base, extra = divmod(total, n_stages)
    counts = [base + (i < extra) for i in range(n_stages)]
    counts[0] -= first_less
    counts[-1] -= last_less
    if base < 1 or min(counts) < 0:
        raise ConfigError(
            f"model.n_layers={n_layers} cannot be split into {n_stages} pipeline stages with the first stage "
            f"holding {first_less} and the last {last_less} fewer layers (each stage gets about {total / n_stages:.2g} "
            "layer slots). Fix: use fewer stages (pipeline_parallel_degree / pipeline_parallel_layers_per_stage), "
            "lower pipeline_parallel_first_stage_less_layers / last_stage_less_layers, or a model with more layers."
        )
    return counts


def pipeline_stage_count(job: JobConfig, dims: Degrees) -> int:
    """Stages of the whole model: explicit, from layers per stage, or one (two for looped/V schedules) per rank."""
    p, m = job.parallelism, job.model
    if p.module_fqns_per_model_part is not None:
        return len(p.module_fqns_per_model_part)
    if p.pipeline_parallel_layers_per_stage is not None:
        total = m.n_layers + p.pipeline_parallel_first_stage_less_layers + p.pipeline_parallel_last_stage_less_layers
        return -(-total // p.pipeline_parallel_layers_per_stage)
    return dims.pp * (2 if p.pipeline_parallel_schedule in MULTI_STAGE_SCHEDULES else 1)
