"""Identity sets: random + rejection vs packed, and the exclusion search at a million rows.

    PYTHONPATH=$PWD python bench/bench_identities.py                      # 10k and 100k
    PYTHONPATH=$PWD python bench/bench_identities.py --counts 10000
    PYTHONPATH=$PWD python bench/bench_identities.py --search 10000 100000  # 1M-row gallery
    PYTHONPATH=$PWD python bench/bench_identities.py --counts 10000 --manifold-rows 256 \
        --job-defaults       # the job's default gallery size and PackingOptions()

Each configuration runs in a fresh process (`--child`), so its peak memory (ru_maxrss,
taken right after the identities are made, before the evaluation) is its own.

Face-manifold stand-in (no real ArcFace embeddings can be downloaded here): unit rows
v = normalise(P z + 0.5 n / sqrt(512)), with z = m_c + 2 g / sqrt(128) in a fixed random
128-d subspace P (m_c one of 64 unit mixture means, g and n standard normal). Its pairwise
cosines have mean ~0.00 and sd ~0.08, about what ArcFace gives for different people
(uniform points on the sphere: sd 0.044). The packing gallery is 10,000 such rows; the
exclusion gallery ("real people") is another 10,000 drawn from the same mixture.

Columns: minimum and 1st-percentile pairwise angle over all N(N-1)/2 pairs (exact,
blocked); the share of pairs within the audit's uniqueness radius (cosine distance
<= `radius`, audit_dataset's default); the mean cosine of each identity to its nearest
gallery row; the exclusion margin (max_cosine - largest identity-to-gallery cosine);
wall and CPU time to make the set (exclusion included; on a shared machine CPU time is the
steadier number) and peak RSS. Torch runs on one thread on CPU
(as the packer and the exclusion search pin it, for reproducible identity sets).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from arc2face_engine.audit import audit_dataset
from arc2face_engine.identities import sources
from arc2face_engine.identities.exclusion import ExclusionGallery, apply_exclusion
from arc2face_engine.identities.neighbours import max_cosine
from arc2face_engine.identities.packing import PackingOptions, sample_packed
from schemas.tables import EMBEDDING_DIM, vector_matrix

GALLERY_ROWS = 10_000
SUBSPACE, COMPONENTS, SPREAD, NOISE = 128, 64, 2.0, 0.5
SEPARATION = 0.3  # the random source's default rejection threshold
MAX_COSINE = 0.5  # identities.exclusion.max_cosine default
UNIQUENESS_RADIUS = inspect.signature(audit_dataset).parameters["radius"].default
BINS = 20_000  # cosine histogram over [-1, 1] for the percentile (angle resolution < 0.01 deg)
BLOCK = 4096


def packing_options(count: int, job_defaults: bool) -> PackingOptions:
    """Steps chosen so that 100k fits a 2-core machine in about 12 minutes (three exact
    neighbour searches); `job_defaults`: what a job's spec gives by default."""
    if job_defaults:
        return PackingOptions()
    if count <= 20_000:
        return PackingOptions(steps=60, refresh_every=20, separation_target=0.15)
    return PackingOptions(steps=30, refresh_every=10, separation_target=0.15)


def face_manifold(rows: int, seed: int) -> np.ndarray:
    basis = np.linalg.qr(np.random.default_rng(1234).standard_normal((EMBEDDING_DIM, SUBSPACE)))[0]
    means = np.random.default_rng(4321).standard_normal((COMPONENTS, SUBSPACE))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    inside = means[rng.integers(0, COMPONENTS, rows)]
    inside = inside + SPREAD * rng.standard_normal((rows, SUBSPACE)) / math.sqrt(SUBSPACE)
    inside /= np.linalg.norm(inside, axis=1, keepdims=True)
    points = inside @ basis.T + NOISE * rng.standard_normal((rows, EMBEDDING_DIM)) / math.sqrt(
        EMBEDDING_DIM
    )
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- one configuration (child process) ------------------------------------------------------


def make_set(
    method: str, count: int, manifold: np.ndarray, people: ExclusionGallery, job_defaults: bool
):
    if method == "random":
        table = sources.sample_random(count, SEPARATION, seed=0, allowed=people.allowed)
    else:
        options = packing_options(count, job_defaults)
        table = sample_packed(count, manifold, seed=0, options=options)
    return apply_exclusion(table, people, method)[0]


def pair_statistics(rows: torch.Tensor) -> dict:
    """Exact over all pairs: largest cosine, 99th-percentile cosine, pairs within radius."""
    histogram = torch.zeros(BINS, dtype=torch.float64)
    largest, within, count = -1.0, 0, len(rows)
    close = 1.0 - UNIQUENESS_RADIUS
    for start in range(0, count, BLOCK):
        for other in range(start, count, BLOCK):
            cosines = rows[start : start + BLOCK] @ rows[other : other + BLOCK].T
            if other == start:  # upper triangle only, no self pairs
                keep = torch.ones_like(cosines, dtype=torch.bool).triu(diagonal=1)
                cosines = cosines[keep]
            largest = max(largest, float(cosines.max()))
            within += int((cosines >= close).sum())
            histogram += torch.histc(cosines.flatten(), BINS, -1.0, 1.0).double()
    pairs = count * (count - 1) // 2
    # The 1st-percentile angle is the 99th-percentile cosine: the bin where the top 1% starts.
    from_top = torch.cumsum(histogram.flip(0), 0)
    bin_from_top = int(torch.searchsorted(from_top, torch.tensor(0.01 * pairs, dtype=torch.float64)))
    p99_cosine = 1.0 - 2.0 * (bin_from_top + 1) / BINS
    return {"max_pair_cosine": largest, "p99_pair_cosine": p99_cosine, "within": within / pairs}


