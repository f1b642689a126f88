"""Every private torch API this project touches, and every torch method or attribute it patches, in one place.

torch keeps no promise about names that start with `_`, about private modules (`torch._inductor`,
`torch.distributed._functional_collectives`, `torch.testing._internal`, ...) or about the internal state
of its objects. Each such use sits behind a small named wrapper here; the rest of the code calls the
wrapper. `TOUCHED` below lists each one: what it is, where it is used, which wrapper uses it and what
happens without it. `tests/test_torch_compat.py` checks the table against the installed torch, so an
upgrade that drops one fails there, with the name, the torch version and the call site, rather than in
the middle of a run.

The test fails for every entry the installed torch should have and lacks: all of them, except those
whose `since` is newer than the installed torch. An `optional` entry's wrappers fall back at run time
(`if_missing` says how), but the test fails all the same, so a fallback is never taken unnoticed on a
torch where the name should be there; the others raise TorchCompatError naming the entry.

Checked on torch 2.11 and 2.13 (`CHECKED_ON`). To take up another torch: run that test, fix what it
names, add the version to `CHECKED_ON`.

A leaf like pretrain.errors: it imports torch and the standard library only, so any layer (models too)
may import it. Heavy or optional torch modules are imported inside the wrapper that needs them, so
importing this module costs no more than importing torch.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import nn
from torch.torch_version import TorchVersion

# torch versions the table was checked on: 2.13 (CPU, CI) by the test, 2.11 (the CUDA machines) against its sources
CHECKED_ON = ("2.11", "2.13")


@dataclass(frozen=True)
class Touch:
    """One private torch name (or patched attribute) and what depends on it."""

    name: str  # "module:attr.attr" (a note may follow a space): the module is imported, the attributes looked up
    used_in: str  # the call sites (under pretrain/), "file: function"
    wrappers: tuple[str, ...]  # the functions (or constants) of this module that use it
    if_missing: str  # what happens without it: the fallback, or what to change
    optional: bool = False  # the wrappers fall back (as `if_missing` says) when it is missing
    since: str | None = None  # first checked torch that has it; on older torch the fallback runs
    probe: Callable[[], Any] | None = None  # for an instance attribute: builds a small object, returns the value


def _instance_attr(build: Callable[[], Any], path: str) -> Callable[[], Any]:
    """A probe: the attribute `path` of the object `build()` returns."""
    return lambda: functools.reduce(getattr, path.split("."), build())


def _compiled_call_of_a_module() -> Callable:
    module = nn.Identity()
    module.compile()  # only wraps; nothing is compiled until a call
    if module._compiled_call_impl is None:  # the class default: Module.compile stored it elsewhere
        raise AttributeError("Module.compile left _compiled_call_impl unset")
    return module._compiled_call_impl


def _checkpoint_wrapped() -> nn.Module:
    return checkpoint_wrapper(nn.Identity(), context_fn=lambda: None)


_ERROR = "no fallback: the wrapper raises naming this entry; adapt it to the torch in use"
_RECOMPUTED = "left out of the per-op policy: its outputs are recomputed in backward (slower, same numbers)"
_AC = "distributed/activation_checkpoint.py: SAVE_OPS, MATMUL_OPS (selective_ac_option=op)"
_CKPT = "torch.distributed.algorithms._checkpoint.checkpoint_wrapper"

TOUCHED: tuple[Touch, ...] = (
    # torch.compile of the blocks (TP inputs, async TP)
    Touch("torch.nn:Module._compiled_call_impl (set by Module.compile)", "distributed/compile.py: apply_compile",
          ("wrap_compiled_call",), _ERROR, probe=_compiled_call_of_a_module),
    Touch("torch.distributed._functional_collectives:AsyncCollectiveTensor", "distributed/compile.py: resolve_async",
          ("is_async_collective",), _ERROR),
    Touch("torch._inductor.config:_micro_pipeline_tp", "distributed/compile.py: enable_async_tp (CUDA only)",
          ("enable_micro_pipeline_tp",), _ERROR),
    Touch("torch.distributed._symmetric_memory:enable_symm_mem_for_group",
          "distributed/compile.py: enable_async_tp (CUDA only)", ("enable_symmetric_memory",),
          "skipped: torch deprecated it in 2.11 as no longer needed", optional=True, since="2.11"),
    Touch(f"{_CKPT}:CheckpointWrapper._checkpoint_wrapped_module (instance)", "distributed/compile.py: _compile_target",
          ("checkpoint_wrapped_module",), _ERROR,
          probe=_instance_attr(_checkpoint_wrapped, "_checkpoint_wrapped_module")),
    Touch(f"{_CKPT}:CheckpointWrapper.checkpoint_fn.keywords (instance)", "distributed/compile.py: _compile_target",
          ("checkpoint_has_policy",), _ERROR, probe=_instance_attr(_checkpoint_wrapped, "checkpoint_fn.keywords")),
    # pipeline parallelism
    Touch("torch.distributed.pipelining.stage:PipelineStage._forward_metadata_inference",
          "distributed/pipeline.py: Pipeline.__init__", ("after_stage_metadata_pass",),
          "no callback: torch before 2.13 infers stage shapes without running the stage forward, nothing to undo",
          optional=True, since="2.13"),
    # device mesh, process groups
    Touch("torch.distributed.device_mesh:DeviceMesh._flatten", "distributed/parallel_dims.py: build_mesh",
          ("flatten_mesh",), _ERROR),
    Touch("torch.distributed.distributed_c10d:_set_pg_timeout", "distributed/utils.py: set_collective_timeout",
          ("set_pg_timeout",), _ERROR),
    Touch("torch.testing._internal.distributed.fake_pg:FakeStore", "dry_run.py: dry_run",
          ("fake_store",), _ERROR),
    # activation checkpointing
    Touch(f"{_CKPT}:checkpoint_wrapper", "distributed/activation_checkpoint.py: apply_ac",
          ("checkpoint_wrapper",), _ERROR),
    Touch("torch._functorch.config:activation_memory_budget", "distributed/activation_checkpoint.py: apply_ac",
          ("set_activation_memory_budget",), _ERROR),
    *(Touch(f"torch:ops.aten.{op}", _AC, ("attention_ops",), _RECOMPUTED, optional=True, since="2.11")
      for op in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")),
    Touch("torch:ops._c10d_functional.reduce_scatter_tensor", _AC, ("reduce_scatter_ops",), _RECOMPUTED,
          optional=True, since="2.11"),
    Touch("torch:ops.aten._scaled_mm", _AC, ("scaled_mm_ops",),
          "float8 matmuls are not counted by the per-op policy: all recomputed", optional=True, since="2.11"),
    # MoE, float8
    Touch("torch:_grouped_mm", "models/common/moe.py: GroupedExperts.forward (CUDA, bf16, sm90+)",
          ("grouped_mm_available", "grouped_mm"), "the experts run as a loop of matmuls (slower, same numbers)",
          optional=True, since="2.11"),
    Touch("torch._inductor.config:emulate_precision_casts", "components/float8.py: convert_to_float8 (rowwise)",
          ("emulate_precision_casts",), _ERROR),
    # checkpoints
    Touch("torch.distributed.checkpoint.default_planner:_EmptyStateDictLoadPlanner", "checkpoint/convert.py: to_torch",
          ("load_dcp_into_empty",), _ERROR),
    Touch("torch.distributed.checkpoint.state_dict_loader:_load_state_dict", "checkpoint/convert.py: to_torch",
          ("load_dcp_into_empty",), _ERROR),
    Touch("torch.distributed.checkpoint.filesystem:FileSystemReader._get_metadata_path",
          "checkpoint/safe_reader.py: SafeFileSystemReader.read_metadata", ("dcp_metadata_path",), _ERROR),
    Touch("torch.serialization:_get_layout", "checkpoint/safe_reader.py: _MetadataUnpickler.find_class",
          ("LAYOUT_PICKLE_GLOBAL",), "metadata holding a torch.layout is refused as unsafe; allow torch's new name"),
    # profiling
    Touch("torch.cuda.memory:_record_memory_history", "components/profiling.py: StepProfiler, profile_steps (CUDA)",
          ("record_memory_history", "stop_memory_history"), _ERROR),
    Touch("torch.cuda.memory:_snapshot", "components/profiling.py: StepProfiler.dump_snapshot (CUDA only)",
          ("memory_snapshot",), _ERROR),
    *(Touch(f"torch.profiler:profile.{attr} (instance)", "components/profiling.py: StepProfiler.__init__",
            ("resume_profiler_schedule",), _ERROR, probe=_instance_attr(torch.profiler.profile, attr))
      for attr in ("step_num", "current_action")),
)


class TorchCompatError(RuntimeError):
    """A private torch name the project relies on is gone from the installed torch."""


GONE = object()  # what `lookup` returns for a name the installed torch lacks


def lookup(touch: Touch) -> Any:
    """The touched object in the installed torch, or `GONE`."""
    try:
        if touch.probe is not None:
            return touch.probe()
        module, _, path = touch.name.split(" ")[0].partition(":")
        return functools.reduce(getattr, path.split("."), importlib.import_module(module))
    except (ImportError, AttributeError):
        return GONE


def expected(touch: Touch) -> bool:
    """Whether the installed torch should have it: always, unless `since` is newer than the installed torch."""
    return touch.since is None or TorchVersion(torch.__version__) >= touch.since


def describe(touch: Touch) -> str:
    """What is gone, on which torch, who uses it, and what happens without it."""
    return (
        f"{touch.name} is missing from torch {torch.__version__} (checked on {', '.join(CHECKED_ON)}). "
        f"Used by pretrain/{touch.used_in} through torch_compat.{'/'.join(touch.wrappers)}. "
        f"{'Fallback' if touch.optional else 'Without it'}: {touch.if_missing}."
    )


def missing() -> list[str]:
    """A message for each touched name that the installed torch should have and lacks."""
    return [describe(t) for t in TOUCHED if expected(t) and lookup(t) is GONE]


def falling_back() -> list[str]:
    """A message for each optional name the installed torch predates (its wrappers take the fallback)."""
    return [describe(t) for t in TOUCHED if not expected(t) and lookup(t) is GONE]


def _uses_private_torch(fn: Callable) -> Callable:
    """Turn an ImportError or AttributeError inside `fn` into a TorchCompatError naming the gone entry."""
    entries = [t for t in TOUCHED if fn.__name__ in t.wrappers and not t.optional]

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ImportError, AttributeError) as e:
            gone = [describe(t) for t in entries if lookup(t) is GONE]
            if gone:
                raise TorchCompatError(" ".join(gone)) from e
            raise

    return call


# ---- torch.compile of the blocks -------------------------------------------------------------------------


@_uses_private_torch
def wrap_compiled_call(module: nn.Module, wrap: Callable[[Callable], Callable]) -> None:
    """After `module.compile(...)`: its compiled call becomes `wrap(compiled call)`. Module.compile stores the
    compiled __call__ in `_compiled_call_impl`, and `_wrapped_call_impl` calls it (torch >= 2.2)."""
    compiled = module._compiled_call_impl
    if compiled is None:
        raise AttributeError(f"{type(module).__name__}._compiled_call_impl is None after Module.compile")
    module._compiled_call_impl = wrap(compiled)


@functools.cache
def _async_collective_tensor_type() -> type:
    from torch.distributed._functional_collectives import AsyncCollectiveTensor  # lazy: pulls in torch.distributed

    return AsyncCollectiveTensor


@_uses_private_torch
def is_async_collective(x: Any) -> bool:
    """Whether x is an AsyncCollectiveTensor: the not-yet-waited result of a functional collective."""
    return isinstance(x, _async_collective_tensor_type())


@_uses_private_torch
def enable_micro_pipeline_tp() -> None:
    """Inductor fuses each TP all-gather/reduce-scatter with its matmul (async TP)."""
    import torch._inductor.config as inductor_config  # lazy: inductor's config imports much of inductor

    inductor_config._micro_pipeline_tp = True


def enable_symmetric_memory(group_name: str) -> None:
    """Register a process group for symmetric memory (async TP); torch 2.11 and 2.13 warn it is no longer needed."""
    try:
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group  # lazy: CUDA-only feature
    except ImportError:
        return
    with warnings.catch_warnings():  # the deprecation warning, on every TP group
        warnings.simplefilter("ignore", FutureWarning)
        enable_symm_mem_for_group(group_name)


@_uses_private_torch
def checkpoint_wrapped_module(module: nn.Module) -> nn.Module | None:
    """The module inside torch's checkpoint wrapper, or None when `module` is not wrapped."""
    # lazy: pulls in torch.distributed.utils and torch.utils.checkpoint
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    return module._checkpoint_wrapped_module if isinstance(module, CheckpointWrapper) else None


