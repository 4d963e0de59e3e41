"""Which device a shard task runs on, and the name of that device's cross-job slot.

Local runs use SHARDS_PER_DEVICE threads per entry of `compute.devices` and hand the
entries out from a process-wide pool (one shard generates while another commits). A Dask worker uses the device it owns, never an index into
the spec's list (a multi-node cluster's workers each see their own GPUs):

1. `ARC2FACE_DEVICE` in the worker's environment, when whoever started it set one
   (the local cluster of `task_runner: dask` does, one device entry per worker);
2. `cpu` when the spec asks only for CPUs;
3. `cuda:0` when `CUDA_VISIBLE_DEVICES` is set: dask-cuda (and the one-worker-per-GPU
   recipe in infra/dask-cluster.md) lists the worker's own GPU first;
4. the spec's device when it names one device (a worker that sees a single GPU).

The slot names a physical device across processes and jobs on one host:
`gpu-<host>-<GPU>` with the GPU as CUDA_VISIBLE_DEVICES lists it (so two processes
that see the same GPU under different local indices agree), `cpu-<host>-<n>` for the
n-th CPU entry (or the Dask worker's name).
"""

from __future__ import annotations

import os
import queue
import re
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from schemas.errors import UserError

DEVICE_ENV = "ARC2FACE_DEVICE"

SHARDS_PER_DEVICE = 2
_POOLS: dict[tuple[str, ...], queue.Queue] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Placement:
    """Where one shard runs: the engine's device, its slot name and the Dask worker."""

    device: str
    slot: str
    worker: str | None = None

    @property
    def is_gpu(self) -> bool:
        return self.slot.startswith("gpu-")


def _safe(text: str) -> str:
    """Concurrency-limit names allow letters, digits and - _ . only."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def _concrete(device: str) -> str:
    """'auto' and bare 'cuda' as the engine will resolve them."""
    if device not in ("auto", "cuda"):
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda:0" if device == "cuda" else f"cuda:{torch.cuda.current_device()}"
    return "cpu" if device == "auto" else device


def slot_name(device: str, ordinal: str, env: Mapping[str, str] | None = None) -> str:
    """The host-wide name of `device` (see the module docstring)."""
    env = os.environ if env is None else env
    host = _safe(socket.gethostname())
    device = _concrete(device)
    kind, _, index = device.partition(":")
    if kind == "cuda":
        local = int(index or 0)
        visible = [part.strip() for part in env.get("CUDA_VISIBLE_DEVICES", "").split(",")]
        visible = [part for part in visible if part]
        physical = visible[local] if local < len(visible) else str(local)
        return f"gpu-{host}-{_safe(physical)}"
    return f"{_safe(kind)}-{host}-{_safe(ordinal)}"


def owned_device(devices: list[str], worker: str, env: Mapping[str, str] | None = None) -> str:
    """The device a Dask worker owns (rules 1-4 of the module docstring)."""
    env = os.environ if env is None else env
    configured = env.get(DEVICE_ENV, "").strip()
    if configured:
        return configured
    if all(device == "cpu" for device in devices):
        return "cpu"
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible != "-1":
        return "cuda:0"
    if len(set(devices)) == 1:
        return devices[0]
    raise UserError(
        f"Dask worker {worker!r} owns no single device of {devices}: start one worker per "
        f"GPU with CUDA_VISIBLE_DEVICES set (dask-cuda does) or set {DEVICE_ENV} in each "
        "worker's environment"
    )


def _dask_worker_name() -> str | None:
    try:
        from distributed import get_worker
    except ImportError:
        return None
    try:
        return str(get_worker().name)
    except ValueError:  # not inside a Dask worker
        return None


@contextmanager
def claim_device(devices: list[str]) -> Iterator[Placement]:
    """Hold one device for the duration of the block: a Dask worker's own device, or
    an entry of `devices` from this process's pool."""
    worker = _dask_worker_name()
    if worker is not None:
        device = owned_device(devices, worker)
        yield Placement(device, slot_name(device, worker), worker)
        return
    key = tuple(devices)
    with _LOCK:
        if key not in _POOLS:
            pool: queue.Queue = queue.Queue()
            # SHARDS_PER_DEVICE turns per device: one shard generates while another drains
            # and commits (the worker's lock in job/workers.py keeps generation one at a time).
            for _ in range(SHARDS_PER_DEVICE):
                for ordinal, device in enumerate(devices):
                    pool.put((ordinal, device))
            _POOLS[key] = pool
    pool = _POOLS[key]
    ordinal, device = pool.get()
    try:
        yield Placement(device, slot_name(device, str(ordinal)))
    finally:
        pool.put((ordinal, device))
