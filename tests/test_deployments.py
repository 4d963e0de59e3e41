"""Scheduling as a user does it: a real Prefect server, process work pools, the
repository's own infra/prefect.yaml, workers, deployment runs with `--param`.

On SQLite always; on PostgreSQL when ARC2FACE_TEST_POSTGRES_URL names a database
(.ci/run installs PostgreSQL from Debian and sets it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PREFECT = [sys.executable, "-m", "prefect"]
POSTGRES_ENV = "ARC2FACE_TEST_POSTGRES_URL"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _base_env(home: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PREFECT_") and key != "PYTHONPATH"
    }
    env.update(
        PYTHONPATH=str(ROOT),
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="5",
        PREFECT_LOGGING_LEVEL="INFO",
    )
    return env


class Server:
    def __init__(self, api: str, env: dict[str, str], home: Path) -> None:
        self.api = api
        self.env = env
        self.home = home
        self.processes: list[subprocess.Popen] = []

    def cli(self, *args: str, timeout: float = 240) -> str:
        done = subprocess.run(
            [*PREFECT, "--no-prompt", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def start(self, *args: str, log: str) -> None:
        handle = open(self.home / log, "w")  # noqa: SIM115 - closed with the process
        self.processes.append(
            subprocess.Popen(
                [*PREFECT, *args],
                cwd=ROOT,
                env=self.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def post(self, path: str, body: dict) -> list | dict:
        response = httpx.post(f"{self.api}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def flow_run(self, run_id: str) -> dict:
        response = httpx.get(f"{self.api}/flow_runs/{run_id}", timeout=30)
        response.raise_for_status()
        return response.json()

    def wait(self, run_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            time.sleep(1)
        raise AssertionError(f"flow run {run_id} did not finish: {self.logs_of(run_id)}")

    def logs_of(self, run_id: str) -> list[str]:
        """Every log line of the run, page by page (the API returns at most 200 at a time)."""
        messages: list[str] = []
        while True:
            page = self.post(
                "/logs/filter",
                {
                    "logs": {"flow_run_id": {"any_": [run_id]}},
                    "sort": "TIMESTAMP_ASC",
                    "offset": len(messages),
                    "limit": 200,
                },
            )
            messages += [entry["message"] for entry in page]
            if len(page) < 200:
                return messages

    def lines_of(self, run_id: str, text: str, count: int, timeout: float = 60) -> list[str]:
        """The run's log lines containing `text`, waiting for `count` of them: a run's state
        can read COMPLETED before its process has sent its last batch of log lines."""
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.logs_of(run_id) if text in line]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(1)

    def run_deployment(self, name: str, *params: str) -> str:
        args = [arg for param in params for arg in ("--param", param)]
        out = self.cli("deployment", "run", name, *args)
        return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request, tmp_path: Path) -> Iterator[Server]:
    """`prefect server start` on 127.0.0.1 and a random port, in a temp PREFECT_HOME."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = _base_env(home)
    if request.param == "postgresql":
        url = os.environ.get(POSTGRES_ENV)
        if not url:
            pytest.skip(
                f"PostgreSQL variant not run: no PostgreSQL here; set {POSTGRES_ENV}="
                "postgresql+asyncpg://USER:PASSWORD@HOST/DB (.ci/run installs and sets it)"
            )
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = url
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    server = Server(api, env, home)
    server.start("server", "start", "--host", "127.0.0.1", "--port", str(port), log="server.log")
    env["PREFECT_API_URL"] = api
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.processes[0].poll() is None, (home / "server.log").read_text()
            assert time.monotonic() < deadline, "Prefect server did not start in 180 s"
            time.sleep(0.5)
        yield server
    finally:
        for process in reversed(server.processes):
            _stop(process)


def _tiny_spec(models: Path, out: Path, name: str) -> dict:
    return {
        "name": name,
        "seed": 5,
        "models": {"dir": str(models), "device": "cpu", "precision": "fp32"},
        "identities": {"source": "random", "count": 2, "separation": 0.3},
        "variations": {"images_per_identity": 2},
        "generation": {"steps": 1, "batch_size": 4, "height": 64, "width": 64},
        "filter": {"min_similarity": -1.0, "min_det_score": 0.0, "require_single_face": False},
        "output": {"uri": str(out), "shard_size": 2},
        "compute": {"task_runner": "local", "devices": ["cpu"], "device_limits": "all"},
    }


