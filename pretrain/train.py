"""The Trainer: every rank runs `main(job)`. It builds everything, then runs a loop that reads top to bottom."""

from __future__ import annotations

import contextlib
import gc
import os
import time

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from pretrain import preemption
from pretrain.checkpoint.manager import CheckpointManager
from pretrain.checkpoint.state import complete_steps
from pretrain.components.expert_load import ExpertLoad
from pretrain.components.float8 import convert_to_float8, precompute_float8_scales
from pretrain.components.loss import build_loss_fn, per_step_loss
from pretrain.components.memory import check_activations_fit
from pretrain.components.metrics import MetricsLogger, cuda_memory_stats, memory_gib, peak_flops, throughput
from pretrain.components.optim import build_lr_scheduler, build_optimizer
from pretrain.components.profiling import profile_steps
from pretrain.config import JobConfig
from pretrain.config.flavors import flavor_label
from pretrain.data.dataset import build_loader
from pretrain.data.tokenizer import build_tokenizer
from pretrain.distributed.context_parallel import shard_sequence
from pretrain.distributed.fsdp import DTYPES, cast_parameters, param_dtype
from pretrain.distributed.parallel_dims import ParallelDims
from pretrain.distributed.parallelize import parallelize_decoder
from pretrain.distributed.pipeline import Pipeline, split_for_rank
from pretrain.distributed.utils import (
    clip_grad_norm_,
    init_distributed,
    pick_device,
    set_collective_timeout,
    set_cpu_threads,
)
from pretrain.errors import TrainingHalted
from pretrain.log import init_logging, is_rank0, logger
from pretrain.models import get_model_spec
from pretrain.rundir import take_run_lock
from pretrain.validation import Validator


