"""Layer 2: the Llama 3 model, its sizes and FLOPs, and the lr schedule, against hand references."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.components.optim import lr_factor
from pretrain.config import LRSchedulerConfig, ModelConfig
from pretrain.models import get_model_spec
from pretrain.models.common.rope import precompute_freqs_cis
from pretrain.models.llama3.model import Transformer

TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**vars(TINY), **overrides}), max_seq_len=16)
    model.init_weights()
    return model


def test_forward_shape_and_causality():
    model = tiny_model()
    tokens = torch.randint(0, 128, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, 128)
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 128
    # positions before the change cannot see it
    assert torch.equal(model(changed)[:, :10], logits[:, :10])
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])


def test_grouped_query_attention_equals_repeated_heads():
    """GQA with K kv heads == full multi-head attention whose k/v weights repeat each kv head."""
    gqa = tiny_model()
    mha = tiny_model(n_kv_heads=4)
    state = {k: v for k, v in gqa.state_dict().items() if not k.endswith(("wk.weight", "wv.weight"))}
    mha.load_state_dict(state, strict=False)
    head_dim = 64 // 4
    for name in ("wk", "wv"):
        for i in mha.layers:
            w = getattr(gqa.layers[i].attention, name).weight.view(2, head_dim, 64)
            getattr(mha.layers[i].attention, name).weight.data = w.repeat_interleave(2, dim=0).reshape(64, 64)
    tokens = torch.randint(0, 128, (2, 16))
    torch.testing.assert_close(gqa(tokens), mha(tokens))


def test_init_is_seeded_and_depth_scaled():
    a, b, c = tiny_model(0), tiny_model(0), tiny_model(1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name
    # wo of block 1 starts with std 0.02 / sqrt(2 * 2); the output layer with dim ** -0.5
    assert a.layers["1"].attention.wo.weight.std().item() == pytest.approx(0.01, rel=0.15)
    assert a.output.weight.std().item() == pytest.approx(64**-0.5, rel=0.15)


def test_tied_embeddings_share_one_weight():
    model = tiny_model(tie_word_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    # the shared matrix starts as an output head (std dim ** -0.5), not as an N(0, 1) embedding
    assert model.output.weight.std().item() == pytest.approx(64**-0.5, rel=0.15)
    n_params, _ = get_model_spec("llama3").params_and_flops(model, model.cfg, 16)
    untied, _ = get_model_spec("llama3").params_and_flops(tiny_model(), TINY, 16)
    assert untied - n_params == 128 * 64


def test_rope_llama31_scaling():
    cfg = ModelConfig(dim=4096, n_heads=32)  # head_dim 128
    scaled = precompute_freqs_cis(cfg, 2).angle()[1]
    plain = precompute_freqs_cis(ModelConfig(dim=4096, n_heads=32, rope_scaling=False), 2).angle()[1]
    wavelen = 2 * math.pi / plain
    high = wavelen < 8192 / 4  # short wavelengths: unchanged
    low = wavelen > 8192 / 1  # long wavelengths: slowed 8x
    torch.testing.assert_close(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 8)
    mid = ~(high | low)
    assert mid.any() and (scaled[mid] < plain[mid]).all() and (scaled[mid] > plain[mid] / 8).all()


# Published sizes (Meta's model cards / HF config sums): 8.03B, 70.6B, 405.9B.
PUBLISHED = {"llama3_8b": 8_030_261_248, "llama3_70b": 70_553_706_496, "llama3_405b": 405_853_388_800}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_parameter_counts_on_meta_match_published(preset):
    from helpers import compose

    from pretrain.config import resolve

    cfg = resolve(compose([f"model={preset}"])).model
    spec = get_model_spec("llama3")
    with torch.device("meta"):
        model = spec.build_model(cfg, 8192)
    n_params, flops = spec.params_and_flops(model, cfg, 8192)
    assert n_params == PUBLISHED[preset]
    # torchtitan's FLOPs/token: 6 x (params - embedding) + 12 x layers x heads x head_dim x seq
    embedding = cfg.vocab_size * cfg.dim
    attention = 12 * cfg.n_layers * cfg.n_heads * (cfg.dim // cfg.n_heads) * 8192
    assert flops == 6 * (PUBLISHED[preset] - embedding) + attention


def test_llama3_8b_flops_per_token_by_hand():
    # 6 * (8_030_261_248 - 128256 * 4096) + 12 * 32 * 32 * 128 * 8192
    assert 6 * (8_030_261_248 - 525_336_576) + 12 * 32 * 32 * 128 * 8192 == 57_914_449_920
    cfg = ModelConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024, ffn_dim_multiplier=1.3
    )
    spec = get_model_spec("llama3")
    with torch.device("meta"):
        model = spec.build_model(cfg, 8192)
    assert spec.params_and_flops(model, cfg, 8192)[1] == 57_914_449_920


def test_lr_schedule_warmup_stable_decay():
    cfg = LRSchedulerConfig(warmup_steps=4, decay_ratio=0.5, decay_type="linear", min_lr_factor=0.1)
    factors = [lr_factor(s, cfg, total_steps=20) for s in range(21)]
    assert factors[:4] == [1 / 5, 2 / 5, 3 / 5, 4 / 5]  # linear warm-up
    assert factors[4:10] == [1.0] * 6  # stable until the last 50%
    assert factors[15] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway down the decay
    assert factors[20] == pytest.approx(0.1)
    cosine = LRSchedulerConfig(warmup_steps=0, decay_type="cosine")
    assert lr_factor(5, cosine, 10) == pytest.approx(0.5)
    sqrt = LRSchedulerConfig(warmup_steps=0, decay_type="sqrt")
    assert lr_factor(4, sqrt, 16) == pytest.approx(0.5)
