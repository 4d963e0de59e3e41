"""Datasets written before the manifest grew (import provenance columns; generation
columns made nullable for imported rows) still read, audit and export."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from arc2face_engine.audit import audit_dataset
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.exports import export_dataset
from schemas.tables import MANIFEST_SCHEMA
from tests.dataset_factory import make_dataset, rewrite_part

ADDED = ("source", "source_label", "source_name")
WERE_NOT_NULL = ("seed", "width", "height", "scheduler", "steps", "guidance",
                 "controlnet_scale", "expression_scale")  # fmt: skip


def previous_schema() -> pa.Schema:
    """MANIFEST_SCHEMA as it was before the import columns."""
    fields = [
        field.with_nullable(False) if field.name in WERE_NOT_NULL else field
        for field in MANIFEST_SCHEMA
        if field.name not in ADDED
    ]
    return pa.schema(fields, metadata=MANIFEST_SCHEMA.metadata)


def test_a_dataset_written_before_the_import_columns_still_audits(tmp_path: Path) -> None:
    made = make_dataset(str(tmp_path / "ds"), n_identities=3, images_per_identity=2, shards=2)
    old = tmp_path / "ds" / "manifest" / "part-00000.parquet"  # one old part, one new
    table = pq.read_table(old).drop_columns(list(ADDED))
    rewrite_part(old, table.cast(previous_schema()))
    assert not pq.read_schema(old).field("scheduler").nullable

    report = audit_dataset(made.uri)
    assert report.passed, report.problems
    manifest = DatasetReader(made.uri).manifest()
    assert manifest.num_rows == made.images
    assert manifest.column("source").to_pylist().count(None) == pq.read_metadata(old).num_rows
    assert export_dataset(made.uri, str(tmp_path / "out"), "imagefolder").images == made.accepted


def test_a_part_that_loosens_a_non_null_column_fails_the_schema_check(tmp_path: Path) -> None:
    made = make_dataset(str(tmp_path / "ds"), n_identities=2, images_per_identity=2, shards=1)
    part = tmp_path / "ds" / "manifest" / "part-00000.parquet"
    table = pq.read_table(part)
    loose = pa.schema([field.with_nullable(True) for field in table.schema])
    rewrite_part(part, table.cast(loose))
    report = audit_dataset(made.uri)
    assert not report.passed
    assert any("'identity_id' is nullable" in problem for problem in report.problems)
