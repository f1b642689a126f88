"""Float8 training through torchao: swap the model's linear layers for torchao's Float8Linear, pick
the tensor-parallel styles that match, and refresh the float8 weight scales after each optimizer step.

Recipes (torchao's names): `tensorwise` scales each tensor by one number and is the only recipe whose
weights can be all-gathered in float8 by FSDP and cast to float8 before the TP collectives;
`rowwise` scales each row (more accurate, slower); `rowwise_with_gw_hp` is rowwise but keeps the
weight-gradient matmul in high precision. Layers whose name contains an entry of `filter_fqns`
stay in the training dtype (the output projection by default: it feeds the loss directly).

Float8 matmuls need tensor cores of compute capability 8.9 or newer (Ada, Hopper, Blackwell). On
CPU the math is always emulated: operands are rounded to float8 exactly as on the GPU, then
multiplied in float32, so CPU runs have float8 numerics at float32 speed. On CPU processes (gloo),
FSDP's float8 all-gather works (FSDP moves the float8 bytes as uint8), but the tensorwise TP styles
do not: they hand float8 tensors to gloo, which has no float8 dtypes, so that pair is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

from pretrain import torch_compat
from pretrain.errors import ConfigError
from pretrain.log import logger

if TYPE_CHECKING:
    from pretrain.config import Float8Config

AUTO_FILTER = "auto_filter_small_kn"
MIN_CUDA_CAPABILITY = (8, 9)


def convert_to_float8(model: nn.Module, cfg: Float8Config, device_type: str) -> None:
    """Swap the model's eligible nn.Linear for torchao's Float8Linear, in place; no-op when disabled."""
    if not cfg.enable:
        return
    # lazy: torchao loads only for float8 runs (it may be absent where float8 is off)
    from torchao.float8 import convert_to_float8_training

    emulate = emulates(cfg, device_type)
    ao_config = build_linear_config(cfg, emulate)
    keep = build_module_filter(cfg, emulate)
    converted: list[str] = []
    skipped: list[str] = []

    def module_filter_fn(module: nn.Module, fqn: str) -> bool:  # torchao calls it for each nn.Linear
        reason = keep(module, fqn)
        if reason is None:
            converted.append(fqn)
        else:
            skipped.append(f"{fqn} ({reason})")
        return reason is None

    convert_to_float8_training(model, module_filter_fn=module_filter_fn, config=ao_config)
    if cfg.recipe_name == "rowwise":
        # compiled rowwise scaling then rounds its low-precision intermediates as eager does
        # (without it, compiled and eager float8 numerics differ)
        torch_compat.emulate_precision_casts()
    if not converted:
        logger.warning(f"float8.enable=true, but no linear layer was converted (filtered: {', '.join(skipped)})")
        return
    mode = "emulated in float32" if emulate else "float8 tensor cores"
    extra = ", FSDP float8 all-gather" if ao_config.enable_fsdp_float8_all_gather else ""
    logger.info(
        f"float8 {cfg.recipe_name} ({mode}{extra}): converted {len(converted)} linear layers; "
        f"kept in high precision: {', '.join(skipped) or 'none'}"
    )


def emulates(cfg: Float8Config, device_type: str) -> bool:
    """Whether the float8 matmuls are emulated. CPU: always. CUDA: when asked; without float8 tensor
    cores and not asked, the run is refused (it would fail at the first matmul otherwise)."""
    if device_type != "cuda":
        return True
    if cfg.emulate:
        return True
    if torch.cuda.is_available():  # not on a dry run of a GPU recipe from a CPU machine
        capability = torch.cuda.get_device_capability()
        if capability < MIN_CUDA_CAPABILITY:
            name = torch.cuda.get_device_name()
            raise ConfigError(
                f"float8.enable=true needs float8 tensor cores (CUDA compute capability >= 8.9: Ada, Hopper, "
                f"Blackwell), but {name} has {capability[0]}.{capability[1]}. Fix: float8=off (float8.enable=false), "
                "or float8.emulate=true to emulate float8 numerics at high-precision speed (for testing)."
            )
    return False


def build_linear_config(cfg: Float8Config, emulate: bool):
    """torchao's Float8LinearConfig for the recipe."""
    # lazy: torchao loads only for float8 runs (it may be absent where float8 is off)
    from torchao.float8 import Float8LinearConfig

    if cfg.recipe_name == "tensorwise":
        return Float8LinearConfig(enable_fsdp_float8_all_gather=cfg.enable_fsdp_float8_all_gather, emulate=emulate)
    if cfg.enable_fsdp_float8_all_gather:  # also refused before launch (pretrain.feature_checks.check_float8)
        raise ConfigError(
            f"float8.enable_fsdp_float8_all_gather=true works with the tensorwise recipe only, not "
            f"float8.recipe_name={cfg.recipe_name}. "
            "Fix: float8=tensorwise, or float8.enable_fsdp_float8_all_gather=false."
        )
    return dataclasses.replace(Float8LinearConfig.from_recipe_name(cfg.recipe_name), emulate=emulate)


