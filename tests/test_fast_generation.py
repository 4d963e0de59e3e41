"""Generation at full speed inside jobs, checked on CPU with the tiny models: the spec's
compile and batch fields reach the engine, ragged batches meet no new compiled shape,
noise drawn up front equals the pipeline's own, and overlapping a shard's commit with the
next shard's generation leaves the dataset byte-for-byte the same."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.dataset.writer import DatasetWriter
from arc2face_engine.generation import engine as generation_engine
from arc2face_engine.generation.engine import Arc2FaceEngine
from arc2face_engine.generation.settings import GenerationSettings, ImageRequest
from arc2face_engine.job import direct, identities_step, lifecycle, workers
from arc2face_engine.job.shards import shard_works
from arc2face_engine.testing.tiny_models import TINY_IMAGE_SIZE
from schemas.job import JobSpec, default_batch_buckets, parse_spec

SIZE = TINY_IMAGE_SIZE


def _requests(count: int, seed: int = 0) -> list[ImageRequest]:
    embeddings = np.random.default_rng(seed).standard_normal((count, 512)).astype(np.float32)
    return [ImageRequest(embedding, 100 + index) for index, embedding in enumerate(embeddings)]


def job_spec(models: Path, out: Path, **generation_fields) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "fast generation",
            "seed": 5,
            "models": {"dir": str(models), "device": "cpu", "precision": "fp32"},
            "identities": {"source": "random", "count": 3, "separation": 0.3},
            "variations": {"images_per_identity": 3},
            "generation": {"steps": 2, "height": SIZE, "width": SIZE, **generation_fields},
            "filter": {"min_similarity": 0.0, "max_attempts": 2},
            "output": {"uri": str(out), "shard_size": 3},
            "compute": {"task_runner": "local", "devices": ["cpu"]},
        }
    )


# --- spec -> engine ------------------------------------------------------------------------


def test_spec_buckets_default_and_checks():
    assert default_batch_buckets(16) == [1, 2, 4, 8, 16]
    assert default_batch_buckets(12) == [1, 2, 4, 8, 12]
    assert default_batch_buckets(1) == [1]
    plain = parse_spec({"name": "x", "generation": {"batch_size": 8}}).generation
    assert plain.engine_buckets() is None  # eager: padding would only cost compute
    compiled = parse_spec({"name": "x", "generation": {"batch_size": 8, "compile": True}})
    assert compiled.generation.engine_buckets() == [1, 2, 4, 8]
    given = parse_spec({"name": "x", "generation": {"batch_size": 8, "batch_buckets": [4, 2]}})
    assert given.generation.engine_buckets() == [2, 4, 8]
    with pytest.raises(ValueError, match=r"generation.batch_buckets: buckets \[9\] outside"):
        parse_spec({"name": "x", "generation": {"batch_size": 8, "batch_buckets": [9]}})


def test_settings_derive_from_the_spec():
    spec = parse_spec({"name": "x", "generation": {"scheduler": "lcm", "steps": 3}})
    assert GenerationSettings.from_spec(spec.generation) == GenerationSettings.lcm(steps=3)
    assert GenerationSettings.from_spec(parse_spec({"name": "x"}).generation) == (
        GenerationSettings()
    )


def test_spec_compile_and_batch_fields_reach_the_engine(tiny_models, tmp_path):
    spec = job_spec(tiny_models, tmp_path / "ds", batch_size=6, batch_buckets=[2], compile=True)
    engine = workers.worker_for(spec, "cpu").engine
    assert engine.max_batch_size == 6
    assert engine.batch_buckets == [2, 6]
    base = engine.variants["dpmsolver++"].pipeline
    # nn.Module.compile wraps in place; compilation itself waits for the first forward.
    assert base.unet._compiled_call_impl is not None
    assert base.vae.decoder._compiled_call_impl is not None
    eager = workers.worker_for(job_spec(tiny_models, tmp_path / "ds"), "cpu").engine
    assert eager.variants["dpmsolver++"].pipeline.unet._compiled_call_impl is None
    assert eager.max_batch_size == 16 and eager.batch_buckets == []


# --- buckets and compilation ----------------------------------------------------------------


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them eagerly."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs: list):
        self.graphs += 1
        return graph_module.forward


@pytest.fixture
def full_batches(monkeypatch):
    """The GPU path on CPU: whole batches in one forward (as in test_generation)."""
    monkeypatch.setattr(generation_engine, "_CPU_MICRO_BATCH", None)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_ragged_batches_cause_no_recompile(tiny_models, full_batches):
    settings = GenerationSettings(num_inference_steps=1, height=SIZE, width=SIZE)
    backend = CountingBackend()
    engine = Arc2FaceEngine.from_pretrained(
        tiny_models, device="cpu", compile=True, compile_backend=backend, max_batch_size=4,
        batch_buckets=[4],
    )  # fmt: skip
    full = engine.generate(_requests(4), settings)  # compiles the bucket's shapes
    compiled = backend.graphs
    assert compiled > 0
    ragged = engine.generate(_requests(3), settings)  # a top-up: padded to 4
    single = engine.generate(_requests(1), settings)  # a shard's tail
    assert backend.graphs == compiled, "a ragged batch triggered a recompile"
    assert ragged.shape == (3, SIZE, SIZE, 3) and single.shape == (1, SIZE, SIZE, 3)
    # Padding adds rows, it does not change a real image beyond the CPU kernels'
    # batch-size rounding (on the default CPU path every image runs alone anyway).
    assert np.abs(ragged.astype(int) - full[:3]).max() <= 2

    # The control: the same engine without padding meets a new shape and recompiles.
    engine._run_pipeline(_requests(3), settings)
    assert backend.graphs > compiled, "the control should recompile for a new batch size"


def test_buckets_leave_cpu_images_bit_identical(tiny_models):
    settings = GenerationSettings(num_inference_steps=2, height=SIZE, width=SIZE)
    plain = Arc2FaceEngine.from_pretrained(tiny_models, device="cpu")
    bucketed = Arc2FaceEngine.from_pretrained(
        tiny_models, device="cpu", max_batch_size=4, batch_buckets=[4]
    )
    requests = _requests(3, seed=1)
    assert np.array_equal(plain.generate(requests, settings), bucketed.generate(requests, settings))


def test_noise_drawn_up_front_equals_the_pipelines(tiny_models):
    """The accelerator path draws latents and LCM's per-step noise before the run and
    uploads them once; on CPU it gives the pipeline's images bit for bit."""
    engine = Arc2FaceEngine.from_pretrained(tiny_models, device="cpu", lcm=True)
    requests = _requests(2, seed=2)
    for settings in (
        GenerationSettings.lcm(steps=3, height=SIZE, width=SIZE),
        GenerationSettings(num_inference_steps=2, height=SIZE, width=SIZE),
    ):
        engine.predraw_noise = False
        drawn_by_pipeline = engine.generate(requests, settings)
        engine.predraw_noise = True
        drawn_up_front = engine.generate(requests, settings)
        assert np.array_equal(drawn_by_pipeline, drawn_up_front), settings.scheduler


