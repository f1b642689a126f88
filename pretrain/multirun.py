"""A local multirun (`python launch.py -m ...` on this machine) runs every point, as the SLURM launcher does: a
refused point is listed with its reason and the sweep goes on to the next; at the end a summary lists each point's
outcome. The exit status is the SLURM launcher's: 0 when every valid point ran to the end (refused points are
skipped, not failures), 1 when one failed, 2 when no point was valid.

launch.py records each point's outcome with `record`; `MultirunSummary`, a Hydra callback registered in
conf/config.yaml, prints the summary when the sweep ends. (Under cluster=slurm the points never reach launch.py
here: the SLURM launcher reports them itself, and this summary stays empty.)
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback

_outcomes: list[tuple[str, int, str]] = []  # (the point's overrides, exit status, what happened), in order


REFUSED = -1  # the status of a point whose config was refused


def record(point: str, status: int, what: str) -> None:
    """The outcome of one point: status 0 = done, REFUSED, or the exit status it failed with."""
    _outcomes.append((point, status, what))


class MultirunSummary(Callback):
    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        _outcomes.clear()

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if not _outcomes:
            return
        refused = sum(status == REFUSED for _, status, _ in _outcomes)
        failed = sum(status not in (0, REFUSED) for _, status, _ in _outcomes)
        lines = [f"multirun: {len(_outcomes) - refused - failed} of {len(_outcomes)} points done, {failed} failed, "
                 f"{refused} skipped (they do not validate)"]
        for point, status, what in _outcomes:
            outcome = "done" if status == 0 else "skipped" if status == REFUSED else f"failed (exit {status})"
            lines.append(f"  {outcome}: {point or '(no overrides)'}{': ' + what if what else ''}")
        print("\n".join(lines), file=sys.stderr if refused or failed else sys.stdout, flush=True)
        if failed or refused == len(_outcomes):
            sys.exit(1 if failed else 2)
