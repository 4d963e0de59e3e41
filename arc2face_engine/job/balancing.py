"""Balanced identities (`identities.balance`), built at preflight so that a quota that
cannot be met is refused in one line before anything is written.

Candidates come from the spec's source in a fixed order: random draws from the seeded
stream (checked against the exclusion gallery and the separation before their probe, or
after it when the probe is also the manifold projection), the rows of an embedding file,
the photos of a folder, or an oversampled packed set (each made by the source's own code,
exclusion included). Every candidate gets one probe image: no pose or expression, the
cheap probe settings (LCM when the models include it), seed
`image_seed(job seed, -1 - candidate, PROBE_VARIANT, 0)`; it is encoded as the dataset's
images are and analysed as stored. Its predicted gender and age and measured skin tone
place the candidate in a cell (identities/balance.py); candidates fill the cells until
every quota is met. The kept probes wait in a local temporary folder until the identities
step writes them under probes/ with their manifest (schemas.tables.ProbeRow).

Probes are generated generation.batch_size at a time; a candidate is decided only at its
turn, against the identities kept before it, so the identities (and the probes manifest)
do not depend on the batch size. Model libraries are imported inside the functions.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from arc2face_engine import models_dir
from arc2face_engine.dataset import layout
from arc2face_engine.dataset.attributes import FROM_PROBE, IdentityAttributes, with_attributes
from arc2face_engine.dataset.codec import IMAGE_EXTENSIONS, decode_image, encode_image
from arc2face_engine.determinism import image_seed
from arc2face_engine.generation.settings import GenerationSettings, ImageRequest
from arc2face_engine.identities import sources
from arc2face_engine.identities.balance import CellFiller, attribute_values, describe
from arc2face_engine.job.identities_step import (
    BuiltIdentities,
    exclusion_gallery,
    make_identities,
)
from arc2face_engine.job.shard import attribute_columns
from schemas.errors import ModelFileMissing, SpecError
from schemas.job import DPM_GUIDANCE, LCM_GUIDANCE, PROBE_STEPS, JobSpec
from schemas.tables import EMBEDDING_DIM, ExclusionReport, ProbeRow, vector_matrix

if TYPE_CHECKING:
    from arc2face_engine.faces.records import FaceRecord
    from arc2face_engine.identities.exclusion import ExclusionGallery
    from arc2face_engine.job.shard import FaceVerifier, ImageGenerator

PROBE_VARIANT = 1  # probe seeds sit on variant 1 of negative identity indices

OUTCOMES = KEPT, CELL_FULL, NO_FACE, TOO_CLOSE, EXCLUDED = (
    "kept", "cell_full", "no_face", "too_close", "excluded",
)  # fmt: skip


def probe_seed(job_seed: int, candidate: int) -> int:
    return image_seed(job_seed, -1 - candidate, PROBE_VARIANT, 0)


def probe_settings(spec: JobSpec) -> GenerationSettings:
    """The probe sampler: LCM when asked or (auto) when the models include the LCM-LoRA."""
    balance = spec.identities.balance
    scheduler = balance.probe_scheduler
    if scheduler == "auto":
        scheduler = "lcm" if _has_lcm(spec.models.dir) else "dpmsolver++"
    return GenerationSettings(
        scheduler=scheduler,
        num_inference_steps=balance.probe_steps or PROBE_STEPS[scheduler],
        guidance_scale=LCM_GUIDANCE if scheduler == "lcm" else DPM_GUIDANCE,
        height=spec.generation.height,
        width=spec.generation.width,
    )


def _has_lcm(root: str) -> bool:
    try:
        models_dir.require(root, "lcm")
    except ModelFileMissing:
        return False
    return True


@dataclass
class Candidate:
    index: int
    embedding: np.ndarray  # unit (512,)
    provenance: str
    identity_id: str | None = None  # file/images keep their ids; random/packed get new ones


@dataclass
class ProbeSet:
    """The probes manifest rows, and the kept probes' image files in a local temporary
    folder (removed when this object goes, or at exit)."""

    rows: list[ProbeRow]
    folder: Path
    _cleanup: weakref.finalize = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.folder), True)

    def files(self) -> Iterator[tuple[str, bytes]]:
        """(relative dataset path, bytes) of every kept probe image."""
        for row in self.rows:
            if row.path is not None:
                yield row.path, (self.folder / Path(row.path).name).read_bytes()

    def remove(self) -> None:
        self._cleanup()


# --- candidates ----------------------------------------------------------------------------------


def _pool_spec(spec: JobSpec, count: int) -> JobSpec:
    identities = spec.identities.model_copy(update={"count": count, "balance": None})
    return spec.model_copy(update={"identities": identities})


def _pool_size(spec: JobSpec) -> int:
    source = spec.identities
    bound = source.balance_candidates()
    if source.source == "packed":
        return min(bound, math.ceil(source.count * source.balance.oversample))
    return bound


def _table_candidates(table: pa.Table, keep_ids: bool) -> list[Candidate]:
    embeddings = vector_matrix(table.column("embedding"), EMBEDDING_DIM)
    ids = table.column("identity_id").to_pylist()
    return [
        Candidate(index, embeddings[index], provenance, ids[index] if keep_ids else None)
        for index, provenance in enumerate(table.column("provenance").to_pylist())
    ]


def _random_candidates(spec: JobSpec) -> Iterator[Candidate]:
    label = "projected candidate" if spec.identities.project_to_manifold else "candidate"
    stream = sources.random_candidates(spec.seed)
    for index, embedding in zip(range(spec.identities.balance_candidates()), stream, strict=False):
        yield Candidate(index, embedding, f"random seed={spec.seed} {label}={index}")


# --- probes -----------------------------------------------------------------------------------------


class _Prober:
    """Generates, stores (encode, decode) and analyses probe images."""

    def __init__(self, spec: JobSpec, engine: ImageGenerator, analyzer: FaceVerifier) -> None:
        self.spec, self.engine, self.analyzer = spec, engine, analyzer
        self.settings = probe_settings(spec)

    def probe(self, candidates: list[Candidate]) -> list[tuple[bytes, FaceRecord]]:
        if not candidates:
            return []
        requests = [
            ImageRequest(embedding=c.embedding, seed=probe_seed(self.spec.seed, c.index))
            for c in candidates
        ]
        images = self.engine.generate(requests, self.settings)
        output = self.spec.output
        encoded = [encode_image(image, output.image_format, output.quality) for image in images]
        records = self.analyzer.analyze([decode_image(data) for data in encoded])
        return list(zip(encoded, records, strict=True))


def _probe_models(spec: JobSpec, settings: GenerationSettings):
    """(engine, analyzer) for the probes: the job's own worker when it samples the same
    way, else an LCM engine next to the face analyzer."""
    from arc2face_engine.job.workers import worker_for

    if (settings.scheduler == "lcm") == (spec.generation.scheduler == "lcm"):
        worker = worker_for(spec)
        return worker.engine, worker.analyzer
    from arc2face_engine.faces.loading import load_face_analyzer
    from arc2face_engine.faces.pack import detection_settings
    from arc2face_engine.generation.engine import Arc2FaceEngine

    engine = Arc2FaceEngine.from_pretrained(
        spec.models.dir, device=spec.models.device, precision=spec.models.precision, lcm=True
    )
    det_size, det_thresh = detection_settings(
        spec.generation.height, spec.generation.width, spec.filter.min_det_score
    )
    analyzer = load_face_analyzer(
        spec.models.dir, det_size=det_size, det_thresh=det_thresh, device=str(engine.device)
    )
    return engine, analyzer


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the placement loop ------------------------------------------------------------------------------


@dataclass
class _Placement:
    """The state of one balancing run: cells, kept identities, probe rows."""

    spec: JobSpec
    settings: GenerationSettings
    filler: CellFiller
    folder: Path
    gallery: ExclusionGallery | None
    check_separation: bool
    kept: list[tuple[Candidate, IdentityAttributes]] = field(default_factory=list)
    rows: list[ProbeRow] = field(default_factory=list)
    excluded: int = 0
    kept_matrix: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.kept_matrix = np.empty((self.spec.identities.count, EMBEDDING_DIM), np.float32)

    @property
    def projecting(self) -> bool:
        return self.spec.identities.project_to_manifold

    def screen(self, embedding: np.ndarray) -> str | None:
        """EXCLUDED or TOO_CLOSE when the embedding breaks the exclusion or the separation
        from the identities kept so far (which only grow: a candidate screened out early
        would be screened out at its turn too)."""
        if self.gallery is not None and not self.gallery.allowed(embedding[None])[0]:
            return EXCLUDED
        kept = self.kept_matrix[: len(self.kept)]
        separation = self.spec.identities.separation
        if self.check_separation and len(kept) and float((kept @ embedding).max()) > separation:
            return TOO_CLOSE
        return None

    def decide(self, candidate: Candidate, probe: tuple[bytes, FaceRecord] | None) -> None:
        """Place one candidate at its turn and record its probe row."""
        data, record = probe if probe is not None else (None, None)
        if self.projecting and (record is None or record.embedding is None):
            outcome = NO_FACE  # nothing to project onto
        else:
            if self.projecting:
                candidate.embedding = np.asarray(record.embedding, np.float32)
            outcome = self.screen(candidate.embedding)
            if outcome is None:
                if record is None:
                    raise AssertionError("a candidate that passes its screen was not probed")
                outcome = self._place(candidate, record)
        if outcome == EXCLUDED:
            self.excluded += 1
        self.rows.append(self._row(candidate, outcome, record, data))

    def _values(self, record: FaceRecord) -> dict[str, str | None]:
        return attribute_values(
            record.gender, record.age, record.skin_ita, self.spec.identities.balance.age_edges
        )

    def _place(self, candidate: Candidate, record: FaceRecord) -> str:
        cell = self.filler.cell_of(self._values(record))
        if cell is None:
            return NO_FACE
        if not self.filler.has_room(cell):
            return CELL_FULL
        self.filler.take(cell)
        if candidate.identity_id is None:
            candidate.identity_id = sources.identity_id(len(self.kept))
        attributes = IdentityAttributes(
            record.gender, record.gender_probability, record.age,
            None if math.isnan(record.skin_ita) else record.skin_ita, FROM_PROBE,
        )  # fmt: skip
        self.kept_matrix[len(self.kept)] = candidate.embedding
        self.kept.append((candidate, attributes))
        return KEPT

    def _row(
        self, candidate: Candidate, outcome: str, record: FaceRecord | None, data: bytes | None
    ) -> ProbeRow:
        """The probes manifest row. Probe details only for candidates that reached the
        placement: whether a screened-out candidate was probed ahead depends on the batch."""
        unknown = dict.fromkeys(["identity_id", "path", "sha256", "face_count", "cell"])
        row = ProbeRow(
            candidate=candidate.index,
            embedding=candidate.embedding.astype(np.float32).tolist(),
            seed=probe_seed(self.spec.seed, candidate.index),
            scheduler=self.settings.scheduler,
            steps=self.settings.num_inference_steps,
            guidance=self.settings.guidance_scale,
            outcome=outcome,
            **unknown,
            **dict.fromkeys(attribute_columns(None)),
        )
        if outcome in (EXCLUDED, TOO_CLOSE) or record is None:
            return row
        row.face_count = record.face_count
        for name, value in attribute_columns(record).items():
            setattr(row, name, value)
        cell = self.filler.cell_of(self._values(record))
        row.cell = describe(cell) if cell is not None else None
        if outcome == KEPT:
            extension = IMAGE_EXTENSIONS[self.spec.output.image_format]
            row.identity_id = candidate.identity_id
            row.path = f"{layout.PROBES_DIR}/{candidate.identity_id}.{extension}"
            row.sha256 = hashlib.sha256(data).hexdigest()
            (self.folder / Path(row.path).name).write_bytes(data)
        return row


def _unmet(placement: _Placement, probed: int, why: str) -> SpecError:
    cell, taken, quota = placement.filler.unfilled()[0]
    return SpecError(
        f"identities.balance cannot be met: cell {describe(cell)} has {taken} of its {quota} "
        f"identities after {probed} candidates ({why}): raise "
        "identities.balance.max_candidates or lower that cell's share"
    )


def _run(
    placement: _Placement, candidates: Iterator[Candidate], prober: _Prober, batch: int,
    screen_first: bool,
) -> int:  # fmt: skip
    """Probe and place candidates until the quotas are met; returns how many were decided.
    Up to `batch` probes are made ahead; candidates that fail their screen already are
    not probed (`screen_first`: their embedding does not change with the probe)."""
    decided = 0
    while not placement.filler.complete:
        turn: list[Candidate] = []
        to_probe: list[Candidate] = []
        for candidate in candidates:
            turn.append(candidate)
            if not screen_first or placement.screen(candidate.embedding) is None:
                to_probe.append(candidate)
            if len(to_probe) == batch:
                break
        if not turn:
            return decided
        probed = dict(zip((c.index for c in to_probe), prober.probe(to_probe), strict=True))
        for candidate in turn:
            if placement.filler.complete:
                break  # probes made ahead of the last placement are dropped
            placement.decide(candidate, probed.get(candidate.index))
            decided += 1
    return decided


def balanced_identities(spec: JobSpec) -> BuiltIdentities:
    """Candidates from the source, probed and placed until every quota is met; refused
    (SpecError) naming the unfillable cell when the candidates run out."""

    source = spec.identities
    filler = CellFiller.for_spec(source.balance, source.count)
    gallery = exclusion_gallery(spec) if source.source == "random" else None
    folder = Path(tempfile.mkdtemp(prefix="arc2face-probes-"))
    probes = ProbeSet([], folder)
    pool_report = None
    if source.source == "random":
        candidates: Iterator[Candidate] = _random_candidates(spec)
        bound = f"identities.balance.max_candidates {source.balance_candidates()}"
    else:
        pool = make_identities(_pool_spec(spec, _pool_size(spec)))
        pool_report = pool.exclusion
        candidates = iter(_table_candidates(pool.table, keep_ids=source.source != "packed"))
        bound = f"all {pool.table.num_rows} candidates of the {source.source} source"
    settings = probe_settings(spec)
    placement = _Placement(
        spec, settings, filler, folder, gallery, check_separation=source.source == "random"
    )
    prober = _Prober(spec, *_probe_models(spec, settings))
    projected = source.source == "random" and source.project_to_manifold
    decided = _run(placement, candidates, prober, spec.generation.batch_size, not projected)
    del prober
    _free_device_memory()  # a dedicated LCM engine's memory goes back before the shards
    if not filler.complete:
        probes.remove()
        raise _unmet(placement, decided, bound)
    probes.rows = placement.rows
    table = _identities_table(spec, placement)
    exclusion = _exclusion_report(spec, table, placement, pool_report)
    return BuiltIdentities(table, exclusion, probes)


def _identities_table(spec: JobSpec, placement: _Placement) -> pa.Table:
    candidates = [candidate for candidate, _ in placement.kept]
    table = sources.build_identities_table(
        np.stack([candidate.embedding for candidate in candidates]),
        spec.identities.source,
        [candidate.provenance for candidate in candidates],
        [candidate.identity_id for candidate in candidates],
    )
    return with_attributes(table, [attributes for _, attributes in placement.kept])


def _exclusion_report(
    spec: JobSpec, table: pa.Table, placement: _Placement, pool: ExclusionReport | None
) -> ExclusionReport | None:
    """The kept identities against the whole gallery (a subset of an excluded pool, or
    random draws screened one by one), with every candidate excluded on the way."""
    from arc2face_engine.identities.exclusion import apply_exclusion

    gallery = placement.gallery or exclusion_gallery(spec)
    if gallery is None:
        return None
    excluded = placement.excluded + (pool.excluded if pool is not None else 0)
    return apply_exclusion(table, gallery, "file", excluded)[1]
