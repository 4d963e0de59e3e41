"""One shard per device across jobs: a Prefect global concurrency limit per device slot.

Every shard holds its device's limit (`gpu-<host>-<GPU>`, one slot) while it
generates, so the shards of any number of concurrent flow runs on one host take turns
on a GPU instead of running out of its memory together; the Prefect server enforces
it, whichever process or Dask worker asks. A limit is created with one slot the first
time a device is used; raise it by hand (`prefect gcl update gpu-host-0 --limit 2`)
for a GPU that fits two shards, or disable it to lift it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress

from prefect import get_run_logger
from prefect.concurrency.sync import concurrency

from tasks.devices import Placement

_KNOWN: set[str] = set()
_KNOWN_LOCK = threading.Lock()


def limited(placement: Placement, policy: str) -> bool:
    """Whether `compute.device_limits` puts this device under a limit."""
    return policy == "all" or (policy == "gpu" and placement.is_gpu)


def ensure_limit(name: str) -> None:
    """Create the one-slot limit `name` unless it exists (then it is left as set)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with _KNOWN_LOCK:
        if name in _KNOWN:
            return
        with get_client(sync_client=True) as client:
            try:  # read first: a create that loses a race makes the server log a traceback
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                with suppress(ObjectAlreadyExists):
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
                    )
        _KNOWN.add(name)


@contextmanager
def hold_slot(placement: Placement, label: str) -> Iterator[None]:
    """Hold the device's slot; the log lines record when it was asked for and held (the
    UI shows them per shard: a shard that says it asks and nothing more is queued)."""
    ensure_limit(placement.slot)
    get_run_logger().info(f"{label} asks for device slot {placement.slot}")
    asked = time.time()
    with concurrency(placement.slot, occupy=1, strict=True):
        started = time.time()
        try:
            yield
        finally:
            get_run_logger().info(
                f"{label} held device slot {placement.slot} from {started:.6f} to "
                f"{time.time():.6f} (asked at {asked:.6f}, waited {started - asked:.1f} s)"
            )


def slot_guard(
    placement: Placement, policy: str, label: str
) -> Callable[[], AbstractContextManager[None]]:
    """What the shard holds around its device work: the slot, or nothing."""
    if not limited(placement, policy):
        return nullcontext
    return lambda: hold_slot(placement, label)
