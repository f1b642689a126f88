"""ModelSpec: what the platform needs to know about a model family, in one record.

A family is a package whose `__init__.py` defines `SPEC = ModelSpec(...)` and imports no torch: config
validation reads a family's features before any process starts. The heavy parts (the model class, its
tensor-parallel plan, its FLOPs count, its Hugging Face adapter) are given as "module:attribute" strings, or
as the objects themselves, and imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

Ref = Union[str, Callable[..., Any]]  # "package.module:attribute", or the object itself


def load(ref: Ref) -> Any:
    """The object a Ref names (imports its module)."""
    if not isinstance(ref, str):
        return ref
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the family's name, as model.name says it
    # (model config, max sequence length) -> nn.Module, built on the current default device (meta for big runs)
    model: Ref
    # (block, colwise, rowwise, prepare_input) -> {module name in the block: ParallelStyle}: the block's TP plan
    tp_plan: Ref
    # (model, model config, seq_len) -> (parameter count, training FLOPs per token)
    flops: Ref
    # module of the Hugging Face state-dict adapter, None if the family has none. It provides
    # to_hf(state_dict, cfg) / from_hf(hf_state_dict, cfg, keys=None) on full tensors, hf_config(cfg, dtype)
    # -> config.json, hf_keys_needed(our keys, cfg) -> {our key: HF key, or a list of HF keys for stacked experts},
    # config_mismatches(config.json, cfg), and optionally FP32_KEYS (HF name suffixes exported in fp32)
    hf: Optional[str] = None
    # model-section features the family implements (config.model.requested_features names them);
    # a config asking it for another one is refused before launch
    features: frozenset[str] = frozenset()
    # features the family cannot do without -> what the config must set
    required: Mapping[str, str] = field(default_factory=dict)

    def build_model(self, cfg: Any, seq_len: int) -> Any:
        return load(self.model)(cfg, seq_len)

    def params_and_flops(self, model: Any, cfg: Any, seq_len: int) -> tuple[int, float]:
        return load(self.flops)(model, cfg, seq_len)

    @property
    def tp_plan_block(self) -> Callable[..., dict]:
        return load(self.tp_plan)

    @property
    def hf_adapter(self) -> Any:
        return importlib.import_module(self.hf) if self.hf else None
