"""Scheduling behaviour on the session's Prefect server: one shard per device slot across
flow runs, Dask workers on their own devices, credentials kept out of parameters and
dataset.json, one-line errors for unreachable services."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from arc2face_engine.dataset.reader import DatasetReader
from schemas.errors import UserError
from schemas.job import JobSpec
from tasks.devices import DEVICE_ENV, owned_device, slot_name

ROOT = Path(__file__).resolve().parent.parent
PLACED = re.compile(r"shard (\d+) on (\S+) \(Dask worker (\S+)\)")


def tiny_spec(models: Path, uri: str, **sections) -> JobSpec:
    raw = {
        "name": "scheduling test",
        "seed": 11,
        "models": {"dir": str(models), "device": "cpu", "precision": "fp32"},
        "identities": {"source": "random", "count": 3, "separation": 0.3},
        "variations": {"images_per_identity": 2},
        "generation": {"steps": 1, "batch_size": 4, "height": 64, "width": 64},
        "filter": {"min_similarity": -1.0, "min_det_score": 0.0, "max_attempts": 1},
        "output": {"uri": uri, "shard_size": 2},
        "compute": {"task_runner": "local", "devices": ["cpu"]},
    }
    for section, values in sections.items():
        raw[section] = {**raw[section], **values} if isinstance(values, dict) else values
    return JobSpec.model_validate(raw)


def two_slot_limited_specs(models: Path, tmp_path: Path, first_seed: int) -> list[JobSpec]:
    """Two jobs on the one CPU device under its slot limit, with different seeds (so
    different in-process workers) and their own outputs."""
    return [
        tiny_spec(
            models,
            str(tmp_path / f"ds{i}"),
            seed=first_seed + i,
            compute={"devices": ["cpu"], "device_limits": "all"},
        )
        for i in range(2)
    ]


def cli_generate_command(spec: JobSpec, workdir: Path, **env: str) -> tuple[list[str], dict]:
    """(argv, environment) of `python -m flows.cli generate` on `spec` written to workdir,
    with a Prefect home of its own there and none of this process's PREFECT_ settings."""
    import os

    path = workdir / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    environment.update(PYTHONPATH=str(ROOT), PREFECT_HOME=str(workdir / "home"), **env)
    return [sys.executable, "-m", "flows.cli", "generate", str(path)], environment


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return [log.message for log in logs]


def _flow_run_logs(flow_run_id, pattern: re.Pattern, count: int) -> list[re.Match]:
    """The run's log lines matching `pattern`, waiting for log batches still in flight."""
    deadline = time.monotonic() + 60
    while True:
        matches = [m for line in asyncio.run(_logs(flow_run_id)) if (m := pattern.search(line))]
        if len(matches) >= count or time.monotonic() > deadline:
            return matches
        time.sleep(1)


@pytest.fixture
def info_run_logs():
    """Task-run INFO lines reach the server (the session harness keeps Prefect at WARNING)."""
    logger = logging.getLogger("prefect.task_runs")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


# --- device ownership and slot names (plain logic) ------------------------------------------


def test_a_dask_worker_uses_the_device_it_owns():
    # dask-cuda lists the worker's own GPU first in CUDA_VISIBLE_DEVICES.
    assert owned_device(["cuda:0", "cuda:1"], "w1", {"CUDA_VISIBLE_DEVICES": "1,2,3,0"}) == "cuda:0"
    assert owned_device(["auto"], "gpu-host-3", {"CUDA_VISIBLE_DEVICES": "3"}) == "cuda:0"
    # A worker's own setting wins over the spec's list; CPU specs stay on CPU.
    assert owned_device(["cuda:0"], "w", {DEVICE_ENV: "cuda:1"}) == "cuda:1"
    assert owned_device(["cpu", "cpu"], "w", {"CUDA_VISIBLE_DEVICES": "0"}) == "cpu"
    assert owned_device(["cuda"], "w", {}) == "cuda"
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES"):
        owned_device(["cuda:0", "cuda:1"], "worker-a", {})


