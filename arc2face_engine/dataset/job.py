"""A generation job in plain Python: the pieces the Prefect flow orchestrates.

`run_job_directly` runs the same work with no orchestrator at all; the flow
overhead benchmark compares the two.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from arc2face_engine import store
from arc2face_engine.dataset.card import write_dataset_card
from arc2face_engine.dataset.plan import iter_shards
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.dataset.shard import (
    ShardJob,
    ShardResult,
    run_shard,
    settings_from_spec,
    shard_identities,
)
from arc2face_engine.dataset.writer import DatasetWriter
from arc2face_engine.expressions import ExpressionBank, load_expression_bank
from arc2face_engine.poses import PoseBank, load_pose_bank
from arc2face_engine.seeding import image_seed
from schemas.job import JobSpec, recorded_spec, spec_hash
from schemas.tables import EMBEDDING_DIM, DatasetCounts, DatasetInfo, vector_matrix

if TYPE_CHECKING:
    import torch

    from arc2face_engine.exclusion import ExclusionGallery

PACKAGES = ("arc2face-synth", "torch", "diffusers", "transformers", "insightface", "onnxruntime")


@dataclass
class Worker:
    """Models and banks of one worker process (one device), loaded once."""

    engine: object
    analyzer: object
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
            )
            det_size, det_thresh = detection_settings(
                spec.generation.height, spec.generation.width, spec.filter.min_det_score
            )
            analyzer = FaceAnalyzer.from_models_dir(
                spec.models.dir, det_size=det_size, det_thresh=det_thresh
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
    files, devices, banks, the identity source and the output. Each failure is a
    UserError naming the problem and the fix, and nothing has been written yet."""
    from arc2face_engine import identities
    from arc2face_engine.generation import resolve_device

    for component in required_components(spec):
        store.require(spec.models.dir, component)
    for device in spec.compute.devices:
        resolve_device(device)
    load_pose_bank(spec.variations.poses, size=spec.generation.height)
    load_expression_bank(spec.variations.expressions, seed=spec.seed, models_dir=spec.models.dir)
    writer = open_writer(spec)
    writer.check_compatible(spec_hash(spec))
    if DatasetReader(spec.output.uri, spec.output.storage_options).has_identities():
        return  # a resumed job keeps the identities it recorded
    source = spec.identities
    if source.source == "file":
        identities.load_embedding_file(source.path, spec.output.storage_options, limit=source.count)
    elif source.source == "images":
        identities.list_image_files(source.path, spec.output.storage_options)
    check_identity_galleries(spec)


def open_writer(spec: JobSpec) -> DatasetWriter:
    return DatasetWriter(spec.output.uri, spec.output.storage_options)


def prepare_dataset(spec: JobSpec) -> DatasetWriter:
    """Refuse an output made from another spec; mark the dataset in progress."""
    writer = open_writer(spec)
    digest = spec_hash(spec)
    if writer.check_compatible(digest) is None:
        writer.write_dataset_json(
            DatasetInfo(
                name=spec.name,
                status="in_progress",
                spec=recorded_spec(spec),
                spec_hash=digest,
                versions=package_versions(),
                model_hashes=store.file_hashes(spec.models.dir),
                created_at=_now(),
            )
        )
    return writer


def build_identities(spec: JobSpec, writer: DatasetWriter) -> pa.Table:
    """Read identities.parquet if a previous run wrote it, else make and write it."""
    reader = DatasetReader(spec.output.uri, spec.output.storage_options)
    if reader.has_identities():
        return reader.identities()
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
        table = identities.load_embedding_file(
            source.path, spec.output.storage_options, limit=source.count
        )
    else:
        analyzer = worker_for(spec).analyzer
        table, skipped = identities.embed_image_folder(
            source.path, analyzer, spec.output.storage_options, limit=source.count
        )
        for path, reason in skipped:
            print(f"skipped {path}: {reason}")
    if gallery is not None:
        table = _exclude(spec, writer, table, gallery, rejected.count)
    writer.write_identities(table)
    return table


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
    spec: JobSpec, writer: DatasetWriter, table: pa.Table, gallery: ExclusionGallery, rejected: int
) -> pa.Table:
    """Make the identities meet the exclusion; record the report in dataset.json."""
    from arc2face_engine.exclusion import apply_exclusion

    table, report, dropped = apply_exclusion(table, gallery, spec.identities.source, rejected)
    for name in dropped:
        print(
            f"dropped {name}: within cosine {gallery.max_cosine:g} of the exclusion gallery"
        )
    info = writer.read_dataset_json()
    if info is not None:
        info.exclusion_report = report
        writer.write_dataset_json(info)
    return table


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
    settings = settings_from_spec(spec.generation)
    counter = iter(range(1 << 62))

    def project(candidate: np.ndarray) -> np.ndarray | None:
        # Negative identity indices keep probe seeds apart from the dataset's own seeds.
        seed = image_seed(spec.seed, -1 - next(counter), 0, 0)
        request = ImageRequest(embedding=candidate, seed=seed)
        image = worker.engine.generate([request], settings)
        record = worker.analyzer.analyze(image)[0]
        return record.embedding

    return project


def shard_jobs(spec: JobSpec, identities_table: pa.Table) -> Iterator[ShardJob]:
    settings = settings_from_spec(spec.generation)
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
        )


def generate_shard(
    spec: JobSpec,
    job: ShardJob,
    device: str = "auto",
    on_batch: Callable[[int, int], None] | None = None,
) -> ShardResult:
    """Run one shard on this process's worker for `device`."""
    worker = worker_for(spec, device)
    with worker.lock:  # one generation at a time per device
        return run_shard(
            job,
            open_writer(spec),
            worker.engine,
            worker.analyzer,
            worker.poses,
            worker.expressions,
            on_batch=on_batch,
        )


def finalize_dataset(spec: JobSpec) -> DatasetInfo:
    """Count the committed manifest, write dataset.json (complete) and the card."""
    writer = open_writer(spec)
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
    writer = prepare_dataset(spec)
    table = build_identities(spec, writer)
    committed = writer.committed_shards()
    for job in shard_jobs(spec, table):
        if job.plan.shard not in committed:
            generate_shard(spec, job)
    return finalize_dataset(spec)


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
