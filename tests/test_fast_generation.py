"""Generation at full speed inside jobs, checked on CPU with the tiny models: the spec's
compile and batch fields reach the engine, ragged batches meet no new compiled shape,
noise drawn up front equals the pipeline's own, and overlapping a shard's commit with the
next shard's generation leaves the dataset byte-for-byte the same."""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections import Counter
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
from arc2face_engine.job import shard as shard_module
from arc2face_engine.job.shards import job_batch_sizes, shard_works
from arc2face_engine.testing.tiny_models import TINY_IMAGE_SIZE
from schemas.job import JobSpec, default_batch_buckets, parse_spec

SIZE = TINY_IMAGE_SIZE


def _requests(count: int, seed: int = 0) -> list[ImageRequest]:
    embeddings = np.random.default_rng(seed).standard_normal((count, 512)).astype(np.float32)
    return [ImageRequest(embedding, 100 + index) for index, embedding in enumerate(embeddings)]


def _updated(spec: JobSpec, section: str, **fields) -> JobSpec:
    return spec.model_copy(update={section: getattr(spec, section).model_copy(update=fields)})


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


@pytest.fixture
def eager_compile(monkeypatch, full_batches):
    """Compiled engines on CPU with dynamo's `eager` backend (traces, never codegens)."""
    monkeypatch.setattr(generation_engine, "COMPILE_BACKEND", "eager")
    limit = torch._dynamo.config.recompile_limit
    yield
    torch._dynamo.config.recompile_limit = limit


def test_a_compiled_job_compiles_each_graph_once_before_its_first_shard(
    tiny_models, tmp_path, eager_compile, monkeypatch
):
    """Poses, expressions and top-ups: every (module, call signature) is compiled once per
    bucket, all at warm-up, and dynamo reports no fallback even with a recompile limit
    lower than the graphs one code object gets (the engine lifts it)."""
    torch._dynamo.config.recompile_limit = 1
    spec = job_spec(tiny_models, tmp_path / "compiled", batch_size=2, compile=True)
    spec = _updated(spec, "filter", min_similarity=0.5, max_attempts=3)
    variations = spec.variations.model_copy(
        update={
            "poses": spec.variations.poses.model_copy(
                update={"kind": "procedural", "yaw": [-20.0, 20.0]}
            ),
            "expressions": spec.variations.expressions.model_copy(
                update={"kind": "random", "count": 2}
            ),
        }
    )
    spec = spec.model_copy(update={"variations": variations})
    graphs_at_first_batch: list[int] = []
    original_generate = Arc2FaceEngine.generate

    def generate(self, requests, settings):
        if not graphs_at_first_batch:
            graphs_at_first_batch.append(len(self.compile_watch.graphs))
        return original_generate(self, requests, settings)

    monkeypatch.setattr(Arc2FaceEngine, "generate", generate)
    unique_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    info = direct.run_job_directly(spec)
    assert info.status == "complete"
    assert info.counts.rejected > 0  # top-ups ran: ragged batches met the buckets
    watch = workers.worker_for(spec).engine.compile_watch
    per_bucket = Counter((graph.module, graph.bucket) for graph in watch.graphs)
    expected = {
        (module, bucket): 1
        for module in ("unet+expression", "controlnet", "vae decoder")
        for bucket in (1, 2)
    }
    assert per_bucket == expected
    assert len(watch.counts()) == len(expected)  # one call signature per module here
    assert graphs_at_first_batch == [len(expected)]  # all compiled before the first shard
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - unique_graphs == 6
    assert workers.worker_for(spec).engine.compile_problems() == []


