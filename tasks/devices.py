"""Which accelerator a shard task runs on.

Local runs use SHARDS_PER_DEVICE threads per device and hand device slots out
from a process-wide pool: two shard tasks share a device, one generating while the
other drains and commits (the worker's lock in dataset/job.py keeps generation one at
a time). Dask workers each own one device (worker resources GPU=1); a worker picks
its device from its name, so a local N-worker cluster spreads over N devices.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SHARDS_PER_DEVICE = 2
_POOLS: dict[tuple[str, ...], queue.Queue] = {}
_LOCK = threading.Lock()


def _dask_worker_index() -> int | None:
    try:
        from distributed import get_worker
    except ImportError:
        return None
    try:
        name = get_worker().name
    except ValueError:  # not inside a Dask worker
        return None
    return name if isinstance(name, int) else abs(hash(name))


@contextmanager
def claim_device(devices: list[str]) -> Iterator[str]:
    """Hold one slot of a device of `devices` for the duration of the block."""
    worker_index = _dask_worker_index()
    if worker_index is not None:
        yield devices[worker_index % len(devices)]
        return
    key = tuple(devices)
    with _LOCK:
        if key not in _POOLS:
            pool: queue.Queue = queue.Queue()
            for _ in range(SHARDS_PER_DEVICE):
                for device in devices:
                    pool.put(device)
            _POOLS[key] = pool
    pool = _POOLS[key]
    device = pool.get()
    try:
        yield device
    finally:
        pool.put(device)
