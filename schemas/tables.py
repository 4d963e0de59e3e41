"""Every Parquet schema (dataset tables and bank input tables), and the dataset.json model.

This module is the single source of truth for column names and types: writers
build tables with these schemas and the audit checks files against them.
`vector_matrix` is the one way a vector column becomes a numpy matrix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field

from schemas.constants import (  # noqa: F401 - re-exported: the columns' sizes and values
    DEFAULT_AGE_EDGES,
    EMBEDDING_DIM,
    EXPRESSION_DIM,
    GENDERS,
    ITA_LOWER_BOUNDS,
    KEYPOINT_VALUES,
    LOW_DETECTION_SCORE,
    LOW_FEATURE_NORM,
    LOW_SIMILARITY,
    MULTIPLE_FACES,
    NO_FACE,
    REJECT_REASONS,
    SKIN_TONES,
    TOO_SIMILAR,
    age_band_names,
    age_band_of,
    l2_normalize,
    skin_tone_of,
)

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Identity ids become part of image file names, so they are held to a conservative
# file-name alphabet on every filesystem and object store: no '/', no spaces, no '..'.
MAX_ID_LENGTH = 128
SAFE_ID_RULE = (
    f"1-{MAX_ID_LENGTH} letters, digits, '.', '_' or '-', starting with a letter or digit, "
    "without '..'"
)


def is_safe_id(name: object) -> bool:
    """Whether `name` may be an identity id (and so part of an image file name)."""
    return (
        isinstance(name, str)
        and len(name) <= MAX_ID_LENGTH
        and ".." not in name
        and _SAFE_ID.match(name) is not None
    )

# Why an imported item was refused before face analysis (`arc2face-synth import`): what a
# source holds is untrusted data, so each of these is a manifest row, never an error.
UNREADABLE = "unreadable"  # not a JPEG, PNG, WebP or BMP image, or truncated
TOO_LARGE = "too_large"  # over the import's byte or pixel bound
UNSAFE_NAME = "unsafe_name"  # its name or link leaves the source root
DUPLICATE_KEY = "duplicate_key"  # a WebDataset key (or file) seen before
BAD_RECORD = "bad_record"  # a RecordIO record whose offset, length or header lies
NOT_ALIGNED = "not_aligned"  # --aligned, but not a 112x112 crop
NO_LABEL = "no_label"  # the item carries no label: there is no identity to import it for
IMPORT_REFUSALS = (
    UNREADABLE, TOO_LARGE, UNSAFE_NAME, DUPLICATE_KEY, BAD_RECORD, NOT_ALIGNED, NO_LABEL,
)  # fmt: skip

# Where a manifest row's image came from (the `source` column).
GENERATED = "generated"
IMPORTED = "imported"
SOURCES = (GENERATED, IMPORTED)
# The label of imported rows whose identity has no accepted image: such identities are
# left out of identities.parquet (and counted in dataset.json), their rows keep the reasons.
LEFT_OUT_LABEL = -1
# The identity of imported items that carry no label at all (e.g. a tar member whose
# sample has no class); never the id of a real identity.
UNLABELLED_ID = "unlabelled"


def _vector(size: int) -> pa.DataType:
    return pa.list_(pa.float32(), size)


EMBEDDING_VECTOR = _vector(EMBEDDING_DIM)
EXPRESSION_VECTOR = _vector(EXPRESSION_DIM)
KEYPOINT_VECTOR = _vector(KEYPOINT_VALUES)
BOX_VECTOR = _vector(4)


def _column(arrow: pa.DataType, doc: str, nullable: bool = True) -> Any:
    """A ManifestRow field: its Parquet type, whether it may be null, what it means."""
    return field(metadata={"arrow": arrow, "nullable": nullable, "doc": doc})


@dataclass
class ManifestRow:
    """One row of `manifest/part-NNNNN.parquet`: one image, generated or imported, accepted
    or rejected.

    The one definition of the manifest's columns: `MANIFEST_SCHEMA` is derived from these
    fields (in this order), the shard (or the import) fills one per image, and
    docs/dataset-format.md is generated from the field docs. Generation columns are null
    on imported rows (`source` says which); parts written before a column became nullable
    still declare it non-null, which readers accept.
    """

    # ids
    image_id: str = _column(pa.string(), "`<identity_id>-v<variant>-a<attempt>`", False)
    identity_id: str = _column(pa.string(), "the identity (identities.parquet)", False)
    label: int = _column(pa.int32(), "the identity's integer label", False)
    shard: int = _column(pa.int32(), "the shard that made the image", False)
    variant: int = _column(pa.int32(), "which wanted image of the identity (0-based)", False)
    attempt: int = _column(pa.int32(), "0 for the first try, +1 per top-up after a reject", False)
    seed: int | None = _column(
        pa.int64(), "the image's generator seed (determinism.image_seed); null: imported"
    )
    # file
    path: str | None = _column(pa.string(), "relative path of the image file (null: not kept)")
    sha256: str | None = _column(pa.string(), "sha256 of the image file's bytes")
    size_bytes: int | None = _column(pa.int64(), "size of the image file")
    width: int | None = _column(pa.int32(), "image width in pixels (null: not decodable)")
    height: int | None = _column(pa.int32(), "image height in pixels (null: not decodable)")
    # requested controls
    pose_name: str | None = _column(pa.string(), "requested pose (null: no pose control)")
    pose_yaw: float | None = _column(pa.float32(), "requested yaw, degrees")
    pose_pitch: float | None = _column(pa.float32(), "requested pitch, degrees")
    pose_roll: float | None = _column(pa.float32(), "requested roll, degrees")
    expression_name: str | None = _column(pa.string(), "requested expression (null: none)")
    expression: list[float] | None = _column(
        EXPRESSION_VECTOR, "requested FLAME values: 50 expression, 2 eyelid, 3 jaw"
    )
    # generation settings (null on imported rows)
    scheduler: str | None = _column(pa.string(), "`dpmsolver++` or `lcm`")
    steps: int | None = _column(pa.int32(), "inference steps")
    guidance: float | None = _column(pa.float32(), "classifier-free guidance scale")
    controlnet_scale: float | None = _column(pa.float32(), "pose ControlNet scale")
    expression_scale: float | None = _column(pa.float32(), "Expression Adapter scale")
    # face analysis of the stored image
    face_count: int = _column(pa.int32(), "faces detected", False)
    det_score: float | None = _column(pa.float32(), "the largest face's detection score")
    bbox: list[float] | None = _column(BOX_VECTOR, "the largest face's box: x1, y1, x2, y2")
    keypoints: list[float] | None = _column(
        KEYPOINT_VECTOR, "its 5 keypoints (eyes, nose, mouth corners) as x, y pairs"
    )
    measured_yaw: float | None = _column(pa.float32(), "head yaw measured on the image")
    measured_pitch: float | None = _column(pa.float32(), "head pitch measured on the image")
    measured_roll: float | None = _column(pa.float32(), "head roll measured on the image")
    face_embedding: list[float] | None = _column(
        EMBEDDING_VECTOR, "ArcFace embedding of the largest face, L2-normalised"
    )
    feature_norm: float | None = _column(
        pa.float32(),
        "ArcFace feature norm before L2 normalisation: an image-quality proxy (AdaFace)",
    )
    similarity: float | None = _column(pa.float32(), "cosine of face_embedding and the identity")
    # composition: predicted and measured on the largest face of this synthetic image
    predicted_gender: str | None = _column(
        pa.string(), "`female` or `male`, predicted by antelopev2's genderage.onnx"
    )
    gender_probability: float | None = _column(
        pa.float32(), "softmax probability of predicted_gender (0.5 to 1)"
    )
    predicted_age: float | None = _column(pa.float32(), "age in years predicted by genderage.onnx")
    skin_ita: float | None = _column(
        pa.float32(),
        "skin tone measured, not predicted: Individual Typology Angle atan((L* - 50) / b*) in "
        "degrees over the cheeks of the aligned face (docs/composition.md); null for a "
        "greyscale image",
    )
    skin_tone: str | None = _column(
        pa.string(), "ITA category of skin_ita: very_light, light, intermediate, tan, brown, dark"
    )
    # verdict
    accepted: bool = _column(pa.bool_(), "passed every filter of the spec", False)
    reject_reason: str | None = _column(
        pa.string(), "the first failed check (REJECT_REASONS, or IMPORT_REFUSALS when imported)"
    )
    # provenance (`arc2face-synth import`); parts written before these columns lack them
    source: str = _column(pa.string(), "`generated` or `imported` (SOURCES)", False)
    source_label: str | None = _column(
        pa.string(),
        "imported: the identity's label in the source, as written there (folder name, "
        "RecordIO label, label column); identity_id is the safe id made from it",
    )
    source_name: str | None = _column(
        pa.string(),
        "imported: where the image was in the source (relative path, tar member, record key, "
        "file and row)",
    )


def _schema_of(row: type, table: str) -> pa.Schema:
    return pa.schema(
        [pa.field(f.name, f.metadata["arrow"], f.metadata["nullable"]) for f in fields(row)],
        metadata={"arc2face_synth.table": table},
    )


@dataclass
class IdentityRow:
    """One row of `identities.parquet`: one identity of the dataset."""

    identity_id: str = _column(pa.string(), f"safe id ({SAFE_ID_RULE})", False)
    label: int = _column(pa.int32(), "integer label, 0..N-1 in row order", False)
    embedding: list[float] = _column(
        EMBEDDING_VECTOR, "ArcFace identity embedding, L2-normalised", False
    )
    source: str = _column(pa.string(), "random, packed, file, images or imported", False)
    provenance: str = _column(
        pa.string(), "where it came from: seed and candidate, file and row, photo path", False
    )
    # composition: from the identity's probe image when the job balanced its identities,
    # else over its accepted images at finalize (null until then, or without a face)
    gender: str | None = _column(
        pa.string(), "predicted gender: the probe's, else the majority of the accepted images"
    )
    gender_probability: float | None = _column(
        pa.float32(), "the probe's probability of `gender`, else the mean over those images"
    )
    age: float | None = _column(pa.float32(), "predicted age in years (median over images)")
    skin_ita: float | None = _column(pa.float32(), "measured ITA in degrees (median over images)")
    skin_tone: str | None = _column(pa.string(), "ITA category of skin_ita")
    attributes_from: str | None = _column(
        pa.string(), "`probe`, `accepted images` (and how many), or null: not measured"
    )


@dataclass
class ProbeRow:
    """One row of `probes/manifest.parquet`: one candidate identity of a balanced job and
    the probe image that placed it (identities.balance), so an auditor can check the
    placement. Candidates not kept have a row and no image."""

    candidate: int = _column(pa.int64(), "the candidate's position in the source's order", False)
    identity_id: str | None = _column(pa.string(), "the identity it became (null: not kept)")
    embedding: list[float] = _column(
        EMBEDDING_VECTOR, "the candidate's identity embedding (after projection, if any)", False
    )
    seed: int = _column(pa.int64(), "the probe image's generator seed", False)
    scheduler: str = _column(pa.string(), "probe sampler: `lcm` or `dpmsolver++`", False)
    steps: int = _column(pa.int32(), "probe inference steps", False)
    guidance: float = _column(pa.float32(), "probe guidance scale", False)
    path: str | None = _column(pa.string(), "relative path of the probe image (kept ones)")
    sha256: str | None = _column(pa.string(), "sha256 of the probe image's bytes")
    face_count: int | None = _column(
        pa.int32(), "faces detected in the probe (null: screened out before its probe counted)"
    )
    predicted_gender: str | None = _column(pa.string(), "as in the manifest")
    gender_probability: float | None = _column(pa.float32(), "as in the manifest")
    predicted_age: float | None = _column(pa.float32(), "as in the manifest")
    skin_ita: float | None = _column(pa.float32(), "as in the manifest")
    skin_tone: str | None = _column(pa.string(), "as in the manifest")
    cell: str | None = _column(
        pa.string(), "the balance cell of these attributes, e.g. `gender=male,age=20-30`"
    )
    outcome: str = _column(
        pa.string(),
        "kept, cell_full, no_face (or no attribute for a balanced axis), too_close "
        "(identities.separation), excluded (identities.exclusion)",
        False,
    )


@dataclass
class AuditIdentityRow:
    """One row of `audit/identities.parquet`, written by the audit: one identity's group
    and how hard and varied its accepted images are (dataset.identity_stats)."""

    identity_id: str = _column(pa.string(), "the identity", False)
    gender: str | None = _column(pa.string(), "its group: gender")
    age: str | None = _column(pa.string(), "its group: age band")
    skin_tone: str | None = _column(pa.string(), "its group: ITA category")
    images: int = _column(pa.int32(), "images generated", False)
    accepted: int = _column(pa.int32(), "images accepted", False)
    similarity_mean: float | None = _column(pa.float32(), "accepted images' mean similarity")
    similarity_min: float | None = _column(pa.float32(), "their lowest similarity")
    similarity_max: float | None = _column(pa.float32(), "their highest similarity")
    intra_class_cosine: float | None = _column(
        pa.float32(), "mean cosine over all pairs of its accepted faces (null: fewer than 2)"
    )
    yaw_spread: float | None = _column(pa.float32(), "std of the measured yaw, degrees")
    pitch_spread: float | None = _column(pa.float32(), "std of the measured pitch, degrees")
    expression_coverage: float | None = _column(
        pa.float32(), "share of its requested expressions with an accepted image"
    )
    nearest_other_identity: float | None = _column(
        pa.float32(), "largest cosine of its centre to another identity's centre"
    )


IDENTITIES_SCHEMA = _schema_of(IdentityRow, "identities")
MANIFEST_SCHEMA = _schema_of(ManifestRow, "manifest")
PROBES_SCHEMA = _schema_of(ProbeRow, "probes")
AUDIT_IDENTITIES_SCHEMA = _schema_of(AuditIdentityRow, "audit_identities")
IDENTITY_ATTRIBUTE_COLUMNS = (
    "gender", "gender_probability", "age", "skin_ita", "skin_tone", "attributes_from",
)  # fmt: skip


def manifest_table(rows: Sequence[ManifestRow]) -> pa.Table:
    """ManifestRows as a manifest table (MANIFEST_SCHEMA), column by column."""
    columns = {f.name: [getattr(row, f.name) for row in rows] for f in fields(ManifestRow)}
    return pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA)


def probes_table(rows: Sequence[ProbeRow]) -> pa.Table:
    """ProbeRows as a probes table (PROBES_SCHEMA)."""
    columns = {f.name: [getattr(row, f.name) for row in rows] for f in fields(ProbeRow)}
    return pa.Table.from_pydict(columns, schema=PROBES_SCHEMA)


TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "identities": IDENTITIES_SCHEMA,
    "manifest": MANIFEST_SCHEMA,
    "probes": PROBES_SCHEMA,
}

# Bank tables: input files that users bring or that banks save, not dataset tables.

# The angle table of a folder pose bank (arc2face_engine.controls.poses.PoseBank.from_folder / save).
POSE_TABLE_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("yaw", pa.float64(), nullable=False),
        pa.field("pitch", pa.float64(), nullable=False),
        pa.field("roll", pa.float64(), nullable=False),
    ]
)

# The table written by arc2face_engine.controls.expressions.ExpressionBank.save.
EXPRESSION_TABLE_SCHEMA = pa.schema(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("values", _vector(EXPRESSION_DIM), nullable=False),
    ]
)


class DatasetCounts(BaseModel):
    """What a dataset holds, counted from its committed manifest at finalize."""

    identities: int = 0
    shards: int = 0
    committed_shards: int = 0
    images: int = 0
    accepted: int = 0
    rejected: int = 0
    reject_reasons: dict[str, int] = Field(default_factory=dict)


class ExclusionReport(BaseModel):
    """How the identities meet `identities.exclusion` (arc2face_engine/identities/exclusion.py)."""

    gallery_sha256: str
    gallery_size: int
    max_cosine: float
    min_margin: float = Field(
        description="max_cosine minus the largest identity-to-gallery cosine (>= 0)"
    )
    excluded: int = Field(
        0, description="candidates rejected, identities moved or photos dropped to meet it"
    )


class ImportProvenance(BaseModel):
    """Where an imported dataset came from (`arc2face-synth import`), counted at finalize
    from its manifest."""

    source_uri: str = Field(description="the dataset it was imported from")
    format: Literal["recordio", "imagefolder", "webdataset", "hf"]
    layout: str | None = Field(
        None, description="recordio: `insightface` (header record and identity ranges) or "
        "`shuffled` (images only)"
    )
    aligned: bool = Field(description="images were taken as aligned 112x112 crops (no detection)")
    plan_sha256: str = Field(
        description="sha256 of the source's labels and item names: a resume must see the same"
    )
    source_items: int = Field(0, description="items read from the source, refused ones included")
    source_identities: int = Field(0, description="distinct labels in the source")
    identities_left_out: int = Field(
        0, description="labels without an accepted image: not in identities.parquet; their "
        f"rows carry label {LEFT_OUT_LABEL}"
    )
    images_left_out: int = Field(0, description="manifest rows of those identities")
    unlabelled: int = Field(
        0, description=f"items that carry no label (identity `{UNLABELLED_ID}`)"
    )
    refused: dict[str, int] = Field(
        default_factory=dict, description="items refused before analysis, by IMPORT_REFUSALS"
    )


class DatasetInfo(BaseModel):
    """The content of dataset.json."""

    format_version: int = 1
    name: str = Field(description="the job's name")
    status: Literal["in_progress", "complete"]
    spec: dict[str, Any] = Field(
        description="the job spec (imported: the import's options), storage option values "
        "redacted"
    )
    spec_hash: str = Field(description="sha256 of the spec fields that decide the content")
    versions: dict[str, str] = Field(
        default_factory=dict, description="versions of the packages that made it"
    )
    model_hashes: dict[str, str] = Field(
        default_factory=dict, description="sha256 of every model file, by relative path"
    )
    precision: str | None = Field(
        None,
        description="the dtype the weights ran at (fp32, fp16, bf16): with the model hashes, "
        "what decides the pixels beyond the spec; a resume must match both",
    )
    identities_sha256: str | None = Field(
        None, description="sha256 of identities.parquet, recorded when written"
    )
    probes_sha256: str | None = Field(
        None, description="sha256 of probes/manifest.parquet (balanced jobs), recorded when written"
    )
    counts: DatasetCounts = Field(default_factory=DatasetCounts)
    created_at: str = Field(description="UTC, ISO 8601")
    finished_at: str | None = Field(None, description="UTC, ISO 8601; set when complete")
    exclusion_report: ExclusionReport | None = Field(
        None, description="how the identities meet identities.exclusion"
    )
    imported: ImportProvenance | None = Field(
        None, description="imported datasets: the source, its format and what was left out"
    )


def vector_matrix(column: pa.Array | pa.ChunkedArray, dim: int) -> np.ndarray:
    """A list column without nulls (e.g. `embedding`, `keypoints`) as an (n, dim) float32
    matrix; filter out null rows first."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float32).reshape(-1, dim)
