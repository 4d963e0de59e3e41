"""The whole job with no orchestrator: the functions the flow calls, in a plain loop.
The flow-overhead benchmark compares the two."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait

from arc2face_engine.job.identities_step import build_identities
from arc2face_engine.job.lifecycle import (
    finalize_dataset,
    prepare_dataset,
    set_aside_damaged,
    writer_lease,
)
from arc2face_engine.job.preflight import preflight
from arc2face_engine.job.shard import PendingCommit
from arc2face_engine.job.shards import shard_works
from arc2face_engine.job.workers import start_shard
from schemas.job import JobSpec
from schemas.tables import DatasetInfo

# Shards on the device at once: one generating, one waiting for its last verdicts (it
# takes the turn again for its top-ups) and one queued for the turn, so the device never
# waits for a verifier; commits run behind them.
SHARDS_IN_FLIGHT = 3


def run_job_directly(spec: JobSpec, redo_damaged: bool = False) -> DatasetInfo:
    """The whole job with no orchestrator: same functions, a plain loop."""
    built = preflight(spec, redo_damaged=redo_damaged)
    with writer_lease(spec) as lease:
        if redo_damaged:
            set_aside_damaged(spec, lease.token)
        writer = prepare_dataset(spec, lease.token)
        table = build_identities(spec, writer, built)
        committed = writer.committed_shards()
        works = shard_works(spec, table, lease.token)
        todo = (work for work in works if work.range.shard not in committed)
        on_device: deque[Future[PendingCommit]] = deque()  # generating or verifying
        committing: deque[PendingCommit] = deque()
        with ThreadPoolExecutor(SHARDS_IN_FLIGHT, thread_name_prefix="shard") as shards:
            try:
                for work in todo:
                    on_device.append(shards.submit(start_shard, spec, work))
                    if len(on_device) >= SHARDS_IN_FLIGHT:
                        committing.append(on_device.popleft().result())
                    while len(committing) > 1:
                        committing.popleft().result()
                while on_device:
                    committing.append(on_device.popleft().result())
                while committing:
                    committing.popleft().result()
            finally:  # after an error: started shards and commits land before it surfaces
                wait(on_device)
                pending = [f.result() for f in on_device if f.exception() is None]
                for commit in [*committing, *pending]:
                    commit.settle()
        return finalize_dataset(spec, lease.token)
