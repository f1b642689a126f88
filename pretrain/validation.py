"""Held-out loss: every validation.freq steps and at the last step, the model runs forward only over the batches
of the held-out documents (validation.steps of them, or every full one), in the run's layout.

The loss is the per-token mean cross-entropy over every token of every batch on every rank, so any layout gives
the one-process value (up to float summation order); perplexity is its exponential. The held-out loader is its
own (pretrain.data, one pass from the start each time), the forward runs under no_grad with the RNG state put
back afterwards, and what MoE layers count of their routing is dropped: the training data position, the
training RNG and the expert-bias updates are the same as in a run without validation.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from pretrain.components.expert_load import ExpertLoad
from pretrain.components.loss import cross_entropy_sum
from pretrain.config import ConfigError, JobConfig
from pretrain.config.held_out import held_out_data, validation_shape
from pretrain.data.dataset import build_loader
from pretrain.data.tokenizer import Tokenizer
from pretrain.data.windows import EndOfData
from pretrain.distributed.context_parallel import shard_sequence
from pretrain.distributed.parallel_dims import ParallelDims
from pretrain.distributed.pipeline import Pipeline


class Validator:
    def __init__(
        self, job: JobConfig, tokenizer: Tokenizer, dims: ParallelDims, dp_rank: int, device: torch.device,
        model_parts: list[nn.Module], pipeline: Pipeline | None, expert_load: ExpertLoad, train_tokens_per_step: int,
    ):
        v = job.validation
        self.freq, self.max_batches = v.freq, v.steps
        self.dims, self.device, self.model_parts, self.pipeline = dims, device, model_parts, pipeline
        self.expert_load = expert_load
        self.train_tokens_per_step = train_tokens_per_step  # the pipeline's loss divides by it
        self.loss_parallel = dims.tp_enabled and not job.parallelism.disable_loss_parallel
        loss_mesh = dims.mesh("dp_cp")
        self.token_group = loss_mesh.get_group() if loss_mesh is not None and loss_mesh.size() > 1 else None
        self.batch, self.seq_len = validation_shape(job)
        self.data = held_out_data(job)
        self.loader = build_loader(
            self.data, tokenizer, self.seq_len, self.batch, self.batch * dims.dp, dp_rank, dims.dp, one_pass=True
        )
        self.start = self.loader.state_dict()
        try:  # a held-out set without one batch is refused now, not at the first validation hours later
            self.loader.next_step()
        except EndOfData:
            raise ConfigError(
                f"The held-out documents ({self.where}) hold fewer tokens than one validation batch of "
                f"{self.batch} x {self.seq_len} tokens per data-parallel rank x {dims.dp} ranks. Fix: lower "
                "validation.local_batch_size or validation.seq_len, or hold out more documents."
            ) from None
        self.loader.load_state_dict(self.start)

    @property
    def where(self) -> str:
        d = self.data
        return f"{d.path}" + (f" {list(d.data_files)}" if d.data_files else "") + f", split {d.split}"

    def describe(self) -> str:
        batches = "every full batch" if self.max_batches == -1 else f"{self.max_batches} batches"
        return (f"validation every {self.freq} steps and at the last: {batches} of {self.batch} x {self.seq_len} "
                f"tokens per data-parallel rank from {self.where}")

    def due(self, step: int, last_step: int) -> bool:
        return step % self.freq == 0 or step == last_step

    @torch.no_grad()
    def run(self, autocast: contextlib.AbstractContextManager) -> dict[str, float]:
        """The held-out loss (on every rank) and perplexity, the tokens it covers and the seconds it took."""
        start = time.perf_counter()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum of cross-entropy, tokens) here
        self.loader.load_state_dict(self.start)
        for part in self.model_parts:
            part.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                batches = 0
                while self.max_batches == -1 or batches < self.max_batches:
                    try:
                        (inputs, labels), = self.loader.next_step()
                    except EndOfData:
                        break
                    totals += self._batch(inputs, labels, autocast)
                    batches += 1
        finally:
            for part in self.model_parts:
                part.train()
            self.expert_load.reset()  # the held-out routing must not steer the training's expert biases
        if self.token_group is not None:
            dist.all_reduce(totals, group=self.token_group)
        loss = (totals[0] / totals[1]).item()
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0)), "val_tokens": totals[1].item(),
                "val_seconds": time.perf_counter() - start}

    def _batch(self, inputs: torch.Tensor, labels: torch.Tensor, autocast) -> torch.Tensor:
        """(sum of cross-entropy, tokens) of this rank's share of one batch."""
        inputs, labels = inputs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        if self.dims.cp_enabled:  # this cp rank's head and tail chunks of every sequence
            inputs, labels = shard_sequence(self.dims.mesh("cp"), inputs, labels)
        with autocast, loss_parallel() if self.loss_parallel else contextlib.nullcontext():
            if self.pipeline is not None:  # the last stage's losses are sum(CE) / training tokens per step
                loss_sum = self.pipeline.eval(inputs, labels) * self.train_tokens_per_step
            else:
                loss_sum = cross_entropy_sum(self.model_parts[0](inputs), labels)
        if isinstance(loss_sum, DTensor):
            loss_sum = loss_sum.full_tensor()
        return torch.stack([loss_sum.double(), torch.tensor(float(labels.numel()), device=self.device).double()])
