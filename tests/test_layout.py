"""The architecture's rules that a static import check cannot see, or states more plainly than
pyproject.toml's import-linter contracts (which CI runs as `lint-imports`)."""

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from pretrain.config.model import family_names, family_spec
from pretrain.models.common.spec import load

REPO = Path(__file__).resolve().parent.parent


def test_no_import_cycle_between_our_modules():
    graph = grimp.build_graph("pretrain", exclude_type_checking_imports=True)
    # Tarjan's strongly connected components over the module import graph: any component of 2+ is a cycle
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(module: str) -> None:
        index[module] = low[module] = counter[0]
        counter[0] += 1
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles between our modules: {cycles}"


@pytest.mark.slow  # a fresh interpreter (subprocess)
def test_config_and_family_specs_load_without_torch():
    """Validation reads each family's SPEC (loaded by name) before any process starts: none of it may pull in
    torch, or a bad command line would take seconds to be refused."""
    script = (
        "import os, sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from pretrain.config import register_configs, resolve\n"
        "from pretrain.config.model import family_names, family_spec\n"
        "register_configs()\n"
        f"with initialize_config_dir(config_dir={str(REPO / 'conf')!r}, version_base='1.3'):\n"
        "    for model in ('llama3_debug', 'qwen3_moe_debug', 'deepseek_v3_debug', 'llama4_debug', 'gpt_oss_debug'):\n"
        "        job = resolve(compose('config', overrides=[f'model={model}', 'dry_run=true']), run_dir='/tmp/x')\n"
        "        assert family_spec(job.model.name).name == job.model.name\n"
        "assert family_names() == ['deepseek_v3', 'gpt_oss', 'llama3', 'llama4', 'qwen3'], family_names()\n"
        "assert 'torch' not in sys.modules, 'validation imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_spec_parts_resolve_for_every_family():
    """Each SPEC's "module:attribute" references name real objects (a typo would only show at run time)."""
    for name in family_names():
        spec = family_spec(name)
        assert callable(spec.tp_plan_block), name
        assert spec.hf_adapter is not None and callable(spec.hf_adapter.to_hf), name
        assert isinstance(load(spec.model), type), name
        assert callable(load(spec.flops)), name


def test_every_function_level_import_says_why_it_is_lazy():
    """A function-level import is either moved to the top or its block of imports keeps a `# lazy: <reason>`
    comment above it (imports that keep `--help`, config validation or optional packages light). One that only
    hid a cycle would have no reason to give."""
    unexplained = []
    for path in sorted((REPO / "pretrain").rglob("*.py")) + [REPO / "launch.py"]:
        lines = path.read_text().splitlines()
        for func in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                for body in (getattr(node, "body", None), getattr(node, "orelse", None)):
                    if not isinstance(body, list):
                        continue
                    for i, stmt in enumerate(body):
                        starts_block = i == 0 or not isinstance(body[i - 1], (ast.Import, ast.ImportFrom))
                        if isinstance(stmt, (ast.Import, ast.ImportFrom)) and starts_block:
                            above, line = lines[stmt.lineno - 2].strip(), lines[stmt.lineno - 1]
                            said = above.startswith("# lazy:") or "# lazy:" in line
                            if not said:
                                unexplained.append(f"{path.relative_to(REPO)}:{stmt.lineno}")
    assert not unexplained, f"function-level imports without a `# lazy:` reason (move them to the top?): {unexplained}"
