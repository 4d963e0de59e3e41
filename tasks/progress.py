"""Live per-batch progress from shard tasks to the flow that runs them.

With the local task runner, shard tasks run in the flow's own process, so the flow
registers a callback under its run id and tasks find it there. Tasks on Dask workers
run elsewhere and find none; the flow then updates once per finished shard.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

BatchCallback = Callable[[int, int], None]  # (images verified, of which accepted)

_CALLBACKS: dict[str, BatchCallback] = {}
_LOCK = threading.Lock()


@contextmanager
def listening(flow_run_id: str, callback: BatchCallback) -> Iterator[None]:
    with _LOCK:
        _CALLBACKS[flow_run_id] = callback
    try:
        yield
    finally:
        with _LOCK:
            _CALLBACKS.pop(flow_run_id, None)


def callback_for(flow_run_id: str | None) -> BatchCallback | None:
    with _LOCK:
        return _CALLBACKS.get(flow_run_id) if flow_run_id else None