def test_slot_names_follow_the_physical_gpu():
    host = re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname())
    # cuda:0 of a worker that sees GPUs 3,0 is physical GPU 3, whatever its local index.
    assert slot_name("cuda:0", "w", {"CUDA_VISIBLE_DEVICES": "3,0"}) == f"gpu-{host}-3"
    assert slot_name("cuda:1", "w", {"CUDA_VISIBLE_DEVICES": "3,0"}) == f"gpu-{host}-0"
    assert slot_name("cuda:2", "w", {}) == f"gpu-{host}-2"
    assert slot_name("cpu", "gpu worker/1", {}) == f"cpu-{host}-gpu-worker-1"


# --- one shard per device slot across flow runs ---------------------------------------------


@pytest.mark.usefixtures("prefect_harness")
def test_shards_of_two_concurrent_flow_runs_take_turns_on_a_device(
    tiny_models, tmp_path, monkeypatch
):
    import tasks.slots
    from flows.generate import generate_dataset_flow

    real_concurrency = tasks.slots.concurrency
    held: list[tuple[str, str, float, float, float]] = []  # thread, slot, asked, from, to
    @contextmanager
    def recorded(name, **options):
        asked = time.time()
        with real_concurrency(name, **options):
            start = time.time()
            yield
            held.append((threading.current_thread().name, name, asked, start, time.time()))

    monkeypatch.setattr(tasks.slots, "concurrency", recorded)
    # Different seeds: separate in-process workers (and locks), so only the Prefect
    # limit on the shared slot can keep their shards apart.
    specs = two_slot_limited_specs(tiny_models, tmp_path, first_seed=100)
    states: list = [None, None]

    def run(i: int) -> None:
        states[i] = generate_dataset_flow(specs[i], return_state=True)

    threads = [threading.Thread(target=run, args=(i,), name=f"job{i}") for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert all(state is not None and state.is_completed() for state in states), states
    assert len(held) == 6, held  # 2 runs x 3 shards (3 identities x 2 images, 2 per shard)
    assert len({slot for _, slot, *_ in held}) == 1  # one slot: cpu-<host>-0
    intervals = sorted((start, end) for *_, start, end in held)
    for (_, end), (next_start, _) in itertools.pairwise(intervals):
        assert end <= next_start, intervals  # hold intervals never overlap
    # Both runs' shards went through the one slot (each flow run has its own task-runner
    # threads). Whether their requests overlap in time depends on how long each run takes to
    # load its models, and in one process the device pool (SHARDS_PER_DEVICE turns) also
    # orders them, so this test pins the limit's bookkeeping; the contention itself, two
    # processes queued on the server, is test_two_cli_processes_queue_on_one_device_slot.
    runs = {thread.rsplit("_", 1)[0] for thread, *_ in held}
    assert len(runs) == 2, held


HELD = re.compile(
    r"shard (\d+) held device slot (\S+) from ([\d.]+) to ([\d.]+) \(asked at ([\d.]+),"
)
ASKS = re.compile(r"shard \d+ asks for device slot (\S+)")


class _CliJob:
    """`python -m flows.cli generate` in its own process, its console lines collected as
    they come (Prefect's INFO run logs included: they carry the slot lines)."""

    def __init__(self, spec: JobSpec, workdir: Path, api_url: str) -> None:
        workdir.mkdir()
        command, environment = cli_generate_command(
            spec,
            workdir,
            PYTHONUNBUFFERED="1",
            PREFECT_API_URL=api_url,
            PREFECT_LOGGING_LEVEL="INFO",
            PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="INFO",
        )
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            command,
            cwd=workdir,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def asks_for(self, slot: str) -> bool:
        return any((m := ASKS.search(line)) and m.group(1) == slot for line in self.lines)

    def finish(self, timeout: float) -> int:
        self.process.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return self.process.returncode

    def holds(self) -> list[tuple[int, str, float, float, float]]:
        """(shard, slot, from, to, asked at) of each shard's slot line."""
        return [
            (int(m.group(1)), m.group(2), *map(float, m.group(3, 4, 5)))
            for line in self.lines
            if (m := HELD.search(line))
        ]


@pytest.mark.usefixtures("prefect_harness")
def test_two_cli_processes_queue_on_one_device_slot(tiny_models, tmp_path):
    from prefect.concurrency.sync import concurrency
    from prefect.settings import PREFECT_API_URL

    from tasks.slots import ensure_limit

    slot = slot_name("cpu", "0")  # the local runner's only entry of devices: [cpu]
    ensure_limit(slot)
    specs = two_slot_limited_specs(tiny_models, tmp_path, first_seed=200)
    jobs: list[_CliJob] = []
    try:
        # The test holds the slot until both processes have asked the server for it: only
        # the server's limit stands between them and the device, whatever their timing.
        with concurrency(slot, occupy=1, strict=True):
            api_url = PREFECT_API_URL.value()
            jobs = [_CliJob(spec, tmp_path / f"job{i}", api_url) for i, spec in enumerate(specs)]
            deadline = time.monotonic() + 240
            while not all(job.asks_for(slot) for job in jobs):
                ended = [job for job in jobs if job.process.poll() is not None]
                assert not ended, f"a job ended before asking for {slot}:\n{ended[0].output()}"
                assert time.monotonic() < deadline, "\n---\n".join(
                    f"job {i} has not asked for {slot} within 240 s:\n{job.output()}"
                    for i, job in enumerate(jobs)
                )
                time.sleep(0.5)
            time.sleep(2)  # their requests are denied and retried on the server meanwhile
            released = time.time()
        for job in jobs:
            assert job.finish(timeout=240) == 0, job.output()
    finally:
        for job in jobs:
            if job.process.poll() is None:
                job.process.kill()
    holds = [job.holds() for job in jobs]
    for job, held in zip(jobs, holds, strict=True):
        assert sorted(shard for shard, *_ in held) == [0, 1, 2], job.output()
        assert {name for _, name, *_ in held} == {slot}, held
        # The job asked while the test held the slot, and got it only after the release.
        first_asked = min(asked for *_, asked in held)
        first_start = min(start for _, _, start, _, _ in held)
        assert first_asked < released <= first_start, (released, held)
    intervals = sorted((start, end) for held in holds for _, _, start, end, _ in held)
    for (_, end), (next_start, _) in itertools.pairwise(intervals):
        assert end <= next_start, intervals  # one shard at a time across both processes
    for spec in specs:
        info = json.loads((Path(spec.output.uri) / "dataset.json").read_text())
        assert info["status"] == "complete", info
        assert info["counts"]["committed_shards"] == info["counts"]["shards"] == 3, info
        assert DatasetReader(spec.output.uri).manifest().num_rows == 6


# --- Dask: named workers, their own devices, same dataset as the local runner ----------------


@pytest.mark.usefixtures("prefect_harness", "info_run_logs")
def test_dask_named_workers_use_their_own_devices(tiny_models, tmp_path):
    import os

    from distributed import Client, Nanny, Scheduler, SpecCluster

    from flows.generate import generate_dataset_flow

    local = tiny_spec(tiny_models, str(tmp_path / "local"))
    assert generate_dataset_flow(local).status == "complete"
    workers = {
        name: {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "resources": {"GPU": 1},
                "env": {DEVICE_ENV: "cpu", "PREFECT_LOGGING_LEVEL": "INFO"},
                "silence_logs": logging.WARNING,
            },
        }
        for name in ("alpha", "beta")
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard": False, "host": "127.0.0.1"}}
    with (
        SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.WARNING) as cluster,
        Client(cluster) as client,
    ):
        configured = client.run(lambda: os.environ.get(DEVICE_ENV))
        names = {info["name"]: address for address, info in client.scheduler_info()["workers"].items()}
        assert set(names) == {"alpha", "beta"}
        spec = tiny_spec(
            tiny_models,
            str(tmp_path / "dask"),
            # The spec lists other devices: each worker must still use its own.
            compute={
                "task_runner": "dask",
                "dask_address": cluster.scheduler_address,
                "devices": ["cpu", "cpu"],
            },
        )
        state = generate_dataset_flow(spec, return_state=True)
        assert state.is_completed(), state
        placed = _flow_run_logs(state.state_details.flow_run_id, PLACED, 3)
    assert sorted(int(m.group(1)) for m in placed) == [0, 1, 2]
    for match in placed:
        assert match.group(3) in names
        assert match.group(2) == configured[names[match.group(3)]]
    rows = lambda uri: sorted(DatasetReader(uri).manifest().to_pylist(), key=str)  # noqa: E731
    assert rows(spec.output.uri) == rows(local.output.uri)


