"""Benchmark: `compare` of two datasets of N identities each, in bounded memory.

Builds two file-less datasets (real 512-d face embeddings around random identity centres,
`--per-identity` accepted images each, no image files, so `verify_files=False`) that share
`--planted` identities, then runs `compare_datasets` on them in a fresh process: both
audits (schema, checksums, integrity, quality with its exact all-pairs passes), the
cross-dataset overlap search, the profile pass and the report. Prints the time of each
stage, the peak RSS, whether exactly the planted pairs were found, and the reference
usage measured in the same process: the overlap as the exclusion gallery searches, one
direction at a time (`neighbours.max_cosine`; `--reference both` times both directions,
`one` times one and the table says so).

    .venv/bin/python bench/bench_compare.py --identities 100000
    .venv/bin/python bench/bench_compare.py --identities 20000 --reference both
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
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

ROWS_PER_PART = 20_000


def _vectors(matrix: np.ndarray) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(matrix, np.float32).ravel())
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])


def _part(shard: int, ids: list[str], first: int, centres: np.ndarray, per_identity: int,
          rng: np.random.Generator) -> pa.Table:  # fmt: skip
    index = np.repeat(np.arange(len(centres)), per_identity)
    variant = np.tile(np.arange(per_identity), len(centres))
    n = len(index)
    noise = rng.standard_normal((n, EMBEDDING_DIM), dtype=np.float32) * (0.4 / np.sqrt(EMBEDDING_DIM))
    faces = l2_normalize(centres[index] + noise).astype(np.float32)
    names = [ids[i] for i in index.tolist()]
    image_ids = [f"{name}-v{v:04d}-a00" for name, v in zip(names, variant.tolist(), strict=True)]
    columns = {
        "image_id": pa.array(image_ids), "identity_id": pa.array(names),
        "label": pa.array(index + first, pa.int32()), "shard": pa.array(np.full(n, shard), pa.int32()),
        "variant": pa.array(variant, pa.int32()), "attempt": pa.array(np.zeros(n), pa.int32()),
        "width": pa.array(np.full(n, 112), pa.int32()), "height": pa.array(np.full(n, 112), pa.int32()),
        "face_count": pa.array(np.ones(n), pa.int32()),
        "det_score": pa.array(np.full(n, 0.9), pa.float32()),
        "measured_yaw": pa.array(rng.normal(0, 20, n).astype(np.float32)),
        "measured_pitch": pa.array(rng.normal(0, 10, n).astype(np.float32)),
        "face_embedding": _vectors(faces),
        "similarity": pa.array(np.einsum("ij,ij->i", faces, centres[index]).astype(np.float32)),
        "accepted": pa.array(np.ones(n, bool)), "source": pa.array(["imported"] * n),
        # paths of files that are not written (the audit runs with verify_files=False)
        "path": pa.array([f"images/{shard:05d}/{i}.jpg" for i in image_ids]),
        "sha256": pa.array(["0" * 64] * n), "size_bytes": pa.array(np.full(n, 4_000), pa.int64()),
    }  # fmt: skip
    arrays = [columns.get(f.name, pa.nulls(n, f.type)) for f in MANIFEST_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=MANIFEST_SCHEMA)


def build(root: str, centres: np.ndarray, prefix: str, per_identity: int, seed: int) -> None:
    """A complete file-less dataset whose identity i has centre centres[i]."""
    import hashlib

    rng = np.random.default_rng(seed)
    n = len(centres)
    ids = [f"{prefix}{i:06d}" for i in range(n)]
    writer = DatasetWriter(root)
    sha = writer.write_identities(pa.Table.from_arrays(
        [pa.array(ids), pa.array(np.arange(n), pa.int32()), _vectors(centres),
         pa.array(["imported"] * n), pa.array(["bench"] * n)], schema=IDENTITIES_SCHEMA,
    ))  # fmt: skip
    per_part = max(1, ROWS_PER_PART // per_identity)
    shard = 0
    for start in range(0, n, per_part):
        table = _part(shard, ids[start : start + per_part], start, centres[start : start + per_part],
                      per_identity, rng)  # fmt: skip
        writer.commit_shard(shard, table)
        shard += 1
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    info = DatasetInfo(
        name=prefix.rstrip("-"), status="complete", spec={}, spec_hash="bench", created_at=now,
        finished_at=now, identities_sha256=sha,
        counts=DatasetCounts(identities=n, shards=shard, committed_shards=shard,
                             images=n * per_identity, accepted=n * per_identity),
    )  # fmt: skip
    writer.write_dataset_json(info)
    assert hashlib.sha256(writer.fs.cat_file(writer.path("identities.parquet"))).hexdigest() == sha


def run_one(first: str, second: str, out: str, reference: str, planted: list[list[int]]) -> None:
    """Child process: compare (stage times from the progress callback), then the reference."""
    import pyarrow.parquet as pq
    import torch

    from arc2face_engine.audit.compare import compare_datasets
    from arc2face_engine.identities.neighbours import max_cosine
    from schemas.tables import vector_matrix

    stages: dict[str, float] = {}
    cpu: dict[str, float] = {}
    clock = [time.perf_counter(), None, time.process_time()]

    def progress(stage: str, done: int, total: int) -> None:
        now, used = time.perf_counter(), time.process_time()
        if clock[1] is not None:
            stages[clock[1]] = stages.get(clock[1], 0.0) + now - clock[0]
            cpu[clock[1]] = cpu.get(clock[1], 0.0) + used - clock[2]
        clock[0], clock[1], clock[2] = now, stage, used

    idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    report = compare_datasets([first, second], out, progress=progress)
    wall = time.perf_counter() - start
    progress("end", 0, 0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    found = sorted((int(p.first_id.split("-")[1]), int(p.second_id.split("-")[1]))
                   for p in report.overlaps[0].pairs)  # fmt: skip
    centres = [
        torch.from_numpy(vector_matrix(pq.read_table(f"{root}/identities.parquet").column("embedding"), EMBEDDING_DIM))
        for root in (first, second)
    ]  # fmt: skip
    timed, timed_cpu = {}, {}
    for name, (queries, keys) in (("one way", centres), ("other way", centres[::-1])):
        if name == "other way" and reference != "both":
            break
        began, used = time.perf_counter(), time.process_time()
        max_cosine(queries, keys)
        timed[name] = time.perf_counter() - began
        timed_cpu[name] = time.process_time() - used
    print(json.dumps({
        "wall_s": wall, "stages": stages, "peak_rss_mb": peak / 1024,
        "compare_rss_mb": (peak - idle) / 1024, "found_planted": found == sorted(map(tuple, planted)),
        "pairs": report.overlaps[0].pair_count, "reference_s": timed,
        "cpu_s": cpu, "reference_cpu_s": timed_cpu, "load": os.getloadavg(),
        "audits_passed": [entry.audit.passed for entry in report.datasets],
    }))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=100_000)
    parser.add_argument("--per-identity", type=int, default=2)
    parser.add_argument("--planted", type=int, default=100)
    parser.add_argument("--reference", choices=("one", "both"), default="one")
    parser.add_argument("--run-one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        first, second, out, planted = args.run_one
        run_one(first, second, out, args.reference, json.loads(planted))
        return
    rng = np.random.default_rng(0)
    n = args.identities
    a = l2_normalize(rng.standard_normal((n, EMBEDDING_DIM))).astype(np.float32)
    b = l2_normalize(rng.standard_normal((n, EMBEDDING_DIM))).astype(np.float32)
    shared_a = rng.choice(n, args.planted, replace=False)
    shared_b = rng.choice(n, args.planted, replace=False)
    b[shared_b] = a[shared_a]
    planted = [[int(i), int(j)] for i, j in zip(shared_a, shared_b, strict=True)]
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as folder:
        began = time.perf_counter()
        build(f"{folder}/a", a, "a-", args.per_identity, 1)
        build(f"{folder}/b", b, "b-", args.per_identity, 2)
        built = time.perf_counter() - began
        del a, b
        child = subprocess.run(
            [sys.executable, __file__, "--reference", args.reference, "--run-one",
             f"{folder}/a", f"{folder}/b", f"{folder}/out", json.dumps(planted)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    result = json.loads(child.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=1), file=sys.stderr)
    audits = ("checksums", "integrity", "quality")

    def pair(stage_keys: tuple[str, ...]) -> str:
        wall = sum(v for k, v in result["stages"].items() if k in stage_keys)
        used = sum(v for k, v in result["cpu_s"].items() if k in stage_keys)
        return f"{wall:.0f} / {used:.0f}"

    reference = " + ".join(
        f"{result['reference_s'][k]:.0f} / {result['reference_cpu_s'][k]:.0f}"
        for k in result["reference_s"]
    )
    print("| identities x 2 | images | audits | overlap search, both ways in one pass | "
          "reference: max_cosine one way at a time | compare wall s | peak RSS MB | "
          "compare RSS MB | planted found | load |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {n:,} | {2 * n * args.per_identity:,} | {pair(audits)} | {pair(('overlap',))} | "
          f"{reference} | {result['wall_s']:.0f} | {result['peak_rss_mb']:.0f} | "
          f"{result['compare_rss_mb']:.0f} | {result['found_planted']} ({result['pairs']} pairs) | "
          f"{result['load'][0]:.1f} |")  # fmt: skip
    print(f"(times: wall s / CPU s of the process, all threads; build {built:.0f} s)")


if __name__ == "__main__":
    main()