@_uses_private_torch
def checkpoint_has_policy(wrapper: nn.Module) -> bool:
    """Whether torch's checkpoint wrapper was given a per-op policy (`context_fn`)."""
    return "context_fn" in wrapper.checkpoint_fn.keywords


# ---- pipeline parallelism --------------------------------------------------------------------------------


def after_stage_metadata_pass(stage: Any, callback: Callable[[], None]) -> None:
    """torch >= 2.13 infers each stage's shapes in its first step by running the stage forward once on
    placeholder inputs; `callback` runs right after that pass (to undo its side effects, e.g. the tokens a
    MoE layer counted). Older torch has no such pass: nothing to do."""
    infer = getattr(stage, "_forward_metadata_inference", None)
    if infer is None:
        return

    def infer_then_callback(*args, **kwargs):
        out = infer(*args, **kwargs)
        callback()
        return out

    stage._forward_metadata_inference = infer_then_callback


# ---- device mesh, process groups -------------------------------------------------------------------------


@_uses_private_torch
def flatten_mesh(mesh: Any, name: str) -> Any:
    """A 1-D view named `name` over all the dimensions of `mesh` (a sub-mesh of the world mesh)."""
    return mesh._flatten(name)


@_uses_private_torch
def set_pg_timeout(timeout: timedelta, group: Any) -> None:
    """The timeout of every later collective on `group`."""
    from torch.distributed.distributed_c10d import _set_pg_timeout  # lazy: torch builds without distributed lack it

    _set_pg_timeout(timeout, group)


