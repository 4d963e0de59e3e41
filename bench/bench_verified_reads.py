"""What verifying every committed part on read costs (docs/safety.md).

    .venv/bin/python bench/bench_verified_reads.py            # 100 shards x 512 rows
    .venv/bin/python bench/bench_verified_reads.py --shards 400

Writes a manifest of SHARDS parts (ROWS rows each, with 512-d face embeddings, as a real
shard has) through DatasetWriter.commit_shard, then times, median of repeats, on a
warm page cache:

- reference: the reads as they were before verification (pyarrow straight from each
  part, no hash): the two columns finalize counts, and every column (export, loader);
- verified: the same reads through DatasetReader (each part hashed against its sidecar
  first, from the same open file);
- resume check: `damaged_parts()` (every part hashed, nothing parsed), what a resume runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from arc2face_engine.dataset import layout
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.dataset.writer import DatasetWriter
from schemas.tables import MANIFEST_SCHEMA

COUNT_COLUMNS = ["accepted", "reject_reason"]


def shard_table(shard: int, rows: int, rng: np.random.Generator) -> pa.Table:
    """A manifest part with realistic column sizes (random embeddings, keypoints, boxes)."""
    columns = {}
    for field in MANIFEST_SCHEMA:
        kind = field.type
        if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind):
            size = kind.list_size if pa.types.is_fixed_size_list(kind) else 4
            values = rng.standard_normal(rows * size).astype(np.float32)
            inner = pa.array(values, kind.value_type)
            if pa.types.is_fixed_size_list(kind):
                columns[field.name] = pa.FixedSizeListArray.from_arrays(inner, size)
            else:
                offsets = pa.array(np.arange(0, rows * size + 1, size, dtype=np.int32))
                columns[field.name] = pa.ListArray.from_arrays(offsets, inner)
        elif pa.types.is_string(kind):
            columns[field.name] = pa.array([f"{field.name}-{shard}-{row}" for row in range(rows)])
        elif pa.types.is_boolean(kind):
            columns[field.name] = pa.array(rng.random(rows) < 0.7)
        elif pa.types.is_integer(kind):
            values = np.full(rows, shard) if field.name == "shard" else rng.integers(0, 1000, rows)
            columns[field.name] = pa.array(values, kind)
        else:
            columns[field.name] = pa.array(rng.random(rows), kind)
    columns["image_id"] = pa.array([f"id-{shard:05d}-{row:05d}" for row in range(rows)])
    return pa.table(columns, schema=MANIFEST_SCHEMA)


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def unverified(reader: DatasetReader, columns: list[str] | None) -> int:
    rows = 0
    for part in reader.manifest_parts():
        with reader.open(part) as handle:
            rows += sum(b.num_rows for b in pq.ParquetFile(handle).iter_batches(columns=columns))
    return rows


def verified(reader: DatasetReader, columns: list[str] | None) -> int:
    return sum(batch.num_rows for batch in reader.iter_manifest(columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        writer = DatasetWriter(f"{folder}/ds")
        for shard in range(args.shards):
            writer.commit_shard(shard, shard_table(shard, args.rows, rng))
        reader = DatasetReader(f"{folder}/ds")
        size = sum(
            (writer.fs.size(writer.path(part))) for part in reader.manifest_parts()
        )
        assert verified(reader, COUNT_COLUMNS) == unverified(reader, COUNT_COLUMNS)
        print(
            f"{args.shards} parts x {args.rows} rows = {args.shards * args.rows:,} rows, "
            f"{size / 2**20:.1f} MiB of Parquet ({layout.MANIFEST_DIR}/), median of {args.repeats}"
        )
        print(f"{'read':<34} {'reference s':>12} {'verified s':>11} {'ratio':>6}")
        for name, columns in (("2 columns (finalize's count)", COUNT_COLUMNS),
                              ("every column (export, loader)", None)):  # fmt: skip
            before = median_seconds(lambda c=columns: unverified(reader, c), args.repeats)
            after = median_seconds(lambda c=columns: verified(reader, c), args.repeats)
            print(f"{name:<34} {before:>12.3f} {after:>11.3f} {after / before:>6.2f}")
        check = median_seconds(reader.damaged_parts, args.repeats)
        print(f"{'resume check (hash every part)':<34} {'-':>12} {check:>11.3f}")


if __name__ == "__main__":
    main()
