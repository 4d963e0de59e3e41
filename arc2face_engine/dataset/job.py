"""A generation job in plain Python: the pieces the Prefect flow orchestrates.

`run_job_directly` runs the same work with no orchestrator at all; the flow
overhead benchmark compares the two.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from arc2face_engine import store
from arc2face_engine.dataset import layout, safety
from arc2face_engine.dataset.card import write_dataset_card
from arc2face_engine.dataset.lease import WriterLease, check_free
from arc2face_engine.dataset.plan import iter_shards
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.dataset.shard import (
    FaceVerifier,
    ImageGenerator,
    PendingCommit,
    ShardJob,
    ShardResult,
    run_shard,
    shard_identities,
)
from arc2face_engine.dataset.writer import DatasetWriter
from arc2face_engine.errors import SpecError, UserError
from arc2face_engine.expressions import ExpressionBank, load_expression_bank
from arc2face_engine.generation import GenerationSettings
from arc2face_engine.poses import PoseBank, load_pose_bank
from arc2face_engine.seeding import image_seed
from schemas.job import MAX_IDENTITIES, JobSpec, recorded_spec, spec_hash
from schemas.tables import EMBEDDING_DIM, DatasetCounts, DatasetInfo, ExclusionReport, vector_matrix

if TYPE_CHECKING:
    import torch

    from arc2face_engine.exclusion import ExclusionGallery

PACKAGES = ("arc2face-synth", "torch", "diffusers", "transformers", "insightface", "onnxruntime")


@dataclass
class Worker:
    """Models and banks of one worker process (one device), loaded once."""

    engine: ImageGenerator
    analyzer: FaceVerifier
    poses: PoseBank | None
    expressions: ExpressionBank | None
    lock: threading.Lock


_WORKERS: dict[tuple, Worker] = {}
_WORKERS_LOCK = threading.Lock()


def worker_for(spec: JobSpec, device: str = "auto") -> Worker:
    """The process-wide worker for (models, device, controls); built on first use."""
    from arc2face_engine.face_analysis import FaceAnalyzer, detection_settings
    from arc2face_engine.generation import Arc2FaceEngine

    poses_spec = spec.variations.poses
    expressions_spec = spec.variations.expressions
    key = (
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
            analyzer = FaceAnalyzer.from_models_dir(
                spec.models.dir,
                det_size=det_size,
                det_thresh=det_thresh,
                device=str(engine.device),
                batch_size=max(32, spec.generation.batch_size),
            )
            _WORKERS[key] = Worker(engine, analyzer, poses, expressions, threading.Lock())
        return _WORKERS[key]


def required_components(spec: JobSpec) -> list[str]:
    """The parts of the models directory this spec uses."""
    components = ["core"]
    if spec.variations.poses.kind != "none":
        components.append("controlnet")
    if spec.variations.expressions.kind != "none":
        components.append("expression")
    if spec.generation.scheduler == "lcm":
        components.append("lcm")
    return components


def preflight(spec: JobSpec) -> None:
    """Check, before any orchestration starts, everything a user can get wrong: model
    files (present and opening), devices, banks, the output (a folder, writable, not in
    use by a live run, and on resume made with the same models and precision) and the
    identity source (identities are built here, so photos with no face or an unusable
    file fail now). Each failure is a UserError naming the problem and the fix, and
    nothing has been written yet."""
    from arc2face_engine.generation import resolve_device

    components = required_components(spec)
    for component in components:
        store.require(spec.models.dir, component)
    store.check_model_files(spec.models.dir, components)
    for device in spec.compute.devices:
        check_face_analysis_device(spec, resolve_device(device))
    precision = safety.resolved_precision(spec)
    load_pose_bank(spec.variations.poses, size=spec.generation.height)
    load_expression_bank(spec.variations.expressions, seed=spec.seed, models_dir=spec.models.dir)
    writer = open_writer(spec)
    safety.check_output_location(writer)
    check_free(writer.fs, writer.root, writer.uri)
    info = writer.check_compatible(spec_hash(spec))
    if info is not None:
        safety.check_resume(spec, info, components, precision)
    if DatasetReader(spec.output.uri, spec.output.storage_options).has_identities():
        # A resumed job keeps the identities it recorded, if they are intact (the job
        # reads them again under the lease).
        safety.read_recorded_identities(writer, info)
        return
    if _identities_need_engine(spec):
        check_identity_galleries(spec)  # the rest is built by the job, with the engine
        return
    key = _prepared_key(spec)
    if key not in _PREPARED:  # the CLI checks before Prefect starts, the flow again
        _PREPARED[key] = make_identities(spec)


# Identities built by preflight for a new dataset, handed to build_identities in the same
# process so they are made once; keyed by output and spec hash.
_PREPARED: dict[tuple[str, str], tuple[pa.Table, ExclusionReport | None]] = {}


def check_face_analysis_device(spec: JobSpec, device: torch.device) -> None:
    """Refuse a GPU job whose face analysis would run on the CPU, unless the spec allows it:
    verification would then cap the whole job at a few images/s."""
    from arc2face_engine.face_analysis import face_analysis_placement, unsupported_ops

    if device.type != "cuda" or spec.compute.allow_cpu_face_analysis:
        return
    runtime, where = face_analysis_placement(spec.models.dir, str(device))
    if where == "cpu":
        missing = "; ".join(
            f"{name}: {', '.join(ops)}" for name, ops in unsupported_ops(spec.models.dir).items()
        )
        raise SpecError(
            f"generation runs on {device} but face analysis would run on the CPU ({runtime}; "
            f"the GPU runner lacks ONNX ops {missing}) and cap the job at a few images/s: "
            f"install onnxruntime-gpu in place of onnxruntime, or set "
            f"compute.allow_cpu_face_analysis: true"
        )


def _prepared_key(spec: JobSpec) -> tuple[str, str]:
    return spec.output.uri, spec_hash(spec)


def open_writer(spec: JobSpec, lease_token: str | None = None) -> DatasetWriter:
    return DatasetWriter(spec.output.uri, spec.output.storage_options, lease_token)


def writer_lease(spec: JobSpec) -> WriterLease:
    """The output's writer lease; hold it (`with`) around everything a job writes."""
    writer = open_writer(spec)
    return WriterLease(writer.fs, writer.root, writer.uri)


