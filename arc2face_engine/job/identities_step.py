"""The identities step of a job: identities.parquet re-read on resume (checked against its
recorded sha256), or built from the spec's source (random, packed, file, photos) with the
exclusion gallery applied (and balanced, job/balancing.py), and written; a balanced job's
probes (probes/) are written before it.

Preflight builds what needs no diffusion model (files, photos, a packing gallery) and
hands it to `build_identities`; sources that generate probe images are built there, once
the worker's models are loaded. Model libraries are imported inside the functions that
use them, so importing this module stays cheap (see job/__init__.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pyarrow as pa

from arc2face_engine.dataset import layout
from arc2face_engine.dataset.gallery import is_dataset, read_identity_embeddings
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.dataset.writer import DatasetWriter
from arc2face_engine.determinism import image_seed
from arc2face_engine.generation.settings import GenerationSettings, ImageRequest
from arc2face_engine.identities import sources
from arc2face_engine.job import output_checks
from arc2face_engine.job.workers import worker_for
from schemas.errors import SpecError
from schemas.job import MAX_IDENTITIES, JobSpec
from schemas.tables import (
    EMBEDDING_DIM,
    ExclusionReport,
    ProbeRow,
    probes_table,
    vector_matrix,
)

if TYPE_CHECKING:
    import torch

    from arc2face_engine.identities.exclusion import ExclusionGallery


class ProbeFiles(Protocol):
    """A balanced job's probes (job/balancing.py ProbeSet): rows, image files, clean-up."""

    rows: list[ProbeRow]

    def files(self) -> Iterator[tuple[str, bytes]]: ...

    def remove(self) -> None: ...


@dataclass(frozen=True)
class BuiltIdentities:
    """An identities table made from the spec's source, with how it meets the exclusion."""

    table: pa.Table
    exclusion: ExclusionReport | None = None
    probes: ProbeFiles | None = None  # identities.balance: the probes that placed them


def build_identities(
    spec: JobSpec, writer: DatasetWriter, built: BuiltIdentities | None = None
) -> pa.Table:
    """Read identities.parquet if a previous run wrote it (checked against its recorded
    sha256), else write `built` (what preflight made) or, when preflight left them to
    the job, make them now."""
    reader = DatasetReader(spec.output.uri, spec.output.storage_options)
    info = writer.read_dataset_json()
    if reader.has_identities():
        table = output_checks.read_recorded_identities(writer, info)
        if info is not None and info.identities_sha256 is None:
            # A run stopped between writing identities.parquet and recording its checksum.
            data = writer.fs.cat_file(writer.path(layout.IDENTITIES))
            info.identities_sha256 = hashlib.sha256(data).hexdigest()
            writer.write_dataset_json(info)
        return table
    built = built if built is not None else make_identities(spec)
    probes_digest = None
    if built.probes is not None:  # before identities.parquet, whose presence ends this step
        probes_digest = writer.write_probes(probes_table(built.probes.rows), built.probes.files())
        built.probes.remove()
    digest = writer.write_identities(built.table)
    if info is not None:
        info.identities_sha256 = digest
        info.probes_sha256 = probes_digest
        info.exclusion_report = built.exclusion
        writer.write_dataset_json(info)
    return built.table


def make_identities(spec: JobSpec) -> BuiltIdentities:
    """The identities table from the spec's source; skipped photos are printed (with their
    reason) on the console of the process that runs this."""
    source = spec.identities
    if source.balance is not None:
        raise ValueError(
            "balanced identities are built by job.balancing.balanced_identities (preflight)"
        )
    gallery = exclusion_gallery(spec)
    rejected = _RejectionCounter(gallery)
    if source.source == "random":
        project = _manifold_projector(spec) if source.project_to_manifold else None
        table = sources.sample_random(
            source.count, source.separation, spec.seed, project=project,
            allowed=rejected.allowed if gallery else None,
        )
    elif source.source == "packed":
        table = _packed_identities(spec)
    elif source.source == "file":
        rows = sources.embedding_file_rows(source.path, spec.output.storage_options)
        if source.count is None and rows > MAX_IDENTITIES:
            raise SpecError(
                f"embedding file {source.path} holds {rows:,} identities, more than "
                f"{MAX_IDENTITIES:,}: set identities.count to use the first ones"
            )
        table = sources.load_embedding_file(
            source.path, spec.output.storage_options, limit=source.count
        )
    else:
        table, skipped = sources.embed_image_folder(
            source.path, _photo_analyzer(spec), spec.output.storage_options, limit=source.count
        )
        for path, reason in skipped:
            print(f"skipped {path}: {reason}", flush=True)
    if gallery is None:
        return BuiltIdentities(table)
    return _exclude(spec, table, gallery, rejected.count)


