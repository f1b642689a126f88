"""Loading a checkpoint never runs code: DCP's pickled .metadata is read by a restricted unpickler.

The crafted checkpoint below would create a marker file if its metadata were unpickled normally."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import REPO, TINY, losses, run_launch

from pretrain.checkpoint.integrity import MANIFEST, hash_files, write_manifest
from pretrain.checkpoint.safe_reader import SafeFileSystemReader, UnsafeCheckpoint


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(step_dir, marker) -> None:
    """A crafted .metadata; in a step with checksums, rewritten to match it, as a deliberate attacker would, so
    that the unpickler (not the checksums) is what refuses it."""
    with open(step_dir / ".metadata", "wb") as f:
        pickle.dump(_Payload(marker), f)
    if (step_dir / MANIFEST).exists():
        names = [n.name for n in step_dir.iterdir() if n.name != MANIFEST]
        write_manifest(str(step_dir), hash_files(str(step_dir), names))


def _save(path) -> dict:
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "step": torch.tensor(3)}
    with warnings.catch_warnings():  # one process, no process group: DCP says so
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=path)
    return state


def test_reads_real_metadata_and_refuses_code(tmp_path):
    saved = _save(tmp_path / "ok")
    loaded = {"model": {"w": torch.zeros(2, 3)}, "step": torch.tensor(0)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(loaded, storage_reader=SafeFileSystemReader(tmp_path / "ok"))
    assert torch.equal(loaded["model"]["w"], saved["model"]["w"]) and loaded["step"].item() == 3

    marker = tmp_path / "pwned"
    _plant(tmp_path / "ok", marker)
    with pytest.raises(UnsafeCheckpoint, match="posix.system|os.system"):
        SafeFileSystemReader(tmp_path / "ok").read_metadata()
    assert not marker.exists()


@pytest.mark.slow
def test_resume_and_convert_refuse_a_crafted_checkpoint(tmp_path):
    args = TINY + ["training.steps=2", "checkpoint.interval=2", "job.name=victim"]
    first = run_launch(args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    step_dir = tmp_path / "outputs" / "victim" / "checkpoint" / "step-2"
    shutil.copytree(step_dir, tmp_path / "copy")
    marker = tmp_path / "pwned"
    _plant(step_dir, marker)

    again = run_launch(TINY + ["training.steps=4", "checkpoint.interval=2", "job.name=victim"], cwd=tmp_path)
    assert again.returncode == 2 and "is unreadable" in again.stderr and "Fix:" in again.stderr, again.stderr[-2000:]
    command = [sys.executable, "-m", "pretrain.convert", "to-torch"]
    convert = subprocess.run(
        [*command, str(step_dir), str(tmp_path / "x.pt")], cwd=REPO, capture_output=True, text=True
    )
    assert convert.returncode == 2 and "Traceback" not in convert.stderr, convert.stderr[-2000:]
    assert not marker.exists()

    # the intact copy converts, and the file loads with weights_only=True
    out = subprocess.run(
        [*command, str(tmp_path / "copy"), str(tmp_path / "m.pt")], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert "layers.0.attention.wq.weight" in state["model"] and losses(tmp_path / "outputs" / "victim")