# --- overlap of a shard's commit with the next shard -----------------------------------------


def _dataset_bytes(root: Path) -> tuple[list[dict], dict[str, str]]:
    rows = sorted(DatasetReader(str(root)).manifest().to_pylist(), key=lambda r: r["image_id"])
    files = {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted((root / "images").rglob("*"))
        if path.is_file()
    }
    return rows, files


def test_overlapped_commits_keep_the_dataset_identical(tiny_models, tmp_path, monkeypatch):
    sequential = job_spec(tiny_models, tmp_path / "sequential", batch_size=4)
    with lifecycle.writer_lease(sequential) as lease:
        writer = lifecycle.prepare_dataset(sequential, lease.token)
        table = identities_step.build_identities(sequential, writer)
        for work in shard_works(sequential, table, lease.token):
            workers.generate_shard(sequential, work)  # waits for each commit
        lifecycle.finalize_dataset(sequential, lease.token)

    events: list[tuple[str, int]] = []
    lock = threading.Lock()
    original_commit = DatasetWriter.commit_shard
    original_start = direct.start_shard

    def slow_commit(self, shard, table, **options):
        time.sleep(0.3)  # a slow object store: the next shard must not wait for it
        result = original_commit(self, shard, table, **options)
        with lock:
            events.append(("committed", shard))
        return result

    def recorded_start(spec, work, *args, **kwargs):
        with lock:
            events.append(("generating", work.range.shard))
        return original_start(spec, work, *args, **kwargs)

    monkeypatch.setattr(DatasetWriter, "commit_shard", slow_commit)
    monkeypatch.setattr(direct, "start_shard", recorded_start)
    overlapped = job_spec(tiny_models, tmp_path / "overlapped", batch_size=4)
    info = direct.run_job_directly(overlapped)
    assert info.status == "complete" and info.counts.committed_shards == 3
    assert events.index(("generating", 1)) < events.index(("committed", 0))
    assert _dataset_bytes(tmp_path / "overlapped") == _dataset_bytes(tmp_path / "sequential")