# --- credentials ------------------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_harness")
def test_credentials_stay_out_of_parameters_and_dataset_json(
    tiny_models, tmp_path, s3_endpoint, monkeypatch
):
    import fsspec
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client

    from flows.generate import generate_dataset, generate_dataset_flow

    key, secret = f"AKIA{uuid.uuid4().hex[:12].upper()}", f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("ARC2FACE_TEST_KEY", key)
    block = f"storage-{uuid.uuid4().hex[:8]}"
    Secret(value={"secret": secret}).save(block)
    bucket = f"creds-{uuid.uuid4().hex[:8]}"
    endpoint = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fsspec.filesystem("s3", key=key, secret=secret, **endpoint).mkdir(bucket)
    uri = f"s3://{bucket}/ds"
    spec = tiny_spec(
        tiny_models,
        uri,
        identities={"count": 1},
        output={
            "storage_options": {**endpoint, "key": "${env:ARC2FACE_TEST_KEY}"},
            "storage_options_secret": block,
        },
    )
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    assert generate_dataset(str(spec_path)).status == "complete"
    # The same job as a Python object with literal credentials: its stored parameters
    # are redacted too (the run resumes: every shard is committed).
    literal = spec.model_copy(
        update={
            "output": spec.output.model_copy(
                update={
                    "storage_options": {**endpoint, "key": key, "secret": secret},
                    "storage_options_secret": None,
                }
            )
        }
    )
    state = generate_dataset_flow(literal, return_state=True)
    assert state.is_completed(), state

    async def stored_parameters() -> list[dict]:
        async with get_client() as client:
            runs = await client.read_flow_runs()
        return [run.parameters for run in runs]

    stored = json.dumps(asyncio.run(stored_parameters()))
    assert str(spec_path) in stored and "<redacted>" in stored
    fs = fsspec.filesystem("s3", key=key, secret=secret, **endpoint)
    dataset_json = fs.cat(f"{bucket}/ds/dataset.json").decode()
    for text in (stored, dataset_json):
        assert key not in text and secret not in text


