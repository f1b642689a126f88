"""Context parallelism (CP): the ranks of the cp mesh split every sequence, and attention still sees it whole.

Load-balanced sharding: a sequence of T tokens is cut into 2 x cp chunks of C = T / (2 x cp) tokens, and
cp rank r keeps chunk r (head) and chunk 2cp-1-r (tail). Under a causal mask a later chunk does more work,
so pairing an early chunk with a late one gives every rank the same amount of attention:

    T = 16, cp = 2, C = 4:   chunks 0 1 2 3   rank 0 holds 0 + 3 (positions 0-3, 12-15)
                                              rank 1 holds 1 + 2 (positions 4-11)

The Trainer shards inputs and labels with `shard_sequence`; everything but attention is per token and
needs nothing more, except RoPE, whose `freqs_cis` rows must be this rank's positions (see
`apply_context_parallel`). Attention gets local q, k, v (B, H, 2C, E) and needs every earlier key,
in one of two ways (parallelism.context_parallel_method):

  allgather  all-gather K and V over cp (their gradients are reduce-scattered back in backward), then
             each local chunk attends to the keys up to its own end (SDPA with a lower-right causal
             mask). Simple and fast for moderate T; the whole sequence's K/V sits on every rank.
  ring       K/V blocks travel round the ring of cp ranks (isend/irecv, the next block in flight while
             this one computes); each step attends to one block and the partial results merge through
             their log-sum-exp. The backward is flash-attention's recurrence with the K/V gradients riding
             round the ring with their blocks. Only two K/V blocks sit on a rank at a time, but each
             block is computed with plain matmuls in fp32, materialising its scores (B x H x 2C x C
             floats): portable and exact, not fused. On CUDA at long context prefer allgather, which
             runs SDPA's fused kernels.

Both are exact up to float rounding (they compute the same softmax, summed in another order) and work
under TP, where attention sees this TP rank's heads. The model hands attention its K/V already repeated
to the query heads (GQA), so both methods move `n_heads / n_kv_heads` times more K/V than needed.
torch's own `context_parallel` (torch.distributed.tensor.experimental) is not used: it has no CPU path
(no sharding rule for the CPU flash kernel), and it shards buffers inside a context manager around
forward and backward, which this Trainer does not need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from pretrain.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from pretrain.config import JobConfig
    from pretrain.distributed.parallel_dims import ParallelDims

METHODS = ("allgather", "ring")
# torch >= 2.13 renames the single-tensor collectives; the old names still work but warn
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ---- sharding --------------------------------------------------------------------------------------


def load_balanced_positions(seq_len: int, cp_degree: int, cp_rank: int, device=None) -> torch.Tensor:
    """Token positions (seq_len / cp,) held by `cp_rank`: chunk cp_rank, then chunk 2cp-1-cp_rank."""
    if seq_len % (2 * cp_degree):
        raise ConfigError(
            f"sequence length {seq_len} cannot be split into 2 x context_parallel_degree = {2 * cp_degree} "
            f"equal chunks. Fix: use a training.seq_len that is a multiple of {2 * cp_degree}."
        )
    chunk = seq_len // (2 * cp_degree)
    head = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    tail_start = (2 * cp_degree - 1 - cp_rank) * chunk
    return torch.cat((head, torch.arange(tail_start, tail_start + chunk, device=device)))


def shard_sequence(cp_mesh: DeviceMesh, *tensors: torch.Tensor, seq_dim: int = 1) -> tuple[torch.Tensor, ...]:
    """This cp rank's head and tail chunks of each tensor along `seq_dim`: (B, T) -> (B, T / cp)."""
    cp_degree, cp_rank = cp_mesh.size(), cp_mesh.get_local_rank()
    out = []
    for t in tensors:
        positions = load_balanced_positions(t.shape[seq_dim], cp_degree, cp_rank, device=t.device)
        out.append(t.index_select(seq_dim, positions))
    return tuple(out)


# ---- allgather -------------------------------------------------------------------------------------


