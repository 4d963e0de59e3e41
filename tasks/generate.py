"""Prefect tasks of the generate flow: thin wrappers over arc2face_engine.job."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from arc2face_engine.job import identities_step, lifecycle, workers
from arc2face_engine.job.identities_step import BuiltIdentities
from arc2face_engine.job.shard import ShardResult
from arc2face_engine.job.shards import ShardWork
from schemas.errors import UserError
from schemas.job import JobSpec
from tasks import progress
from tasks.devices import claim_device
from tasks.slots import slot_guard


@task(name="prepare-dataset", cache_policy=NO_CACHE, persist_result=False)
def prepare_dataset(spec: JobSpec, lease_token: str | None = None) -> set[int]:
    """Check the output, write dataset.json; return the already committed shards."""
    return lifecycle.prepare_dataset(spec, lease_token).committed_shards()


@task(name="build-identities", cache_policy=NO_CACHE, persist_result=False)
def build_identities(
    spec: JobSpec, lease_token: str | None = None, built: BuiltIdentities | None = None
):
    """identities.parquet re-read, or `built` (preflight's) written, or made now."""
    writer = lifecycle.open_writer(spec, lease_token)
    return identities_step.build_identities(spec, writer, built)


def _worth_retrying(task, task_run, state) -> bool:
    """Retry transient failures (a storage hiccup, an evicted GPU), not user errors:
    a bad bank or a missing file fails the same way every time."""
    return not isinstance(state.result(raise_on_failure=False), UserError)


@task(
    name="generate-shard",
    task_run_name="shard-{work.range.shard:05d}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_worth_retrying,
)
def generate_shard(spec: JobSpec, work: ShardWork) -> ShardResult:
    """Generate, verify and commit one shard on a device of this worker, holding the
    device's cross-job slot (tasks/slots.py) while it generates."""
    on_batch = progress.callback_for(flow_run.get_id())
    with claim_device(spec.compute.devices) as placement:
        label = f"shard {work.range.shard:05d}"
        worker = f" (Dask worker {placement.worker})" if placement.worker else ""
        get_run_logger().info(f"{label} on {placement.device}{worker}")
        guard = slot_guard(placement, spec.compute.device_limits, label)
        result = workers.generate_shard(
            spec, work, device=placement.device, on_batch=on_batch, hold_device=guard
        )
    for warning in result.warnings:  # e.g. torch.compile fell back to eager
        get_run_logger().warning(f"{label}: {warning}")
    if result.superseded:  # e.g. this worker was paused, presumed lost, and resumed
        get_run_logger().warning(
            f"{label}: another attempt at it committed or claimed it first; this attempt "
            "stopped without writing more (dataset/attempt.py)"
        )
    return result


@task(name="finalize-dataset", cache_policy=NO_CACHE, persist_result=False)
def finalize_dataset(spec: JobSpec, lease_token: str | None = None):
    return lifecycle.finalize_dataset(spec, lease_token)
