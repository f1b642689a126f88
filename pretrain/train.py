"""The Trainer: every rank runs `main(job)`. It builds everything, then runs a loop that reads top to bottom."""

from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from pretrain.checkpoint import CheckpointManager
from pretrain.config import JobConfig
from pretrain.data.dataset import TokenWindowLoader
from pretrain.data.tokenizer import build_tokenizer
from pretrain.distributed.fsdp import param_dtype
from pretrain.distributed.parallel_dims import ParallelDims
from pretrain.distributed.utils import clip_grad_norm_, init_distributed, pick_device, set_cpu_threads
from pretrain.log import init_logging, is_rank0, logger
from pretrain.metrics import MetricsLogger, memory_gib, peak_flops, throughput
from pretrain.models import get_model_spec
from pretrain.optim import build_lr_scheduler, build_optimizer


class Trainer:
    def __init__(self, job: JobConfig):
        self.job = job
        t = job.training
        self.device = pick_device(job.cluster)
        set_cpu_threads(self.device)
        init_distributed(self.device)
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.dims = ParallelDims.from_config(job.parallelism, dist.get_world_size())
        self.dims.build_mesh(self.device.type)
        dp_mesh, loss_mesh = self.dims.mesh("dp"), self.dims.mesh("dp_cp")
        dp_rank = dp_mesh.get_local_rank() if dp_mesh is not None else 0
        # the loss is a mean over dp x cp: those ranks hold different tokens of the global batch
        self.loss_group = loss_mesh.get_group() if loss_mesh is not None and loss_mesh.size() > 1 else None
        self.loss_parallel = self.dims.tp_enabled and not job.parallelism.disable_loss_parallel
        if is_rank0():
            os.makedirs(job.job.run_dir, exist_ok=True)
            OmegaConf.save(OmegaConf.structured(job), os.path.join(job.job.run_dir, "config.yaml"))

        tokenizer = build_tokenizer(job.data, job.model)
        self.dataloader = TokenWindowLoader(
            job.data, tokenizer, t.seq_len, t.local_batch_size, t.global_batch_size, dp_rank, self.dims.dp
        )
        self.spec = get_model_spec(job.model.name)
        self.model = self._build_model()
        self.n_params, self.flops_per_token = self.spec.params_and_flops(self.model, job.model, t.seq_len)
        self.optimizer = build_optimizer(self.model, job.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, job.lr_scheduler, t.steps)
        self.checkpoint = CheckpointManager(
            job.checkpoint, job.job.run_dir, self.model, self.optimizer, self.lr_scheduler, self.dataloader, is_rank0()
        )
        self.state = self.checkpoint.load()
        self.compute_dtype = param_dtype(t, self.device)
        # without FSDP there is no MixedPrecisionPolicy: bf16 compute comes from autocast
        self.use_autocast = self.compute_dtype != torch.float32 and not self.dims.fsdp_enabled
        self.peak_flops, peak_source = peak_flops(self.device, self.compute_dtype, job.data.cache_dir)
        self.metrics = MetricsLogger(job, enabled=is_rank0())
        # tokens this rank computes per optimizer step (context parallelism splits each sequence)
        self.local_tokens_per_step = t.global_batch_size // self.dims.dp * t.seq_len // self.dims.cp
        logger.info(
            f"model {job.model.name}/{job.model.flavor}: {self.n_params:,} params, "
            f"{self.flops_per_token:.3g} FLOPs/token | {self.dims} on {self.device} | "
            f"global batch {t.global_batch_size} x {t.seq_len} tokens, "
            f"{t.global_batch_size // (t.local_batch_size * self.dims.dp)} micro-step(s) | "
            f"peak {self.peak_flops / 1e12:.3g} TFLOP/s ({peak_source}) | run dir {job.job.run_dir}"
        )

    def _build_model(self) -> torch.nn.Module:
        cfg, t = self.job.model, self.job.training
        if self.device.type == "cpu":
            # The full model is initialised from the seed, then sharded: every layout starts from
            # the same weights (DTensor's sharded random init only matches the full one on CUDA).
            torch.manual_seed(t.seed)
            model = self.spec.build_model(cfg, t.seq_len)
            model.init_weights()
            return self.spec.parallelize(model, self.dims, self.job)
        with torch.device("meta"):
            model = self.spec.build_model(cfg, t.seq_len)
        model = self.spec.parallelize(model, self.dims, self.job)
        model.to_empty(device=self.device)
        torch.manual_seed(t.seed)  # the offset-based RNG of DTensor makes each shard its slice of the full init
        model.init_weights(buffer_device=self.device)
        return model

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over this rank's micro-batches. The loss is the per-token mean over
        the global batch: each micro-batch contributes sum(CE) / tokens of this rank's step, and
        FSDP averages gradients over the data-parallel ranks."""
        autocast = (
            torch.autocast(self.device.type, dtype=self.compute_dtype) if self.use_autocast else contextlib.nullcontext()
        )
        loss_total = torch.zeros((), device=self.device)
        for inputs, labels in micro_batches:
            inputs, labels = inputs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            with autocast:
                logits = self.model(inputs)
            # with loss parallel the logits stay sharded over the vocabulary (a DTensor) and the
            # cross-entropy reduces across TP ranks itself; backward must run in the same context
            with loss_parallel() if self.loss_parallel else contextlib.nullcontext():
                loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
                loss = loss / self.local_tokens_per_step
                loss.backward()
            loss_total += loss.detach().full_tensor() if isinstance(loss, DTensor) else loss.detach()
        grad_norm = clip_grad_norm_(list(self.model.parameters()), self.job.training.max_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_total, grad_norm

    def train(self) -> None:
        t, state = self.job.training, self.state
        if state.step >= t.steps:
            logger.info(f"nothing to do: step {state.step} >= training.steps={t.steps}")
            return
        logger.info(f"training from step {state.step} to {t.steps}")
        start = window_start = time.perf_counter()
        window_tokens = 0
        while state.step < t.steps:
            lr = self.lr_scheduler.get_last_lr()[0]
            loss, grad_norm = self.train_step(self.dataloader.next_step())
            state.step += 1
            state.tokens_seen += t.global_batch_size * t.seq_len
            window_tokens += self.local_tokens_per_step
            if state.step == 1 or state.step % self.job.metrics.log_freq == 0 or state.step == t.steps:
                now = time.perf_counter()
                rates = throughput(window_tokens, now - window_start, self.flops_per_token, self.peak_flops)
                self.metrics.log(
                    state.step,
                    {
                        "loss": self._dp_mean(loss),
                        "grad_norm": grad_norm.item(),
                        "lr": lr,
                        **rates,
                        "memory_gib": memory_gib(self.device),
                        "elapsed_s": state.elapsed_s + now - start,
                        "tokens_seen": state.tokens_seen,
                    },
                )
                window_start, window_tokens = time.perf_counter(), 0
            if self.checkpoint.should_save(state.step, t.steps):
                state.elapsed_s += time.perf_counter() - start
                start = time.perf_counter()
                self.checkpoint.save(state, last=state.step == t.steps)
                window_start, window_tokens = time.perf_counter(), 0  # saves are not training throughput

    def _dp_mean(self, loss: torch.Tensor) -> float:
        if self.loss_group is not None:
            loss = loss.clone()
            dist.all_reduce(loss, group=self.loss_group)  # gloo has no AVG
            loss /= self.dims.dp * self.dims.cp
        return loss.item()

    def close(self) -> None:
        self.metrics.close()


@record
def main(job: JobConfig) -> None:
    """Entry point of every rank (in-process for one rank, or started by the launcher)."""
    init_logging()
    trainer = Trainer(job)
    try:
        trainer.train()
    finally:
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
