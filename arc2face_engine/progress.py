"""How long-running dataset operations (audit, export) report progress to a front end.

The engine stays free of any UI: it calls `report(stage, completed, total)` and the
CLI draws a rich progress bar from it (flows/cli.py).
"""

from __future__ import annotations

from typing import Protocol


class ProgressReport(Protocol):
    def __call__(self, stage: str, completed: int, total: int) -> None:
        """`completed` of `total` units of `stage` are done (called again as it advances)."""


def no_progress(stage: str, completed: int, total: int) -> None:
    """The default: report nothing."""
