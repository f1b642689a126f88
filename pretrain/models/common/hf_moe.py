"""The Hugging Face names and tensor layout the MoE decoder families share (Qwen3, DeepSeek-V3), on top of
Llama's names (pretrain/models/common/hf.py). Ours -> HF:

    layers.N.<name>                    model.layers.N.<its HF name>, one tensor each: the family's table
    layers.N.moe.experts.w1  (X, H, D) model.layers.N.mlp.experts.{0..X-1}.gate_proj.weight, (H, D) each
    layers.N.moe.experts.w3  (X, H, D) model.layers.N.mlp.experts.{0..X-1}.up_proj.weight
    layers.N.moe.experts.w2  (X, D, H) model.layers.N.mlp.experts.{0..X-1}.down_proj.weight, (D, H) each
    layers.N.moe.expert_bias (X,)      the family's routing-bias tensor, or none (zero on import; export
                                       refuses a non-zero one)

(X experts of hidden size H.) The per-expert layout is the hub's (and what transformers writes with
save_pretrained); transformers 5 fuses it into (X, 2H, D) / (X, D, H) tensors as it loads. One of our
stacked expert tensors is X of theirs: `hf_keys_needed` maps it to the list of their names, `from_hf`
stacks them and `to_hf` unstacks them.

A family whose hub files hold the experts fused (GPT-OSS, `fused_experts=True`) has one tensor per layer
for all X experts, with biases (ours b1, b3 (X, H), b2 (X, D)), gate and up interleaved in the columns:

    layers.N.moe.experts.w1, w3        model.layers.N.mlp.experts.gate_up_proj (X, D, 2H): column 2j is w1's
                                       row j (gate), column 2j+1 w3's row j (up)
    layers.N.moe.experts.b1, b3        model.layers.N.mlp.experts.gate_up_proj_bias (X, 2H), interleaved alike
    layers.N.moe.experts.w2            model.layers.N.mlp.experts.down_proj (X, H, D), w2 transposed
    layers.N.moe.experts.b2            model.layers.N.mlp.experts.down_proj_bias (X, D)

Two of ours come from one of theirs there: `hf_keys_needed` names it for both, `from_hf` takes each one's
columns, `to_hf` interleaves the pair back.

A family gives its table of per-layer names, whether its expert bias has an HF tensor, and hooks for the
tensors whose layout differs between the two (Qwen3's RoPE row order, DeepSeek's shared expert).
Everything here works on full (unsharded) tensors; callers gather or shard around it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch

from pretrain.models.common import hf as llama_hf

if TYPE_CHECKING:
    from pretrain.config import ModelConfig

EXPERT_KEYS = {"moe.experts.w1": "gate_proj", "moe.experts.w3": "up_proj", "moe.experts.w2": "down_proj"}
# the fused layout: ours -> (HF name after "mlp.experts.", the interleaved columns it takes: 0 gate, 1 up, None all)
FUSED_EXPERT_KEYS = {
    "moe.experts.w1": ("gate_up_proj", 0), "moe.experts.w3": ("gate_up_proj", 1), "moe.experts.w2": ("down_proj", None),
    "moe.experts.b1": ("gate_up_proj_bias", 0), "moe.experts.b3": ("gate_up_proj_bias", 1),
    "moe.experts.b2": ("down_proj_bias", None),
}
_FUSED_PARTNER = {"moe.experts.w1": "moe.experts.w3", "moe.experts.b1": "moe.experts.b3"}
_FUSED_BACK = {hf: [ours for ours, (name, _) in FUSED_EXPERT_KEYS.items() if name == hf]
               for hf, _ in FUSED_EXPERT_KEYS.values()}
_EXPERT_KEYS_BACK = {hf: ours for ours, hf in EXPERT_KEYS.items()}
EXPERT_BIAS = "moe.expert_bias"
_ROUTER_GATE = "moe.router.gate.weight"
_OURS_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT = re.compile(r"^mlp\.experts\.\d+\.(\w+)\.weight$")
_HF_FUSED = re.compile(r"^mlp\.experts\.(\w+)$")
_EMBEDDING = "model.embed_tokens.weight"

# (our name, tensor, model config) -> the tensor in the other layout
TensorHook = Callable[[str, torch.Tensor, "ModelConfig"], torch.Tensor]


def layer_key(key: str) -> tuple[str, str]:
    """("N", the name within the block) of one of our block tensors; ("", key) otherwise."""
    match = _OURS_LAYER.match(key)
    return (match.group(1), match.group(2)) if match else ("", key)


def hf_layer(hf_key: str) -> int | None:
    """N of an HF tensor model.layers.N.*; None for the others."""
    match = _HF_LAYER.match(hf_key)
    return int(match.group(1)) if match else None


def _as_llama(rename: Callable[[str], str], key: str, unknown: str) -> str:
    """`key` renamed as Llama's adapter does; KeyError(unknown) where Llama has no such name either."""
    try:
        return rename(key)
    except KeyError:
        raise KeyError(unknown) from None


