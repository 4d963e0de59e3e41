"""Plan a 200k-identity x 50-image job (10M images) item by item; show memory stays bounded.

Every (identity, variant) of every shard gets its grid cell (`job.shards.variant_for`)
and its seed (`determinism.image_seed`, attempt 0), exactly as a shard run would
compute them. Each size runs in a fresh subprocess so that its peak RSS is its own:
if planning materialised the items, peak memory would grow with the job.

    .venv/bin/python bench/bench_plan.py                 # 2k, 20k, 200k identities x 50
    .venv/bin/python bench/bench_plan.py --sizes 200000 --tracemalloc
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc

from arc2face_engine.determinism import image_seed
from arc2face_engine.job.shards import iter_shards, variant_for

POSES, EXPRESSIONS = 5, 8  # a typical grid: 5 yaw angles x 8 expressions


def plan_items(identities: int, images_per_identity: int, shard_size: int, job_seed: int) -> dict:
    """Walk every item of every shard; returns counts and a seed checksum (proves the work)."""
    items = shards = checksum = 0
    cells = [0] * (POSES * EXPRESSIONS)
    for shard in iter_shards(identities, images_per_identity, shard_size):
        shards += 1
        for identity, variant in shard.items(images_per_identity):
            chosen = variant_for(identity, variant, POSES, EXPRESSIONS, images_per_identity)
            cells[chosen.pose_index * EXPRESSIONS + chosen.expression_index] += 1
            checksum ^= image_seed(job_seed, identity, variant, 0)
            items += 1
    return {
        "items": items,
        "shards": shards,
        "checksum": checksum,
        "cells": [min(cells), max(cells)],
    }


def run_one(args: argparse.Namespace, identities: int) -> dict:
    if args.tracemalloc:
        tracemalloc.start()
    started = time.perf_counter()
    result = plan_items(identities, args.images_per_identity, args.shard_size, args.seed)
    result["seconds"] = time.perf_counter() - started
    result["identities"] = identities
    # ru_maxrss is KiB on Linux (bytes on macOS; this bench targets Linux workers).
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.tracemalloc:
        result["tracemalloc_peak_kib"] = tracemalloc.get_traced_memory()[1] / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000, 20_000, 200_000])
    parser.add_argument("--images-per-identity", type=int, default=50)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tracemalloc", action="store_true", help="also trace Python allocations (slower)"
    )
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single is not None:
        print(json.dumps(run_one(args, args.single)))
        return
    flags = [
        "--images-per-identity",
        str(args.images_per_identity),
        "--shard-size",
        str(args.shard_size),
        "--seed",
        str(args.seed),
    ] + (["--tracemalloc"] if args.tracemalloc else [])
    header = f"| identities | items | shards | wall s | items/s | peak RSS MiB |{' tracemalloc peak KiB |' if args.tracemalloc else ''} grid cell min/max |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for size in args.sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--single", str(size), *flags],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        r = json.loads(out)
        traced = f" {r['tracemalloc_peak_kib']:.0f} |" if args.tracemalloc else ""
        print(
            f"| {r['identities']:,} | {r['items']:,} | {r['shards']:,} | {r['seconds']:.1f} | "
            f"{r['items'] / r['seconds']:,.0f} | {r['peak_rss_mib']:.0f} |{traced} "
            f"{r['cells'][0]:,}/{r['cells'][1]:,} |"
        )


if __name__ == "__main__":
    main()
