"""Checkpoints that leave and enter the platform: HF safetensors both ways (checked against
transformers' LlamaForCausalLM), initial loads into every layout, and the convert CLI.

Tolerances (fp32 on CPU). Our model and transformers' compute the same function in a different order:
RoPE as complex products of adjacent pairs vs cos/sin with rotate_half on permuted rows, cos/sin of
differently rounded angles, different kv-head expansion and matmul groupings. Each op differs by a
few ulps (~1e-7 relative); through two blocks the logits stay within ~1e-6 of their largest magnitude.
We allow 1e-5 of it. Measured (torch 2.13 CPU, transformers 5.24): export 1.2e-7 untied, 1.0e-7 tied,
import 6e-7. Dropping the rope scaling from config.json moves them by 7e-3 to 1.4e-2 (checked below),
skipping the wq/wk row permutation by 1.5e-2: the tolerance sees RoPE errors.
Losses of launched runs: fp32, step 1 is a forward on the same weights and the same global batch, so
layouts differ only by summation order (~1e-7); allowed 1e-5 relative, as tests/test_parallel_parity.py
does. Measured: single, FSDP 2, TP 2 and transformers' loss within 7e-8 relative of each other; our
own initialisation gives a loss 5e-2 away.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import LOSS_RTOL, REPO, TINY, assert_logits_close, compose, logits, losses, run_launch

transformers = pytest.importorskip("transformers")

from pretrain.checkpoint import convert, hf_io  # noqa: E402
from pretrain.checkpoint.manager import CheckpointManager  # noqa: E402
from pretrain.config import CheckpointConfig, ConfigError, ModelConfig  # noqa: E402
from pretrain.models import get_model_spec  # noqa: E402
from pretrain.models.common import hf as llama_hf  # noqa: E402

SPEC = get_model_spec("llama3")
# GQA (4 query heads, 2 kv heads), and rope scaling that reaches all three bands at 64 positions:
# head_dim 16 with theta 1e4 gives wavelengths 6.3 .. 2e4; with an original context of 16 the shortest
# one lies between the high and low wavelengths (blended) and the others above (divided by the factor).
UNIT = ModelConfig(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, rope_theta=1e4,
    rope_scaling=True, rope_scaling_factor=4.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
    rope_original_max_seq_len=16,
)
SEQ = 64
# TINY's model section (tests/helpers.py) as a ModelConfig: the launched runs load HF weights made for it
TINY_MODEL = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32)
RUN = [*TINY, "training.local_batch_size=8", "metrics.log_freq=1"]  # global batch 8 in every layout


def our_model(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = SPEC.build_model(cfg, SEQ)
    model.init_weights()
    with torch.no_grad():  # sharper attention than at init (q.k x 100), so that the rotations matter to the logits
        for block in model.layers.values():
            block.attention.wq.weight *= 10
            block.attention.wk.weight *= 10
    return model.eval()


def hf_llama_config(cfg: ModelConfig, **extra) -> transformers.LlamaConfig:
    """The transformers config of an equivalent model, built with transformers' own (v5) rope keys."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_seq_len)
    return transformers.LlamaConfig(
        hidden_size=cfg.dim, intermediate_size=llama_hf.ffn_hidden_size(cfg), num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.norm_eps, max_position_embeddings=max(SEQ, 4 * cfg.rope_original_max_seq_len),
        rope_parameters=rope, tie_word_embeddings=cfg.tie_word_embeddings, **extra,
    )


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, UNIT.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- adapter, in process
def test_names_and_rope_rows_round_trip():
    model = our_model(UNIT)
    sd = model.state_dict()
    hf_sd = llama_hf.to_hf(sd, UNIT)
    assert "model.layers.1.mlp.gate_proj.weight" in hf_sd and "lm_head.weight" in hf_sd
    assert not torch.equal(hf_sd["model.layers.0.self_attn.q_proj.weight"], sd["layers.0.attention.wq.weight"])
    back = llama_hf.from_hf(hf_sd, UNIT)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # a pipeline stage asks for its own keys only
    assert llama_hf.hf_keys_needed(["layers.1.ffn_norm.weight", "norm.weight"], UNIT) == {
        "layers.1.ffn_norm.weight": "model.layers.1.post_attention_layernorm.weight",
        "norm.weight": "model.norm.weight",
    }


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, tokens, tied):
    cfg = ModelConfig(**{**vars(UNIT), "tie_word_embeddings": tied})
    model = our_model(cfg)
    config = hf_io.save_hf(model.state_dict(), str(tmp_path), SPEC, cfg, dtype="float32")
    assert config["intermediate_size"] == model.layers["0"].feed_forward.w1.out_features
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["num_key_value_heads"] == 2
    index = json.loads((tmp_path / hf_io.INDEX).read_text())
    assert ("lm_head.weight" in index["weight_map"]) is not tied  # tied: HF files omit the output projection
    hf, info = transformers.LlamaForCausalLM.from_pretrained(
        str(tmp_path), output_loading_info=True, dtype=torch.float32
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert_logits_close(logits(model, tokens), logits(hf.eval(), tokens))

    # the comparison sees the rope scaling: without it in config.json the logits move well beyond the tolerance
    config.pop("rope_scaling")
    (tmp_path / "config.json").write_text(json.dumps(config))
    unscaled = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with pytest.raises(AssertionError):
        assert_logits_close(logits(model, tokens), logits(unscaled, tokens))


def test_export_in_bfloat16_in_shards(tmp_path):
    from safetensors import safe_open

    model = our_model(UNIT)
    hf_io.save_hf(model.state_dict(), str(tmp_path), SPEC, UNIT, dtype="bfloat16", max_shard_bytes=60_000)
    index = json.loads((tmp_path / hf_io.INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with safe_open(str(tmp_path / files[0]), framework="pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    read = hf_io.read_hf(str(tmp_path), ["model.norm.weight"])  # one tensor, from its own shard
    assert torch.equal(read["model.norm.weight"], model.norm.weight.detach().bfloat16())


def test_import_from_transformers_gives_equal_logits(tmp_path, tokens):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_llama_config(UNIT, initializer_range=0.1)).eval()
    hf.save_pretrained(str(tmp_path))
    assert (tmp_path / "model.safetensors").exists()
    assert llama_hf.config_mismatches(hf_io.read_config(str(tmp_path)), UNIT) == []
    model = our_model(UNIT, seed=1)  # other weights until loaded
    hf_io.load_hf_into([model], str(tmp_path), SPEC, UNIT)
    assert_logits_close(logits(model, tokens), logits(hf, tokens))


def test_initial_load_errors_name_the_key_and_a_fix(tmp_path):
    model = our_model(TINY_MODEL)

    def load(**cfg):
        return CheckpointManager(CheckpointConfig(**cfg), str(tmp_path / "run"), [model], None, None, None, True).load()

    with pytest.raises(ConfigError, match=r"checkpoint.initial_load_path='/no/such/dir' is not a directory.*Fix"):
        load(initial_load_path="/no/such/dir", initial_load_in_hf=True)
    hf_dir = tmp_path / "hf"
    hf_io.save_hf(model.state_dict(), str(hf_dir), SPEC, ModelConfig(**{**vars(TINY_MODEL), "dim": 128, "n_heads": 8}))
    with pytest.raises(ConfigError, match=r"initial_load_in_hf=true"):  # an HF folder without the flag
        load(initial_load_path=str(hf_dir))
    with pytest.raises(ConfigError, match=r"model.dim gives hidden_size=64 but config.json has hidden_size=128.*Fix"):
        load(initial_load_path=str(hf_dir), initial_load_in_hf=True)


# ----------------------------------------------------------------------------- launched runs
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_runs")


@pytest.fixture(scope="module")
def tiny_hf_dir(root):
    """A random transformers Llama shaped like TINY's model, saved by transformers itself."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_llama_config(TINY_MODEL, initializer_range=0.1))
    hf.save_pretrained(str(root / "tiny_hf"))
    return root / "tiny_hf"


def launch(root, name: str, overrides: list[str], cache_dir) -> dict[int, float]:
    proc = run_launch([*RUN, *overrides, f"job.name={name}", f"data.cache_dir={cache_dir}"], cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return losses(root / "outputs" / name)


HF_LOAD_LAYOUTS = {
    # single: 2 steps with a checkpoint each, the last one model-only in bfloat16, for the CLI tests below
    "single": ["training.steps=2", "checkpoint.interval=1", "checkpoint.last_save_model_only=true",
               "checkpoint.export_dtype=bfloat16"],
    "fsdp2": ["parallelism=fsdp", "cluster.nproc_per_node=2", "training.local_batch_size=4", "training.steps=1",
              "checkpoint.enable=false"],
    "tp2": ["parallelism=tp", "parallelism.tensor_parallel_degree=2", "cluster.nproc_per_node=2", "training.steps=1",
            "checkpoint.enable=false"],
}


@pytest.fixture(scope="module")
def hf_runs(root, tiny_hf_dir, cache_dir):
    """Step-1 loss of runs that start from the HF folder, per layout."""
    initial = [f"checkpoint.initial_load_path={tiny_hf_dir}", "checkpoint.initial_load_in_hf=true"]
    return {
        name: launch(root, f"hf_{name}", [*initial, *extra], cache_dir)[1] for name, extra in HF_LOAD_LAYOUTS.items()
    }


def first_step_losses(hf_dir, cache_dir) -> tuple[float, float]:
    """Per-token mean cross-entropy on the runs' first global batch: (transformers' model from hf_dir,
    our model with its own initialisation, i.e. step 1 of a run without an initial load)."""
    from pretrain.config import resolve
    from pretrain.data.dataset import TokenWindowLoader
    from pretrain.data.tokenizer import build_tokenizer

    job = resolve(compose([*RUN, f"data.cache_dir={cache_dir}"]))
    t = job.training
    tokenizer = build_tokenizer(job.data, job.model)
    loader = TokenWindowLoader(job.data, tokenizer, t.seq_len, t.local_batch_size, t.global_batch_size)
    [(inputs, labels)] = loader.next_step()
    hf = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    torch.manual_seed(t.seed)  # as the Trainer initialises on CPU
    own = SPEC.build_model(job.model, t.seq_len)
    own.init_weights()
    ce = torch.nn.functional.cross_entropy
    return tuple(ce(logits(m, inputs).flatten(0, 1), labels.flatten()).item() for m in (hf, own.eval()))


@pytest.mark.multiprocess
def test_initial_load_from_hf_in_every_layout(hf_runs, tiny_hf_dir, cache_dir):
    reference, own_init = first_step_losses(tiny_hf_dir, cache_dir)
    for name, loss in hf_runs.items():
        assert loss == pytest.approx(hf_runs["single"], rel=LOSS_RTOL), (name, loss, hf_runs["single"])
        assert loss == pytest.approx(reference, rel=LOSS_RTOL), (name, loss, reference)
    assert abs(own_init - reference) > 1e-2  # a run from its own init is another model


# ----------------------------------------------------------------------------- the CLI
@pytest.mark.slow
def test_cli_bad_paths_exit_2_with_the_argument_named(tmp_path):
    command = [sys.executable, "-m", "pretrain.convert", "to-hf", str(tmp_path / "nope"), str(tmp_path / "out")]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: dcp_step_dir"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert convert.main(["to-torch", str(tmp_path), str(tmp_path / "x.pt")]) == 2  # a folder, but no DCP in it
    assert convert.main(["from-hf", str(tmp_path), str(tmp_path / "out")]) == 2


@pytest.mark.multiprocess
def test_cli_to_hf_to_torch_and_from_hf(root, hf_runs, tiny_hf_dir, tokens, cache_dir, capsys):
    ckpt = root / "outputs" / "hf_single" / "checkpoint"  # a run's own checkpoints
    tiny_tokens = tokens % TINY_MODEL.vocab_size
    # to-hf, on the full step-1 and on the model-only bfloat16 step-2
    for step, dtype in ((1, "float32"), (2, "bfloat16")):
        out = root / f"run_hf_{step}"
        assert convert.main(["to-hf", str(ckpt / f"step-{step}"), str(out), "--dtype", dtype]) == 0
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
        model = SPEC.build_model(TINY_MODEL, SEQ)
        model.load_state_dict({k: v.float() for k, v in convert.read_dcp_model(str(ckpt / f"step-{step}")).items()})
        hf, info = transformers.LlamaForCausalLM.from_pretrained(
            str(out), output_loading_info=True, dtype=torch.float32
        )
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert_logits_close(logits(model.eval(), tiny_tokens), logits(hf.eval(), tiny_tokens))
    assert convert.main(["to-hf", str(ckpt / "step-1"), str(root / "run_hf_1")]) == 2  # not an empty folder
    assert "out_dir" in capsys.readouterr().err

    # to-torch: torch's own format, plain tensors, readable without unpickling code
    pt = root / "run_step1.pt"
    assert convert.main(["to-torch", str(ckpt / "step-1"), str(pt)]) == 0
    saved = torch.load(pt, weights_only=True)
    weights = convert.read_dcp_model(str(ckpt / "step-1"))
    assert saved["model"].keys() == weights.keys() and "optimizer" in saved
    assert all(torch.equal(saved["model"][k], weights[k]) for k in weights)

    # from-hf: a model-only DCP folder a run starts from, with the same first loss as the HF load
    out = root / "tiny_dcp"
    model_args = ["--model", "llama3_debug", *(o for o in TINY if o.startswith("model."))]
    assert convert.main(["from-hf", str(tiny_hf_dir), str(out), *model_args]) == 0
    assert convert.main(["from-hf", str(tiny_hf_dir), str(root / "bad"), "--model", "llama3_debug"]) == 2
    assert "model.n_layers" in capsys.readouterr().err
    initial = [f"checkpoint.initial_load_path={out}", "training.steps=1", "checkpoint.enable=false"]
    from_dcp = launch(root, "from_dcp", initial, cache_dir)
    assert from_dcp[1] == pytest.approx(hf_runs["single"], rel=1e-6)


@pytest.mark.multiprocess
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP on one process, no group: intended
def test_initial_load_of_a_dcp_step_whole_or_model_only(root, hf_runs, cache_dir, tmp_path):
    """checkpoint.initial_load_path on a run's DCP step folder, in process: everything (weights, optimizer,
    schedule, data position, step) with initial_load_model_only=false, the weights alone by default."""
    from pretrain.components.optim import build_lr_scheduler, build_optimizer
    from pretrain.config import resolve
    from pretrain.data.dataset import TokenWindowLoader
    from pretrain.data.tokenizer import build_tokenizer

    ckpt = root / "outputs" / "hf_single" / "checkpoint"
    job = resolve(compose([*RUN, f"data.cache_dir={cache_dir}"]))
    t = job.training

    def manager(path: str, model_only: bool):
        model = SPEC.build_model(job.model, t.seq_len)
        optimizer = build_optimizer(model, job.optimizer)
        tokenizer = build_tokenizer(job.data, job.model)
        loader = TokenWindowLoader(job.data, tokenizer, t.seq_len, t.local_batch_size, t.global_batch_size)
        cfg = CheckpointConfig(initial_load_path=path, initial_load_model_only=model_only)
        parts = (model, optimizer, build_lr_scheduler(optimizer, job.lr_scheduler, t.steps), loader)
        return CheckpointManager(cfg, str(tmp_path / "run"), [model], *parts[1:], True), parts

    cm, (model, optimizer, scheduler, loader) = manager(str(ckpt / "step-1"), model_only=False)
    state = cm.load()
    assert state.step == 1 and loader.windows_consumed == t.global_batch_size and scheduler.last_epoch == 1
    assert all("exp_avg" in optimizer.state[p] for p in model.parameters())
    saved = convert.read_dcp_model(str(ckpt / "step-1"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())

    cm, (model, optimizer, scheduler, loader) = manager(str(ckpt / "step-2"), model_only=True)  # bfloat16, model only
    assert cm.load().step == 0 and not optimizer.state and loader.windows_consumed == 0
    saved = convert.read_dcp_model(str(ckpt / "step-2"))
    assert all(torch.equal(saved[k].float(), v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match=r"holds model weights only.*Fix: checkpoint.initial_load_model_only=true"):
        manager(str(ckpt / "step-2"), model_only=False)[0].load()
    with pytest.raises(ConfigError, match=r"run directory: use .*step-2"):  # the run directory, not a step
        manager(str(root / "outputs" / "hf_single"), model_only=True)[0].load()
