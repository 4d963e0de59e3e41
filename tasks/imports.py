"""Prefect tasks of the import flow: thin wrappers over arc2face_engine.ingest."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from arc2face_engine.ingest import direct, lifecycle
from arc2face_engine.ingest.plan import ImportPlan, ImportWork
from arc2face_engine.ingest.shard import AnalysedShard
from schemas.errors import UserError
from schemas.imports import ImportSpec
from tasks import progress


@task(name="prepare-import", cache_policy=NO_CACHE, persist_result=False)
def prepare_import(spec: ImportSpec, plan: ImportPlan, lease_token: str) -> tuple[set[int], int]:
    """dataset.json in progress (or a resume checked); committed shards, next label."""
    return lifecycle.prepare_import(spec, plan, lease_token)


def _worth_retrying(task, task_run, state) -> bool:
    """Retry storage hiccups, not user errors (they fail the same way every time)."""
    return not isinstance(state.result(raise_on_failure=False), UserError)


@task(
    name="import-shard",
    task_run_name="shard-{work.shard:05d}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_worth_retrying,
)
def import_shard(spec: ImportSpec, work: ImportWork) -> AnalysedShard:
    """Read, copy and analyse one shard (its commit waits for its turn in the flow)."""
    return direct.analyse_work(spec, work, progress.callback_for(flow_run.get_id()))


@task(name="commit-import-shard", cache_policy=NO_CACHE, persist_result=False)
def commit_import_shard(
    spec: ImportSpec, analysed: AnalysedShard, first_label: int, lease_token: str
) -> int:
    return direct.commit_analysed(spec, analysed, first_label, lease_token)


@task(name="finalize-import", cache_policy=NO_CACHE, persist_result=False)
def finalize_import(spec: ImportSpec, plan: ImportPlan, lease_token: str):
    return lifecycle.finalize_import(spec, plan, lease_token)