def test_a_failed_commit_surfaces_and_a_rerun_completes(tiny_models, tmp_path, monkeypatch):
    spec = job_spec(tiny_models, tmp_path / "ds", batch_size=4)
    original_commit = DatasetWriter.commit_shard

    def failing(self, shard, table, **options):
        if shard == 1:
            raise OSError("injected: storage went away")
        return original_commit(self, shard, table, **options)

    monkeypatch.setattr(DatasetWriter, "commit_shard", failing)
    with pytest.raises(OSError, match="storage went away"):
        direct.run_job_directly(spec)
    committed = DatasetWriter(str(tmp_path / "ds")).committed_shards()
    assert 0 in committed and 1 not in committed
    monkeypatch.setattr(DatasetWriter, "commit_shard", original_commit)
    assert direct.run_job_directly(spec).counts.committed_shards == 3


# --- the end-to-end benchmark's JSON feeds the plan -------------------------------------------


def test_bench_e2e_throughput_feeds_plan(tmp_path):
    import importlib.util
    import subprocess
    import sys
    from types import SimpleNamespace

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_e2e.py"
    module_spec = importlib.util.spec_from_file_location("bench_e2e", path)
    bench = importlib.util.module_from_spec(module_spec)
    sys.modules.setdefault("bench_e2e", bench)  # dataclasses look their module up there
    module_spec.loader.exec_module(bench)
    settings = {"default": GenerationSettings(height=SIZE, width=SIZE)}
    label = bench._label("default", settings["default"])
    ctx = SimpleNamespace(
        size=SIZE,
        device=torch.device("cpu"),
        rows=[
            bench.Row(label, 16, False, "shard", 16, 8.0, "tiny"),  # 2 images/s
            bench.Row(label, 32, False, "shard", 32, 8.0, "tiny"),  # 4 images/s: the best
            bench.Row(label, 32, False, "generate", 64, 1.0, "tiny"),  # not a shard
        ],
    )
    table = tmp_path / "throughput.json"
    bench.save_throughput(table, bench.throughput_records(ctx, settings))
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"name: planned\ngeneration: {{height: {SIZE}, width: {SIZE}}}\n"
        "identities: {source: random, count: 1000}\n"
    )
    planned = subprocess.run(
        [sys.executable, "-m", "flows.cli", "plan", str(spec), "--throughput-table", str(table)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr
    assert "4 (measured on cpu" in planned.stdout
    assert "estimated GPU hours" in planned.stdout
