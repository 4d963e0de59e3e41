"""Schema checks: every Parquet footer against schemas.tables; the parts safe to stream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from arc2face_engine.audit.report import IntegritySection, SchemaCheck, SchemaSection
from arc2face_engine.dataset import layout
from arc2face_engine.dataset.paths import UnsafePath
from arc2face_engine.dataset.reader import DatasetNotFound, DatasetReader
from schemas.tables import IDENTITIES_SCHEMA, MANIFEST_SCHEMA, DatasetInfo

BATCH_ROWS = 16_384
MAX_DATASET_JSON_BYTES = 64 << 20  # a spec and counts; anything bigger is not ours
# Columns added after datasets were already written: absent in older parts, allowed in any.
OPTIONAL_COLUMNS = ("feature_norm", "source", "source_label", "source_name")


def read_dataset_info(
    reader: DatasetReader, section: IntegritySection
) -> tuple[DatasetInfo | None, dict[str, Any] | None]:
    """dataset.json validated against DatasetInfo: (info, raw dict); a file that is not JSON,
    not an object or not a DatasetInfo is an integrity finding and gives (None, raw or None)."""
    full = reader.path(layout.DATASET_JSON, "dataset.json")
    try:
        size = reader.fs.size(full)
        if size is not None and size > MAX_DATASET_JSON_BYTES:
            section.dataset_json.add(f"dataset.json is {size} bytes, more than any dataset writes")
            return None, None
        raw = reader.fs.cat_file(full)
    except FileNotFoundError:
        raise DatasetNotFound(
            f"no dataset at {reader.uri} (dataset.json missing): check the URI"
        ) from None
    try:
        data = json.loads(raw)
    except ValueError as error:
        section.dataset_json.add(f"dataset.json is not JSON: {str(error).splitlines()[0]}")
        return None, None
    if not isinstance(data, dict):
        section.dataset_json.add(f"dataset.json holds a {type(data).__name__}, not an object")
        return None, None
    try:
        return DatasetInfo.model_validate(data), data
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(root)"
        section.dataset_json.add(
            f"dataset.json does not match its schema: {where}: {first['msg']} "
            f"({error.error_count()} errors)"
        )
        return None, data


def schema_errors(found: pa.Schema, expected: pa.Schema) -> list[str]:
    """Differences in column names, types and nullability (metadata is ignored)."""
    errors = []
    found_fields = {field.name: field for field in found}
    for wanted in expected:
        have = found_fields.get(wanted.name)
        if have is None:
            if wanted.name in OPTIONAL_COLUMNS:
                continue
            errors.append(f"missing column {wanted.name!r}")
        elif have.type != wanted.type:
            errors.append(f"column {wanted.name!r} is {have.type}, expected {wanted.type}")
        elif have.nullable and not wanted.nullable:
            # The other way round is a part written before the column became nullable
            # (generation columns, for imported rows): stricter than needed, and valid.
            errors.append(f"column {wanted.name!r} is nullable, expected non-null")
    extra = sorted(set(found_fields) - set(expected.names) - set(OPTIONAL_COLUMNS))
    if extra:
        errors.append(f"unexpected columns {extra}")
    return errors


def check_file_schema(reader: DatasetReader, relative: str, table: str) -> SchemaCheck:
    """Read only the footer; a missing, truncated or non-Parquet file is an error, not a crash."""
    expected = IDENTITIES_SCHEMA if table == "identities" else MANIFEST_SCHEMA
    try:
        with reader.open(relative) as handle:
            found = pq.read_schema(handle)
    except FileNotFoundError:
        return SchemaCheck(file=relative, table=table, ok=False, errors=["file is missing"])
    except UnsafePath as error:
        return SchemaCheck(file=relative, table=table, ok=False, errors=[str(error)])
    except (pa.ArrowException, OSError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        return SchemaCheck(
            file=relative, table=table, ok=False, errors=[f"unreadable Parquet: {message}"]
        )
    errors = schema_errors(found, expected)
    return SchemaCheck(file=relative, table=table, ok=not errors, errors=errors)


def check_schemas(reader: DatasetReader) -> tuple[SchemaSection, list[str]]:
    """Check identities.parquet and every committed part; return the parts safe to stream."""
    section = SchemaSection()
    section.files.append(check_file_schema(reader, layout.IDENTITIES, "identities"))
    good_parts = []
    for part in reader.manifest_parts():
        check = check_file_schema(reader, part, "manifest")
        section.files.append(check)
        if check.ok:
            good_parts.append(part)
    section.ok = all(check.ok for check in section.files)
    return section, good_parts


def iter_part_batches(
    reader: DatasetReader,
    part: str,
    columns: list[str],
    batch_rows: int = BATCH_ROWS,
    optional: tuple[str, ...] = (),
) -> Iterator[pa.RecordBatch]:
    """Batches of `columns`, plus those of `optional` that the part holds (newer columns)."""
    with reader.open(part) as handle:
        parquet = pq.ParquetFile(handle)
        present = set(parquet.schema_arrow.names)
        wanted = list(columns) + [name for name in optional if name in present]
        yield from parquet.iter_batches(batch_size=batch_rows, columns=wanted)

