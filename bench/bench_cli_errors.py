"""How fast a mistake in a spec reaches the user: `generate` and `plan` on broken specs,
against `--help` (the CLI's own start-up) in the same run.

Each command runs as a whole process, `--runs` times after one warm-up, alternating
so that machine drift hits every row alike; the table gives min / median / max wall
seconds and the exit status. `--baseline DIR` adds the same rows for another checkout
(e.g. the commit before the CLI checked specs before importing the model libraries):

    .venv/bin/python bench/bench_cli_errors.py
    .venv/bin/python bench/bench_cli_errors.py --baseline /tmp/old-main --runs 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SPECS = {
    "unknown key": {"name": "x", "identites": {"count": 3}},
    "bad value": {"name": "x", "identities": {"count": -3}},
    "missing models": {"name": "x", "models": {"dir": "no-such-models"}},
}


def commands(folder: Path) -> dict[str, list[str]]:
    rows = {"--help": ["--help"]}
    for name, spec in SPECS.items():
        path = folder / f"{name.replace(' ', '-')}.yaml"
        path.write_text(yaml.safe_dump({**spec, "output": {"uri": str(folder / "out")}}))
        rows[f"generate ({name})"] = ["generate", str(path)]
        if name != "missing models":  # plan loads no model and does not look for them
            rows[f"plan ({name})"] = ["plan", str(path)]
    return rows


def time_once(checkout: Path, args: list[str]) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=checkout, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return time.perf_counter() - started, done.returncode


def measure(checkouts: dict[str, Path], runs: int, folder: Path) -> list[tuple]:
    rows = commands(folder)
    times: dict[tuple[str, str], list[float]] = {}
    codes: dict[tuple[str, str], int] = {}
    for round_ in range(runs + 1):  # round 0 warms the file cache
        for label, checkout in checkouts.items():
            for name, args in rows.items():
                seconds, code = time_once(checkout, args)
                if round_:
                    times.setdefault((label, name), []).append(seconds)
                codes[(label, name)] = code
    return [
        (label, name, min(t), statistics.median(t), max(t), codes[(label, name)])
        for (label, name), t in times.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="another checkout to time the same way")
    args = parser.parse_args()
    checkouts = {"this checkout": ROOT}
    if args.baseline:
        checkouts["baseline"] = args.baseline.resolve()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        table = measure(checkouts, args.runs, Path(folder))
    print(f"{args.runs} runs each after a warm-up; {os.cpu_count()} CPUs; load {load:.1f}")
    print(f"{'checkout':<14} {'command':<26} {'min s':>7} {'median s':>9} {'max s':>7} {'exit':>5}")
    for label, name, low, middle, high, code in table:
        print(f"{label:<14} {name:<26} {low:7.2f} {middle:9.2f} {high:7.2f} {code:5d}")


if __name__ == "__main__":
    main()
