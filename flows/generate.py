"""The generate flow: identities -> shards fanned out -> finalise."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from arc2face_engine.dataset import job as dataset_job
from arc2face_engine.dataset.shard import ShardResult, total
from schemas.job import JobSpec, load_spec
from schemas.tables import DatasetInfo
from tasks.generate import build_identities, finalize_dataset, generate_shard, prepare_dataset


class ShardsFailed(RuntimeError):
    """Some shards failed; the committed ones are kept and a re-run resumes."""


def task_runner_for(spec: JobSpec):
    """Local: one thread per device. Dask: one worker per device via resources."""
    devices = spec.compute.devices
    if spec.compute.task_runner == "local":
        return ThreadPoolTaskRunner(max_workers=len(devices))
    from prefect_dask import DaskTaskRunner

    if spec.compute.dask_address:
        return DaskTaskRunner(address=spec.compute.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": len(devices),
            "threads_per_worker": 1,
            "processes": True,
            "resources": {"GPU": 1},
            "silence_logs": logging.WARNING,
            "dashboard_address": None,
        }
    )


def _progress(show: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} shards"),
        TextColumn("{task.fields[images]} images, {task.fields[rate]:.1f} img/s"),
        TextColumn("accept {task.fields[accept]:.0%}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not show,
    )


def _summary_rows(info: DatasetInfo, results: Iterable[ShardResult], seconds: float) -> list[dict]:
    combined = total(list(results))
    counts = info.counts
    rows = [
        {"metric": "identities", "value": counts.identities},
        {"metric": "shards committed", "value": f"{counts.committed_shards}/{counts.shards}"},
        {"metric": "images (this run)", "value": combined.images},
        {"metric": "images (dataset)", "value": counts.images},
        {"metric": "accepted (dataset)", "value": counts.accepted},
        {"metric": "rejected (dataset)", "value": counts.rejected},
        {"metric": "images/s (this run)", "value": round(combined.images / max(seconds, 1e-9), 2)},
    ]
    rows += [
        {"metric": f"rejected: {reason}", "value": n}
        for reason, n in sorted(counts.reject_reasons.items())
    ]
    return rows


@flow(name="generate-dataset", log_prints=True)
def generate_dataset_flow(spec: JobSpec, show_progress: bool = False) -> DatasetInfo:
    """Turn a job spec into a dataset: identities, shards, verification, finalise."""
    committed = prepare_dataset(spec)
    identities = build_identities(spec)
    jobs = list(dataset_job.shard_jobs(spec, identities))
    todo = [job for job in jobs if job.plan.shard not in committed]
    results: list[ShardResult] = []
    failures: list[str] = []
    started = time.perf_counter()
    with _progress(show_progress) as progress:
        bar = progress.add_task(
            "generate",
            total=len(jobs),
            completed=len(jobs) - len(todo),
            images=0,
            rate=0.0,
            accept=0.0,
        )
        futures = [generate_shard.submit(spec, job) for job in todo]
        for future in as_completed(futures):
            try:
                results.append(future.result())
            except Exception as error:  # the other shards go on; re-run retries this one
                failures.append(f"{future.task_run_id}: {error}")
                continue
            combined = total(results)
            elapsed = time.perf_counter() - started
            progress.update(
                bar,
                advance=1,
                images=combined.images,
                rate=combined.images / max(elapsed, 1e-9),
                accept=combined.accepted / max(combined.images, 1),
            )
    info = finalize_dataset(spec)
    create_table_artifact(
        key="dataset-summary",
        table=_summary_rows(info, results, time.perf_counter() - started),
        description=f"Dataset {spec.name} at {spec.output.uri}",
    )
    if failures:
        raise ShardsFailed(
            f"{len(failures)} of {len(todo)} shards failed (first: {failures[0]}); "
            "re-run the same command to redo only the uncommitted shards"
        )
    return info


def generate_dataset(spec: JobSpec | str, show_progress: bool = False) -> DatasetInfo:
    """Run the generate flow for a spec object or a spec file URI."""
    if not isinstance(spec, JobSpec):
        spec = load_spec(spec)
    runner = task_runner_for(spec)
    return generate_dataset_flow.with_options(task_runner=runner)(spec, show_progress)