@_uses_private_torch
def fake_store() -> Any:
    """A store for `init_process_group("fake", ...)`: one process plays every rank, nothing is sent."""
    # lazy: a testing module; importing it registers the "fake" backend
    from torch.testing._internal.distributed.fake_pg import FakeStore

    return FakeStore()


# ---- activation checkpointing ----------------------------------------------------------------------------


@_uses_private_torch
def checkpoint_wrapper(module: nn.Module, **kwargs: Any) -> nn.Module:
    """torch's (non-reentrant) activation checkpoint wrapper around `module`."""
    # lazy: pulls in torch.distributed.utils and torch.utils.checkpoint
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper as wrap

    return wrap(module, **kwargs)


@_uses_private_torch
def set_activation_memory_budget(budget: float) -> None:
    """The fraction of activation memory torch.compile's partitioner may keep (the rest is recomputed)."""
    import torch._functorch.config as functorch_config  # lazy: not imported by `import torch`

    functorch_config.activation_memory_budget = budget  # torch's config modules refuse unknown names


def op_overloads(namespace: str, names: tuple[str, ...]) -> set:
    """The `.default` overloads of the ops `torch.ops.<namespace>.<name>` this torch build has."""
    ops = getattr(torch.ops, namespace)
    return {getattr(ops, name).default for name in names if hasattr(ops, name)}