def prepare_dataset(spec: JobSpec, lease_token: str | None = None) -> DatasetWriter:
    """Refuse an output made from another spec, other models or another precision; mark
    the dataset in progress."""
    writer = open_writer(spec, lease_token)
    digest = spec_hash(spec)
    precision = safety.resolved_precision(spec)
    info = writer.check_compatible(digest)
    if info is not None:
        safety.check_resume(spec, info, required_components(spec), precision)
    else:
        writer.write_dataset_json(
            DatasetInfo(
                name=spec.name,
                status="in_progress",
                spec=recorded_spec(spec),
                spec_hash=digest,
                versions=package_versions(),
                model_hashes=store.file_hashes(spec.models.dir),
                precision=precision,
                created_at=_now(),
            )
        )
    return writer


def build_identities(spec: JobSpec, writer: DatasetWriter) -> pa.Table:
    """Read identities.parquet if a previous run wrote it (checked against its recorded
    sha256), else make it (or take what preflight made) and write it."""
    prepared = _PREPARED.pop(_prepared_key(spec), None)
    reader = DatasetReader(spec.output.uri, spec.output.storage_options)
    info = writer.read_dataset_json()
    if reader.has_identities():
        table = safety.read_recorded_identities(writer, info)
        if info is not None and info.identities_sha256 is None:
            # A run stopped between writing identities.parquet and recording its checksum.
            data = writer.fs.cat_file(writer.path(layout.IDENTITIES))
            info.identities_sha256 = hashlib.sha256(data).hexdigest()
            writer.write_dataset_json(info)
        return table
    table, report = prepared if prepared is not None else make_identities(spec)
    digest = writer.write_identities(table)
    if info is not None:
        info.identities_sha256 = digest
        info.exclusion_report = report
        writer.write_dataset_json(info)
    return table


def make_identities(spec: JobSpec) -> tuple[pa.Table, ExclusionReport | None]:
    """The identities table from the spec's source; skipped photos are printed (with their
    reason) on the console of the process that runs this."""
    from arc2face_engine import identities

    source = spec.identities
    gallery = _exclusion_gallery(spec)
    rejected = _RejectionCounter(gallery)
    if source.source == "random":
        project = _manifold_projector(spec) if source.project_to_manifold else None
        table = identities.sample_random(
            source.count, source.separation, spec.seed, project=project,
            allowed=rejected.allowed if gallery else None,
        )
    elif source.source == "packed":
        table = _packed_identities(spec)
    elif source.source == "file":
        rows = identities.embedding_file_rows(source.path, spec.output.storage_options)
        if source.count is None and rows > MAX_IDENTITIES:
            raise SpecError(
                f"embedding file {source.path} holds {rows:,} identities, more than "
                f"{MAX_IDENTITIES:,}: set identities.count to use the first ones"
            )
        table = identities.load_embedding_file(
            source.path, spec.output.storage_options, limit=source.count
        )
    else:
        table, skipped = identities.embed_image_folder(
            source.path, _photo_analyzer(spec), spec.output.storage_options, limit=source.count
        )
        for path, reason in skipped:
            print(f"skipped {path}: {reason}", flush=True)
    if gallery is None:
        return table, None
    return _exclude(spec, table, gallery, rejected.count)