def test_an_env_reference_that_is_not_set_is_one_clear_error(monkeypatch):
    from flows.credentials import expand_env

    monkeypatch.delenv("ARC2FACE_UNSET", raising=False)
    with pytest.raises(UserError, match=r"output\.storage_options\.key .*ARC2FACE_UNSET"):
        expand_env({"key": "${env:ARC2FACE_UNSET}"}, "output.storage_options")


# --- one-line errors --------------------------------------------------------------------------


def _cli_generate(spec: JobSpec, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    command, environment = cli_generate_command(spec, tmp_path, **env)
    return subprocess.run(
        command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )


def test_unreachable_prefect_api_and_dask_scheduler_are_one_line(tiny_models, tmp_path):
    out = tmp_path / "never"
    api = f"http://127.0.0.1:{_free_port()}/api"
    failed = _cli_generate(tiny_spec(tiny_models, str(out)), tmp_path, PREFECT_API_URL=api)
    assert failed.returncode == 2, failed.stderr
    assert failed.stderr.startswith(f"error: Prefect API {api} is unreachable")
    assert failed.stderr.count("\n") == 1 and not out.exists()

    address = f"tcp://127.0.0.1:{_free_port()}"
    dask = tiny_spec(
        tiny_models, str(out), compute={"task_runner": "dask", "dask_address": address}
    )
    failed = _cli_generate(dask, tmp_path)
    assert failed.returncode == 2, failed.stderr
    assert failed.stderr.startswith(f"error: Dask scheduler {address} is unreachable")
    assert failed.stderr.count("\n") == 1 and not out.exists()


def test_a_slow_temporary_server_is_one_line_with_the_setting_to_raise(tiny_models, tmp_path):
    out = tmp_path / "never"
    failed = _cli_generate(
        tiny_spec(tiny_models, str(out)),
        tmp_path,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0",
    )
    assert failed.returncode == 2, failed.stderr
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in failed.stderr
    assert failed.stderr.count("\n") == 1 and not out.exists()
