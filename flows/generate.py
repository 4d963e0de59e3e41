"""The generate flow: identities -> shards fanned out -> finalise."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator

from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture
from prefect.runtime import deployment, flow_run
from prefect.task_runners import TaskRunner
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from arc2face_engine.dataset import layout
from arc2face_engine.job import lifecycle, preflight
from arc2face_engine.job.identities_step import BuiltIdentities
from arc2face_engine.job.shard import ShardResult
from arc2face_engine.job.shards import ShardWork, shard_count, shard_works
from flows import interrupts
from flows.credentials import with_credentials
from flows.prefect_api import check_api
from flows.redacting import RedactingFlow
from flows.runners import check_dask_scheduler, submit_on_gpu, task_runner_for
from schemas.errors import UserError, first_line
from schemas.job import JobSpec, load_spec, parse_spec
from schemas.tables import DatasetInfo
from tasks.devices import SHARDS_PER_DEVICE
from tasks.generate import build_identities, finalize_dataset, generate_shard, prepare_dataset
from tasks.progress import listening


class ShardsFailed(RuntimeError):
    """Some shards failed; the committed ones are kept and a re-run resumes."""


class StorageUnavailable(ShardsFailed):
    """The output's store stopped answering, even after its client's retries; the
    committed shards are kept, nothing half-written counts, and a re-run resumes."""


def _store_down(spec: JobSpec, detail: str) -> StorageUnavailable:
    return StorageUnavailable(
        f"the store of output {spec.output.uri} stopped answering, even after retries "
        f"({detail}): the committed shards are kept and nothing half-written counts: "
        "re-run the same command once it answers again"
    )


def _buried_failure(error: BaseException) -> ShardsFailed | None:
    """A ShardsFailed that a later error (a lease release during an outage) hid."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ShardsFailed):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _failure(failures: list[tuple[int, Exception]], attempted: int) -> Exception:
    """One exception for the failed shards: a user error as itself (re-running will not
    help until it is fixed), anything else as ShardsFailed (a re-run resumes)."""
    shard, first = min(failures, key=lambda failure: failure[0])
    if isinstance(first, UserError):
        return first
    return ShardsFailed(
        f"{len(failures)} of {attempted} shards failed (first: shard {shard:05d}: "
        f"{type(first).__name__}: {first}); the others are committed: re-run the same "
        "command to redo only the failed ones"
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


def _summary_rows(info: DatasetInfo, combined: ShardResult, seconds: float) -> list[dict]:
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


class _LiveCounts:
    """Images and accepts seen so far, fed per batch by in-process shard tasks and per
    shard by remote ones (whichever is further along)."""

    def __init__(self) -> None:
        self.images = 0
        self.accepted = 0
        self._lock = threading.Lock()

    def batch_callback(self, show: Callable[[int, int], None]) -> Callable[[int, int], None]:
        def on_batch(images: int, accepted: int) -> None:
            with self._lock:
                self.images += images
                self.accepted += accepted
                show(self.images, self.accepted)

        return on_batch

    def at_least(self, finished: ShardResult, show: Callable[[int, int], None]) -> None:
        with self._lock:
            self.images = max(self.images, finished.images)
            self.accepted = max(self.accepted, finished.accepted)
            show(self.images, self.accepted)


def _window(spec: JobSpec) -> int:
    if spec.compute.max_shards_in_flight:
        return spec.compute.max_shards_in_flight
    return 256 if spec.compute.dask_address else SHARDS_PER_DEVICE * len(spec.compute.devices)


def _fan_out(
    spec: JobSpec, runner: TaskRunner, works: Iterator[ShardWork], window: int
) -> Iterator[tuple[int, PrefectFuture]]:
    """Submit shard tasks with at most `window` in flight; yield (shard, future) as each
    finishes.

    Two per device keeps every device busy (the next shard is queued while one runs)
    without creating a task run per shard up front.
    """
    finished: queue.Queue[tuple[int, PrefectFuture]] = queue.Queue()

    def submit_next() -> bool:
        work = next(works, None)
        if work is None:
            return False
        shard = work.range.shard
        future = submit_on_gpu(runner, generate_shard, {"spec": spec, "work": work})
        future.add_done_callback(lambda done, shard=shard: finished.put((shard, done)))
        return True

    in_flight = 0
    while in_flight < window and submit_next():
        in_flight += 1
    while in_flight:
        future = finished.get()
        in_flight -= 1
        yield future
        if submit_next():
            in_flight += 1


def load_job_spec(spec: JobSpec | str | dict) -> JobSpec:
    """A spec object as is; a mapping validated; a string read as a YAML path or URI."""
    if isinstance(spec, JobSpec):
        return spec
    if isinstance(spec, dict):
        return parse_spec(spec, source="<spec parameter>")
    return load_spec(spec)


def check_quickly(spec: JobSpec) -> DatasetInfo | None:
    """The checks that load no model library (job/preflight.py quick_checks), and the
    Dask scheduler: a mistake is one line within a second, before anything is written.
    Returns the output's dataset.json (None for a new dataset)."""
    info = preflight.quick_checks(spec)
    if spec.compute.task_runner == "dask" and spec.compute.dask_address:
        check_dask_scheduler(spec.compute.dask_address)  # seconds, before loading banks
    return info


def in_deployment_terms(error: UserError) -> UserError:
    """`error` with what to do in a deployment run when it is about a relative path: a
    worker runs each flow run in a folder of its own (a new temporary one, for process
    workers), so relative paths in a spec rarely mean what they meant to its author."""
    folder = getattr(error, "resolved_against", None)
    if folder is None or deployment.get_id() is None:
        return error
    return type(error)(
        f"{error}; in a deployment run relative paths resolve against the flow run's working "
        f"folder {folder}: give absolute paths or URIs, or set the work pool's working_dir "
        "(`--job-variable working_dir=/srv/arc2face-synth`, or job_variables in "
        "infra/prefect.yaml)"
    )


def _generate_dataset(
    spec: JobSpec | str, show_progress: bool = False, redo_damaged: bool = False
) -> DatasetInfo:
    """Turn a job spec (a YAML path or URI, or the spec itself) into a dataset:
    identities, shards, verification, finalise. `redo_damaged`: committed shards whose
    manifest part fails its checksum are moved aside (damaged/<time>/) and generated
    again (without it, a resume refuses them).

    Deployment runs and CLI runs do the same: credentials resolved on this worker,
    every check before anything is written, then the spec's own task runner.
    """
    with interrupts.kept_inside_flows():  # the CLI's Ctrl-C/SIGTERM handling, not Prefect's
        try:
            spec = with_credentials(load_job_spec(spec))
            existing = check_quickly(spec)
        except UserError as error:
            raise in_deployment_terms(error) from None
        # model files and configs, devices, banks, resume (committed parts verified), identities
        built = preflight.preflight(spec, redo_damaged=redo_damaged)
        finished = None if redo_damaged else lifecycle.nothing_to_do(spec, existing)
        if finished:  # a re-run of a finished job that passed every check rewrites nothing
            print(finished)
            return existing
        try:
            # One writer per output: the lease (heartbeat thread) is held until the flow ends.
            with lifecycle.writer_lease(spec) as lease, task_runner_for(spec) as runner:
                if redo_damaged:
                    _set_aside_damaged(spec, lease.token)
                return _run_job(spec, runner, show_progress, lease.token, built)
        except (UserError, ShardsFailed):
            raise
        except Exception as error:  # an outage: one line, not a storage client's traceback
            buried = _buried_failure(error)
            if buried is not None:
                raise buried from None
            if layout.store_unavailable(error):
                raise _store_down(spec, f"{type(error).__name__}: {first_line(error)}") from None
            raise


def _set_aside_damaged(spec: JobSpec, lease_token: str) -> None:
    moved, folder = lifecycle.set_aside_damaged(spec, lease_token)
    if moved:
        shards = ", ".join(f"{shard:05d}" for shard in moved)
        print(f"damaged shards {shards} moved aside to {folder}/; generating them again")


generate_dataset_flow = RedactingFlow(_generate_dataset, name="generate-dataset", log_prints=True)


def _run_job(
    spec: JobSpec,
    runner: TaskRunner,
    show_progress: bool,
    lease_token: str,
    built: BuiltIdentities | None,
) -> DatasetInfo:
    """prepare -> identities -> shards fanned out on `runner` -> finalise + summary."""
    committed = prepare_dataset(spec, lease_token)
    identities = build_identities(spec, lease_token, built)
    shards = shard_count(
        len(identities), spec.variations.images_per_identity, spec.output.shard_size
    )
    works = shard_works(spec, identities, lease_token)
    store_down = threading.Event()  # then every further shard would wait out its retries
    todo = itertools.takewhile(
        lambda _: not store_down.is_set(),
        (work for work in works if work.range.shard not in committed),
    )
    if committed:
        print(f"resuming: {len(committed)} of {shards} shards already committed, skipped")
    finished = ShardResult(shard=-1)  # counts of finished shards
    live = _LiveCounts()  # counts of verified batches, finished shards or not
    failures: list[tuple[int, Exception]] = []
    superseded: list[int] = []  # shards another attempt took over (a paused worker's)
    started = time.perf_counter()
    with _progress(show_progress) as progress:
        bar = progress.add_task(
            "generate", total=shards, completed=len(committed), images=0, rate=0.0, accept=0.0
        )

        def show(images: int, accepted: int) -> None:
            progress.update(
                bar,
                images=images,
                rate=images / max(time.perf_counter() - started, 1e-9),
                accept=accepted / max(images, 1),
            )

        with listening(flow_run.get_id(), live.batch_callback(show)):
            for shard, future in _fan_out(spec, runner, todo, _window(spec)):
                try:
                    result = future.result()
                except Exception as error:  # the other shards go on; re-run retries this one
                    failures.append((shard, error))
                    if layout.store_unavailable(error):
                        store_down.set()
                    continue
                if result.superseded:
                    superseded.append(shard)
                finished.merge(result)
                progress.advance(bar)
                live.at_least(finished, show)
    if store_down.is_set():  # finalize would wait out the same outage: the re-run does it
        shard, error = next(f for f in failures if layout.store_unavailable(f[1]))
        raise _store_down(
            spec, f"first: shard {shard:05d}: {type(error).__name__}: {first_line(error)}"
        )
    if superseded:  # the attempts that took these over are still at work: let them commit
        lifecycle.wait_for_commits(spec, superseded)
    info = finalize_dataset(spec, lease_token)
    create_table_artifact(
        key="dataset-summary",
        table=_summary_rows(info, finished, time.perf_counter() - started),
        description=f"Dataset {spec.name} at {spec.output.uri}",
    )
    if failures:
        raise _failure(failures, shards - len(committed))
    if info.status != "complete":  # every task returned, yet a shard is not committed
        missing = info.counts.shards - info.counts.committed_shards
        raise ShardsFailed(
            f"{missing} of {info.counts.shards} shards are not committed although every "
            "shard task finished (another attempt took them over and did not finish): "
            "re-run the same command to redo only those"
        )
    return info


def generate_dataset(
    spec: JobSpec | str, show_progress: bool = False, redo_damaged: bool = False
) -> DatasetInfo:
    """Run the generate flow for a spec object or a spec file path/URI; an unreachable
    Prefect API is one line. (The CLI makes the quick checks before it imports this.)"""
    check_api()
    return generate_dataset_flow(spec, show_progress, redo_damaged)
