"""Pipeline parallelism with torch.distributed.pipelining: split a model into stages by module names,
place the stages on the pp ranks (one per rank, looped, or in a V) and run a schedule over them.

A model that can be pipelined keeps its blocks in an `nn.ModuleDict` (names survive deletion) and
accepts None for the modules before and after them (Llama: the embedding; the norm and output). A stage
is a copy of the whole model with the other stages' modules removed, so its parameter names are those
of the full model and checkpoints reshard between PP and non-PP layouts.

The loss is the Trainer's: per micro-batch, sum(cross-entropy) / tokens of this rank's optimizer step.
The schedules' own gradient scaling by 1/n_microbatches is turned off (`scale_grads=False`), so the
micro-batch losses add up to the per-token mean exactly as gradient accumulation does.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class
from torch.distributed.tensor import DTensor

from pretrain import torch_compat
from pretrain.config.layout import V_SCHEDULES, pipeline_layers_per_stage, pipeline_stage_count
from pretrain.errors import ConfigError
from pretrain.log import logger

if TYPE_CHECKING:
    from pretrain.components.loss import LossFn
    from pretrain.config import JobConfig
    from pretrain.distributed.parallel_dims import ParallelDims


def model_sections(model: nn.Module) -> tuple[list[str], list[str], list[str]]:
    """The splittable module names in forward order: (before the blocks, the blocks, after the blocks).
    Llama: (["tok_embeddings"], ["layers.0", ...], ["norm", "output"])."""
    head: list[str] = []
    blocks: list[str] = []
    tail: list[str] = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleDict):
            if blocks:
                raise ValueError(f"{type(model).__name__} has several ModuleDicts; a pipeline split needs one")
            blocks = [f"{name}.{key}" for key in child]
        else:
            (tail if blocks else head).append(name)
    if not blocks:
        raise ValueError(f"{type(model).__name__} keeps no blocks in an nn.ModuleDict, so it cannot be pipelined")
    return head, blocks, tail


def fqns_per_stage(
    model: nn.Module, n_stages: int, first_less: int = 1, last_less: int = 1
) -> list[list[str]]:
    """Module names of each stage, split by blocks: the first stage also embeds, the last also computes
    the output, so they may take `first_less` / `last_less` fewer blocks."""
    head, blocks, tail = model_sections(model)
    counts = pipeline_layers_per_stage(len(blocks), n_stages, first_less, last_less)
    stages, start = [], 0
    for i, count in enumerate(counts):
        stages.append((head if i == 0 else []) + blocks[start : start + count] + (tail if i == n_stages - 1 else []))
        start += count
    return stages


def check_explicit_fqns(model: nn.Module, stages: list[list[str]]) -> list[list[str]]:
    """Explicit stage lists must name every module once, in forward order, and leave no stage empty."""
    head, blocks, tail = model_sections(model)
    expected = head + blocks + tail
    given = [name for stage in stages for name in stage]
    if given != expected or not all(stages):
        shown = expected if len(expected) <= 10 else [*expected[:4], "...", *expected[-4:]]
        raise ConfigError(
            f"parallelism.module_fqns_per_model_part={stages} must list every module of the model once, in forward "
            f"order, with no empty stage; the model's modules are {shown}. Fix: correct the lists, or set "
            "module_fqns_per_model_part=null to split by layers."
        )
    return [list(stage) for stage in stages]


def stage_ids_for_rank(pp_rank: int, pp: int, n_stages: int, v_shape: bool) -> list[int]:
    """Stages this pp rank runs. Looped: r, r + pp, r + 2 pp, ...; V: rank r runs r and 2 pp - 1 - r (and so
    on in further rounds), so the first and the last stage both sit on rank 0."""
    if not v_shape:
        return list(range(pp_rank, n_stages, pp))
    ids = []
    for stage in range(n_stages):
        position, rnd = stage % pp, stage // pp
        if (position if rnd % 2 == 0 else pp - 1 - position) == pp_rank:
            ids.append(stage)
    return ids


def split_model(model: nn.Module, fqns: list[str]) -> nn.Module:
    """A copy of `model` holding only the modules named in `fqns`; the others are deleted (blocks) or set to None."""
    part = copy.deepcopy(model)
    keep = set(fqns)
    head, blocks, tail = model_sections(part)
    for name in head + blocks + tail:
        if name in keep:
            continue
        parent, _, key = name.rpartition(".")
        if parent:
            del part.get_submodule(parent)[key]
        else:
            setattr(part, name, None)
    return part


def job_fqns_per_stage(model: nn.Module, dims: ParallelDims, job: JobConfig) -> list[list[str]]:
    """The stages of the whole pipeline for this job: explicit FQN lists, or split by layers."""
    p = job.parallelism
    if p.module_fqns_per_model_part is not None:
        return check_explicit_fqns(model, p.module_fqns_per_model_part)
    return fqns_per_stage(
        model,
        pipeline_stage_count(job, dims),
        p.pipeline_parallel_first_stage_less_layers,
        p.pipeline_parallel_last_stage_less_layers,
    )


def _stage_ids(dims: ParallelDims, job: JobConfig, pp_rank: int | None) -> list[int]:
    if pp_rank is None:
        pp_rank = dims.mesh("pp").get_local_rank()
    v_shape = job.parallelism.pipeline_parallel_schedule in V_SCHEDULES
    return stage_ids_for_rank(pp_rank, dims.pp, pipeline_stage_count(job, dims), v_shape)


def split_for_rank(
    model: nn.Module, dims: ParallelDims, job: JobConfig, pp_rank: int | None = None
) -> list[nn.Module]:
    """The model parts (stage modules) of one pp rank (default: this process's), in stage order.
    `model` is left whole; on CPU split it after init so every layout starts from the same weights."""
    stages = job_fqns_per_stage(model, dims, job)
    return [split_model(model, stages[i]) for i in _stage_ids(dims, job, pp_rank)]


def schedule_class(name: str) -> type:
    """torch's schedule class of that name; a clear error where the installed torch lacks it."""
    try:
        return get_schedule_class(name)
    except ValueError:
        raise ConfigError(
            f"parallelism.pipeline_parallel_schedule={name} is not available in the installed torch "
            f"{torch.__version__}. Fix: use GPipe or 1F1B (or Interleaved1F1B), or upgrade torch."
        ) from None


class Pipeline:
    """This rank's stages and the schedule that runs them. `step` takes one batch through every stage
    (forward, loss on the last stage, backward), split into micro-batches by the schedule."""

    def __init__(
        self, parts: list[nn.Module], dims: ParallelDims, job: JobConfig, device: torch.device, loss_fn: LossFn,
        after_metadata_pass: Callable[[], None] = lambda: None,
    ):
        p = job.parallelism
        self.device, self.parts = device, parts
        self.forward_only_eval = p.pipeline_parallel_schedule not in V_SCHEDULES
        self.group = dims.mesh("pp").get_group()
        n_stages = pipeline_stage_count(job, dims)
        ids = _stage_ids(dims, job, pp_rank=None)
        assert len(ids) == len(parts), (ids, len(parts))
        self.has_first, self.has_last = 0 in ids, n_stages - 1 in ids
        stages = [PipelineStage(part, i, n_stages, device, group=self.group) for part, i in zip(parts, ids)]
        for stage in stages:  # torch >= 2.13 runs each stage once to infer shapes: undo its side effects
            torch_compat.after_stage_metadata_pass(stage, after_metadata_pass)
        cls = schedule_class(p.pipeline_parallel_schedule)
        n_microbatches = job.training.local_batch_size // p.pipeline_parallel_microbatch_size
        single = issubclass(cls, PipelineScheduleSingle)
        try:
            self.schedule = cls(
                stages[0] if single else stages,
                n_microbatches=n_microbatches,
                loss_fn=loss_fn,  # sum(CE) / tokens of this rank's optimizer step
                scale_grads=False,  # the loss is already divided by the tokens of the whole step
            )
        except ValueError as e:  # a micro-batch count or stage placement this torch's schedule refuses
            raise ConfigError(
                f"{p.pipeline_parallel_schedule} with {n_microbatches} micro-batches and {n_stages} stages over "
                f"pipeline_parallel_degree={dims.pp}: {e} Fix: change training.local_batch_size / "
                "parallelism.pipeline_parallel_microbatch_size, or the schedule."
            ) from None
        # newer torch can skip keeping the last stage's logits (only the losses are needed)
        takes = inspect.signature(self.schedule.step).parameters
        self.step_options = {"return_outputs": False} if "return_outputs" in takes else {}
        logger.info(
            f"pipeline: {p.pipeline_parallel_schedule} over {n_stages} stages, {n_microbatches} micro-batches of "
            f"{p.pipeline_parallel_microbatch_size} per schedule step; this rank runs stages {ids} "
            f"({sum(len(part.layers) for part in parts)} blocks)"
        )

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward and backward of inputs, labels (B, T); the summed micro-batch losses, on every pp rank."""
        return self._run(self.schedule.step, inputs, labels)

    def eval(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Validation: the summed micro-batch losses of inputs, labels (B, T), on every pp rank, forward only. The
        V-shaped schedules have no forward-only pass in torch (their action lists hold the backward whatever
        schedule.eval asks): they run a whole step, and its gradients are dropped."""
        if self.forward_only_eval:
            return self._run(self.schedule.eval, inputs, labels)
        with torch.enable_grad():
            loss = self._run(self.schedule.step, inputs, labels)
        for part in self.parts:
            for param in part.parameters():
                param.grad = None
        return loss

    def _run(self, run_schedule: Callable, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.has_first else ()
        targets = {"target": labels, "losses": losses} if self.has_last else {}
        run_schedule(*args, **targets, **self.step_options)
        loss = torch.zeros((), device=self.device)
        for micro_loss in losses:
            micro_loss = micro_loss.detach()
            loss += micro_loss.full_tensor() if isinstance(micro_loss, DTensor) else micro_loss
        dist.all_reduce(loss, group=self.group)  # only the last stage computed it; rank 0 logs it
        return loss
