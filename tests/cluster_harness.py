"""A multi-host cluster on one machine, for fault tests and the fault benchmark.

Every service is a real process in its own session (its own process group), as if on
its own host, so a fault can be delivered to one "host" at a time:

- a persistent Prefect server (`prefect server start`, SQLite in its own home, or
  PostgreSQL), which can be stopped and started again on the same port and database;
- a Dask scheduler with a short worker TTL (a worker silent for that long is removed and
  its shards re-run elsewhere), and N Dask workers (`dask worker`, each with a nanny),
  each advertising one GPU and running shards with the stand-in generator
  (`arc2face_engine.testing.standin`, injected with ARC2FACE_MODEL_FACTORY);
- an S3 API (moto's server) behind the fault-injecting proxy (`tests/faulty_s3.py`);
- `arc2face-synth generate` runs as a separate process too (the flow process).

Used by tests/test_cluster_faults.py (the fast cases) and bench/bench_faults.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.faulty_s3 import FaultyS3Proxy
from tests.s3_fixture import DUMMY_CREDENTIALS  # the one set of fake AWS credentials

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
STANDIN_FACTORY = "arc2face_engine.testing.standin:standin_models"
# What the writer sees of S3 through the proxy: a stalled request times out after
# READ_TIMEOUT_S and is retried; botocore's standard mode retries throttling, 5xx and
# dropped connections with exponential backoff and full jitter.
READ_TIMEOUT_S = 2
RETRY_CONFIG = {
    "retries": {"mode": "standard", "max_attempts": 3},
    "read_timeout": READ_TIMEOUT_S,
    "connect_timeout": 2,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Service:
    """One process in its own session: signals go to its whole process group (a host)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.log = logs / f"{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> Service:
        handle = open(self.log, "a")  # noqa: SIM115 - the process owns it
        self.process = subprocess.Popen(
            self.argv, cwd=ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        handle.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal_group(self, sig: int) -> None:
        """Send `sig` to every process of this host (the service and its children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = 20) -> None:
        if self.process is None:
            return
        if self.alive():
            self.signal_group(signal.SIGCONT)  # a paused host cannot handle SIGTERM
            self.signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        self.signal_group(signal.SIGKILL)  # children that outlived their parent
        self.process.wait()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def clean_env(home: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PREFECT_", "DASK_", "ARC2FACE_")) and key != "PYTHONPATH"
    }
    env.update(DUMMY_CREDENTIALS)
    env.update(
        PYTHONPATH=str(ROOT),
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    return env


class PrefectServer:
    """`prefect server start` on a fixed port and database, restartable."""

    def __init__(self, workdir: Path, database_url: str | None = None) -> None:
        self.home = workdir / "prefect-server"
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        env = clean_env(self.home)
        if database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        argv = [PYTHON, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                "--port", str(self.port)]  # fmt: skip
        self.service = Service("prefect-server", argv, env, workdir)

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.api}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self, timeout: float = 240) -> None:
        self.service.start()

        def up() -> bool:
            if not self.service.alive():
                raise RuntimeError(f"Prefect server exited:\n{self.service.tail()}")
            return self.healthy()

        wait_until(up, timeout, "the Prefect server", every=0.5)

    def stop(self) -> None:
        self.service.stop()

    def restart(self, down_s: float = 3.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def flow_runs(self) -> list[dict]:
        response = httpx.post(f"{self.api}/flow_runs/filter", json={}, timeout=30)
        response.raise_for_status()
        return response.json()


@dataclass
class ClusterOptions:
    workers: int = 3
    worker_ttl: str = "10s"
    seconds_per_image: float = 0.25
    database_url: str | None = None


class Cluster:
    """Prefect server + Dask scheduler + workers + S3 behind a fault proxy."""

    def __init__(self, workdir: Path, s3_endpoint: str, options: ClusterOptions | None = None):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.options = options or ClusterOptions()
        self.s3_endpoint = s3_endpoint
        self.proxy = FaultyS3Proxy(s3_endpoint)
        self.proxy_endpoint = ""
        self.server = PrefectServer(workdir, self.options.database_url)
        self.scheduler_port = free_port()
        self.scheduler_address = f"tcp://127.0.0.1:{self.scheduler_port}"
        self.scheduler: Service | None = None
        self.workers: dict[str, Service] = {}
        self._client = None

    # --- lifecycle ------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = clean_env(self.workdir / "prefect-client")
        env.update(
            PREFECT_API_URL=self.server.api,
            DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL=self.options.worker_ttl,
            # The default (300 s) would keep a removed worker's shard waiting: with a
            # short TTL, a paused host is declared lost within seconds.
            DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="10s",
        )
        return env

    def start(self) -> Cluster:
        self.proxy_endpoint = self.proxy.start()
        self.server.start()
        self.scheduler = Service(
            "dask-scheduler",
            [PYTHON, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", str(self.scheduler_port), "--no-dashboard"],
            self.env(), self.workdir,
        ).start()  # fmt: skip
        for index in range(self.options.workers):
            self.start_worker(f"host-{index}")
        self.wait_for_workers()
        return self

    def start_worker(self, name: str) -> Service:
        env = self.env()
        env.update(
            ARC2FACE_DEVICE="cpu",
            ARC2FACE_MODEL_FACTORY=STANDIN_FACTORY,
            ARC2FACE_STANDIN_SECONDS_PER_IMAGE=str(self.options.seconds_per_image),
        )
        argv = [PYTHON, "-m", "distributed.cli.dask_worker", self.scheduler_address,
                "--name", name, "--nthreads", "1", "--resources", "GPU=1", "--no-dashboard",
                "--death-timeout", "60"]  # fmt: skip
        # Its disk can be filled and freed while it runs (fill_disk, free_disk).
        env["ARC2FACE_TEST_DISK_FILE"] = str(self.disk_control(name))
        argv += ["--preload", str(ROOT / "tests" / "disk_full_preload.py")]
        worker = Service(name, argv, env, self.workdir).start()
        self.workers[name] = worker
        return worker

    def disk_control(self, name: str) -> Path:
        return self.workdir / f"disk-{name}"

    def fill_disk(self, name: str, after_writes: int) -> None:
        """Worker `name`'s disk is full after `after_writes` more writes."""
        self.disk_control(name).write_text(str(after_writes))

    def free_disk(self, name: str) -> None:
        self.disk_control(name).unlink(missing_ok=True)

    def client(self):
        from distributed import Client

        if self._client is None:
            self._client = Client(self.scheduler_address, timeout=30)
        return self._client

    def worker_names(self) -> dict[str, str]:
        """Dask worker address -> our worker name, as the scheduler knows them now."""
        info = self.client().scheduler_info(n_workers=-1)
        return {address: str(worker["name"]) for address, worker in info["workers"].items()}

    def wait_for_workers(self, timeout: float = 180) -> None:
        def ready() -> bool:
            for worker in self.workers.values():
                if not worker.alive():
                    raise RuntimeError(f"{worker.name} exited:\n{worker.tail()}")
            return set(self.worker_names().values()) == set(self.workers)

        wait_until(ready, timeout, f"{len(self.workers)} Dask workers", every=0.5)

    def heal(self, timeout: float = 180) -> None:
        """Every worker running and registered again, the server up and the store
        healthy (after a test killed, paused or broke something)."""
        self.proxy.plan = type(self.proxy.plan)()
        self.proxy.end_outage()
        for name in self.workers:
            self.free_disk(name)
        if not self.server.healthy():
            self.server.start()
        for worker in self.workers.values():
            worker.signal_group(signal.SIGCONT)

        def healed() -> bool:
            for name, worker in list(self.workers.items()):
                if not worker.alive():  # killed, or its nanny closed after a TTL removal
                    worker.stop()
                    self.start_worker(name)
            return set(self.worker_names().values()) == set(self.workers)

        wait_until(healed, timeout, f"{len(self.workers)} Dask workers", every=1.0)

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        for worker in self.workers.values():
            worker.stop()
        if self.scheduler is not None:
            self.scheduler.stop()
        self.server.stop()
        self.proxy.stop()

    # --- what is running where ------------------------------------------------------------

    def busy_workers(self) -> list[str]:
        """Names of the workers running a shard now."""
        names = self.worker_names()
        processing = self.client().processing()
        return [names[address] for address, keys in processing.items() if keys and address in names]

    # --- jobs -----------------------------------------------------------------------------

    def storage_options(self, endpoint: str | None = None) -> dict[str, Any]:
        return {
            "key": DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {
                "endpoint_url": endpoint or self.proxy_endpoint,
                "region_name": "us-east-1",
            },
            "config_kwargs": RETRY_CONFIG,
        }

    def direct_fs(self):
        """s3fs straight to moto (no faults): for checking what a run left."""
        import s3fs

        # No region_name: s3fs would send a us-east-1 LocationConstraint with mkdir,
        # which S3 rejects.
        return s3fs.S3FileSystem(
            key=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            client_kwargs={"endpoint_url": self.s3_endpoint},
        )

    def new_bucket(self) -> str:
        bucket = f"faults-{uuid.uuid4().hex[:10]}"
        fs = self.direct_fs()
        fs.mkdir(bucket)
        fs.invalidate_cache()
        return bucket

    def write_spec(self, models: Path, uri: str, name: str = "faults", **overrides) -> Path:
        spec = job_spec(models, uri, self.storage_options(), self.scheduler_address, name)
        for key, value in overrides.items():
            section, _, field_name = key.partition("__")
            spec[section][field_name] = value
        path = self.workdir / f"spec-{uuid.uuid4().hex[:8]}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    def generate(self, spec: Path, log_name: str = "generate", env: dict | None = None) -> Service:
        """`arc2face-synth generate SPEC` as its own process (the flow process)."""
        run_env = self.env()
        run_env.update(env or {})
        argv = [PYTHON, "-m", "flows.cli", "generate", str(spec), "--no-progress"]
        return Service(f"{log_name}-{uuid.uuid4().hex[:6]}", argv, run_env, self.workdir).start()


def job_spec(
    models: Path, uri: str, storage_options: dict, scheduler: str, name: str = "faults"
) -> dict:
    """8 shards of 2 identities x 2 images (plus top-ups), tiny images, on the cluster."""
    return {
        "name": name,
        "seed": 11,
        "models": {"dir": str(models), "device": "cpu", "precision": "fp32"},
        "identities": {"source": "random", "count": 16, "separation": 0.3},
        "variations": {"images_per_identity": 2},
        "generation": {"steps": 1, "batch_size": 4, "height": 32, "width": 32},
        "filter": {"min_similarity": 0.5, "max_attempts": 3},
        "output": {"uri": uri, "shard_size": 4, "storage_options": storage_options},
        "compute": {"task_runner": "dask", "dask_address": scheduler, "devices": ["cpu"]},
    }


def wait_for(service: Service, timeout: float) -> int:
    try:
        return service.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        service.stop()
        raise TimeoutError(
            f"{service.name} did not finish in {timeout:.0f} s:\n{service.tail()}"
        ) from None


# --- what a dataset holds -------------------------------------------------------------------

VOLATILE_INFO = ("created_at", "finished_at")


def snapshot(fs, root: str) -> dict[str, str]:
    """Every file under `root` -> sha256 of its bytes; dataset.json -> its content without
    the timestamps and with the output's own location as "<output>" (sorted JSON, so a
    difference shows which field)."""
    fs.invalidate_cache()
    files = {}
    for path in sorted(fs.find(root)):
        relative = path[len(root.rstrip("/")) + 1 :]
        data = fs.cat_file(path)
        if relative == "dataset.json":
            info = json.loads(data.decode().replace(root.rstrip("/"), "<output>"))
            for key in VOLATILE_INFO:
                info.pop(key, None)
            files[relative] = json.dumps(info, sort_keys=True)
        else:
            files[relative] = hashlib.sha256(data).hexdigest()
    return files


def committed_parts(fs, root: str) -> list[str]:
    fs.invalidate_cache()
    try:
        return sorted(p for p in fs.ls(f"{root}/manifest", detail=False) if p.endswith(".parquet"))
    except FileNotFoundError:
        return []
