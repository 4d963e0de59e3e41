"""Benchmark: the audit streams, so peak memory should not grow with the manifest.

Builds synthetic datasets of 100k / 300k / 1M manifest rows (many parts, real
512-d face embeddings, no image files) and runs `audit_dataset(...,
verify_files=False)` on each in a fresh subprocess: schema checks, the
row-level integrity pass (counts, duplicates, shards, identities) and both
quality passes, plus report.json/report.html. Prints rows, parts, wall time and
peak RSS (the audit's increment over the imported-but-idle process too).

    .venv/bin/python bench/bench_audit.py                  # 100k, 300k, 1M
    .venv/bin/python bench/bench_audit.py --rows 100000    # one size
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arc2face_engine.dataset.writer import DatasetWriter
from schemas.tables import (
    EMBEDDING_DIM,
    IDENTITIES_SCHEMA,
    MANIFEST_SCHEMA,
    DatasetCounts,
    DatasetInfo,
    l2_normalize,
)


def _vectors(matrix: np.ndarray) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(matrix, np.float32).ravel())
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])


def _part(shard: int, identity_start: int, n_identities: int, per_identity: int,
          centres: np.ndarray, rng: np.random.Generator) -> pa.Table:  # fmt: skip
    identity = np.repeat(np.arange(identity_start, identity_start + n_identities), per_identity)
    variant = np.tile(np.arange(per_identity), n_identities)
    n = len(identity)
    noise = rng.standard_normal((n, EMBEDDING_DIM), dtype=np.float32) * (
        0.4 / np.sqrt(EMBEDDING_DIM)
    )
    faces = l2_normalize(centres[identity] + noise).astype(np.float32)
    accepted = rng.random(n) > 0.1
    similarity = np.einsum("ij,ij->i", faces, centres[identity]).astype(np.float32)
    ids = [f"id-{i:06d}" for i in identity.tolist()]
    image_ids = [f"{i}-v{v:04d}-a00" for i, v in zip(ids, variant.tolist(), strict=True)]
    yaw = np.choose(variant % 3, [0.0, -30.0, 30.0]).astype(np.float32)
    columns = {
        "image_id": pa.array(image_ids),
        "identity_id": pa.array(ids),
        "label": pa.array(identity, pa.int32()),
        "shard": pa.array(np.full(n, shard), pa.int32()),
        "variant": pa.array(variant, pa.int32()),
        "attempt": pa.array(np.zeros(n), pa.int32()),
        "seed": pa.array(rng.integers(0, 2**62, n), pa.int64()),
        "path": pa.array([f"images/{shard:05d}/{i}.jpg" for i in image_ids]),
        "sha256": pa.array(["0" * 64] * n),
        "size_bytes": pa.array(np.full(n, 40_000), pa.int64()),
        "width": pa.array(np.full(n, 512), pa.int32()),
        "height": pa.array(np.full(n, 512), pa.int32()),
        "pose_name": pa.array(np.choose(variant % 3, ["frontal", "left", "right"]).tolist()),
        "pose_yaw": pa.array(yaw),
        "measured_yaw": pa.array(yaw + rng.normal(0, 3, n).astype(np.float32)),
        "expression_name": pa.array(np.choose(variant % 2, ["neutral", "smile"]).tolist()),
        "scheduler": pa.array(["dpmsolver++"] * n),
        "steps": pa.array(np.full(n, 25), pa.int32()),
        "guidance": pa.array(np.full(n, 3.0), pa.float32()),
        "controlnet_scale": pa.array(np.ones(n), pa.float32()),
        "expression_scale": pa.array(np.ones(n), pa.float32()),
        "face_count": pa.array(np.ones(n), pa.int32()),
        "det_score": pa.array(np.full(n, 0.9), pa.float32()),
        "face_embedding": _vectors(faces),
        "similarity": pa.array(similarity),
        "accepted": pa.array(accepted),
        "reject_reason": pa.array(
            [None if a else "low_similarity" for a in accepted.tolist()], pa.string()
        ),
        "source": pa.array(["generated"] * n),
    }
    arrays = [columns.get(f.name, pa.nulls(n, f.type)) for f in MANIFEST_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=MANIFEST_SCHEMA)


def _ensure_checksum(writer: DatasetWriter, shard: int) -> None:
    """The part's sha256 sidecar, which the audit verifies (unless the writer wrote it)."""
    import hashlib

    from arc2face_engine.dataset import layout

    part = layout.manifest_part(shard)
    sidecar = f"{part}.sha256"
    if not writer.fs.exists(writer.path(sidecar)):
        digest = hashlib.sha256(writer.fs.cat_file(writer.path(part))).hexdigest()
        writer.write_bytes(sidecar, f"{digest}\n".encode())