def test_deployments_on_process_pools(server: Server, tmp_path: Path):
    models = tmp_path / "models"
    made = subprocess.run(
        [sys.executable, "-m", "flows.cli", "models", "tiny", str(models)],
        cwd=ROOT,
        env=server.env,
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    for pool in ("gpu-pool", "cpu-pool"):
        server.cli("work-pool", "create", pool, "--type", "process", "--overwrite")
    # Workers start (imports) while the deployments are created.
    for pool in ("gpu-pool", "cpu-pool"):
        server.start("worker", "start", "--pool", pool, "--type", "process", log=f"{pool}.log")
    server.cli(
        "deploy", "--prefect-file", "infra/prefect.yaml",
        "--name", "generate", "--name", "audit", "--name", "export",
    )  # fmt: skip
    spec_path = tmp_path / "job.yaml"
    dataset = tmp_path / "dataset"
    spec_path.write_text(yaml.safe_dump(_tiny_spec(models, dataset, "deployed")))

    # A bad models dir fails the deployed run as it fails the CLI: before anything is written.
    never = tmp_path / "never"
    bad_path = tmp_path / "bad.yaml"
    bad_path.write_text(yaml.safe_dump(_tiny_spec(tmp_path / "no-models", never, "bad")))

    # A relative path resolves against the flow run's working folder (a temporary one):
    # the failure names it and says what to do in a deployment.
    relative_path = tmp_path / "relative.yaml"
    relative_path.write_text(yaml.safe_dump(_tiny_spec(Path("models"), never, "relative")))

    generate = server.run_deployment("generate-dataset/generate", f"spec={spec_path}")
    bad = server.run_deployment("generate-dataset/generate", f"spec={bad_path}")
    relative = server.run_deployment("generate-dataset/generate", f"spec={relative_path}")
    run = server.wait(generate)
    assert run["state_type"] == "COMPLETED", server.logs_of(generate)
    assert run["parameters"] == {"spec": str(spec_path), "show_progress": False}
    task_runs = server.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [generate]}}})
    shard_runs = {task["name"]: task["state_type"] for task in task_runs if "shard" in task["name"]}
    assert shard_runs == {"shard-00000": "COMPLETED", "shard-00001": "COMPLETED"}
    artifacts = server.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [generate]}}})
    summary = next(artifact for artifact in artifacts if artifact["key"] == "dataset-summary")
    rows = {row["metric"]: row["value"] for row in json.loads(summary["data"])}
    assert rows["shards committed"] == "2/2" and rows["images (dataset)"] == 4
    assert json.loads((dataset / "dataset.json").read_text())["status"] == "complete"
    # Each shard held this host's device slot; the lines are in the run's logs.
    held = server.lines_of(generate, "held device slot cpu-", count=2)
    assert len(held) == 2, server.logs_of(generate)

    assert server.wait(bad)["state_type"] == "FAILED"
    assert server.lines_of(bad, "no-models does not exist", count=1)
    assert server.wait(relative)["state_type"] == "FAILED"
    said = server.lines_of(relative, "models.dir models", count=1)[0]
    assert "does not exist (resolved against " in said
    assert "in a deployment run relative paths resolve against" in said
    assert "working_dir" in said and "absolute paths" in said
    assert not never.exists()

    audit = server.run_deployment("audit-dataset/audit", f"uri={dataset}")
    run = server.wait(audit)
    assert run["state_type"] == "COMPLETED", server.logs_of(audit)
    report = json.loads((dataset / "audit" / "report.json").read_text())
    assert report["passed"] is True, report.get("problems")
    artifacts = server.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [audit]}}})
    verdict = next(artifact for artifact in artifacts if artifact["key"] == "audit-verdict")
    assert "PASSED" in verdict["data"]

    # The export deployment takes the CLI's names: out and format.
    folder = tmp_path / "exported"
    export = server.run_deployment(
        "export-dataset/export", f"uri={dataset}", f"out={folder}", "format=imagefolder",
        "align=false",
    )  # fmt: skip
    run = server.wait(export)
    assert run["state_type"] == "COMPLETED", server.logs_of(export)
    assert run["parameters"] == {
        "uri": str(dataset), "out": str(folder), "format": "imagefolder", "align": False,
    }  # fmt: skip
    assert len(list(folder.rglob("*.jpg"))) == rows["accepted (dataset)"]
