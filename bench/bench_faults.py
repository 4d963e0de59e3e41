"""Preemptible workers on several hosts: every fault, injected again and again.

The cluster of tests/cluster_harness.py (a persistent Prefect server, a Dask scheduler
and three Dask workers, each in its own process group as if on its own host, S3 from
moto's server behind a fault-injecting proxy, shards by the stand-in generator). For
each fault and repetition: a fresh output, one `arc2face-synth generate` disturbed at a
random moment while shards are in flight, then (if it did not exit 0) one re-run.
A row passes when the run or its one re-run exits 0, the dataset equals the
undisturbed run's file for file (image bytes, parts, identities, dataset.json apart
from timestamps), nothing of any attempt is left, and the audit passes.

    python bench/bench_faults.py [--repeats 3] [--faults kill-worker zombie ...]

Prints the table (fault, injections, outcome, data lost) and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster_harness import (  # noqa: E402 - after the path is set
    DUMMY_CREDENTIALS,
    STANDIN_FACTORY,
    Cluster,
    ClusterOptions,
    committed_parts,
    free_port,
    snapshot,
    wait_for,
    wait_until,
)
from tests.faulty_s3 import FaultPlan  # noqa: E402

RUN_TIMEOUT_S = 420


class Trial:
    """One disturbed run: what was injected and how it ended."""

    def __init__(self, cluster: Cluster, models: Path, rng: random.Random) -> None:
        self.cluster, self.rng = cluster, rng
        self.bucket = cluster.new_bucket()
        self.root = f"{self.bucket}/ds"
        self.spec = cluster.write_spec(models, f"s3://{self.root}")
        self.injected: Counter[str] = Counter()
        self.notes: list[str] = []

    def start(self, name: str):
        return self.cluster.generate(self.spec, name)

    def wait_commits(self, count: int) -> None:
        fs = self.cluster.direct_fs()
        wait_until(lambda: len(committed_parts(fs, self.root)) >= count, 300, "commits")

    def busy_worker(self) -> str:
        return wait_until(lambda: next(iter(self.cluster.busy_workers()), None), 300, "a shard")

    def random_moment(self) -> None:
        """Wait for 0..3 commits and a busy worker, then up to a second more."""
        self.wait_commits(self.rng.randint(0, 3))
        self.busy_worker()
        time.sleep(self.rng.uniform(0, 1.0))


def kill_worker(trial: Trial):
    run = trial.start("kill-worker")
    trial.random_moment()
    victim = trial.busy_worker()
    trial.cluster.workers[victim].signal_group(signal.SIGKILL)
    trial.injected["worker host SIGKILLed mid-shard"] += 1
    return run


def zombie(trial: Trial):
    run = trial.start("zombie")
    trial.random_moment()
    victim = trial.busy_worker()
    cluster = trial.cluster
    cluster.workers[victim].signal_group(signal.SIGSTOP)
    wait_until(lambda: victim not in cluster.worker_names().values(), 120, "the worker TTL")
    time.sleep(trial.rng.uniform(0, 4))  # its shard re-runs elsewhere meanwhile
    cluster.workers[victim].signal_group(signal.SIGCONT)
    trial.injected["worker host paused past the TTL, then resumed"] += 1
    return run


def kill_flow(trial: Trial):
    run = trial.start("kill-flow")
    trial.random_moment()
    run.process.kill()
    run.process.wait()
    trial.injected["flow process SIGKILLed"] += 1
    return run


def restart_server(trial: Trial):
    run = trial.start("restart-server")
    trial.random_moment()
    trial.cluster.server.restart(down_s=trial.rng.uniform(2, 8))
    trial.injected["Prefect server restarted"] += 1
    return run


def flaky_store(trial: Trial):
    proxy = trial.cluster.proxy
    proxy.reset_counts()
    proxy.plan = FaultPlan(slowdown_every=7, reset_every=11, stall_every=31, stall_s=3)
    run = trial.start("flaky-store")
    trial.random_moment()
    proxy.outage_for(trial.rng.uniform(2, 6))
    return run


def long_outage(trial: Trial):
    run = trial.start("long-outage")
    trial.random_moment()
    trial.cluster.proxy.outage_for(3600)
    trial.injected["store outage until the run gives up"] += 1
    return run


def disk_full(trial: Trial):
    trial.cluster.fill_disk("host-2", after_writes=trial.rng.randint(0, 8))
    trial.injected["one worker's disk full (ENOSPC from fsspec)"] += 1
    return trial.start("disk-full")


FAULTS: dict[str, Callable[[Trial], object]] = {
    "kill-worker": kill_worker,
    "zombie": zombie,
    "kill-flow": kill_flow,
    "restart-server": restart_server,
    "flaky-store": flaky_store,
    "long-outage": long_outage,
    "disk-full": disk_full,
}


def after_first_run(fault: str, trial: Trial) -> None:
    """Undo the condition a re-run needs undone (an operator freeing space, the store
    answering again)."""
    cluster = trial.cluster
    if fault == "flaky-store":
        for kind, count in cluster.proxy.counts.items():
            if kind != "requests":
                trial.injected[f"store: {kind}"] += count
    cluster.heal()  # the store answers again, disks are freed, workers are back


def verdict(trial: Trial, baseline: dict[str, str]) -> tuple[bool, str]:
    from arc2face_engine.audit import audit_dataset

    cluster = trial.cluster
    files = snapshot(cluster.direct_fs(), trial.root)
    missing = sorted(set(baseline) - set(files))
    extra = sorted(set(files) - set(baseline))
    different = sorted(p for p in set(files) & set(baseline) if files[p] != baseline[p])
    options = cluster.storage_options(cluster.s3_endpoint)
    options.pop("config_kwargs")
    report = audit_dataset(f"s3://{trial.root}", options, write_report=False)
    problems = []
    if missing:
        problems.append(f"missing {missing[:3]}")
    if extra:
        problems.append(f"extra {extra[:3]}")
    if different:
        problems.append(f"different {different[:3]}")
    if not report.passed:
        problems.append(f"audit: {report.problems[:2]}")
    return not problems, "; ".join(problems) or "identical, audit passed"


def superseded_attempts(cluster: Cluster) -> int:
    """Late attempts the fence stopped, as the shard tasks logged them (all workers)."""
    import httpx

    body = {"logs": {"level": {"ge_": 30}}, "limit": 200}
    response = httpx.post(f"{cluster.server.api}/logs/filter", json=body, timeout=60)
    return sum("another attempt at it" in entry["message"] for entry in response.json())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--faults", nargs="*", default=list(FAULTS), choices=list(FAULTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    os.environ.update(DUMMY_CREDENTIALS)
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    work = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    from arc2face_engine.testing.tiny_models import write_tiny_models

    models = write_tiny_models(work / "models")
    cluster = Cluster(work / "cluster", f"http://127.0.0.1:{port}", ClusterOptions()).start()
    rng = random.Random(args.seed)
    rows = []
    started = time.perf_counter()
    try:
        from arc2face_engine.job.direct import run_job_directly
        from schemas.job import load_spec

        reference = Trial(cluster, models, rng)
        os.environ["ARC2FACE_MODEL_FACTORY"] = STANDIN_FACTORY
        run_job_directly(load_spec(str(reference.spec)))
        del os.environ["ARC2FACE_MODEL_FACTORY"]
        baseline = snapshot(cluster.direct_fs(), reference.root)
        for fault in args.faults:
            outcomes: Counter[str] = Counter()
            injected: Counter[str] = Counter()
            lost = []
            superseded_before = superseded_attempts(cluster)
            for _ in range(args.repeats):
                trial = Trial(cluster, models, rng)
                run = FAULTS[fault](trial)
                first = wait_for(run, RUN_TIMEOUT_S)
                last_line = run.tail(1)
                one_line = "Traceback" not in run.log.read_text()
                after_first_run(fault, trial)
                if first == 0:
                    outcome = "run exit 0"
                else:
                    rerun = trial.start(f"{fault}-rerun")
                    second = wait_for(rerun, RUN_TIMEOUT_S)
                    kind = "one line" if one_line else "TRACEBACK"
                    outcome = f"exit {first} ({kind}), re-run exit {second}"
                    if second != 0:
                        trial.notes.append(rerun.tail(5))
                same, detail = verdict(trial, baseline)
                outcomes[outcome if same else f"{outcome}: {detail}"] += 1
                injected.update(trial.injected)
                if not same:
                    lost.append(detail)
                print(f"{fault}: {outcome}; {detail}; first run ended: {last_line[:160]}",
                      flush=True)  # fmt: skip
            superseded = superseded_attempts(cluster) - superseded_before
            rows.append({
                "fault": fault,
                "injected": dict(injected),
                "outcomes": dict(outcomes),
                "late_attempts_fenced": superseded,
                "data_lost": lost or "none",
            })  # fmt: skip
    finally:
        cluster.stop()
        moto.stop()
    minutes = (time.perf_counter() - started) / 60
    print(f"\n{dt.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, {minutes:.1f} min")  # fmt: skip
    print(f"{'fault':<16}{'injected':<58}{'outcome':<44}data lost")
    for row in rows:
        injected = ", ".join(f"{k} x{v}" for k, v in row["injected"].items())
        outcome = ", ".join(f"{k} x{v}" for k, v in row["outcomes"].items())
        lost = row["data_lost"] if isinstance(row["data_lost"], str) else "SOME"
        print(f"{row['fault']:<16}{injected:<58}{outcome:<44}{lost}")
        if row["late_attempts_fenced"]:
            print(f"{'':<16}late attempts stopped by the fence: {row['late_attempts_fenced']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
