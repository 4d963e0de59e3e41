"""The whole import with no orchestrator: the functions the flow calls, in a plain loop."""

from __future__ import annotations

from collections.abc import Callable

from arc2face_engine.ingest.analyzers import ImportAnalyzers
from arc2face_engine.ingest.lifecycle import (
    finalize_import,
    open_writer,
    prepare_import,
    quick_checks,
    writer_lease,
)
from arc2face_engine.ingest.plan import ImportWork, plan_import
from arc2face_engine.ingest.shard import AnalysedShard, analyse_shard, commit_shard
from schemas.imports import ImportSpec
from schemas.tables import DatasetInfo


def analyse_work(
    spec: ImportSpec, work: ImportWork, on_items: Callable[[int, int], None] | None = None
) -> AnalysedShard:
    """One shard read, copied and analysed on this process's analyzers (not committed)."""
    analyzers = ImportAnalyzers(spec.models_dir, spec.device, spec.min_det_score)
    return analyse_shard(spec, work, open_writer(spec, work.lease_token), analyzers, on_items)


def commit_analysed(spec: ImportSpec, analysed: AnalysedShard, first_label: int, token: str) -> int:
    """Commit a shard (in shard order); returns the next free identity label."""
    return commit_shard(open_writer(spec, token), analysed, first_label)


def run_import_directly(spec: ImportSpec) -> DatasetInfo:
    """Check, plan, analyse and commit every shard in order, finalise."""
    quick_checks(spec)
    plan = plan_import(spec)
    with writer_lease(spec) as lease:
        committed, next_label = prepare_import(spec, plan, lease.token)
        for work in plan.with_lease(lease.token):
            if work.shard not in committed:
                analysed = analyse_work(spec, work)
                next_label = commit_analysed(spec, analysed, next_label, lease.token)
        return finalize_import(spec, plan, lease.token)