def build_module_filter(cfg: Float8Config, emulate: bool) -> Callable[[nn.Module, str], str | None]:
    """(module, fqn) -> None to convert the linear layer, else why it stays in high precision.

    `filter_fqns` entries match as substrings of the fully qualified name ("output" keeps `output`;
    "feed_forward" would keep every FFN projection). The entry `auto_filter_small_kn` adds torchao's
    size rule, measured on H100: a layer converts only when its dimensions are multiples of 16 and
    large enough for the float8 matmul plus the casts to beat bf16 (tensorwise: not when K <= 4096
    and N <= 1024; rowwise: N > 2048, K > 1024, and not both N <= 4096 and K <= 2048, for a weight of
    shape N x K). torchao has no rule for rowwise_with_gw_hp; its forward and input-gradient matmuls
    are the rowwise ones, so the rowwise rule is used. Without emulation, a layer whose dimensions are
    not multiples of 16 always stays in high precision: the float8 matmul kernel cannot take it. A MoE
    router always does (the experts themselves are stacked weights, not linear layers: they stay in the
    training dtype)."""
    # lazy: torchao loads only for float8 runs (it may be absent where float8 is off)
    from torchao.float8 import _auto_filter_for_recipe

    names = [f for f in cfg.filter_fqns if f != AUTO_FILTER]
    auto = None
    if AUTO_FILTER in cfg.filter_fqns:
        recipe = "rowwise" if cfg.recipe_name == "rowwise_with_gw_hp" else cfg.recipe_name
        auto = _auto_filter_for_recipe(recipe, filter_fqns=[])

    def keep(module: nn.Module, fqn: str) -> str | None:
        if fqn.endswith("router.gate"):  # its scores choose the experts: a rounding flip changes the routing
            return "MoE router"
        match = next((f for f in names if f in fqn), None)
        if match is not None:
            return f"filter_fqns: {match!r}"
        n, k = module.weight.shape
        if auto is not None and not auto(module, fqn):
            return f"{AUTO_FILTER}: {n}x{k}"
        if not emulate and (n % 16 or k % 16):
            return f"{n}x{k} not multiples of 16"
        return None

    return keep


def float8_tp_styles(cfg: Float8Config) -> tuple[type, type, type]:
    """(colwise, rowwise, prepare-input) TP styles: torchao's float8 ones for the tensorwise recipe.
    They cast activations to float8 before the TP all-gather (half the bytes); the rowwise recipes
    cast after it and use torch's plain styles. Called on the rank, once the process group exists."""
    if cfg.enable and cfg.recipe_name == "tensorwise":
        if dist.is_initialized() and dist.get_backend() == "gloo":
            raise ConfigError(
                "float8.recipe_name=tensorwise with tensor parallelism sends float8 activations through the "
                "tensor-parallel collectives, and gloo (the CPU backend) has no float8 dtypes. Fix: float8=rowwise "
                "(its TP collectives run in the training dtype), parallelism.tensor_parallel_degree=1, or CUDA (nccl)."
            )
        # lazy: torchao loads only for float8 runs (it may be absent where float8 is off)
        from torchao.float8.float8_tensor_parallel import (
            Float8ColwiseParallel,
            Float8RowwiseParallel,
            PrepareFloat8ModuleInput,
        )

        return Float8ColwiseParallel, Float8RowwiseParallel, PrepareFloat8ModuleInput
    return ColwiseParallel, RowwiseParallel, PrepareModuleInput


def precompute_float8_scales(model_parts: list[nn.Module], cfg: Float8Config) -> None:
    """After each optimizer step: one fused amax for all float8 weights (FSDP float8 all-gather)."""
    if not (cfg.enable and cfg.precompute_float8_dynamic_scale_for_fsdp):
        return
    # lazy: torchao loads only for float8 runs (it may be absent where float8 is off)
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    for part in model_parts:
        precompute_float8_dynamic_scale_for_fsdp(part)