def child(method: str, count: int, manifold_rows: int, job_defaults: bool) -> dict:
    torch.set_num_threads(1)
    manifold = face_manifold(manifold_rows, seed=1)
    people_rows = face_manifold(GALLERY_ROWS, seed=2)
    people = ExclusionGallery(torch.from_numpy(people_rows), MAX_COSINE, "synthetic", "synthetic")
    started, cpu_started = time.perf_counter(), time.process_time()
    table = make_set(method, count, manifold, people, job_defaults)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    peak = peak_mib()
    rows = torch.from_numpy(vector_matrix(table.column("embedding"), EMBEDDING_DIM))
    stats = pair_statistics(rows)
    nearest_face = max_cosine(rows, torch.from_numpy(manifold))[0]
    nearest_person = max_cosine(rows, people.embeddings)[0]
    return {
        "method": method + (" (job defaults)" if job_defaults and method == "packed" else ""),
        "count": count,
        "manifold_rows": manifold_rows,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_mib": peak,
        "min_angle": math.degrees(math.acos(min(stats["max_pair_cosine"], 1.0))),
        "p1_angle": math.degrees(math.acos(stats["p99_pair_cosine"])),
        "within_radius": stats["within"],
        "manifold_cosine": float(nearest_face.mean()),
        "exclusion_margin": MAX_COSINE - float(nearest_person.max()),
    }


def search_child(queries: int, gallery_rows: int) -> dict:
    """Exact max-cosine search of `queries` rows against a `gallery_rows` x 512 gallery."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    gallery = torch.randn(gallery_rows, EMBEDDING_DIM, generator=generator)
    gallery /= gallery.norm(dim=1, keepdim=True)
    rows = torch.randn(queries, EMBEDDING_DIM, generator=generator)
    rows /= rows.norm(dim=1, keepdim=True)
    people = ExclusionGallery(gallery, MAX_COSINE, "synthetic", "synthetic")
    started, cpu_started = time.perf_counter(), time.process_time()
    best, _ = people.nearest(rows.numpy())
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "queries": queries,
        "gallery_rows": gallery_rows,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_mib": peak_mib(),
        "pairs_per_second": queries * gallery_rows / seconds,
        "max_cosine": float(best.max()),
    }


# --- driver ---------------------------------------------------------------------------------


def run_child(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_sets(results: list[dict]) -> None:
    print(
        f"| N | gallery rows | method | min angle | 1st pct angle | pairs within r={UNIQUENESS_RADIUS:g} | "
        "mean cos to manifold | exclusion margin | wall time | CPU time | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in results:
        print(
            f"| {row['count']:,} | {row['manifold_rows']:,} | {row['method']} | {row['min_angle']:.2f} deg | "
            f"{row['p1_angle']:.2f} deg | {row['within_radius']:.2e} | "
            f"{row['manifold_cosine']:.3f} | {row['exclusion_margin']:.3f} | "
            f"{row['seconds']:.1f} s | {row.get('cpu_seconds', math.nan):.1f} s | "
            f"{row['peak_mib']:.0f} MiB |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--methods", nargs="*", default=["random", "packed"])
    parser.add_argument("--search", type=int, nargs="*", default=[], help="query counts")
    parser.add_argument("--gallery-rows", type=int, default=1_000_000, help="exclusion search")
    parser.add_argument(
        "--manifold-rows", type=int, default=GALLERY_ROWS, help="rows of the packing gallery"
    )
    parser.add_argument(
        "--job-defaults", action="store_true", help="pack with PackingOptions() defaults"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "search":
            print(json.dumps(search_child(int(args.child[1]), int(args.child[2]))))
        else:
            method, count, rows, defaults = args.child
            print(json.dumps(child(method, int(count), int(rows), defaults == "1")))
        return
    results = []
    for count in args.counts:
        for method in args.methods:
            flags = (str(args.manifold_rows), "1" if args.job_defaults else "0")
            results.append(run_child(method, str(count), *flags))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    if results:
        print_sets(results)
    if args.search:
        print("\n| queries | gallery rows | wall time | CPU time | pairs/s (wall) | peak RSS |")
        print("|---|---|---|---|---|---|")
    for queries in args.search:
        row = run_child("search", str(queries), str(args.gallery_rows))
        print(
            f"| {queries:,} | {row['gallery_rows']:,} | {row['seconds']:.1f} s | "
            f"{row['cpu_seconds']:.1f} s | {row['pairs_per_second']:.3g} | "
            f"{row['peak_mib']:.0f} MiB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
