"""What a rank's saved activations take, estimated from the config alone (no model is built): the dry run
prints it, and a run refuses up front a batch whose activations cannot fit the device."""

from __future__ import annotations

import os

import torch

from pretrain.config import JobConfig
from pretrain.config.features import selective_every_n
from pretrain.config.held_out import validation_shape
from pretrain.config.model import ffn_hidden_dim
from pretrain.distributed.fsdp import param_dtype
from pretrain.distributed.parallel_dims import ParallelDims
from pretrain.errors import ConfigError

GIB = 1024**3


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


def estimate_validation_activations(job: JobConfig, dims: ParallelDims, compute_bytes: int) -> int:
    """A validation batch's peak, forward only under no_grad: nothing is saved for backward, so one layer's
    working set (the 34 D per token of no AC, freed as the next layer starts) plus the fp32 logits of the
    batch (B x T x V / tp; under PP, of one micro-batch on the last stage)."""
    m = job.model
    batch, seq_len = validation_shape(job)
    micro = job.parallelism.pipeline_parallel_microbatch_size if dims.pp_enabled else batch
    tokens = micro * seq_len // dims.cp
    none, _, _ = _saved_per_token(job, dims)
    return int(none * tokens * compute_bytes / 2) + tokens * m.vocab_size // dims.tp * 4


def check_activations_fit(job: JobConfig, dims: ParallelDims, device: torch.device) -> None:
    """Refuse, before any data is read, a batch whose saved activations alone exceed this rank's memory (the
    whole device on CUDA, the machine's RAM shared by its local ranks on CPU). Parameters, gradients and
    optimizer state come on top: `dry_run=true` prints the whole estimate."""
    compute_bytes = torch.finfo(param_dtype(job.training, device)).bits // 8
    layers = -(-job.model.n_layers // dims.pp)
    need = estimate_activations(job, dims, layers, compute_bytes)
    if device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, f"{device} memory"
    else:
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // ranks_here
        where = "RAM" + (f" (the machine's, shared by {ranks_here} local ranks)" if ranks_here > 1 else "")
    if need > have:
        t = job.training
        raise ConfigError(
            f"training.seq_len={t.seq_len} x training.local_batch_size={t.local_batch_size} needs about "
            f"{need / GIB:,.1f} GiB of saved activations on each rank (activation_checkpoint.mode="
            f"{job.activation_checkpoint.mode}), more than its {have / GIB:,.1f} GiB of {where}. Fix: lower "
            "training.seq_len or training.local_batch_size (training.global_batch_size keeps the batch through "
            "accumulation), or set activation_checkpoint.mode=full; `dry_run=true` prints the whole estimate."
        )
    held_out = estimate_validation_activations(job, dims, compute_bytes) if job.validation.enable else 0
    if held_out > have:
        batch, seq_len = validation_shape(job)
        raise ConfigError(
            f"A validation batch of {batch} x {seq_len} tokens per rank needs about {held_out / GIB:,.1f} GiB in its "
            f"forward pass (mostly fp32 logits), more than the {have / GIB:,.1f} GiB of {where}. Fix: lower "
            "validation.local_batch_size or validation.seq_len."
        )
