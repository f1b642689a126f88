"""The attention masks every family shares (models/common/masks.py): windows, sinks, which layers are windowed,
how they count in FLOPs, and what the config refuses."""

import pytest
import torch
from helpers import compose

from pretrain.config import ConfigError, resolve
from pretrain.config.model import ModelConfig, is_moe_layer, layer_window
from pretrain.models.common.flops import attended_keys
from pretrain.models.common.masks import allowed_keys, masked_attention


def reference_attention(q, k, v, allowed, sinks=None):
    """Softmax attention written out (as transformers' eager path does), in the inputs' dtype."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        B, H, T, _ = scores.shape
        scores = torch.cat([scores, sinks.view(1, H, 1, 1).expand(B, H, T, 1)], dim=-1)
        return scores.softmax(-1)[..., :-1] @ v
    return scores.softmax(-1) @ v


def test_window_patterns():
    T = 10
    i = torch.arange(T)
    q, k = i[:, None], i[None, :]
    assert torch.equal(allowed_keys("causal", 0, T), k <= q)
    chunked = allowed_keys("chunked", 4, T)
    assert chunked[7].tolist() == [False] * 4 + [True] * 4 + [False] * 2  # position 7 sees 4..7
    assert chunked[8].tolist() == [False] * 8 + [True, False]  # a new chunk starts at 8
    sliding = allowed_keys("sliding", 3, T)
    assert sliding[7].tolist() == [False] * 5 + [True] * 3 + [False] * 2  # the last 3 keys: 5, 6, 7
    assert sliding.sum(-1).tolist() == [1, 2] + [3] * 8


# float64 on both sides: the only difference is the order of the sums, so 1e-12 is far above rounding
@pytest.mark.parametrize("kind,size", [("causal", 0), ("chunked", 4), ("sliding", 3), ("sliding", 64)])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_masked_attention_matches_the_written_out_softmax(kind, size, with_sinks):
    torch.manual_seed(0)
    B, H, T, E = 2, 3, 13, 8  # T not a multiple of the window, nor of the key padding
    q, k, v = (torch.randn(B, H, T, E, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sinks = torch.randn(H, dtype=torch.float64, requires_grad=True) if with_sinks else None
    ours = masked_attention(q, k, v, kind, size, sinks=sinks)
    ref = reference_attention(q, k, v, allowed_keys(kind, size, T), sinks)
    assert (ours - ref).abs().max() < 1e-12
    inputs = [q, k, v] + ([sinks] if with_sinks else [])
    g_ours = torch.autograd.grad(ours.square().sum(), inputs)
    g_ref = torch.autograd.grad(ref.square().sum(), inputs)
    for a, b in zip(g_ours, g_ref):
        assert (a - b).abs().max() < 1e-12


def test_sinks_take_probability_away_from_the_keys():
    q, k = torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2)
    v = torch.ones(1, 1, 4, 2)
    # all scores 0: the first query has one key, so a sink logit of 0 halves its output
    out = masked_attention(q, k, v, "causal", 0, sinks=torch.zeros(1))
    assert torch.allclose(out[0, 0, :, 0], torch.tensor([1 / 2, 2 / 3, 3 / 4, 4 / 5]))


def test_which_layers_are_windowed_and_moe():
    # Llama 4: chunked RoPE layers, every 4th layer global; MoE every other layer (Maverick)
    cfg = ModelConfig(n_layers=8, attention_window="chunked", attention_window_size=16, global_attention_every=4)
    assert [layer_window(cfg, i)[0] for i in range(8)] == ["chunked"] * 3 + ["causal"] + ["chunked"] * 3 + ["causal"]
    cfg.moe.n_routed_experts, cfg.moe.interleave_step = 4, 2
    assert [is_moe_layer(cfg, i) for i in range(4)] == [False, True, False, True]
    # GPT-OSS: sliding and full layers alternate, starting with sliding
    cfg = ModelConfig(n_layers=4, attention_window="sliding", attention_window_size=128, global_attention_every=2)
    assert [layer_window(cfg, i) for i in range(2)] == [("sliding", 128), ("causal", 0)]
    assert layer_window(ModelConfig(), 0) == ("causal", 0)


def test_flops_count_the_window_not_the_sequence():
    cfg = ModelConfig(n_layers=4, attention_window="sliding", attention_window_size=128, global_attention_every=2)
    assert attended_keys(cfg, 4096) == 2 * 128 + 2 * 4096
    assert attended_keys(cfg, 64) == 4 * 64  # a window longer than the sequence is the whole sequence
    assert attended_keys(ModelConfig(n_layers=3), 100) == 300


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model.attention_window=diagonal"], "model.attention_window"),
        (["model.attention_window=sliding"], "model.attention_window_size"),
        (["model.attention_window=sliding", "model.attention_window_size=8"], "the llama3 family does not implement"),
        (["model=qwen3_moe_debug", "model.moe.interleave_step=8"], "leave no MoE layer"),
    ],
)
def test_bad_window_settings_are_refused(overrides, key):
    with pytest.raises(ConfigError, match="Fix:") as info:
        resolve(compose(overrides))
    assert key in str(info.value)
