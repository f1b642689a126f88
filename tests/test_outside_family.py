"""A model family defined outside the package (tests/outside/tiny_lab, a squared-ReLU MLP decoder) is found by its
module name, validated like a built-in one, and trained through launch.py on 1 and 2 processes (FSDP) with its
config option taken from the user's own config folder (Hydra's search path)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY, compose, losses, run_launch

from pretrain.config import ConfigError, resolve
from pretrain.config.model import family_spec, ffn_hidden_dim

OUTSIDE = Path(__file__).parent / "outside"
SEARCH_PATH = f"hydra.searchpath=[file://{OUTSIDE / 'conf'}]"


@pytest.fixture
def importable(monkeypatch):
    monkeypatch.syspath_prepend(str(OUTSIDE))


def test_a_family_is_found_by_its_module_name_and_validated(importable):
    spec = family_spec("tiny_lab.relu2")
    assert spec.name == "tiny_lab.relu2" and spec.features == {"rope_llama3"}
    job = resolve(compose([SEARCH_PATH, "model=tiny_relu2"]))
    assert (job.model.name, job.model.dim) == ("tiny_lab.relu2", 64)
    # its features are checked as a built-in family's are: it has no MoE, so a MoE config is refused
    with pytest.raises(ConfigError, match="moe"):
        resolve(compose([SEARCH_PATH, "model=tiny_relu2", "model.moe.n_routed_experts=4", "model.moe.hidden_dim=32"]))


def test_names_that_are_no_family_are_refused_with_the_fix(importable):
    with pytest.raises(ConfigError, match="no module tiny_lab.nothing can be imported.*PYTHONPATH"):
        family_spec("tiny_lab.nothing")
    with pytest.raises(ConfigError, match="no module no_such_lab.model can be imported"):
        family_spec("no_such_lab.model")
    with pytest.raises(ConfigError, match=r"module json.decoder .* defines no SPEC = ModelSpec"):
        family_spec("json.decoder")
    with pytest.raises(ConfigError, match="or to the dotted name of a module of yours"):
        family_spec("not a name")


@pytest.mark.multiprocess
def test_it_trains_on_one_and_two_processes_alike(tmp_path, cache_dir, importable):
    """FSDP on 2 ranks against 1 process, the tolerance of tests/test_parallel_parity.py (1e-5 relative: the
    same sums in another order); and the run built the lab's model, whose MLP has 2 matrices, not SwiGLU's 3."""
    env = {"PYTHONPATH": str(OUTSIDE)}
    base = [*TINY, SEARCH_PATH, "model=tiny_relu2", f"data.cache_dir={cache_dir}", "checkpoint.enable=false"]
    runs = {"single": ["training.local_batch_size=8"],
            "fsdp2": ["parallelism=fsdp", "cluster.nproc_per_node=2", "training.local_batch_size=4"]}
    out = {}
    for name, layout in runs.items():
        proc = run_launch([*base, *layout, f"job.name={name}"], cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[name] = (losses(tmp_path / "outputs" / name), proc.stdout + proc.stderr)
    (single, log), (fsdp2, _) = out["single"], out["fsdp2"]
    assert sorted(fsdp2) == sorted(single) == list(range(1, 11))
    assert fsdp2 == pytest.approx(single, rel=1e-5)
    hidden = ffn_hidden_dim(resolve(compose([SEARCH_PATH, "model=tiny_relu2"])).model)
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 2 * 64 * hidden + 2 * 64  # wq wo, wk wv (2 kv heads of 16), w1 w2, norms
    params = 2 * 512 * 64 + 2 * per_layer + 64  # embedding and output, 2 layers, final norm
    assert f"model tiny_lab.relu2/tiny: {params:,} params" in log
