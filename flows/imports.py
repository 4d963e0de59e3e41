"""The import flow: a face dataset others published, checked, planned, analysed shard by
shard and committed in shard order into this project's format, then finalised.

Resumable like generate: committed shards are skipped on a re-run with the same options.
Shards are analysed `spec.workers` at a time; one writer (the flow, holding the output's
lease) commits them in order, since each shard's identity labels follow the previous one's.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from arc2face_engine.ingest import lifecycle
from arc2face_engine.ingest.plan import ImportPlan, ImportWork, plan_import
from arc2face_engine.ingest.shard import AnalysedShard
from flows.credentials import resolve_storage_options
from flows.generate import ShardsFailed
from flows.prefect_api import check_api
from flows.redacting import RedactingFlow
from schemas.errors import UserError
from schemas.imports import ImportSpec, parse_import_spec
from schemas.tables import DatasetInfo
from tasks.imports import commit_import_shard, finalize_import, import_shard, prepare_import
from tasks.progress import listening


def load_import_spec(spec: ImportSpec | dict) -> ImportSpec:
    """The spec with its storage options resolved for this process (env references)."""
    if isinstance(spec, dict):
        spec = parse_import_spec(spec)
    return spec.model_copy(
        update={
            "storage_options": resolve_storage_options(spec.storage_options, None),
            "out_storage_options": resolve_storage_options(
                spec.out_storage_options, None, "out_storage_options"
            ),
        }
    )


def _progress(show: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} shards"),
        TextColumn("{task.fields[images]} images, {task.fields[rate]:.1f} img/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not show,
    )


def _fan_out(
    spec: ImportSpec, runner: TaskRunner, works: list[ImportWork], stop: list[bool]
) -> Iterator[tuple[int, PrefectFuture]]:
    """Submit shard tasks, at most two per worker in flight; yield (shard, future) as each
    finishes; no new shard once `stop[0]` is set."""
    finished: queue.Queue[tuple[int, PrefectFuture]] = queue.Queue()
    pending = iter(works)

    def submit_next() -> bool:
        work = None if stop[0] else next(pending, None)
        if work is None:
            return False
        future = runner.submit(import_shard, {"spec": spec, "work": work})
        future.add_done_callback(lambda done, shard=work.shard: finished.put((shard, done)))
        return True

    in_flight = 0
    while in_flight < 2 * spec.workers and submit_next():
        in_flight += 1
    while in_flight:
        yield finished.get()
        in_flight -= 1
        if submit_next():
            in_flight += 1


def _failure(failures: list[tuple[int, Exception]], attempted: int) -> Exception:
    shard, first = min(failures, key=lambda failure: failure[0])
    if isinstance(first, UserError):
        return first
    return ShardsFailed(
        f"{len(failures)} of {attempted} import shards failed (first: shard {shard:05d}: "
        f"{type(first).__name__}: {first}); the shards before it are committed: re-run the "
        "same command to resume"
    )


def _run_import(
    spec: ImportSpec, plan: ImportPlan, runner: TaskRunner, token: str, show: bool
) -> DatasetInfo:
    committed, next_label = prepare_import(spec, plan, token)
    todo = [work for work in plan.with_lease(token) if work.shard not in committed]
    if committed:
        print(f"resuming: {len(committed)} of {len(plan.works)} shards already committed, skipped")
    waiting: dict[int, AnalysedShard] = {}
    next_shard, images, failures, stop = len(committed), [0], [], [False]
    started = time.perf_counter()
    with _progress(show) as progress:
        bar = progress.add_task("import", total=len(plan.works), completed=len(committed),
                                images=0, rate=0.0)  # fmt: skip

        def on_items(count: int, _accepted: int) -> None:
            images[0] += count
            rate = images[0] / max(time.perf_counter() - started, 1e-9)
            progress.update(bar, images=images[0], rate=rate)

        with listening(flow_run.get_id(), on_items):
            for shard, future in _fan_out(spec, runner, todo, stop):
                try:
                    waiting[shard] = future.result()
                except Exception as error:  # later shards cannot commit past it: stop
                    failures.append((shard, error))
                    stop[0] = True
                    continue
                while next_shard in waiting and not failures:
                    next_label = commit_import_shard(spec, waiting.pop(next_shard), next_label, token)
                    next_shard += 1
                    progress.advance(bar)
    info = finalize_import(spec, plan, token)
    counts = info.counts
    summary = {
        "identities": counts.identities,
        "images": counts.images,
        "accepted": counts.accepted,
        "rejected": counts.rejected,
        "identities left out": info.imported.identities_left_out,
        "shards committed": f"{counts.committed_shards}/{counts.shards}",
    }
    create_table_artifact(
        key="import-summary",
        table=[{"metric": key, "value": value} for key, value in summary.items()],
        description=f"Import of {spec.source} into {spec.out}",
    )
    if failures:
        raise _failure(failures, len(todo))
    return info


def _import_dataset(spec: ImportSpec | dict, show_progress: bool = False) -> DatasetInfo:
    """Import `spec.source` into `spec.out`: checks and the plan before anything is
    written, then the shards under the output's writer lease."""
    spec = load_import_spec(spec)
    lifecycle.quick_checks(spec)
    plan = plan_import(spec)
    with (
        lifecycle.writer_lease(spec) as lease,
        ThreadPoolTaskRunner(max_workers=spec.workers) as runner,
    ):
        return _run_import(spec, plan, runner, lease.token, show_progress)


import_dataset_flow = RedactingFlow(_import_dataset, name="import-dataset", log_prints=True)


def import_dataset(spec: ImportSpec | dict, show_progress: bool = False) -> DatasetInfo:
    """Run the import flow; an unreachable Prefect API is one line."""
    check_api()
    return import_dataset_flow(spec, show_progress)