class _AllGather(torch.autograd.Function):
    """x (...) on each rank -> (cp, ...) stacked in rank order; backward: reduce-scatter (sum) of the grad."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))  # gathered along dim 0
        _all_gather_single(out, x, group=group)
        return out.unflatten(0, (-1, x.shape[0]))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # every rank's queries used this rank's K/V: their gradient contributions are summed here
        out = grad.new_empty(grad.shape[1:])
        _reduce_scatter_single(out, grad.flatten(0, 1).contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Causal attention of this rank's load-balanced queries (B, H, 2C, E) against all-gathered K/V."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    C = q.shape[2] // 2
    kv = _AllGather.apply(torch.stack((k, v)), group)  # (cp, 2, B, H, 2C, E): rank j holds chunks j, 2cp-1-j
    kv = kv.unflatten(-2, (2, C))  # (cp, 2, B, H, 2, C, E)
    heads, tails = kv.select(-3, 0), kv.select(-3, 1)  # chunks 0..cp-1 and 2cp-1..cp
    kv = torch.cat((heads, tails.flip(0)))  # (2cp, 2, B, H, C, E) in sequence order
    k_all, v_all = kv.permute(1, 2, 3, 0, 4, 5).flatten(3, 4)  # each (B, H, T, E)
    outs = []
    for chunk, q_chunk in zip((rank, 2 * cp - 1 - rank), q.chunk(2, dim=2)):
        end = (chunk + 1) * C  # this chunk sees keys [0, end); causal inside its own chunk
        mask = causal_lower_right(C, end)
        outs.append(F.scaled_dot_product_attention(q_chunk, k_all[:, :, :end], v_all[:, :, :end], attn_mask=mask))
    return torch.cat(outs, dim=2)


# ---- ring ------------------------------------------------------------------------------------------


class _RingShift:
    """Send a tensor to the next rank of the ring and receive the previous rank's; `wait()` returns it."""

    def __init__(self, tensor: torch.Tensor, group: dist.ProcessGroup, tag: int):
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        self.sent = tensor.contiguous()  # kept alive until the send completes
        if cp == 1:  # a ring of one: the block comes straight back
            self.received, self.requests = self.sent, []
            return
        self.received = torch.empty_like(self.sent)
        nxt, prev = dist.get_global_rank(group, (rank + 1) % cp), dist.get_global_rank(group, (rank - 1) % cp)
        self.requests = dist.batch_isend_irecv(
            [
                dist.P2POp(dist.isend, self.sent, nxt, group, tag),
                dist.P2POp(dist.irecv, self.received, prev, group, tag),
            ]
        )

    def wait(self) -> torch.Tensor:
        for request in self.requests:
            request.wait()
        return self.received


def _ring_block(rank: int, src: int, C: int) -> tuple[slice, slice, bool]:
    """Which local query rows attend to which columns of the K/V block from cp rank `src`, and whether a
    causal mask is needed. Rank j holds chunks j and 2cp-1-j, so for src < rank every query sees the
    block's head chunk only, for src > rank only the tail queries see the block (both chunks), and the
    rank's own block is causal. No query row is ever fully masked."""
    if src == rank:
        return slice(None), slice(None), True
    if src < rank:
        return slice(None), slice(0, C), False
    return slice(C, None), slice(None), False


