"""Benchmark: what checking every name and path costs when planning an export.

Builds the file-less synthetic datasets of bench_audit.py (100 images per identity,
2,000 rows per part) and times `select_export` (which streams the small manifest
columns and checks every image_id, identity_id and path, resolving symlinks on local
disks) against the same streaming with the checks skipped. Prints one row per size.

    .venv/bin/python bench/bench_export_plan.py                 # 100k and 300k rows
    .venv/bin/python bench/bench_export_plan.py --rows 100000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_audit import build


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    from arc2face_engine.dataset.reader import DatasetReader
    from arc2face_engine.exports import base
    from arc2face_engine.exports.base import select_export

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[100_000, 300_000])
    args = parser.parse_args()
    print("| rows | parts | plan s (checked) | plan s (no checks) | checks us/row |")
    print("|---|---|---|---|---|")
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as folder:
            root = f"{folder}/ds"
            parts = build(root, rows, 100, 2_000)
            reader = DatasetReader(root)
            checked = _timed(lambda: select_export(reader, include_rejected=True))  # noqa: B023
            with mock.patch.object(base, "_check_row_paths", lambda *a: None):
                bare = _timed(lambda: select_export(reader, include_rejected=True))  # noqa: B023
            per_row = (checked - bare) / rows * 1e6
            print(f"| {rows:,} | {parts} | {checked:.2f} | {bare:.2f} | {per_row:.1f} |")


if __name__ == "__main__":
    main()