def build(root: str, rows: int, per_identity: int, rows_per_part: int, seed: int = 0) -> int:
    """Write a file-less dataset of `rows` manifest rows; returns the number of parts."""
    rng = np.random.default_rng(seed)
    n_identities = rows // per_identity
    centres = l2_normalize(rng.standard_normal((n_identities, EMBEDDING_DIM))).astype(np.float32)
    writer = DatasetWriter(root)
    writer.write_identities(pa.Table.from_arrays(
        [pa.array([f"id-{i:06d}" for i in range(n_identities)]), pa.array(np.arange(n_identities), pa.int32()),
         _vectors(centres), pa.array(["random"] * n_identities), pa.array(["bench"] * n_identities),
         *(pa.nulls(n_identities, IDENTITIES_SCHEMA.field(name).type)
           for name in IDENTITIES_SCHEMA.names[5:])],
        schema=IDENTITIES_SCHEMA,
    ))  # fmt: skip
    per_part = max(1, rows_per_part // per_identity)
    accepted = total = shard = 0
    for start in range(0, n_identities, per_part):
        table = _part(shard, start, min(per_part, n_identities - start), per_identity, centres, rng)
        writer.commit_shard(shard, table)
        _ensure_checksum(writer, shard)
        total += table.num_rows
        accepted += int(np.asarray(table.column("accepted")).sum())
        shard += 1
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    writer.write_dataset_json(DatasetInfo(
        name="bench", status="complete", spec={}, spec_hash="bench", created_at=now,
        counts=DatasetCounts(identities=n_identities, shards=shard, committed_shards=shard,
                             images=total, accepted=accepted, rejected=total - accepted,
                             reject_reasons={"low_similarity": total - accepted}),
    ))  # fmt: skip
    return shard


def run_one(root: str) -> None:
    """Child process: audit and print wall time and peak RSS as JSON."""
    from arc2face_engine.audit import audit_dataset

    idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    report = audit_dataset(root, verify_files=False)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "rows": report.integrity.rows, "parts": report.integrity.parts, "wall_s": wall,
        "peak_rss_mb": peak / 1024, "audit_rss_mb": (peak - idle) / 1024, "passed": report.passed,
        "uniqueness": report.quality.uniqueness,
        "intra": report.quality.intra_class_consistency,
    }))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--per-identity", type=int, default=100)
    parser.add_argument("--rows-per-part", type=int, default=2_000)
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        run_one(args.run_one)
        return
    results = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="bench-audit-") as folder:
            root = f"{folder}/ds"
            start = time.perf_counter()
            build(root, rows, args.per_identity, args.rows_per_part)
            built = time.perf_counter() - start
            child = subprocess.run([sys.executable, __file__, "--run-one", root],
                                   capture_output=True, text=True, check=True)  # fmt: skip
            result = json.loads(child.stdout.strip().splitlines()[-1])
            result["build_s"] = built
            results.append(result)
            print(f"done {rows} rows: {result}", file=sys.stderr)
    print(
        "| rows | parts | identities | build s | audit wall s | rows/s | peak RSS MB | audit RSS MB | passed |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['parts']} | {r['rows'] // args.per_identity:,} | {r['build_s']:.1f} | "
              f"{r['wall_s']:.1f} | {r['rows'] / r['wall_s']:,.0f} | {r['peak_rss_mb']:.0f} | "
              f"{r['audit_rss_mb']:.0f} | {r['passed']} |")  # fmt: skip


if __name__ == "__main__":
    main()