def _identities_need_engine(spec: JobSpec) -> bool:
    """Sources that generate probe images, so the job builds them once models are loaded."""
    source = spec.identities
    if source.source == "random":
        return source.project_to_manifold
    return source.source == "packed" and not source.packing.gallery


def _photo_analyzer(spec: JobSpec):
    """The face analyzer alone (no diffusion models) for embedding identity photos."""
    from arc2face_engine.face_analysis import FaceAnalyzer, detection_settings

    det_size, det_thresh = detection_settings(
        spec.generation.height, spec.generation.width, spec.filter.min_det_score
    )
    return FaceAnalyzer.from_models_dir(spec.models.dir, det_size=det_size, det_thresh=det_thresh)


# --- identity galleries: packing's face manifold and the exclusion gallery -------------------


def check_identity_galleries(spec: JobSpec) -> None:
    """Preflight: the galleries the identity source uses are readable, and a file source
    already meets the exclusion (refused naming the first identity if not)."""
    from arc2face_engine import exclusion, identities

    source = spec.identities
    if source.source == "packed" and source.packing.gallery:
        identities.read_embedding_matrix(
            source.packing.gallery, spec.output.storage_options, "identities.packing.gallery"
        )
    gallery = _exclusion_gallery(spec)
    if gallery is not None and source.source == "file":
        table = identities.load_embedding_file(
            source.path, spec.output.storage_options, limit=source.count
        )
        exclusion.apply_exclusion(table, gallery, "file")


def _search_device(spec: JobSpec) -> torch.device:
    from arc2face_engine.generation import resolve_device

    return resolve_device(spec.models.device)


def _exclusion_gallery(spec: JobSpec) -> ExclusionGallery | None:
    from arc2face_engine.exclusion import ExclusionGallery

    settings = spec.identities.exclusion
    if not settings.gallery:
        return None
    return ExclusionGallery.load(
        settings.gallery, settings.max_cosine, spec.output.storage_options, _search_device(spec)
    )


class _RejectionCounter:
    """The exclusion filter for random sampling, counting the candidates it rejects."""

    def __init__(self, gallery: ExclusionGallery | None) -> None:
        self.gallery = gallery
        self.count = 0

    def allowed(self, candidates: np.ndarray) -> np.ndarray:
        mask = self.gallery.allowed(candidates)
        self.count += int((~mask).sum())
        return mask


def _exclude(
    spec: JobSpec, table: pa.Table, gallery: ExclusionGallery, rejected: int
) -> tuple[pa.Table, ExclusionReport]:
    """Make the identities meet the exclusion; the report goes into dataset.json."""
    from arc2face_engine.exclusion import apply_exclusion

    table, report, dropped = apply_exclusion(table, gallery, spec.identities.source, rejected)
    for name in dropped:
        print(
            f"dropped {name}: within cosine {gallery.max_cosine:g} of the exclusion gallery",
            flush=True,
        )
    return table, report


def _packed_identities(spec: JobSpec) -> pa.Table:
    from arc2face_engine import identities
    from arc2face_engine.packing import PackingOptions, sample_packed

    settings = spec.identities.packing
    if settings.gallery:
        manifold = identities.read_embedding_matrix(
            settings.gallery, spec.output.storage_options, "identities.packing.gallery"
        )[0]
    else:  # the project's own face manifold: ArcFace re-embeddings of Arc2Face probe images
        probes = identities.sample_random(
            settings.probes, 1.0, spec.seed, project=_manifold_projector(spec)
        )
        manifold = vector_matrix(probes.column("embedding"), EMBEDDING_DIM)
    options = PackingOptions(
        separation_target=settings.separation_target,
        manifold_weight=settings.manifold_weight,
        steps=settings.steps,
        learning_rate=settings.learning_rate,
        neighbours=settings.neighbours,
    )
    return sample_packed(
        spec.identities.count, manifold, spec.seed, options, _search_device(spec)
    )


def _manifold_projector(spec: JobSpec) -> Callable[[np.ndarray], np.ndarray | None]:
    """Generate a probe image for a candidate and keep its ArcFace re-embedding."""
    from arc2face_engine.generation import ImageRequest

    worker = worker_for(spec)
    settings = GenerationSettings.from_spec(spec.generation)
    counter = iter(range(1 << 62))

    def project(candidate: np.ndarray) -> np.ndarray | None:
        # Negative identity indices keep probe seeds apart from the dataset's own seeds.
        seed = image_seed(spec.seed, -1 - next(counter), 0, 0)
        request = ImageRequest(embedding=candidate, seed=seed)
        image = worker.engine.generate([request], settings)
        record = worker.analyzer.analyze(image)[0]
        return record.embedding

    return project


