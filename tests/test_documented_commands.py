"""Every shell command in a fenced block of README.md and docs/*.md is checked the cheapest way that proves it is not
refused: `python launch.py ...` is composed and validated as launch.py would (every point of a sweep); `python -m
pretrain.X ...` parses its arguments with the module's own parser; scripts exist and compile. A command whose
example paths (/data/..., /models/...) are not on this machine may be refused only for those paths.

A command of a kind this file does not know fails the test, so a new documented command gets a check."""

from __future__ import annotations

import importlib
import itertools
import os
import py_compile
import re
import shlex
import subprocess
import sys

import pytest
from helpers import REPO, compose_full, resolve_full

from pretrain.config import ConfigError

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# commands CI itself runs on every landing (.ci/run: the venv, the installs, the tests) or that start a service
NOT_CHECKED_HERE = ("python -m venv", "pip install", "python -m pytest", "aim up", "tensorboard --logdir",
                    "wandb sync")


def documented_commands() -> list[tuple[str, str, str]]:
    """(where, command, the folder it runs in) for each command line of every fenced shell block (```bash, or any
    block whose commands have a `$ ` prompt, whose other lines are output): comments and `\\` continuations
    handled; a `cd DIR` line moves the block's later commands to DIR (relative to the repository)."""
    found = []
    for path in DOCS:
        for lang, block in re.findall(r"```([a-z]*)\n(.*?)```", path.read_text(), re.S):
            prompted = any(line.startswith("$ ") for line in block.splitlines())
            if lang not in ("bash", "sh", "shell", "console") and not prompted:
                continue  # output, a diagram, code
            cwd, lines = ".", iter(block.splitlines())
            for line in lines:
                if prompted and not line.startswith("$ "):
                    continue
                line = line.removeprefix("$ ")
                while line.rstrip().endswith("\\"):
                    line = line.rstrip()[:-1] + " " + next(lines).strip()
                command = re.sub(r"\s+#.*$", "", line).strip()
                if command.startswith("cd "):
                    cwd = command[3:].strip()
                elif command and not command.startswith("#"):
                    found.append((f"{path.name}: {command[:70]}", command, cwd))
    return found


COMMANDS = documented_commands()


def words(command: str) -> list[str]:
    return shlex.split(os.path.expandvars(command.split("&&")[0]))


def check_refusal(error: ConfigError) -> None:
    """A refusal is acceptable only when it names a file or folder the reader brings that is not on this machine
    (the example's /data/..., /models/..., a downloaded model under ~/.cache, another run's checkpoint)."""
    message = str(error)
    paths = [p for p in re.findall(r"'([^']+)'", message) if "/" in p]
    assert any(not os.path.exists(os.path.expanduser(p.split("*")[0]) or ".") for p in paths), f"refused: {message}"


def launch_points(args: list[str]):
    """([(overrides, whether it must validate)] for each run the launch.py command makes, the config's name and
    folder). Every point of a command-line sweep must validate; a sweep file may hold points that do not fit."""
    config_dir, config_name, overrides, multirun = None, "config", [], False
    it = iter(args)
    for arg in it:
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg == "-cd":
            config_dir = REPO / next(it)
        elif arg == "-cn":
            config_name = next(it)
        elif arg in ("--help", "--cfg", "job"):
            continue
        else:
            overrides.append(arg)
    axes = [[o] if not multirun or "," not in o.split("=", 1)[-1] or o.split("=", 1)[-1].startswith("[")
            else [f"{o.split('=', 1)[0]}={v}" for v in o.split("=", 1)[1].split(",")] for o in overrides]
    composed = compose_full([], config_name, config_dir)
    params = composed.hydra.sweeper.get("params") or {}
    file_axes = [[f"{key}={v}" for v in str(values).split(",")] for key, values in params.items()]
    return [(list(p), not file_axes) for p in itertools.product(*axes, *file_axes)], config_name, config_dir


def check_launch(args: list[str]) -> None:
    points, config_name, config_dir = launch_points(args)
    refusals = []
    for overrides, must_pass in points:
        try:
            resolve_full(compose_full(overrides, config_name, config_dir))
        except ConfigError as e:
            if must_pass:
                check_refusal(e)
            else:
                refusals.append(e)
            continue
        if not must_pass:
            return  # a sweep file may list points that do not fit (launch.py skips and lists them): one runs
    # (tests/test_slurm_config.py checks every point of the sweep files)
    assert not refusals, f"no point of the sweep validates: {refusals[0]}"


def check_module(args: list[str]) -> None:
    """`python -m pretrain.X ...`: the module's own argument parser accepts the arguments, or, for a module that
    parses in main(), the command's (subcommand's) `--help` answers."""
    name, rest = args[2], args[3:]
    module = importlib.import_module(name)
    if hasattr(module, "parse_args"):
        module.parse_args(rest)  # argparse exits 2 on anything it does not accept
    if hasattr(module, "composed_config"):  # data.prepare: launch.py's data and model options
        try:
            module.composed_config(module.parse_args(rest).overrides)
        except ConfigError as e:
            check_refusal(e)
    if hasattr(module, "parse_args"):
        return  # its own parser took the arguments: no process needed
    sub = [a for a in itertools.takewhile(lambda a: re.fullmatch(r"[a-z][a-z-]*", a), rest)]
    proc = subprocess.run([sys.executable, "-m", name, *sub, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "usage" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.slow  # some checks start `python -m ... --help`; the launch.py ones compose in this process
@pytest.mark.parametrize("where, command, cwd", COMMANDS, ids=[w for w, _, _ in COMMANDS])
def test_documented_command(where, command, cwd, tmp_path, monkeypatch):
    if command.startswith(NOT_CHECKED_HERE):
        pytest.skip(".ci/run runs the setup and test commands on every landing")
    args = words(command)
    while re.fullmatch(r"[A-Z_]+=.*", args[0]):  # PYTHONPATH=. python ...: the import path the command gets
        if args[0].startswith("PYTHONPATH="):
            monkeypatch.syspath_prepend(str((REPO / cwd / args[0].split("=", 1)[1]).resolve()))
        args = args[1:]
    if not (REPO / cwd).is_dir():
        pytest.skip(f"runs in a project of the reader's ({cwd}); the docs show it again on tests/outside, checked")
    monkeypatch.chdir(REPO / cwd if cwd != "." else tmp_path)
    if args[0] == "python" and args[1].endswith("launch.py"):
        check_launch(args[2:])
    elif args[:2] == ["python", "-m"] and args[2].startswith("pretrain."):
        check_module(args)
    elif args[0] == "python" and args[1].endswith(".py"):
        py_compile.compile(str(REPO / args[1]), doraise=True)
    elif args[0] == "bash" and args[1].endswith(".sh"):
        assert subprocess.run(["bash", "-n", str(REPO / args[1])]).returncode == 0
    else:
        pytest.fail(f"{where}: no check for this kind of command; add one to tests/test_documented_commands.py")


def test_the_readme_commands_are_found():
    commands = [c for _, c, _ in COMMANDS]
    assert "python launch.py" in commands  # the quick start
    assert any(c.startswith("python launch.py -m parallelism") for c in commands)  # the TP sweep
    assert len(commands) > 50
