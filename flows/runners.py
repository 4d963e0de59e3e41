"""Where the shard tasks of a generate flow run: threads here, or Dask workers.

The flow picks the runner from the spec itself (not the caller), so a deployment run
and a CLI run of the same spec run the same way. Shard tasks on Dask ask for the
worker resource `GPU=1`: a worker that advertises one GPU runs one shard at a time.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from schemas.errors import UserError
from schemas.job import JobSpec
from tasks.devices import DEVICE_ENV, SHARDS_PER_DEVICE

GPU_RESOURCE = {"GPU": 1}
SCHEDULER_CONNECT_TIMEOUT_S = 5.0


def _worker_name(ordinal: int, device: str) -> str:
    return f"device-{ordinal}-{re.sub(r'[^A-Za-z0-9]+', '', device)}"


def local_cluster_kwargs(devices: list[str]) -> dict:
    """A local Dask cluster: one named worker process per device entry, which owns that
    device (ARC2FACE_DEVICE) and advertises it as GPU=1."""
    from distributed import Nanny, Scheduler

    workers = {
        _worker_name(ordinal, device): {
            "cls": Nanny,
            "options": {
                # Two shard turns on the one device: one generates while the other commits
                # (the worker's lock keeps generation one at a time).
                "nthreads": SHARDS_PER_DEVICE,
                "resources": {"GPU": SHARDS_PER_DEVICE},
                "env": {DEVICE_ENV: device},
                "silence_logs": logging.WARNING,
            },
        }
        for ordinal, device in enumerate(devices)
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard": False, "host": "127.0.0.1"}}
    return {"workers": workers, "scheduler": scheduler, "silence_logs": logging.WARNING}


def check_dask_scheduler(address: str, timeout: float = SCHEDULER_CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, with one line, when the scheduler at `address` does not answer
    (distributed itself waits 30 s and ends in a traceback)."""
    scheme, _, rest = address.rpartition("://")
    if scheme not in ("", "tcp", "tls"):
        return  # other transports (ucx, inproc) are left to distributed
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(
            f"compute.dask_address {address!r} is not host:port: write e.g. tcp://scheduler:8786"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UserError(
            f"Dask scheduler {address} is unreachable ({reason}): start it "
            "(`dask scheduler`) or fix compute.dask_address"
        ) from None


def task_runner_for(spec: JobSpec) -> TaskRunner:
    """Local: SHARDS_PER_DEVICE threads per device. Dask: the given scheduler, or a local
    cluster with one named worker per device."""
    devices = spec.compute.devices
    if spec.compute.task_runner == "local":
        return ThreadPoolTaskRunner(max_workers=SHARDS_PER_DEVICE * len(devices))
    from distributed import SpecCluster
    from prefect_dask import DaskTaskRunner

    if spec.compute.dask_address:
        return DaskTaskRunner(address=spec.compute.dask_address)
    return DaskTaskRunner(cluster_class=SpecCluster, cluster_kwargs=local_cluster_kwargs(devices))


@contextmanager
def gpu_annotation(runner: TaskRunner) -> Iterator[None]:
    """Tasks submitted inside ask Dask for one GPU (no-op for other runners)."""
    if type(runner).__name__ != "DaskTaskRunner":
        yield
        return
    import dask

    with dask.annotate(resources=GPU_RESOURCE):
        yield


def submit_on_gpu(runner: TaskRunner, task, parameters: dict) -> PrefectFuture:
    with gpu_annotation(runner):
        return runner.submit(task, parameters)