def _block_scores(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    s = (q @ k.transpose(-1, -2)) * scale  # (B, H, rows, cols)
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


class _RingAttention(torch.autograd.Function):
    """Causal attention of load-balanced local q against K/V passed round the ring (fp32 or wider math).

    Forward keeps a running output and log-sum-exp per query row: after a block with (out_b, lse_b),
    lse' = logaddexp(lse, lse_b), out' = out exp(lse - lse') + out_b exp(lse_b - lse').
    Backward, with the final lse: P = exp(S - lse), dV = P^T dO, dS = P (dO V^T - rowsum(dO * O)),
    dQ = dS K scale, dK = dS^T Q scale; dK/dV accumulate as they travel round the ring with their block,
    and one last hop brings each block's gradient home."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        C, scale = q.shape[2] // 2, q.shape[-1] ** -0.5
        positions = load_balanced_positions(2 * C * cp, cp, rank, device=q.device)
        diagonal_mask = positions[:, None] >= positions[None, :]  # (2C, 2C) for the rank's own block
        acc = torch.promote_types(q.dtype, torch.float32)  # accumulate in fp32 at least
        qf = q.to(acc)
        out = torch.zeros_like(qf)  # (B, H, 2C, E)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)  # (B, H, 2C)
        kv = torch.stack((k, v))  # (2, B, H, 2C, E), the block now held
        for step in range(cp):
            incoming = _RingShift(kv, group, tag=0) if step + 1 < cp else None
            rows, cols, causal = _ring_block(rank, (rank - step) % cp, C)
            s = _block_scores(qf[:, :, rows], kv[0][:, :, cols].to(acc), scale, diagonal_mask if causal else None)
            lse_b = s.logsumexp(-1)
            out_b = (s - lse_b[..., None]).exp() @ kv[1][:, :, cols].to(acc)
            new_lse = torch.logaddexp(lse[:, :, rows], lse_b)
            out[:, :, rows] = (
                out[:, :, rows] * (lse[:, :, rows] - new_lse).exp()[..., None]
                + out_b * (lse_b - new_lse).exp()[..., None]
            )
            lse[:, :, rows] = new_lse
            if incoming is not None:
                kv = incoming.wait()
        ctx.group = group
        ctx.save_for_backward(q, k, v, out, lse, diagonal_mask)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse, diagonal_mask = ctx.saved_tensors
        group = ctx.group
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        C, scale = q.shape[2] // 2, q.shape[-1] ** -0.5
        acc = out.dtype
        qf, dout = q.to(acc), dout.to(acc)
        delta = (dout * out).sum(-1)  # (B, H, 2C): rowsum(dO * O)
        dq = torch.zeros_like(qf)
        kv = torch.stack((k, v))
        grad_home = None  # the gradient of the block held now, arriving from the previous rank
        for step in range(cp):
            incoming = _RingShift(kv, group, tag=0) if step + 1 < cp else None
            rows, cols, causal = _ring_block(rank, (rank - step) % cp, C)
            kb, vb = kv[0][:, :, cols].to(acc), kv[1][:, :, cols].to(acc)
            s = _block_scores(qf[:, :, rows], kb, scale, diagonal_mask if causal else None)
            p = (s - lse[:, :, rows, None]).exp()  # the final softmax's entries for this block
            ds = p * (dout[:, :, rows] @ vb.transpose(-1, -2) - delta[:, :, rows, None])
            dq[:, :, rows] += (ds @ kb) * scale
            dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)  # (2, B, H, 2C, E)
            dkv[0][:, :, cols] = (ds.transpose(-1, -2) @ qf[:, :, rows]) * scale
            dkv[1][:, :, cols] = p.transpose(-1, -2) @ dout[:, :, rows]
            if grad_home is not None:
                dkv += grad_home.wait()
            grad_home = _RingShift(dkv, group, tag=1)  # on with the block; the last hop brings it home
            if incoming is not None:
                kv = incoming.wait()
        dk, dv = grad_home.wait()
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Causal attention of this rank's load-balanced queries (B, H, 2C, E) with K/V passed round the ring."""
    return _RingAttention.apply(q, k, v, group)


# ---- wiring ----------------------------------------------------------------------------------------


class ContextParallelAttention:
    """An `attention_op` for load-balanced CP shards: q, k (B, H, 2C, E) and v (B, H, 2C, Ev <= E) -> (B, H, 2C, Ev)."""

    def __init__(self, method: str, group: dist.ProcessGroup):
        if method not in METHODS:
            raise ConfigError(
                f"parallelism.context_parallel_method={method!r} is not one of {', '.join(METHODS)}. "
                "Fix: use allgather or ring."
            )
        self.method, self.group = method, group
        self.fn = allgather_attention if method == "allgather" else ring_attention

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        width = v.shape[-1]
        if width < k.shape[-1]:  # K and V travel stacked: zero columns widen V (MLA: 128 vs 192) and are cut after
            v = F.pad(v, (0, k.shape[-1] - width))
        return self.fn(q, k, v, self.group)[..., :width]

    def __repr__(self) -> str:
        return f"ContextParallelAttention(method={self.method}, cp={dist.get_world_size(self.group)})"


def narrow_rope_to_positions(model: nn.Module, positions: torch.Tensor) -> None:
    """Keep the rows at this rank's positions of every per-position buffer of the model (`position_buffers`:
    freqs_cis (T, E/2), and e.g. Llama 4's attention temperatures); a no-op for a buffer already narrowed."""
    for name in getattr(model, "position_buffers", ("freqs_cis",)):
        table = getattr(model, name, None)
        if table is not None and table.shape[0] != positions.numel():
            setattr(model, name, table.index_select(0, positions.to(table.device)))


def apply_context_parallel(model: nn.Module, dims: ParallelDims, job: JobConfig) -> None:
    """Swap every `attention_op` for the CP one and give RoPE this rank's positions.

    `init_weights()` recomputes the full `freqs_cis`; it runs before parallelize on CPU and after on
    CUDA (meta init). So the table is narrowed now and again by a forward pre-hook whenever it has been
    recomputed at full length: either order works, and a correct table costs one shape check per step."""
    cp_mesh = dims.mesh("cp")
    op = ContextParallelAttention(job.parallelism.context_parallel_method, cp_mesh.get_group())
    attentions = [m for m in model.modules() if hasattr(m, "attention_op")]
    if not attentions:
        raise ConfigError(
            f"context parallelism found no attention module with an `attention_op` in {type(model).__name__}. "
            "Fix: set parallelism.context_parallel_degree=1 for this model."
        )
    for module in attentions:
        module.attention_op = op
    positions = load_balanced_positions(job.training.seq_len, dims.cp, cp_mesh.get_local_rank())
    narrow_rope_to_positions(model, positions)
    model.register_forward_pre_hook(lambda module, args: narrow_rope_to_positions(module, positions))