def shard_jobs(
    spec: JobSpec, identities_table: pa.Table, lease_token: str | None = None
) -> Iterator[ShardJob]:
    settings = GenerationSettings.from_spec(spec.generation)
    for plan in iter_shards(
        len(identities_table), spec.variations.images_per_identity, spec.output.shard_size
    ):
        yield ShardJob(
            plan=plan,
            identities=shard_identities(identities_table, plan.identity_start, plan.identity_stop),
            job_seed=spec.seed,
            images_per_identity=spec.variations.images_per_identity,
            settings=settings,
            batch_size=spec.generation.batch_size,
            min_similarity=spec.filter.min_similarity,
            min_det_score=spec.filter.min_det_score,
            require_single_face=spec.filter.require_single_face,
            max_attempts=spec.filter.max_attempts,
            image_format=spec.output.image_format,
            quality=spec.output.quality,
            keep_rejected_images=spec.output.keep_rejected_images,
            min_feature_norm=spec.filter.min_feature_norm,
            lease_token=lease_token,
        )


def start_shard(
    spec: JobSpec,
    job: ShardJob,
    device: str = "auto",
    on_batch: Callable[[int, int], None] | None = None,
    hold_device: Callable[[], AbstractContextManager] = nullcontext,
) -> PendingCommit:
    """Generate and verify one shard on this process's worker for `device`; returns as
    soon as the device is free, with the shard's writes and commit still running.
    `hold_device()` is held with the device lock: the orchestrator's cross-job turn on
    the device (tasks/slots.py), released before the commit like the lock."""
    try:
        worker = worker_for(spec, device)
    except UserError:
        raise
    except Exception:
        # A model file that broke after preflight: name it as a user error (not retried,
        # says what to fix) when it no longer opens; anything else propagates unchanged.
        store.check_model_files(spec.models.dir, required_components(spec))
        raise
    with worker.lock, hold_device():  # one generation at a time per device
        return run_shard(
            job,
            open_writer(spec, job.lease_token),
            worker.engine,
            worker.analyzer,
            worker.poses,
            worker.expressions,
            on_batch=on_batch,
        )


def generate_shard(
    spec: JobSpec,
    job: ShardJob,
    device: str = "auto",
    on_batch: Callable[[int, int], None] | None = None,
    hold_device: Callable[[], AbstractContextManager] = nullcontext,
) -> ShardResult:
    """Run one shard to its commit. The device lock is released before the commit, so
    another shard task on the same device generates while this one drains."""
    return start_shard(spec, job, device, on_batch, hold_device).result()


def finalize_dataset(spec: JobSpec, lease_token: str | None = None) -> DatasetInfo:
    """Count the committed manifest, write dataset.json (complete) and the card."""
    writer = open_writer(spec, lease_token)
    reader = DatasetReader(spec.output.uri, spec.output.storage_options)
    counts = count_manifest(reader)
    counts.identities = reader.identities().num_rows
    counts.shards = sum(
        1
        for _ in iter_shards(
            counts.identities, spec.variations.images_per_identity, spec.output.shard_size
        )
    )
    info = writer.read_dataset_json()
    info.counts = counts
    complete = counts.committed_shards == counts.shards
    info.status = "complete" if complete else "in_progress"
    info.finished_at = _now() if complete else None
    writer.write_dataset_json(info)
    write_dataset_card(writer, info)
    return info


def count_manifest(reader: DatasetReader) -> DatasetCounts:
    counts = DatasetCounts(committed_shards=len(reader.manifest_parts()))
    for batch in reader.iter_manifest(columns=["accepted", "reject_reason"]):
        accepted = batch.column("accepted").to_numpy(zero_copy_only=False)
        counts.images += len(accepted)
        counts.accepted += int(accepted.sum())
        for reason in batch.column("reject_reason").drop_null().to_pylist():
            counts.reject_reasons[reason] = counts.reject_reasons.get(reason, 0) + 1
    counts.rejected = counts.images - counts.accepted
    return counts


def run_job_directly(spec: JobSpec) -> DatasetInfo:
    """The whole job with no orchestrator: same functions, a plain loop."""
    preflight(spec)
    with writer_lease(spec) as lease:
        writer = prepare_dataset(spec, lease.token)
        table = build_identities(spec, writer)
        committed = writer.committed_shards()
        jobs = shard_jobs(spec, table, lease.token)
        todo = (job for job in jobs if job.plan.shard not in committed)
        in_flight: list[PendingCommit] = []
        try:
            for job in todo:
                in_flight.append(start_shard(spec, job))  # generates while the previous commits
                if len(in_flight) > 1:
                    in_flight.pop(0).result()
            while in_flight:
                in_flight.pop(0).result()
        finally:
            for pending in in_flight:  # after an error: started commits land before it surfaces
                pending.settle()
        return finalize_dataset(spec, lease.token)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