def test_a_fallback_to_eager_is_reported_and_the_engine_lifts_the_limit(
    tiny_models, eager_compile, monkeypatch
):
    """With dynamo's recompile limit below what the engine compiles, dynamo falls back to
    eager and the engine says so in one line; the engine lifts the limit, so it does not."""
    settings = GenerationSettings(num_inference_steps=1, height=SIZE, width=SIZE)

    def warmed_engine() -> Arc2FaceEngine:
        torch._dynamo.config.recompile_limit = 1
        engine = Arc2FaceEngine.from_pretrained(
            tiny_models, device="cpu", compile=True, max_batch_size=2, batch_buckets=[1, 2]
        )
        engine.warm_up({1, 2}, settings)
        return engine

    monkeypatch.setattr(generation_engine, "raise_recompile_limit", lambda entries: None)
    problems = warmed_engine().compile_problems()
    assert any(line.startswith("torch.compile fell back to eager") for line in problems)
    monkeypatch.undo()  # the engine's own limit-raising again
    monkeypatch.setattr(generation_engine, "_CPU_MICRO_BATCH", None)
    monkeypatch.setattr(generation_engine, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    assert warmed_engine().compile_problems() == []


def test_only_the_buckets_a_job_can_meet_are_compiled(tiny_models, eager_compile):
    # 3 images per shard, no top-ups: every batch holds 3 images, so only bucket 4 runs.
    assert job_batch_sizes(5, 3, 3, batch_size=8, max_attempts=1) == {3}
    assert job_batch_sizes(5, 3, 9, batch_size=4, max_attempts=1) == {4, 2, 1}
    assert job_batch_sizes(5, 3, 9, batch_size=4, max_attempts=2) == {1, 2, 3, 4}
    engine = Arc2FaceEngine.from_pretrained(
        tiny_models, device="cpu", compile=True, max_batch_size=8, batch_buckets=[1, 2, 4, 8]
    )
    settings = GenerationSettings(num_inference_steps=1, height=SIZE, width=SIZE)
    engine.warm_up({3}, settings)
    assert {bucket for _, _, bucket in engine.compile_watch.counts()} == {4}
    compiled = len(engine.compile_watch.graphs)
    engine.warm_up({3, 4}, settings)  # already warm: nothing more
    engine.generate(_requests(3), settings)
    assert len(engine.compile_watch.graphs) == compiled
    assert engine.compile_problems() == []
    engine.generate(_requests(5), settings)  # a batch the job never meets: reported
    assert engine.compile_problems() == [
        "torch.compile compiled graphs after warm-up (unet, vae decoder)"
    ]


# --- overlap of a shard's commit with the next shard -----------------------------------------


def _dataset_bytes(root: Path) -> tuple[list[dict], dict[str, str]]:
    rows = sorted(DatasetReader(str(root)).manifest().to_pylist(), key=lambda r: r["image_id"])
    files = {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted((root / "images").rglob("*"))
        if path.is_file()
    }
    return rows, files


def test_overlapped_shards_keep_the_dataset_identical(tiny_models, tmp_path, monkeypatch):
    """The next shard generates while this one's last batch is verified (the device turn
    is given back while a shard only waits for verdicts) and while it commits; at most
    one generated batch waits for the verifier; the dataset is the sequential one."""
    sequential = job_spec(tiny_models, tmp_path / "sequential", batch_size=2)
    with lifecycle.writer_lease(sequential) as lease:
        writer = lifecycle.prepare_dataset(sequential, lease.token)
        table = identities_step.build_identities(sequential, writer)
        for work in shard_works(sequential, table, lease.token):
            workers.generate_shard(sequential, work)  # waits for each commit
        lifecycle.finalize_dataset(sequential, lease.token)

    events: list[tuple[str, int]] = []
    times: dict[str, list[tuple[int, float]]] = {"generated": [], "verified": []}
    waiting = [0, 0]  # batches generated and not yet verifying; the most seen
    lock = threading.Lock()
    original_commit = DatasetWriter.commit_shard
    original_start = direct.start_shard
    original_generate, original_verification = shard_module._generate, shard_module._verification

    def slow_commit(self, shard, table, **options):
        time.sleep(0.3)  # a slow object store: the next shard must not wait for it
        result = original_commit(self, shard, table, **options)
        with lock:
            events.append(("committed", shard))
        return result

    def recorded_start(spec, work, *args, **kwargs):
        with lock:
            events.append(("starting", work.range.shard))
        return original_start(spec, work, *args, **kwargs)

    def recorded_generate(work, *args):
        with lock:
            times["generated"].append((work.range.shard, time.perf_counter()))
        generated = original_generate(work, *args)
        with lock:
            waiting[0] += 1
            waiting[1] = max(waiting)
        return generated

    def slow_verification(turns, work, *args):
        with lock:
            waiting[0] -= 1
        checked = original_verification(turns, work, *args)
        time.sleep(1.0)  # a slow verifier: the device must not wait for it
        with lock:
            times["verified"].append((work.range.shard, time.perf_counter()))
        return checked

    monkeypatch.setattr(DatasetWriter, "commit_shard", slow_commit)
    monkeypatch.setattr(direct, "start_shard", recorded_start)
    monkeypatch.setattr(shard_module, "_generate", recorded_generate)
    monkeypatch.setattr(shard_module, "_verification", slow_verification)
    overlapped = job_spec(tiny_models, tmp_path / "overlapped", batch_size=2)
    info = direct.run_job_directly(overlapped)
    assert info.status == "complete" and info.counts.committed_shards == 3
    assert events.index(("starting", 1)) < events.index(("committed", 0))

    def first(kind: str, shard: int) -> float:
        return min(t for s, t in times[kind] if s == shard)

    def last(kind: str, shard: int) -> float:
        return max(t for s, t in times[kind] if s == shard)

    order = sorted(range(3), key=lambda shard: first("generated", shard))
    for earlier, later in itertools.pairwise(order):
        assert first("generated", later) < last("verified", earlier)
    assert waiting[1] == 1
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
