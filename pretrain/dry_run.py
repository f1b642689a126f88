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
from pretrain.config import JobConfig
from pretrain.config.features import selective_every_n
from pretrain.config.model import ffn_hidden_dim
from pretrain.distributed.fsdp import param_dtype
from pretrain.distributed.parallel_dims import ParallelDims
from pretrain.distributed.parallelize import parallelize_decoder
from pretrain.distributed.pipeline import split_for_rank
from pretrain.models import get_model_spec

GIB = 1024**3


@dataclass
class RankMemory:
    params: int  # bytes of this rank's parameter shards (fp32 master weights)
    grads: int  # bytes of this rank's gradient shards
    optimizer: int  # bytes of AdamW state (exp_avg, exp_avg_sq)
    gathered_block: int  # bytes of the largest block's parameters all-gathered in the compute dtype (x2: prefetch)
    activations: int  # estimated bytes of saved activations at the peak (see estimate_activations)
    n_params_local: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.gathered_block + self.activations


def local_numel(p: torch.Tensor) -> int:
    """Elements this rank stores: the local shard of a DTensor, else the whole tensor."""
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def _saved_per_token(job: JobConfig, dims: ParallelDims) -> tuple[float, float, float]:
    """Bytes in 16-bit that one layer keeps per token of the rank's tokens: (without AC, with the block
    wrapped for full recompute, under the per-op selective policy). D below is dim / tp (sequence parallel
    shards what sits between the TP regions, heads and FFN units shard what is inside)."""
    m, tp = job.model, dims.tp
    d = m.dim / tp
    none = 34 * d  # Korthikanti et al. 2022, table 2, without the T x T scores (fused attention)
    full = 2 * d  # the block input only
    # the per-op policy (pretrain.distributed.activation_checkpoint) keeps the block input, the attention
    # output, and the 1st, 3rd, 5th and 7th matmul of the Llama block: wq (D), wv (D x K/H), w1 (F), w2
    # (D; its rowwise output is a full-size partial sum under TP), plus with TP the two reduce-scatter
    # outputs (attention and FFN, D each). Llama 3 8B, tp=1: (4 + 0.25) D + 3.5 D = 7.75 D elements,
    # i.e. 15.5 D bytes in 16-bit, about 0.46 of the 34 D without AC.
    kv_ratio = (m.n_kv_heads or m.n_heads) / m.n_heads
    elements = (3 + kv_ratio) * d + ffn_hidden_dim(m) / tp + m.dim + (2 * d if tp > 1 else 0)
    return none, full, 2 * elements


def estimate_activations(job: JobConfig, dims: ParallelDims, layers_on_rank: int, compute_bytes: int) -> int:
    """Saved activations per transformer layer without recomputation, with a fused attention kernel
    (no T x T matrix): about 34 x B x T x D bytes in 16-bit (Korthikanti et al. 2022, table 2, with
    sequence parallel dividing every term by tp), scaled to the compute dtype; T is split by cp.
    Pipelining keeps up to `pp` micro-batches in flight on the first stage (1F1B), and the last stage
    holds fp32 logits of B x T x V / tp.

    Activation checkpointing changes what each layer keeps (see _saved_per_token):
      full           the block input (2 D per token in 16-bit) per layer and micro-batch in flight, plus one
                     block's full activations while it is recomputed in backward
      selective op   the per-op policy's outputs, (2 x (3 + K/H) D + 2 F + 2 dim) per token (about 0.46 of
                     no AC for Llama 3 8B), plus the recompute of one block's remaining activations
      selective N    layers_on_rank // N blocks as in full (the wrapped blocks are every N-th layer id, so a
                     stage holds this many or one more: the estimate errs high), the others as no AC
      memory_budget  the compiler's target: budget x (no AC) + (1 - budget) x (full) per layer; the
                     partitioner only approximates it"""
    m, t, ac = job.model, job.training, job.activation_checkpoint
    micro = job.parallelism.pipeline_parallel_microbatch_size if dims.pp_enabled else t.local_batch_size
    tokens = micro * t.seq_len // dims.cp
    in_flight = min(dims.pp, t.local_batch_size // micro) if dims.pp_enabled else 1
    logits = tokens * m.vocab_size // dims.tp * 4
    none, full, selective_op = _saved_per_token(job, dims)
    every_n = 1 if ac.mode == "full" else selective_every_n(ac.selective_ac_option) if ac.mode == "selective" else 0
    recompute_peak = 0.0  # activations of the one block being recomputed in backward
    if every_n:
        n_wrapped = layers_on_rank // every_n
        kept = n_wrapped * full + (layers_on_rank - n_wrapped) * none
        recompute_peak = none - full if n_wrapped else 0.0
    elif ac.mode == "selective":
        kept = layers_on_rank * selective_op
        recompute_peak = max(none - selective_op, 0.0)
    elif ac.mode == "memory_budget":
        kept = layers_on_rank * (ac.memory_budget * none + (1 - ac.memory_budget) * full)
        recompute_peak = (1 - ac.memory_budget) * (none - full)
    else:
        kept = layers_on_rank * none
    per_token_16bit = kept * in_flight + recompute_peak
    return int(per_token_16bit * tokens * compute_bytes / 2) + logits


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
        ("total", mem.total),
    ]
    print(f"dry run: {job.model.name}/{job.model.flavor} ({n_params / 1e9:.1f} B params, {flops:.3g} FLOPs/token)")
    print(f"  world {world} = {dims} on a fake process group; rank 0 holds {mem.n_params_local:,} parameters")
    t = job.training
    print(f"  batch: local {t.local_batch_size} x seq {t.seq_len}, global {t.global_batch_size}")
    print("  per-rank memory (rank 0):")
    for label, value in rows:
        print(f"    {label:<30} {value / GIB:9.2f} GiB")
    if job.model.moe.n_routed_experts or job.model.mla.kv_lora_rank:
        print("  (the activation estimate uses the dense Llama block's formula; MoE and MLA layers differ)")
    print(f"  built and checked in {time.perf_counter() - start:.1f}s")


def build_parts(spec, model: nn.Module, dims: ParallelDims, job: JobConfig) -> list[nn.Module]:
    """The model parts rank 0 would hold, parallelized as in training."""
    if dims.pp_enabled:
        parts = split_for_rank(model, dims, job, pp_rank=0)
        return [parallelize_decoder(part, dims, job, spec.tp_plan_block) for part in parts]
    return [parallelize_decoder(model, dims, job, spec.tp_plan_block)]
