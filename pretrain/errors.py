"""The errors every layer may raise, and the small checks that raise them. Imports nothing of ours.

- ConfigError: a user's mistake (config, data, checkpoint), found before or during the run; the message
  names the key or file, the value and a fix. The shell sees exit code 2 and no traceback.
- TrainingHalted: the run stopped itself on purpose (a non-finite loss, a failed save); the message says at
  which step, what was kept and how to go on. Exit code 3.
- RunStopped: a signal (Ctrl-C, SIGTERM) stopped a local run after a step, checkpointed; exit 128 + the
  signal's number, as a shell reports a process ended by it (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2  # ConfigError
EXIT_HALTED = 3  # TrainingHalted


class ConfigError(ValueError):
    """A user error: the message names the key (or file), the value and a fix."""


class TrainingHalted(RuntimeError):
    """The run stopped itself on purpose; the message says at which step, what was kept and how to go on."""


class RunStopped(Exception):
    """A signal stopped the run after a step; the message says where and how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def exit_code_of(command: Callable[[], object]) -> int:
    """A command-line tool's exit status: 0, or EXIT_USER_ERROR after one line `error: ...` for a ConfigError."""
    try:
        command()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise ConfigError unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}. Fix: set {key} to one of them.")


def check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    """Raise ConfigError unless `value` is a finite number > 0 (or >= 0 with allow_zero)."""
    if (isinstance(value, float) and not math.isfinite(value)) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value} must be {bound}. Fix: set {key} to a value {bound}.")
