"""The private torch names in pretrain/torch_compat.py's table against the installed torch.

Run this first after a torch upgrade: a failure names what is gone, the torch version, the call site and
what to change. It also checks that the table and the code agree: each wrapper exists and its call site
uses it, no other module of pretrain/ touches a private torch name, and importing torch_compat stays cheap.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import REPO
from torch import nn

from pretrain import torch_compat
from pretrain.torch_compat import TOUCHED, TorchCompatError, Touch


def _id(touch: Touch) -> str:
    return touch.name.split(" ")[0]


@pytest.mark.parametrize("touch", TOUCHED, ids=_id)
def test_touched_name_is_in_the_installed_torch(touch: Touch):
    present = torch_compat.lookup(touch) is not torch_compat.GONE
    if not torch_compat.expected(touch):  # newer than this torch: say which fallback runs rather than pass silently
        if not present:
            warnings.warn(torch_compat.describe(touch), stacklevel=1)
        return
    assert present, torch_compat.describe(touch)


def test_the_installed_torch_is_one_the_table_was_checked_on():
    version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if version not in torch_compat.CHECKED_ON:
        warnings.warn(f"torch {torch.__version__} is not in torch_compat.CHECKED_ON {torch_compat.CHECKED_ON}: "
                      "once this file passes on it, add it there", stacklevel=1)


def test_missing_names_the_attribute_the_torch_version_and_the_call_site(monkeypatch):
    gone = Touch("torch:_no_such_function", "models/common/moe.py: GroupedExperts.forward", ("grouped_mm",),
                 "the experts run as a loop")
    monkeypatch.setattr(torch_compat, "TOUCHED", (*TOUCHED, gone))
    (message,) = torch_compat.missing()
    for part in ("torch:_no_such_function", torch.__version__, "pretrain/models/common/moe.py",
                 "torch_compat.grouped_mm", "the experts run as a loop"):
        assert part in message, (part, message)


def test_an_entry_newer_than_the_installed_torch_falls_back_instead_of_failing(monkeypatch):
    newer = Touch("torch:_from_a_later_torch", "distributed/pipeline.py: Pipeline.__init__",
                  ("after_stage_metadata_pass",), "no callback", optional=True, since="99.0")
    monkeypatch.setattr(torch_compat, "TOUCHED", (newer,))
    assert torch_compat.missing() == []
    (message,) = torch_compat.falling_back()
    assert "torch:_from_a_later_torch" in message and "Fallback: no callback" in message, message


def test_a_wrapper_names_the_gone_entry_in_its_error(monkeypatch):
    monkeypatch.setattr(torch_compat, "lookup", lambda touch: torch_compat.GONE)
    with pytest.raises(TorchCompatError, match="DeviceMesh._flatten .*parallel_dims.py"):
        torch_compat.flatten_mesh(object(), "dp")


def _call_site(touch: Touch):
    return REPO / "pretrain" / touch.used_in.split(":")[0]


@pytest.mark.parametrize("touch", TOUCHED, ids=_id)
def test_the_wrappers_exist_and_their_call_site_uses_them(touch: Touch):
    source = _call_site(touch).read_text()
    assert "torch_compat" in source, f"{_call_site(touch)} does not use torch_compat ({touch.name})"
    for name in touch.wrappers:
        assert hasattr(torch_compat, name), f"the table names torch_compat.{name}, which does not exist"
        assert name in source, f"{_call_site(touch)} does not call torch_compat.{name} ({touch.name})"


def _private_names() -> set[str]:
    """The private attribute names of the table (`_flatten`, `_forward_metadata_inference`, ...)."""
    paths = [t.name.split(" ")[0].partition(":")[2] for t in TOUCHED]
    return {part for path in paths for part in path.split(".") if part.startswith("_")}


def _is_private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def _private_uses(tree: ast.AST, touched: set[str]) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            names = [*node.module.split("."), *(a.name for a in node.names)]
            if any(_is_private(n) for n in names):
                found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] == "torch" and any(_is_private(p) for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute):
            chain, root = [node.attr], node.value
            while isinstance(root, ast.Attribute):
                chain.append(root.attr)
                root = root.value
            if node.attr in touched or (isinstance(root, ast.Name) and root.id == "torch" and _is_private(node.attr)):
                found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Constant) and node.value in touched:
            found.append(f"line {node.lineno}: {node.value!r}")
    return found


def test_no_module_but_torch_compat_touches_a_private_torch_name():
    touched = _private_names()
    offenders = []
    for path in sorted([*(REPO / "pretrain").rglob("*.py"), REPO / "launch.py"]):
        if path.name == "torch_compat.py" or not path.exists():
            continue
        offenders += [f"{path.relative_to(REPO)} {use}" for use in _private_uses(ast.parse(path.read_text()), touched)]
    assert not offenders, (
        "private torch names outside pretrain/torch_compat.py (add a wrapper and a TOUCHED entry there):\n  "
        + "\n  ".join(offenders)
    )


@pytest.mark.slow  # a fresh interpreter (subprocess)
def test_importing_torch_compat_imports_nothing_beyond_torch():
    code = ("import sys, torch; before = set(sys.modules); import pretrain.torch_compat; "
            "print(sorted(set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['pretrain', 'pretrain.torch_compat']", out


def test_after_stage_metadata_pass_runs_the_callback_after_the_pass():
    calls = []

    class Stage:
        def _forward_metadata_inference(self, x):
            calls.append(("infer", x))
            return x + 1

    stage = Stage()
    torch_compat.after_stage_metadata_pass(stage, lambda: calls.append("callback"))
    assert stage._forward_metadata_inference(1) == 2
    assert calls == [("infer", 1), "callback"]
    torch_compat.after_stage_metadata_pass(object(), lambda: calls.append("never"))  # torch < 2.13: no pass


def test_wrap_compiled_call_wraps_what_module_compile_stored():
    module = nn.Linear(2, 2)
    module.compile(backend="eager")
    seen = []

    def wrap(compiled):
        def call(*args, **kwargs):
            seen.append(len(args))
            return compiled(*args, **kwargs)

        return call

    torch_compat.wrap_compiled_call(module, wrap)
    x = torch.randn(3, 2)
    torch.testing.assert_close(module(x), nn.functional.linear(x, module.weight, module.bias))
    assert seen == [1]


def test_checkpoint_wrapper_accessors():
    plain = nn.Linear(2, 2)
    assert torch_compat.checkpoint_wrapped_module(plain) is None
    full = torch_compat.checkpoint_wrapper(plain)
    assert torch_compat.checkpoint_wrapped_module(full) is plain
    assert not torch_compat.checkpoint_has_policy(full)
    with_policy = torch_compat.checkpoint_wrapper(nn.Linear(2, 2), context_fn=lambda: None)
    assert torch_compat.checkpoint_has_policy(with_policy)


@pytest.mark.skipif(not torch_compat.grouped_mm_available(), reason="this torch build has no grouped matmul")
def test_grouped_mm_matches_a_loop_of_matmuls():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 8, generator=g), torch.randn(2, 8, 4, generator=g)  # rows of 16-byte multiples
    offsets = torch.tensor([2, 6], dtype=torch.int32)
    expected = torch.cat([x[:2] @ w[0], x[2:] @ w[1]])
    torch.testing.assert_close(torch_compat.grouped_mm(x, w, offsets), expected)