def _as_is(key: str, value: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    return value


def _keeps_all(hf_key: str, cfg: ModelConfig) -> bool:
    return False


def fused_from_hf(name: str, value: torch.Tensor) -> torch.Tensor:
    """Our expert tensor `name` (moe.experts.w1 ...) from the fused HF tensor it is read from."""
    columns = FUSED_EXPERT_KEYS[name][1]
    if columns is not None:
        value = value[..., columns::2]  # (X, D, H) or (X, H)
    return value.transpose(1, 2).contiguous() if value.dim() == 3 else value.contiguous()  # weights: ours (X, out, in)


def fused_to_hf(name: str, value: torch.Tensor, partner: torch.Tensor | None) -> torch.Tensor:
    """The fused HF tensor of our expert tensor `name`, with its up-projection partner (w3 for w1, b3 for b1)."""
    if value.dim() == 3:
        value, partner = value.transpose(1, 2), None if partner is None else partner.transpose(1, 2)
    if partner is not None:  # (..., H) and (..., H) -> (..., 2H), gate in the even columns
        value = torch.stack([value, partner], dim=-1).flatten(-2)
    return value.contiguous()


class MoEStateDictAdapter:
    """One MoE family's names and tensors, ours <-> HF. The methods are the family adapter's functions
    (to_hf_key, from_hf_key, expert_hf_keys, hf_keys_needed, to_hf, from_hf)."""

    def __init__(
        self,
        family: str,
        layer_keys: dict[str, str],
        bias_has_no_hf_tensor: Callable[[ModelConfig], bool],
        no_bias_reason: str,
        to_hf_value: TensorHook = _as_is,
        from_hf_value: TensorHook = _as_is,
        skips_hf_key: Callable[[str, ModelConfig], bool] = _keeps_all,
        fused_experts: bool = False,
    ):
        self.family = family  # in error messages: "Qwen3", "DeepSeek-V3"
        self.layer_keys = layer_keys  # ours (after "layers.N.") -> HF (after "model.layers.N."), beyond Llama's
        self.layer_keys_back = {hf: ours for ours, hf in layer_keys.items()}
        self.bias_has_no_hf_tensor = bias_has_no_hf_tensor  # then the bias is zero on import, refused if not on export
        self.no_bias_reason = no_bias_reason  # why a non-zero expert bias cannot be exported, for the message
        self.to_hf_value = to_hf_value  # applied to each single tensor (not the experts) on export
        self.from_hf_value = from_hf_value  # its inverse, on import
        self.skips_hf_key = skips_hf_key  # HF tensors a whole-model import leaves out (not part of our model)
        self.fused_experts = fused_experts  # the hub holds one tensor per layer for all experts (GPT-OSS)

    # ------------------------------------------------------------------------- names
    def to_hf_key(self, key: str) -> str:
        """Our name of a tensor that is one HF tensor -> the HF name. KeyError for the others."""
        layer, name = layer_key(key)
        if name in self.layer_keys:
            return f"model.layers.{layer}.{self.layer_keys[name]}"
        if self.fused_experts and name in FUSED_EXPERT_KEYS:
            return f"model.layers.{layer}.mlp.experts.{FUSED_EXPERT_KEYS[name][0]}"
        return _as_llama(llama_hf.to_hf_key, key, f"{key!r} has no single Hugging Face {self.family} counterpart")

    def from_hf_key(self, hf_key: str) -> str:
        """HF name -> ours; an expert's tensor maps to the stacked tensor of its layer. KeyError for names
        we do not know (e.g. rotary inv_freq buffers)."""
        match = _HF_LAYER.match(hf_key)
        if match:
            layer, name = match.groups()
            expert = _HF_EXPERT.match(name)
            if expert and expert.group(1) in _EXPERT_KEYS_BACK:
                return f"layers.{layer}.{_EXPERT_KEYS_BACK[expert.group(1)]}"
            if name in self.layer_keys_back:
                return f"layers.{layer}.{self.layer_keys_back[name]}"
        return _as_llama(llama_hf.from_hf_key, hf_key, f"{hf_key!r} is not a {self.family} parameter we know")

    def from_hf_keys(self, hf_key: str) -> list[str]:
        """Our names of what one HF tensor holds: one, or in the fused layout two (w1 and w3 in gate_up_proj)."""
        match = _HF_LAYER.match(hf_key)
        fused = _HF_FUSED.match(match.group(2)) if match and self.fused_experts else None
        if fused and fused.group(1) in _FUSED_BACK:
            return [f"layers.{match.group(1)}.{ours}" for ours in _FUSED_BACK[fused.group(1)]]
        return [self.from_hf_key(hf_key)]

    @staticmethod
    def expert_hf_keys(key: str, n_experts: int) -> list[str]:
        """The HF names, expert by expert, of one of our stacked expert tensors (layers.N.moe.experts.w*)."""
        layer, name = layer_key(key)
        return [f"model.layers.{layer}.mlp.experts.{e}.{EXPERT_KEYS[name]}.weight" for e in range(n_experts)]

    def hf_keys_needed(self, keys: Iterable[str], cfg: ModelConfig) -> dict[str, str | list[str]]:
        """For our tensor names (e.g. one pipeline stage's), the HF tensor each is read from: a name, or for
        stacked expert weights the list of per-expert names. With tied embeddings the output projection
        is read from the embedding (HF files omit lm_head). An expert bias without an HF tensor is left
        out: it stays zero."""
        needed: dict[str, str | list[str]] = {}
        for key in keys:
            name = layer_key(key)[1]
            if name == EXPERT_BIAS and self.bias_has_no_hf_tensor(cfg):
                continue
            if name in EXPERT_KEYS and not self.fused_experts:
                needed[key] = self.expert_hf_keys(key, cfg.moe.n_routed_experts)
            elif key == "output.weight" and cfg.tie_word_embeddings:
                needed[key] = _EMBEDDING
            else:
                needed[key] = self.to_hf_key(key)
        return needed

    # ------------------------------------------------------------------------- tensors
    def to_hf(self, state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Our full state dict -> HF tensors (same dtype): experts one by one (copies, so that each is its
        own storage in safetensors), lm_head left out when embeddings are tied. ValueError for a non-zero
        expert bias where the HF model has none."""
        out = {}
        for key, value in state_dict.items():
            name = layer_key(key)[1]
            if key == "output.weight" and cfg.tie_word_embeddings:
                continue
            if name == EXPERT_BIAS and self.bias_has_no_hf_tensor(cfg):
                if torch.count_nonzero(value):
                    raise ValueError(f"{key} is non-zero, and {self.no_bias_reason}. "
                                     "Fix: train with model.moe.bias_update_speed=0 to export to it.")
                continue
            if self.fused_experts and name in FUSED_EXPERT_KEYS:
                if FUSED_EXPERT_KEYS[name][1] == 1:
                    continue  # written with its gate partner
                partner = key.replace(name, _FUSED_PARTNER[name]) if name in _FUSED_PARTNER else None
                out[self.to_hf_key(key)] = fused_to_hf(name, value, None if partner is None else state_dict[partner])
            elif name in EXPERT_KEYS:
                out.update({hf_key: w.clone() for hf_key, w in zip(self.expert_hf_keys(key, value.shape[0]), value)})
            else:
                out[self.to_hf_key(key)] = self.to_hf_value(key, value, cfg)
        return out

    def _keys_of(self, hf_state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> list[str]:
        """Our names of everything an HF state dict holds (a whole model), expert biases without an HF
        tensor included."""
        keys = []
        for hf_key in hf_state_dict:
            if self.skips_hf_key(hf_key, cfg):
                continue
            if hf_key == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            for key in self.from_hf_keys(hf_key):
                if key not in keys:
                    keys.append(key)
                    if layer_key(key)[1] == _ROUTER_GATE and self.bias_has_no_hf_tensor(cfg):
                        keys.append(key.replace("router.gate.weight", "expert_bias"))
        if cfg.tie_word_embeddings and "tok_embeddings.weight" in keys:
            keys.append("output.weight")
        return keys

    def from_hf(
        self, hf_state_dict: dict[str, torch.Tensor], cfg: ModelConfig, keys: Iterable[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """HF tensors -> our state dict. `keys`: the names wanted (a pipeline stage's); default: the whole
        model (zero expert biases where the HF model has none). KeyError names the first HF tensor that is
        missing."""
        keys = self._keys_of(hf_state_dict, cfg) if keys is None else list(keys)
        needed = self.hf_keys_needed(keys, cfg)
        out = {}
        for key in keys:
            if key not in needed:  # an expert bias without an HF tensor
                out[key] = torch.zeros(cfg.moe.n_routed_experts)
                continue
            sources = needed[key]
            names = [sources] if isinstance(sources, str) else sources
            missing = [hf_key for hf_key in names if hf_key not in hf_state_dict]
            if missing:
                raise KeyError(f"the HF checkpoint has no {missing[0]!r} (needed for our {key!r})")
            if isinstance(sources, list):
                out[key] = torch.stack([hf_state_dict[hf_key] for hf_key in names])
            elif self.fused_experts and layer_key(key)[1] in FUSED_EXPERT_KEYS:
                out[key] = fused_from_hf(layer_key(key)[1], hf_state_dict[sources])
            else:
                out[key] = self.from_hf_value(key, hf_state_dict[sources], cfg)
        return out
