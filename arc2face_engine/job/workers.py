"""One worker process's models and banks per device, loaded once and kept (`worker_for`),
and one shard run on them (`start_shard`, `generate_shard`).

The engine and the face analyzer are imported where they are built: importing this
module does not load torch, diffusers or insightface (see job/__init__.py).

The one injection point: `ARC2FACE_MODEL_FACTORY=module:function` in a worker process's
environment makes `worker_for` take its generator and verifier from that function
(a `ModelFactory`) instead of loading Arc2Face and the face models. Harnesses and
benchmarks use it to drive the real flow, runners and writer without diffusion
(`arc2face_engine.testing.standin`); everything else about the shard is unchanged.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

from arc2face_engine import models_dir
from arc2face_engine.controls.expressions import ExpressionBank, load_expression_bank
from arc2face_engine.controls.poses import PoseBank, load_pose_bank
from arc2face_engine.job.lifecycle import open_writer, required_components
from arc2face_engine.job.shard import (
    DeviceTurns,
    FaceVerifier,
    ImageGenerator,
    PendingCommit,
    ShardResult,
    run_shard,
)
from arc2face_engine.job.shards import ShardWork
from schemas.errors import UserError
from schemas.job import JobSpec


@dataclass
class Worker:
    """Models and banks of one worker process (one device), loaded once."""

    engine: ImageGenerator
    analyzer: FaceVerifier
    poses: PoseBank | None
    expressions: ExpressionBank | None
    turns: DeviceTurns  # how its shards share the device (job/shard.py)

    def warm_up(self, work: ShardWork) -> None:
        """Compile (when compiled) every bucket the job can meet, before its first shard;
        once per job settings, a no-op for later shards."""
        warm_up = getattr(self.engine, "warm_up", None)
        if warm_up is not None:
            warm_up(
                work.job_batch_sizes, work.settings,
                with_pose=self.poses is not None, with_expression=self.expressions is not None,
            )  # fmt: skip


_WORKERS: dict[tuple, Worker] = {}
_WORKERS_LOCK = threading.Lock()

MODEL_FACTORY_ENV = "ARC2FACE_MODEL_FACTORY"


class ModelFactory(Protocol):
    """Builds a worker's generator and verifier for a spec on a device."""

    def __call__(self, spec: JobSpec, device: str) -> tuple[ImageGenerator, FaceVerifier]: ...


def injected_model_factory() -> ModelFactory | None:
    """The factory `ARC2FACE_MODEL_FACTORY` names (`package.module:function`), if any."""
    target = os.environ.get(MODEL_FACTORY_ENV, "").strip()
    if not target:
        return None
    module, _, name = target.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise UserError(
            f"{MODEL_FACTORY_ENV}={target!r} names no importable function ({error}): "
            "write package.module:function, or unset it to load the real models"
        ) from None


def worker_for(spec: JobSpec, device: str = "auto") -> Worker:
    """The process-wide worker for (models, device, controls); built on first use."""
    poses_spec = spec.variations.poses
    expressions_spec = spec.variations.expressions
    factory = injected_model_factory()
    key = (
        factory,
        str(spec.models.dir),
        device,
        spec.models.precision,
        spec.generation.scheduler,
        poses_spec.model_dump_json(),
        expressions_spec.model_dump_json(),
        spec.seed,
        spec.generation.height,
        spec.generation.batch_size,
        tuple(spec.generation.engine_buckets() or ()),
        spec.generation.compile,
        spec.filter.min_det_score,
    )
    with _WORKERS_LOCK:
        if key not in _WORKERS:
            poses = load_pose_bank(poses_spec, size=spec.generation.height)
            expressions = load_expression_bank(
                expressions_spec, seed=spec.seed, models_dir=spec.models.dir
            )
            if factory is not None:
                engine, analyzer = factory(spec, device)
                _WORKERS[key] = Worker(engine, analyzer, poses, expressions, DeviceTurns())
                return _WORKERS[key]
            from arc2face_engine.faces.loading import load_face_analyzer
            from arc2face_engine.faces.pack import detection_settings
            from arc2face_engine.generation.engine import Arc2FaceEngine

            engine = Arc2FaceEngine.from_pretrained(
                spec.models.dir,
                device=device,
                precision=spec.models.precision,
                controlnet=poses is not None,
                expression=expressions is not None,
                lcm=spec.generation.scheduler == "lcm",
                compile=spec.generation.compile,
                max_batch_size=spec.generation.batch_size,
                batch_buckets=spec.generation.engine_buckets(),
            )
            det_size, det_thresh = detection_settings(
                spec.generation.height, spec.generation.width, spec.filter.min_det_score
            )
            # On a GPU the analyzer runs there too (batched torch, fp16): verification must
            # keep up with generation. On CPU, the onnxruntime reference.
            analyzer = load_face_analyzer(
                spec.models.dir,
                det_size=det_size,
                det_thresh=det_thresh,
                device=str(engine.device),
                batch_size=max(32, spec.generation.batch_size),
            )
            _WORKERS[key] = Worker(engine, analyzer, poses, expressions, DeviceTurns())
        return _WORKERS[key]


def start_shard(
    spec: JobSpec,
    work: ShardWork,
    device: str = "auto",
    on_batch: Callable[[int, int], None] | None = None,
    hold_device: Callable[[], AbstractContextManager] = nullcontext,
) -> PendingCommit:
    """Generate and verify one shard on this process's worker for `device`; returns as
    soon as the engine is done with it, with the shard's writes and commit still running.
    The shard generates while it holds the device's generation turn (one shard at a time;
    given back while it only waits for verdicts, see shard.DeviceTurns), and
    `hold_device()`, the orchestrator's cross-job turn on the device (tasks/slots.py),
    is held with it."""
    try:
        worker = worker_for(spec, device)
    except UserError:
        raise
    except Exception:
        # A model file that broke after preflight: name it as a user error (not retried,
        # says what to fix) when it no longer opens; anything else propagates unchanged.
        models_dir.check_model_files(spec.models.dir, required_components(spec))
        raise
    return run_shard(
        work,
        open_writer(spec, work.lease_token),
        worker.engine,
        worker.analyzer,
        worker.poses,
        worker.expressions,
        on_batch=on_batch,
        turns=worker.turns,
        hold_device=hold_device,
        warm_up=lambda: worker.warm_up(work),
    )


def generate_shard(
    spec: JobSpec,
    work: ShardWork,
    device: str = "auto",
    on_batch: Callable[[int, int], None] | None = None,
    hold_device: Callable[[], AbstractContextManager] = nullcontext,
) -> ShardResult:
    """Run one shard to its commit. The device lock is released before the commit, so
    another shard task on the same device generates while this one drains."""
    return start_shard(spec, work, device, on_batch, hold_device).result()