def identities_need_engine(spec: JobSpec) -> bool:
    """Sources that generate probe images, so the job builds them once models are loaded
    (balanced identities are built at preflight instead: their quotas are checked there)."""
    source = spec.identities
    if source.balance is not None:
        return False
    if source.source == "random":
        return source.project_to_manifold
    return source.source == "packed" and not source.packing.gallery


def _photo_analyzer(spec: JobSpec):
    """The face analyzer alone (no diffusion models) for embedding identity photos."""
    from arc2face_engine.faces.loading import load_face_analyzer
    from arc2face_engine.faces.pack import detection_settings

    det_size, det_thresh = detection_settings(
        spec.generation.height, spec.generation.width, spec.filter.min_det_score
    )
    return load_face_analyzer(spec.models.dir, det_size=det_size, det_thresh=det_thresh)


# --- identity galleries: packing's face manifold and the exclusion gallery -------------------


def check_identity_galleries(spec: JobSpec) -> None:
    """Preflight: the galleries the identity source uses are readable, and a file source
    already meets the exclusion (refused naming the first identity if not)."""
    from arc2face_engine.identities import exclusion

    source = spec.identities
    if source.source == "packed" and source.packing.gallery:
        gallery_matrix(
            source.packing.gallery, spec.output.storage_options, "identities.packing.gallery"
        )
    gallery = exclusion_gallery(spec)
    if gallery is not None and source.source == "file":
        table = sources.load_embedding_file(
            source.path, spec.output.storage_options, limit=source.count
        )
        exclusion.apply_exclusion(table, gallery, "file")


def _search_device(spec: JobSpec) -> torch.device:
    from arc2face_engine.generation.devices import resolve_device

    return resolve_device(spec.models.device)


def gallery_matrix(
    uri: str, storage_options: dict | None, setting: str
) -> tuple[np.ndarray, str]:
    """(unit rows, sha256) of a gallery: an embeddings file (.parquet/.npy), or a dataset
    folder (its identities, checked against its dataset.json)."""
    if is_dataset(uri, storage_options):
        matrix, _, digest = read_identity_embeddings(uri, storage_options, setting)
        return matrix, digest
    return sources.read_embedding_matrix(uri, storage_options, setting)


def exclusion_gallery(spec: JobSpec) -> ExclusionGallery | None:
    from arc2face_engine.identities.exclusion import SETTING, ExclusionGallery

    settings = spec.identities.exclusion
    if not settings.gallery:
        return None
    matrix, digest = gallery_matrix(settings.gallery, spec.output.storage_options, SETTING)
    return ExclusionGallery.from_matrix(
        matrix, settings.max_cosine, digest, settings.gallery, _search_device(spec)
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
) -> BuiltIdentities:
    """Make the identities meet the exclusion; the report goes into dataset.json."""
    from arc2face_engine.identities.exclusion import apply_exclusion

    table, report, dropped = apply_exclusion(table, gallery, spec.identities.source, rejected)
    for name in dropped:
        print(
            f"dropped {name}: within cosine {gallery.max_cosine:g} of the exclusion gallery",
            flush=True,
        )
    return BuiltIdentities(table, report)


def _packed_identities(spec: JobSpec) -> pa.Table:
    from arc2face_engine.identities.packing import PackingOptions, sample_packed

    settings = spec.identities.packing
    if settings.gallery:
        manifold = gallery_matrix(
            settings.gallery, spec.output.storage_options, "identities.packing.gallery"
        )[0]
    else:  # the project's own face manifold: ArcFace re-embeddings of Arc2Face probe images
        probes = sources.sample_random(
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
