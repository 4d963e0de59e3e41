"""Every Parquet schema (dataset tables and bank input tables), and the dataset.json model.

This module is the single source of truth for column names and types: writers
build tables with these schemas and the audit checks files against them.
`vector_matrix` is the one way a vector column becomes a numpy matrix.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, Field

EMBEDDING_DIM = 512
EXPRESSION_DIM = 55
KEYPOINT_VALUES = 10  # 5 points x (x, y)

# Reject reasons, in the order face_analysis.judge checks them.
NO_FACE = "no_face"
MULTIPLE_FACES = "multiple_faces"
LOW_DETECTION_SCORE = "low_detection_score"
LOW_FEATURE_NORM = "low_feature_norm"
LOW_SIMILARITY = "low_similarity"
REJECT_REASONS = (NO_FACE, MULTIPLE_FACES, LOW_DETECTION_SCORE, LOW_FEATURE_NORM, LOW_SIMILARITY)


def _vector(size: int) -> pa.DataType:
    return pa.list_(pa.float32(), size)


IDENTITIES_SCHEMA = pa.schema(
    [
        pa.field("identity_id", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("embedding", _vector(EMBEDDING_DIM), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("provenance", pa.string(), nullable=False),
    ],
    metadata={"arc2face_synth.table": "identities"},
)

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("identity_id", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("variant", pa.int32(), nullable=False),
        pa.field("attempt", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        # file
        pa.field("path", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("size_bytes", pa.int64()),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        # requested controls
        pa.field("pose_name", pa.string()),
        pa.field("pose_yaw", pa.float32()),
        pa.field("pose_pitch", pa.float32()),
        pa.field("pose_roll", pa.float32()),
        pa.field("expression_name", pa.string()),
        pa.field("expression", _vector(EXPRESSION_DIM)),
        # generation settings
        pa.field("scheduler", pa.string(), nullable=False),
        pa.field("steps", pa.int32(), nullable=False),
        pa.field("guidance", pa.float32(), nullable=False),
        pa.field("controlnet_scale", pa.float32(), nullable=False),
        pa.field("expression_scale", pa.float32(), nullable=False),
        # face analysis of the generated image
        pa.field("face_count", pa.int32(), nullable=False),
        pa.field("det_score", pa.float32()),
        pa.field("bbox", _vector(4)),
        pa.field("keypoints", _vector(KEYPOINT_VALUES)),
        pa.field("measured_yaw", pa.float32()),
        pa.field("measured_pitch", pa.float32()),
        pa.field("measured_roll", pa.float32()),
        pa.field("face_embedding", _vector(EMBEDDING_DIM)),
        # ArcFace feature norm before L2 normalisation: an image-quality proxy (AdaFace).
        pa.field("feature_norm", pa.float32()),
        pa.field("similarity", pa.float32()),
        # verdict
        pa.field("accepted", pa.bool_(), nullable=False),
        pa.field("reject_reason", pa.string()),
    ],
    metadata={"arc2face_synth.table": "manifest"},
)

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "identities": IDENTITIES_SCHEMA,
    "manifest": MANIFEST_SCHEMA,
}

# Bank tables: input files that users bring or that banks save, not dataset tables.

# The angle table of a folder pose bank (arc2face_engine.poses.PoseBank.from_folder / save).
POSE_TABLE_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("yaw", pa.float64(), nullable=False),
        pa.field("pitch", pa.float64(), nullable=False),
        pa.field("roll", pa.float64(), nullable=False),
    ]
)

# The table written by arc2face_engine.expressions.ExpressionBank.save.
EXPRESSION_TABLE_SCHEMA = pa.schema(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("values", _vector(EXPRESSION_DIM), nullable=False),
    ]
)


class DatasetCounts(BaseModel):
    identities: int = 0
    shards: int = 0
    committed_shards: int = 0
    images: int = 0
    accepted: int = 0
    rejected: int = 0
    reject_reasons: dict[str, int] = Field(default_factory=dict)


class ExclusionReport(BaseModel):
    """How the identities meet `identities.exclusion` (arc2face_engine/exclusion.py)."""

    gallery_sha256: str
    gallery_size: int
    max_cosine: float
    min_margin: float  # max_cosine - the largest identity-to-gallery cosine (>= 0)
    excluded: int = 0  # candidates rejected, identities moved or photos dropped to meet it


class DatasetInfo(BaseModel):
    """The content of dataset.json."""

    format_version: int = 1
    name: str
    status: Literal["in_progress", "complete"]
    spec: dict[str, Any]
    spec_hash: str
    versions: dict[str, str] = Field(default_factory=dict)
    model_hashes: dict[str, str] = Field(default_factory=dict)
    # The dtype the weights ran at ("fp32", "fp16", "bf16"): with the model hashes, what
    # decides the pixels beyond the spec; a resume must match both.
    precision: str | None = None
    # sha256 of identities.parquet's bytes, recorded when it is written (audits verify it).
    identities_sha256: str | None = None
    counts: DatasetCounts = Field(default_factory=DatasetCounts)
    created_at: str
    finished_at: str | None = None
    exclusion_report: ExclusionReport | None = None


def empty_table(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def l2_normalize(vectors: np.ndarray, axis: int = -1) -> np.ndarray:
    """Unit vectors along `axis`, in the input's float dtype; an all-zero vector stays zero
    (the one L2 normalisation of embeddings on the host)."""
    vectors = np.asarray(vectors)
    if not np.issubdtype(vectors.dtype, np.floating):
        vectors = vectors.astype(np.float64)
    norms = np.linalg.norm(vectors, axis=axis, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def vector_matrix(column: pa.Array | pa.ChunkedArray, dim: int) -> np.ndarray:
    """A list column without nulls (e.g. `embedding`, `keypoints`) as an (n, dim) float32
    matrix; filter out null rows first."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float32).reshape(-1, dim)
