"""Damage that a reader cannot see by parsing: bytes of a committed part changed in the
middle so that the part still reads, with other values (the case measured in issue 17:
face embeddings silently changed). Only the checksum sidecar can tell."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def alter_part_keeping_it_readable(path: Path) -> list[str]:
    """Flip one bit inside the largest column chunk of the Parquet file at `path`, at the
    first position (from the chunk's middle on) where the file still reads with the same
    schema and row count but other values; returns the columns whose values changed."""
    data = path.read_bytes()
    before = pq.read_table(io.BytesIO(data))
    group = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0)
    chunk = max(
        (group.column(index) for index in range(group.num_columns)),
        key=lambda column: column.total_compressed_size,
    )
    # A chunk starts at its dictionary page when it has one; total_compressed_size spans both.
    start = min(offset for offset in (chunk.dictionary_page_offset, chunk.data_page_offset) if offset)
    stop = start + chunk.total_compressed_size
    for offset in range((start + stop) // 2, stop, 3):
        altered = bytearray(data)
        altered[offset] ^= 0x04
        try:
            after = pq.read_table(io.BytesIO(bytes(altered)))
        except (pa.ArrowException, OSError):
            continue
        if after.schema != before.schema or after.num_rows != before.num_rows:
            continue
        changed = [
            name for name in before.column_names if not after.column(name).equals(before.column(name))
        ]
        if changed:
            path.write_bytes(bytes(altered))
            return changed
    raise AssertionError(f"no readable alteration of {path} found")