class Trainer:
    def __init__(self, job: JobConfig):
        self.job = job
        t = job.training
        self.device = pick_device(job.cluster)
        set_cpu_threads(self.device)
        init_distributed(self.device, timeout_s=job.comm.init_timeout_seconds)
        # one live run per run directory: taken here unless the local launcher holds it (a SLURM job, a test)
        self.run_lock = take_run_lock(job.job.run_dir, dist.get_rank())
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.dims = ParallelDims.from_config(job.parallelism, dist.get_world_size())
        self.dims.build_mesh(self.device.type)
        check_activations_fit(job, self.dims, self.device)  # before any data is read or model built
        dp_mesh, loss_mesh = self.dims.mesh("dp"), self.dims.mesh("dp_cp")
        dp_rank = dp_mesh.get_local_rank() if dp_mesh is not None else 0
        # the loss is a mean over dp x cp: those ranks hold different tokens of the global batch
        self.loss_group = loss_mesh.get_group() if loss_mesh is not None and loss_mesh.size() > 1 else None
        self.loss_parallel = self.dims.tp_enabled and not job.parallelism.disable_loss_parallel

        tokenizer = build_tokenizer(job.data, job.model)
        self.dataloader = build_loader(
            job.data, tokenizer, t.seq_len, t.local_batch_size, t.global_batch_size, dp_rank, self.dims.dp
        )
        # tokens this rank computes per optimizer step (context parallelism splits each sequence)
        self.local_tokens_per_step = t.global_batch_size // self.dims.dp * t.seq_len // self.dims.cp
        self.spec = get_model_spec(job.model.name)
        self.model_parts = self._build_model()  # the whole model, or this rank's pipeline stages
        self.loss_fn = per_step_loss(build_loss_fn(job.compile, self.loss_parallel), self.local_tokens_per_step)
        microbatches = t.global_batch_size // (t.local_batch_size * self.dims.dp)
        if self.dims.pp_enabled:
            microbatches *= t.local_batch_size // job.parallelism.pipeline_parallel_microbatch_size
        pp_mesh = self.dims.mesh("pp") if self.dims.pp_enabled else None
        self.expert_load = ExpertLoad(self.model_parts, job.model, microbatches, self.loss_group,
                                      pp_mesh.get_group() if pp_mesh is not None else None, self.device)
        self.expert_stats: dict = {}
        self.pipeline = None
        if self.dims.pp_enabled:
            self.pipeline = Pipeline(self.model_parts, self.dims, job, self.device, self.loss_fn,
                                     after_metadata_pass=self.expert_load.reset)
        self.model = None if self.pipeline else self.model_parts[0]
        self.params = [p for part in self.model_parts for p in part.parameters()]  # clipped every step
        self.validator = None  # its held-out documents are checked here, before the checkpoint is touched
        if job.validation.enable:
            self.validator = Validator(job, tokenizer, self.dims, dp_rank, self.device, self.model_parts,
                                       self.pipeline, self.expert_load, self.local_tokens_per_step)
            logger.info(self.validator.describe())
        self.optimizer = build_optimizer(nn.ModuleList(self.model_parts), job.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, job.lr_scheduler, t.steps)
        self.checkpoint = CheckpointManager(
            job.checkpoint, job.job.run_dir, self.model_parts, self.optimizer, self.lr_scheduler, self.dataloader,
            is_rank0(), job=job,
        )
        self.state = self.checkpoint.load()
        if is_rank0():  # the data, the model and the checkpoint were accepted: this config is the run's now
            os.makedirs(job.job.run_dir, exist_ok=True)
            OmegaConf.save(OmegaConf.structured(job), os.path.join(job.job.run_dir, "config.yaml"))
        self.nonfinite_steps = 0  # steps whose update was dropped (training.on_nonfinite=skip)
        fresh = not complete_steps(self.checkpoint.folder) and not job.checkpoint.initial_load_path
        if self.pipeline and self.device.type != "cpu" and fresh and is_rank0():
            logger.warning("pipeline stages start from their own random init: for the weights of other layouts, start "
                           "from a seed checkpoint (checkpoint.create_seed_checkpoint=true, see the README)")
        self.compute_dtype = param_dtype(t, self.device)
        # without FSDP there is no MixedPrecisionPolicy: bf16 compute comes from autocast
        self.use_autocast = self.compute_dtype != torch.float32 and not self.dims.fsdp_enabled
        self.peak_flops, peak_source = peak_flops(self.device, self.compute_dtype, job.data.cache_dir)
        self.metrics = MetricsLogger(job, enabled=is_rank0())
        logger.info(
            f"model {job.model.name}/{flavor_label(job.model)}: {self.n_params:,} params, "
            f"{self.flops_per_token:.3g} FLOPs/token | {self.dims} on {self.device} | "
            f"global batch {t.global_batch_size} x {t.seq_len} tokens, "
            f"{t.global_batch_size // (t.local_batch_size * self.dims.dp)} micro-step(s) | "
            f"peak {self.peak_flops / 1e12:.3g} TFLOP/s ({peak_source}) | run dir {job.job.run_dir}"
        )
        if job.float8.enable:
            logger.info("float8: MFU is reported against the bf16 peak above (torchtitan's convention), "
                        "not the float8 peak, so it compares with bf16 runs")

    def _build_model(self) -> list[nn.Module]:
        cfg, t = self.job.model, self.job.training
        # On CPU (and for a seed checkpoint) the full model is initialised from the seed, then split and
        # sharded: every layout starts from the same weights (DTensor's sharded random init only matches
        # the full one on CUDA, and not across pipeline stages: PP runs on CUDA start from a seed checkpoint).
        init_full = self.device.type == "cpu" or self.job.checkpoint.create_seed_checkpoint
        torch.manual_seed(t.seed)
        with torch.device("cpu" if init_full else "meta"):
            model = self.spec.build_model(cfg, t.seq_len)
        self.n_params, self.flops_per_token = self.spec.params_and_flops(model, cfg, t.seq_len)
        if init_full:
            model.init_weights()
        convert_to_float8(model, self.job.float8, self.device.type)
        if t.dtype != "float32":  # full low-precision training: no fp32 master weights
            cast_parameters(model, DTYPES[t.dtype])
        parts = split_for_rank(model, self.dims, self.job) if self.dims.pp_enabled else [model]
        parts = [parallelize_decoder(part, self.dims, self.job, self.spec.tp_plan_block) for part in parts]
        if not init_full:
            torch.manual_seed(t.seed)  # the offset-based RNG of DTensor makes each shard its slice of the full init
            for part in parts:
                part.to_empty(device=self.device)
                if cfg.tie_word_embeddings and part.output is not None and part.tok_embeddings is not None:
                    part.output.weight = part.tok_embeddings.weight  # without FSDP, to_empty gives each its own tensor
                part.init_weights(buffer_device=self.device)
        return parts

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over this rank's micro-batches. The loss is the per-token mean over
        the global batch: each micro-batch contributes sum(CE) / tokens of this rank's step, and
        FSDP averages gradients over the data-parallel ranks."""
        autocast = self._autocast()
        loss_total = torch.zeros((), device=self.device)
        for inputs, labels in micro_batches:
            inputs, labels = inputs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            if self.dims.cp_enabled:  # this cp rank's head and tail chunks of every sequence
                inputs, labels = shard_sequence(self.dims.mesh("cp"), inputs, labels)
            if self.pipeline is not None:  # the schedule runs forward, loss and backward of its micro-batches
                with autocast, loss_parallel() if self.loss_parallel else contextlib.nullcontext():
                    loss_total += self.pipeline.step(inputs, labels)
                continue
            with autocast:
                logits = self.model(inputs)
            # with loss parallel the logits stay sharded over the vocabulary (a DTensor) and the
            # cross-entropy reduces across TP ranks itself; backward must run in the same context
            with loss_parallel() if self.loss_parallel else contextlib.nullcontext():
                loss = self.loss_fn(logits, labels)
                loss.backward()
            loss_total += loss.detach().full_tensor() if isinstance(loss, DTensor) else loss.detach()
        grad_norm = clip_grad_norm_(
            self.params, self.job.training.max_norm, self.pipeline.group if self.pipeline else None
        )
        # the norm is global (reduced over every rank), so all ranks take the same branch. Reading it is the
        # step's one host sync: on CUDA the optimizer kernels are queued after backward ends, not during it
        if torch.isfinite(grad_norm):
            self.optimizer.step()
            precompute_float8_scales(self.model_parts, self.job.float8)
        else:
            self._on_nonfinite(loss_total, grad_norm)
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_total, grad_norm

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.use_autocast:
            return torch.autocast(self.device.type, dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def _on_nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """A NaN/Inf gradient norm (a NaN/Inf loss gives one too): the update is never applied, so neither
        the weights nor the optimizer state hold it, and no checkpoint can."""
        step = self.state.step + 1
        what = f"step {step}: loss {loss.item():.4g}, gradient norm {grad_norm.item():.4g}"
        if self.job.training.on_nonfinite == "stop":
            latest = complete_steps(self.checkpoint.folder)
            kept = f"the last checkpoint is step {latest[-1]}" if latest else "no checkpoint was written"
            raise TrainingHalted(
                f"{what} is not finite; stopped before applying it, and {kept}. Fix: lower optimizer.lr or raise "
                "lr_scheduler.warmup_steps, then rerun (it resumes from the last checkpoint); or "
                "training.on_nonfinite=skip to drop such steps."
            )
        self.nonfinite_steps += 1
        logger.warning(
            f"{what} is not finite: update skipped (training.on_nonfinite=skip; {self.nonfinite_steps} so far)"
        )

    def train(self) -> None:
        t, state = self.job.training, self.state
        if self.job.checkpoint.create_seed_checkpoint:  # step-0: the initial weights, for runs in any layout
            self.checkpoint.save(state, seed=True)
            return
        if state.step >= t.steps:
            logger.info(f"nothing to do: step {state.step} >= training.steps={t.steps}")
            return
        logger.info(f"training from step {state.step} to {t.steps}")
        self.first_step = state.step + 1
        if t.gc_freq > 0:  # a full collection walks every object (Hydra, datasets, Aim...): do it on our schedule
            gc.collect()
            gc.disable()
        start = window_start = time.perf_counter()
        window_tokens, window_data_s = 0, 0.0  # tokens trained and seconds waited for batches since the last log
        rank = dist.get_rank()
        with profile_steps(self.job.profiling, self.job.job.run_dir, rank, self.device, state.step) as profiler:
            while state.step < t.steps:
                lr = self.lr_scheduler.get_last_lr()[0]
                waited = time.perf_counter()
                batch = self.dataloader.next_step()  # ready in steady state: prepared ahead in a thread
                window_data_s += time.perf_counter() - waited
                loss, grad_norm = self.train_step(batch)
                state.step += 1
                if state.step == self.first_step:  # set-up, compile and loading are done: a stall now is a fault
                    set_collective_timeout(self.job.comm.train_timeout_seconds, self.dims.process_groups())
                profiler.step()
                if t.gc_freq > 0 and state.step % t.gc_freq == 0:
                    gc.collect(1)
                state.tokens_seen += t.global_batch_size * t.seq_len
                # per device, as torchtitan counts: the ranks of one data-parallel replica (cp x tp x pp) share
                # its tokens
                window_tokens += self.local_tokens_per_step // (self.dims.tp * self.dims.pp)
                validate = self.validator is not None and self.validator.due(state.step, t.steps)
                log_now = state.step == 1 or state.step % self.job.metrics.log_freq == 0 or state.step == t.steps
                log_now = log_now or validate  # the held-out loss goes into its step's record
                self.expert_stats = self.expert_load.step(log_now)  # MoE: expert-bias update, load metrics
                # before this step's checkpoint: a run resumed from it does not validate that step again
                held_out = self.validator.run(self._autocast()) if validate else {}
                if log_now:
                    now = time.perf_counter()
                    window = now - window_start - held_out.get("val_seconds", 0.0)  # training time only
                    data = {"data_wait_pct": 100.0 * window_data_s / window}  # of the training time: 0 = never waited
                    self._log_step(state, loss, grad_norm, lr, window_tokens, window, now - start, {**data, **held_out})
                    window_start, window_tokens, window_data_s = time.perf_counter(), 0, 0.0
                if self.checkpoint.should_save(state.step, t.steps):
                    state.elapsed_s += time.perf_counter() - start
                    start = time.perf_counter()
                    self.checkpoint.save(state, last=state.step == t.steps)
                    window_start, window_tokens, window_data_s = time.perf_counter(), 0, 0.0  # saves are not training
                # a signal: save this step, then stop (locally) or requeue (SLURM)
                preemption.checkpoint_and_requeue_if_signalled(self.checkpoint, state)
            self.checkpoint.wait()  # a background save still in flight is on disk before the run ends

    def _log_step(self, state, loss, grad_norm, lr: float, tokens: int, seconds: float, since_start: float,
                  extra: dict[str, float]) -> None:
        if state.step == self.first_step:  # compile, allocator and cache warm-up: not steady state
            logger.info(
                f"first step took {seconds:.1f}s "
                f"(warm-up{', compile included' if self.job.compile.enable else ''}); "
                "throughput is steady from the next logged step"
            )
        self.metrics.log(
            state.step,
            {
                "loss": self._dp_mean(loss),
                "grad_norm": grad_norm.item(),
                "lr": lr,
                **throughput(tokens, seconds, self.flops_per_token, self.peak_flops),
                "memory_gib": memory_gib(self.device),
                **cuda_memory_stats(self.device),
                "elapsed_s": state.elapsed_s + since_start,
                "tokens_seen": state.tokens_seen,
                "nonfinite_steps": self.nonfinite_steps,
                **{key: value.item() for key, value in self.expert_stats.items()},
                **extra,
                **({"warmup": 1.0} if state.step == self.first_step else {}),  # readers drop it from steady state
            },
        )

    def _dp_mean(self, loss: torch.Tensor) -> float:
        if self.loss_group is not None:
            loss = loss.clone()
            dist.all_reduce(loss, group=self.loss_group)  # gloo has no AVG
            loss /= self.dims.dp * self.dims.cp
        return loss.item()

    def close(self) -> None:
        self.metrics.close()
        if self.run_lock is not None:
            self.run_lock.release()


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
