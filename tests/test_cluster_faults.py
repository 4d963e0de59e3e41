"""Preemptible workers on several hosts: the faults a real cluster has, on a real cluster.

A Prefect server, a Dask scheduler and three Dask workers, each in its own process
group as if on its own host, and S3 (moto's server) behind a fault-injecting proxy
(tests/cluster_harness.py). Each test disturbs one run of `arc2face-synth generate`
and then requires: the run (or one re-run) exits 0, the dataset equals the undisturbed
run's file for file (image bytes, parts, identities, dataset.json apart from its
timestamps), every part has its checksum, nothing is left of any attempt, and the
audit passes. The slower faults and their repetitions are in bench/bench_faults.py;
two of them (a throttling store, a long outage: over a minute each) run here too with
ARC2FACE_TEST_SLOW_FAULTS=1, so that the suite stays within its time.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.cluster_harness import (
    STANDIN_FACTORY,
    Cluster,
    ClusterOptions,
    committed_parts,
    snapshot,
    wait_for,
    wait_until,
)

RUN_TIMEOUT_S = 240
slow_fault = pytest.mark.skipif(
    os.environ.get("ARC2FACE_TEST_SLOW_FAULTS") != "1",
    reason="over a minute; bench/bench_faults.py runs it every time (set ARC2FACE_TEST_SLOW_FAULTS=1)",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str):
    root = tmp_path_factory.mktemp("cluster")
    harness = Cluster(root, s3_endpoint, ClusterOptions()).start()
    try:
        yield harness
    finally:
        harness.stop()


@pytest.fixture(scope="module")
def baseline(cluster: Cluster, tiny_models: Path) -> dict[str, str]:
    """The same spec run undisturbed, as a plain loop in this process (no Prefect, no
    Dask): what every disturbed cluster run must end up equal to."""
    from arc2face_engine.job.direct import run_job_directly
    from arc2face_engine.job.workers import MODEL_FACTORY_ENV
    from schemas.job import load_spec

    bucket = cluster.new_bucket()
    spec = cluster.write_spec(tiny_models, f"s3://{bucket}/ds")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(MODEL_FACTORY_ENV, STANDIN_FACTORY)
        assert run_job_directly(load_spec(str(spec))).status == "complete"
    return snapshot(cluster.direct_fs(), f"{bucket}/ds")


@pytest.fixture
def job(cluster: Cluster, tiny_models: Path):
    """(spec path, bucket root) of a fresh output; the cluster is healed afterwards."""
    bucket = cluster.new_bucket()
    yield cluster.write_spec(tiny_models, f"s3://{bucket}/ds"), f"{bucket}/ds"
    cluster.heal()


def assert_same_as_baseline(cluster: Cluster, root: str, baseline: dict[str, str]) -> None:
    from arc2face_engine.audit import audit_dataset

    fs = cluster.direct_fs()
    files = snapshot(fs, root)
    assert set(files) == set(baseline), (
        f"extra {sorted(set(files) - set(baseline))}, missing {sorted(set(baseline) - set(files))}"
    )
    different = sorted(
        path for path in files if files[path] != baseline[path] and path != "dataset.json"
    )
    assert not different, f"files differ from the undisturbed run: {different}"
    assert files["dataset.json"] == baseline["dataset.json"]
    options = cluster.storage_options(cluster.s3_endpoint)
    options.pop("config_kwargs")
    report = audit_dataset(f"s3://{root}", options, write_report=False)
    assert report.passed, report.problems
    assert not report.integrity.uncommitted_leftovers.count


def wait_for_commits(cluster: Cluster, root: str, count: int, timeout: float = 120) -> None:
    fs = cluster.direct_fs()
    wait_until(lambda: len(committed_parts(fs, root)) >= count, timeout, f"{count} commits")


def busy_worker(cluster: Cluster, timeout: float = 120) -> str:
    return wait_until(lambda: next(iter(cluster.busy_workers()), None), timeout, "a busy worker")


def test_a_worker_killed_mid_shard_has_its_shard_rerun_elsewhere(cluster, job, baseline):
    spec, root = job
    run = cluster.generate(spec, "kill-worker")
    wait_for_commits(cluster, root, 1)
    victim = busy_worker(cluster)
    cluster.workers[victim].signal_group(signal.SIGKILL)  # the host is gone, nanny and all
    assert wait_for(run, RUN_TIMEOUT_S) == 0, run.tail()
    assert not cluster.workers[victim].alive()
    assert_same_as_baseline(cluster, root, baseline)


def test_a_zombie_worker_cannot_replace_the_rerun(cluster, job, baseline):
    """Paused past the scheduler's TTL (its shard re-runs elsewhere), then resumed: its
    late writes are fenced off and the run does not count the race as a failure."""
    spec, root = job
    run = cluster.generate(spec, "zombie")
    wait_for_commits(cluster, root, 1)
    zombie = busy_worker(cluster)
    cluster.workers[zombie].signal_group(signal.SIGSTOP)
    wait_until(lambda: zombie not in cluster.worker_names().values(), 60, "the TTL to expire")
    time.sleep(2)  # its shard is re-run elsewhere meanwhile
    cluster.workers[zombie].signal_group(signal.SIGCONT)
    assert wait_for(run, RUN_TIMEOUT_S) == 0, run.tail()
    assert_same_as_baseline(cluster, root, baseline)


def test_the_flow_process_killed_then_rerun(cluster, job, baseline):
    spec, root = job
    run = cluster.generate(spec, "kill-flow")
    wait_for_commits(cluster, root, 2)
    run.process.kill()  # SIGKILL the flow process alone; its shard tasks run on
    run.process.wait()
    rerun = cluster.generate(spec, "kill-flow-rerun")
    assert wait_for(rerun, RUN_TIMEOUT_S) == 0, rerun.tail()
    assert_same_as_baseline(cluster, root, baseline)


@slow_fault
def test_object_store_throttling_resets_and_stalls_are_retried(cluster, job, baseline):
    spec, root = job
    proxy = cluster.proxy
    proxy.reset_counts()
    proxy.plan = type(proxy.plan)(slowdown_every=7, reset_every=11, stall_every=61, stall_s=3)
    run = cluster.generate(spec, "flaky-s3")
    wait_for_commits(cluster, root, 2)
    proxy.outage_for(4)  # a short outage: every request fails for 4 s
    assert wait_for(run, RUN_TIMEOUT_S) == 0, run.tail()
    counts = dict(proxy.counts)
    assert counts.get("slowdown") and counts.get("reset") and counts.get("stall"), counts
    assert counts.get("outage-slowdown"), counts
    assert_same_as_baseline(cluster, root, baseline)


def test_a_worker_whose_disk_fills_fails_one_line_and_a_rerun_finishes(
    cluster, job, baseline, tiny_models
):
    spec, root = job
    fs = cluster.direct_fs()
    name = "host-2"
    cluster.fill_disk(name, after_writes=3)
    run = cluster.generate(spec, "disk-full")
    assert wait_for(run, RUN_TIMEOUT_S) == 2, run.tail()
    last = run.tail(1)
    assert last.startswith("error: cannot write ") and "no space left on the device" in last
    assert "Traceback" not in run.log.read_text()
    committed = committed_parts(fs, root)
    assert committed, "the other workers' shards are committed"
    # Nothing torn: every committed part has its checksum, nothing else is in manifest/.
    names = sorted(path.rsplit("/", 1)[1] for path in fs.find(f"{root}/manifest"))
    parts = [path.rsplit("/", 1)[1] for path in committed]
    assert names == sorted(parts + [f"{part}.sha256" for part in parts])
    cluster.free_disk(name)
    rerun = cluster.generate(spec, "disk-full-rerun")
    assert wait_for(rerun, RUN_TIMEOUT_S) == 0, rerun.tail()
    assert_same_as_baseline(cluster, root, baseline)


def test_the_lease_heartbeat_outlives_a_short_outage(cluster: Cluster):
    from arc2face_engine.dataset.lease import WriterLease, read_lease, verify
    from arc2face_engine.dataset.writer import DatasetWriter

    uri = f"s3://{cluster.new_bucket()}/ds"
    writer = DatasetWriter(uri, cluster.storage_options())
    lease = WriterLease(writer.fs, writer.root, writer.uri, ttl_s=8.0, heartbeat_s=0.5)
    direct = cluster.direct_fs()
    with lease:
        cluster.proxy.outage_for(3)  # six heartbeats' worth of failed requests
        time.sleep(3)
        after = time.time()
        wait_until(lambda: read_lease(direct, writer.root).heartbeat_at > after, 30, "a heartbeat")
        assert lease.lost is None
        verify(writer.fs, writer.root, writer.uri, lease.token)  # still this run's
    assert read_lease(direct, writer.root) is None  # released


@slow_fault
def test_a_long_store_outage_ends_in_one_line_with_nothing_torn(cluster, job, baseline):
    from arc2face_engine.audit import audit_dataset

    spec, root = job
    fs = cluster.direct_fs()
    run = cluster.generate(spec, "long-outage")
    wait_for_commits(cluster, root, 5)  # the re-run then has fewer shards left to do
    cluster.proxy.outage_for(3600)  # until the run gives up
    assert wait_for(run, RUN_TIMEOUT_S) == 1, run.tail()
    cluster.proxy.end_outage()
    last = run.tail(1)
    assert last.startswith(f"error: the store of output s3://{root} stopped answering"), last
    assert "Traceback" not in run.log.read_text()
    # Nothing torn: every committed part is whole and names only whole images.
    options = cluster.storage_options(cluster.s3_endpoint)
    report = audit_dataset(f"s3://{root}", options, write_report=False)
    assert report.passed, report.problems
    assert committed_parts(fs, root)
    rerun = cluster.generate(spec, "long-outage-rerun")
    assert wait_for(rerun, RUN_TIMEOUT_S) == 0, rerun.tail()
    assert_same_as_baseline(cluster, root, baseline)
