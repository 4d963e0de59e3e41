"""The whole job with no orchestrator: the functions the flow calls, in a plain loop.
The flow-overhead benchmark compares the two."""

from __future__ import annotations

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
        in_flight: list[PendingCommit] = []
        try:
            for work in todo:
                in_flight.append(start_shard(spec, work))  # generates while the previous commits
                if len(in_flight) > 1:
                    in_flight.pop(0).result()
            while in_flight:
                in_flight.pop(0).result()
        finally:
            for pending in in_flight:  # after an error: started commits land before it surfaces
                pending.settle()
        return finalize_dataset(spec, lease.token)