def attention_ops() -> set:
    """The ops behind scaled_dot_product_attention (flash, memory-efficient, cuDNN, CPU flash)."""
    return op_overloads("aten", (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    ))


def reduce_scatter_ops() -> set:
    """The functional reduce-scatter that DTensor and FSDP issue."""
    return op_overloads("_c10d_functional", ("reduce_scatter_tensor",))


def scaled_mm_ops() -> set:
    """The float8 matmul."""
    return op_overloads("aten", ("_scaled_mm",))


# ---- MoE, float8 -----------------------------------------------------------------------------------------


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x (N, D) rows grouped by `offsets` (cumulative int32 ends), w (G, D, H) -> (N, H): rows of group g times w[g]."""
    return torch._grouped_mm(x, w, offs=offsets)


@_uses_private_torch
def emulate_precision_casts() -> None:
    """Compiled code rounds its low-precision intermediates as eager does."""
    import torch._inductor.config as inductor_config  # lazy: inductor's config imports much of inductor

    inductor_config.emulate_precision_casts = True  # torch's config modules refuse unknown names


# ---- checkpoints -----------------------------------------------------------------------------------------


@_uses_private_torch
def load_dcp_into_empty(state_dict: dict, reader: Any) -> None:
    """Fill the empty `state_dict` with everything the DCP checkpoint behind `reader` holds, in this process
    alone (what torch's format_utils.dcp_to_torch_save does, with our reader)."""
    # lazy: torch.distributed.checkpoint is heavy
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    _load_state_dict(state_dict, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)


@_uses_private_torch
def dcp_metadata_path(reader: Any, rank: int | None) -> Any:
    """The path of the `.metadata` file a FileSystemReader reads."""
    return reader._get_metadata_path(rank)


LAYOUT_PICKLE_GLOBAL = ("torch.serialization", "_get_layout")  # what a pickled torch.layout calls on load


# ---- profiling -------------------------------------------------------------------------------------------


@_uses_private_torch
def record_memory_history(max_entries: int) -> None:
    """Start recording CUDA allocator events (for `memory_snapshot`)."""
    torch.cuda.memory._record_memory_history(max_entries=max_entries)


@_uses_private_torch
def stop_memory_history() -> None:
    torch.cuda.memory._record_memory_history(enabled=None)


@_uses_private_torch
def memory_snapshot() -> Any:
    """The CUDA allocator's state and recorded history (pickle it for pytorch.org/memory_viz)."""
    return torch.cuda.memory._snapshot()


@_uses_private_torch
def resume_profiler_schedule(profiler: torch.profiler.profile, step: int) -> None:
    """Start `profiler`'s schedule at `step` (before `start()`), so its windows stay aligned across resumes."""
    for attr in ("step_num", "current_action"):  # plain attributes: setting a gone one would go unnoticed
        getattr(profiler, attr)
    profiler.step_num = step
    profiler.current_action = profiler.schedule(step)
