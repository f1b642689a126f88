"""Decoding (pretrain/generation/, python -m pretrain.generate): the KV-cache path against a full forward for
every family and for windowed and sink attention, greedy tokens against transformers' generate() on the exported
weights, sampling, and the CLI on a launched run's checkpoints with its refusals.

Tolerances (fp32 on CPU). The cached path computes the same attention as a full forward over fewer query rows
(SDPA with an explicit mask instead of is_causal for the decoded tokens), so the logits differ by summation order:
within LOGIT_TOL (1e-5) of their largest magnitude, as tests/test_hf.py allows against transformers. Measured
(torch 2.13 CPU): 3.2e-7 to 4.7e-7 for the six models; the windowed and sink kernels within 6e-7 (absolute, on
unit-variance inputs; allowed 1e-5), and attending past the window moves them by more than 1e-3 (checked).
Greedy tokens against transformers are compared exactly: argmax differs only where two logits are within float
noise, which the seeded weights here do not have.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from helpers import REPO, TINY, assert_logits_close, compose

from pretrain import generate as generate_cli
from pretrain.checkpoint import hf_io
from pretrain.checkpoint.convert import read_dcp_model
from pretrain.config import resolve
from pretrain.generation.kv_cache import CachedAttention, KVCache
from pretrain.generation.load import load_model, open_run
from pretrain.generation.sampling import generate, next_token
from pretrain.models import get_model_spec
from pretrain.models.common.masks import WindowedAttention, masked_attention

# family -> the conf/model option and overrides of a small model of it; a new family is one more line
FAMILIES = {
    "llama3": ("llama3_debug", "model.n_layers=2"),
    "qwen3": ("qwen3_debug",),
    "qwen3_moe": ("qwen3_moe_debug",),
    "deepseek_v3": ("deepseek_v3_debug",),
    # chunks of 16 and a temperature step every 8 positions: both change within the 40 positions decoded below
    "llama4": ("llama4_debug", "model.attention_window_size=16", "model.attn_floor_scale=8"),
    "gpt_oss": ("gpt_oss_debug",),  # sliding windows of 8 every other layer, sinks
}
SEQ = 64
PROMPT, NEW = 12, 20


def model_of(family: str, seq_len: int = SEQ, seed: int = 0):
    option, *overrides = FAMILIES[family]
    cfg = resolve(compose([f"model={option}", *overrides])).model
    torch.manual_seed(seed)
    model = get_model_spec(cfg.name).build_model(cfg, seq_len)
    model.init_weights()
    return cfg, model.eval()


def random_tokens(vocab: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the KV cache
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_decoding_gives_the_full_forward_logits(family):
    cfg, model = model_of(family)
    tokens = random_tokens(cfg.vocab_size, 40)
    with torch.no_grad():
        full = model(tokens)
        with KVCache(model, 40) as cache:
            steps = [cache.forward(tokens[:, :30])] + [cache.forward(tokens[:, i : i + 1]) for i in range(30, 40)]
            assert cache.length == 40
    assert_logits_close(full, torch.cat(steps, dim=1))
    assert model.freqs_cis.shape[0] == SEQ  # the full buffer and the model's own kernels are back
    assert not any(isinstance(getattr(m, "attention_op", None), CachedAttention) for m in model.modules())


@pytest.mark.parametrize("kind, size", [("causal", 0), ("chunked", 8), ("sliding", 5)])
@pytest.mark.parametrize("sinks", [False, True], ids=["no_sinks", "sinks"])
def test_cached_kernel_masks_windows_and_sinks_by_absolute_position(kind, size, sinks):
    gen = torch.Generator().manual_seed(0)
    B, H, T, E = 2, 4, 29, 16
    q, k, v = (torch.randn(B, H, T, E, generator=gen) for _ in range(3))
    sink_logits = torch.randn(H, generator=gen) if sinks else None
    full = masked_attention(q, k, v, kind, size, sinks=sink_logits)
    op = CachedAttention(kind, size, capacity=T)
    prefill = 11  # not a multiple of the chunk: the chunk boundary at 8 falls inside the prompt, 16 and 24 after it
    outs = [op(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], sinks=sink_logits)]
    outs += [op(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], sinks=sink_logits)
             for i in range(prefill, T)]
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=1e-5, atol=1e-5)
    # the window matters: attending to every cached key gives other outputs
    if kind != "causal":
        wide = CachedAttention("causal", 0, capacity=T)
        wide(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], sinks=sink_logits)
        late = [wide(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], sinks=sink_logits)
                for i in range(prefill, T)]
        assert not torch.allclose(torch.cat(late, dim=2), full[:, :, prefill:], atol=1e-3)


def test_a_windowed_layer_keeps_its_window_under_the_cache():
    """The cache reads kind/size from a layer's WindowedAttention: a model with a sliding layer decodes as its
    full forward does."""
    cfg, model = model_of("llama3")
    model.layers["0"].attention.attention_op = WindowedAttention("sliding", 6)
    tokens = random_tokens(cfg.vocab_size, 30)
    with torch.no_grad():
        full = model(tokens)
        with KVCache(model, 30) as cache:
            steps = [cache.forward(tokens[:, :9])] + [cache.forward(tokens[:, i : i + 1]) for i in range(9, 30)]
    assert_logits_close(full, torch.cat(steps, dim=1))
    assert isinstance(model.layers["0"].attention.attention_op, WindowedAttention)


def test_cache_refuses_more_positions_than_the_model_has():
    _, model = model_of("llama3")
    with pytest.raises(ValueError, match="covers 64 positions, fewer than the 65"):
        KVCache(model, SEQ + 1)


# ----------------------------------------------------------------------------- against transformers
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_tokens_equal_transformers_generate(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    cfg, model = model_of(family, seq_len=PROMPT + NEW)
    hf_io.save_hf(model.state_dict(), str(tmp_path), get_model_spec(cfg.name), cfg, dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    prompt = random_tokens(cfg.vocab_size, PROMPT)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, PROMPT:].tolist()
    ours = generate(model, prompt[0].tolist(), NEW)
    assert len(ours) == NEW and ours == theirs


# ----------------------------------------------------------------------------- sampling
def test_sampling_is_seeded_and_stays_in_the_top_k():
    _, model = model_of("llama3")
    prompt = random_tokens(2048, 8)[0].tolist()
    greedy = generate(model, prompt, 10)
    assert generate(model, prompt, 10, temperature=1.0, top_k=1, seed=3) == greedy  # top-1 is the argmax
    sampled = generate(model, prompt, 10, temperature=1.0, seed=3)
    assert generate(model, prompt, 10, temperature=1.0, seed=3) == sampled
    assert sampled != greedy  # at temperature 1 an untrained model's tokens are far from its argmax
    logits = torch.randn(2048, generator=torch.Generator().manual_seed(0))
    allowed = set(torch.topk(logits, 5).indices.tolist())
    gen = torch.Generator().manual_seed(0)
    drawn = {next_token(logits, 1.0, 5, gen) for _ in range(200)}
    assert drawn <= allowed and len(drawn) > 1
    stop = greedy[3]  # decoding ends with the first time it comes
    assert generate(model, prompt, 10, stop_ids=(stop,)) == greedy[: greedy.index(stop) + 1]


# ----------------------------------------------------------------------------- the CLI on a launched run
@pytest.fixture(scope="module")
def run_dir(launch_once):
    """A tiny run with checkpoints at steps 1 and 2."""
    run, _ = launch_once([*TINY, "training.steps=2", "checkpoint.interval=1"])
    return run


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.generate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_cli_prints_the_greedy_continuation_of_the_newest_step(run_dir, capsys):
    proc = cli(str(run_dir), "--prompt", "The list", "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert "step-2 (llama3/debug" in proc.stderr and "Traceback" not in proc.stderr
    opened = open_run(str(run_dir))
    model = load_model(opened, 64, torch.device("cpu"), torch.float32)
    # the loaded model is the step's: the logits of a model given the step's tensors by the converter's reader
    reference = get_model_spec("llama3").build_model(opened.job.model, 64)
    reference.load_state_dict(read_dcp_model(str(run_dir / "checkpoint" / "step-2")))
    tokens = random_tokens(opened.job.model.vocab_size, 64)
    with torch.no_grad():
        assert torch.equal(model(tokens), reference.eval()(tokens))
    prompt = opened.tokenizer.encode("The list")
    new = generate(model, [opened.tokenizer.bos_id, *prompt], 12, stop_ids=(opened.tokenizer.eos_id,))
    assert proc.stdout == opened.tokenizer.decode(prompt + new) + "\n"
    assert proc.stdout.startswith("The list") and len(proc.stdout) > len("The list\n")

    # a step folder loads that step; sampling with a seed repeats itself
    step1 = str(run_dir / "checkpoint" / "step-1")
    args = [step1, "--prompt", "The list", "--max-new-tokens", "8", "--temperature", "0.9", "--top-k", "20"]
    assert generate_cli.main(args) == 0
    first = capsys.readouterr()
    assert "step-1" in first.err
    assert generate_cli.main(args) == 0
    assert capsys.readouterr().out == first.out
    assert generate_cli.main([str(run_dir), "--prompt", "The list", "--max-new-tokens", "4", "--dtype",
                              "bfloat16"]) == 0
    assert "cpu, bfloat16" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_refuses_bad_paths_and_broken_checkpoints_with_the_fix(run_dir, tmp_path, capsys):
    def refused(*args: str) -> str:
        assert generate_cli.main([*args, "--prompt", "x"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Fix:" in err and err.count("\n") == 1, err
        return err

    assert "does not exist" in refused(str(tmp_path / "nope"))
    assert "config.yaml does not exist" in refused(str(tmp_path))
    empty = tmp_path / "empty_run"
    (empty / "checkpoint").mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", empty / "config.yaml")
    assert f"{empty} has no complete checkpoint" in refused(str(empty))

    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged, ignore=shutil.ignore_patterns(".run.lock*"))
    shard = next((damaged / "checkpoint" / "step-2").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-16])
    err = refused(str(damaged))
    assert f"checkpoint {damaged}/checkpoint/step-2 is broken" in err and "step-1" in err
    assert "--max-new-tokens 0 must be > 0" in refused(str(run_dir), "--max-new-tokens", "0")
