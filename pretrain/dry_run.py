"""Dry run at full scale: build the real mesh on a fake process group at the recipe's world size,
the model on the meta device, apply every parallelism exactly as a run would, and print what one
rank holds (parameters, gradients, optimizer state) plus an activation estimate. No memory is
allocated and nothing is communicated, so a 512-GPU layout is checked on a laptop in seconds.

    python launch.py experiment=llama3_405b_4d dry_run=true
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pretrain import torch_compat
from pretrain.components.float8 import convert_to_float8
from pretrain.components.memory import estimate_activations, estimate_validation_activations
from pretrain.config import JobConfig
from pretrain.config.flavors import flavor_label
from pretrain.config.held_out import validation_shape
from pretrain.distributed.fsdp import param_dtype
from pretrain.distributed.parallel_dims import ParallelDims
from pretrain.distributed.parallelize import parallelize_decoder
from pretrain.distributed.pipeline import split_for_rank
from pretrain.models import get_model_spec
from pretrain.models.common.flops import inactive_expert_params

GIB = 1024**3


@dataclass
class RankMemory:
    params: int  # bytes of this rank's parameter shards (fp32 master weights)
    grads: int  # bytes of this rank's gradient shards
    optimizer: int  # bytes of AdamW state (exp_avg, exp_avg_sq)
    gathered_block: int  # bytes of the largest block's parameters all-gathered in the compute dtype (x2: prefetch)
    activations: int  # estimated bytes of saved activations at the peak (see estimate_activations)
    n_params_local: int
    validation: int = 0  # a validation batch's forward-only peak (0: no validation); it runs after the step

    @property
    def total(self) -> int:
        """The peak: training's saved activations and gradients are freed before a validation runs."""
        training = self.grads + self.activations
        return self.params + self.optimizer + self.gathered_block + max(training, self.validation)


def local_numel(p: torch.Tensor) -> int:
    """Elements this rank stores: the local shard of a DTensor, else the whole tensor."""
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def gathered_numel(block: nn.Module, dims: ParallelDims) -> int:
    """Elements FSDP all-gathers for one block on this rank: everything split by TP stays split, and under
    EP a MoE layer gathers only its own experts (1 / ep of them)."""
    total = 0
    for name, p in block.named_parameters():
        split = dims.tp * (dims.ep if "moe.experts." in name else 1)
        total += p.numel() // split
    return total


def measure(job: JobConfig, dims: ParallelDims, parts: list[nn.Module], device_type: str) -> RankMemory:
    params = [p for part in parts for p in part.parameters()]
    n_local = sum(local_numel(p) for p in {id(p): p for p in params}.values())
    compute_bytes = torch.finfo(param_dtype(job.training, torch.device(device_type))).bits // 8
    blocks = [b for part in parts for b in part.layers.values()]
    block_numel = max((gathered_numel(b, dims) for b in blocks), default=0)
    stored = 2 if job.training.dtype == "bfloat16" else 4  # bytes per parameter, gradient and Adam moment
    return RankMemory(
        params=n_local * stored,
        grads=n_local * stored,
        optimizer=n_local * 2 * stored,
        gathered_block=2 * block_numel * compute_bytes if dims.fsdp_enabled else 0,
        activations=estimate_activations(job, dims, len(blocks), compute_bytes),
        n_params_local=n_local,
        validation=estimate_validation_activations(job, dims, compute_bytes) if job.validation.enable else 0,
    )


def dry_run(job: JobConfig) -> None:
    start = time.perf_counter()
    world = job.world_size
    device_type = "cuda" if job.cluster.device == "cuda" else "cpu"
    dist.init_process_group("fake", store=torch_compat.fake_store(), rank=0, world_size=world)
    try:
        dims = ParallelDims.from_config(job.parallelism, world)
        dims.build_mesh("cpu")
        spec = get_model_spec(job.model.name)
        with torch.device("meta"):
            model = spec.build_model(job.model, job.training.seq_len)
        n_params, flops = spec.params_and_flops(model, job.model, job.training.seq_len)
        n_active = n_params - inactive_expert_params(model)  # a MoE layer's tokens use top-k of its experts
        convert_to_float8(model, job.float8, device_type)
        parts = build_parts(spec, model, dims, job)
        mem = measure(job, dims, parts, device_type)
    finally:
        dist.destroy_process_group()
    rows = [
        (f"parameters ({'bf16' if job.training.dtype == 'bfloat16' else 'fp32'} shards)", mem.params),
        ("gradients", mem.grads),
        ("optimizer state (AdamW)", mem.optimizer),
        ("all-gathered block x2 (FSDP)", mem.gathered_block),
        ("activations (estimate)", mem.activations),
        *([("validation batch (forward only)", mem.validation)] if job.validation.enable else []),
        ("total", mem.total),
    ]
    model = f"{job.model.name}/{flavor_label(job.model)}"
    active = f", {n_active / 1e9:.1f} B active per token" if n_active < n_params else ""
    print(f"dry run: {model} ({n_params / 1e9:.1f} B params{active}, {flops:.3g} FLOPs/token)")
    print(f"  world {world} = {dims} on a fake process group; rank 0 holds {mem.n_params_local:,} parameters")
    t = job.training
    print(f"  batch: local {t.local_batch_size} x seq {t.seq_len}, global {t.global_batch_size}")
    if job.validation.enable:
        v, (batch, seq_len) = job.validation, validation_shape(job)
        batches = "every full batch of the held-out set" if v.steps == -1 else f"{v.steps} batches"
        print(f"  validation: every {v.freq} steps, {batches} of local {batch} x seq {seq_len}, global "
              f"{batch * dims.dp}; after the step, so the total counts the larger of it and training's activations "
              "and gradients")
    print("  per-rank memory (rank 0):")
    for label, value in rows:
        print(f"    {label:<30} {value / GIB:9.2f} GiB")
    if job.parallelism.enable_async_tensor_parallel:
        print("  async TP: checked (TP > 1, compiled); enabled on the GPUs at run time (symmetric memory, CUDA only)")
    if job.model.moe.n_routed_experts or job.model.mla.kv_lora_rank:
        print("  (the activation estimate uses the dense Llama block's formula; MoE and MLA layers differ)")
    print(f"  built and checked in {time.perf_counter() - start:.1f}s")


def build_parts(spec, model: nn.Module, dims: ParallelDims, job: JobConfig) -> list[nn.Module]:
    """The model parts rank 0 would hold, parallelized as in training."""
    if dims.pp_enabled:
        parts = split_for_rank(model, dims, job, pp_rank=0)
        return [parallelize_decoder(part, dims, job, spec.tp_plan_block) for part in parts]
    return [parallelize_decoder(model, dims, job, spec.tp_plan_block)]
