"""Prefect tasks of the audit and export flows: thin wrappers over the plain functions."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from arc2face_engine.audit import audit_dataset
from arc2face_engine.exports import export_dataset


@task(name="audit-dataset", cache_policy=NO_CACHE, persist_result=False)
def audit(uri: str, storage_options: dict | None = None, **options):
    return audit_dataset(uri, storage_options=storage_options, **options)


@task(name="compare-datasets", cache_policy=NO_CACHE, persist_result=False)
def compare(uris: list[str], out: str, storage_options: dict | None = None, **options):
    from arc2face_engine.audit.compare import compare_datasets

    return compare_datasets(uris, out, storage_options=storage_options, **options)


@task(name="export-dataset", cache_policy=NO_CACHE, persist_result=False)
def export(uri: str, out_uri: str, fmt: str, storage_options: dict | None = None, **options):
    return export_dataset(uri, out_uri, fmt, storage_options=storage_options, **options)
