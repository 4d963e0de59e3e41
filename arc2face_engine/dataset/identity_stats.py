"""Per-identity statistics from a dataset's manifest, read part by part: a shard holds whole
identities, so one part holds every image of its identities and memory stays bounded by
one part.

For each identity:
- its attributes over its accepted images (dataset.attributes.summarise);
- how hard and how varied its accepted images are: similarity to the identity (mean, min,
  max), intra-class cosine (the mean cosine over all pairs of its accepted faces, from the
  sum of their unit embeddings: (|sum|^2 - n) / (n (n - 1))), the spread (standard
  deviation) of the measured yaw and pitch, and expression coverage (the share of the
  expressions it was asked for that have an accepted image);
- its counts: images, accepted, reject reasons.

The finalize step fills identities.parquet's attributes from these, the dataset card
shows their distributions, and the audit groups them (audit/composition.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from arc2face_engine.dataset.attributes import IdentityAttributes, summarise
from arc2face_engine.dataset.reader import DatasetReader
from schemas.tables import EMBEDDING_DIM, l2_normalize, vector_matrix

STATS_COLUMNS = [
    "identity_id", "accepted", "reject_reason", "similarity", "face_embedding",
    "measured_yaw", "measured_pitch", "expression_name", "predicted_gender",
    "gender_probability", "predicted_age", "skin_ita",
]  # fmt: skip


@dataclass
class IdentityStats:
    identity_id: str
    images: int
    accepted: int
    reject_reasons: dict[str, int] = field(default_factory=dict)
    similarity_mean: float | None = None
    similarity_min: float | None = None
    similarity_max: float | None = None
    intra_class_cosine: float | None = None  # None: fewer than two accepted faces
    yaw_spread: float | None = None  # degrees (standard deviation)
    pitch_spread: float | None = None
    expression_coverage: float | None = None  # None: no expression control
    attributes: IdentityAttributes | None = None  # over the accepted images


def _floats(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


def _spread(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(values.std()) if len(values) >= 2 else None


def _intra_class(embeddings: np.ndarray) -> float | None:
    n = len(embeddings)
    if n < 2:
        return None
    total = l2_normalize(embeddings, axis=1).astype(np.float64).sum(axis=0)
    return float((total @ total - n) / (n * (n - 1)))


def _coverage(all_names: list, accepted_names: list) -> float | None:
    wanted = {name for name in all_names if name is not None}
    if not wanted:
        return None
    return len(wanted & set(accepted_names)) / len(wanted)


def identity_stats(rows: pa.Table) -> IdentityStats:
    """The statistics of one identity from all of its manifest rows (STATS_COLUMNS)."""
    accepted_mask = rows.column("accepted").to_numpy(zero_copy_only=False).astype(bool)
    accepted = rows.filter(pa.array(accepted_mask))
    reasons: dict[str, int] = {}
    for reason in rows.column("reject_reason").drop_null().to_pylist():
        reasons[reason] = reasons.get(reason, 0) + 1
    stats = IdentityStats(
        identity_id=rows.column("identity_id")[0].as_py(),
        images=rows.num_rows,
        accepted=accepted.num_rows,
        reject_reasons=reasons,
        expression_coverage=_coverage(
            rows.column("expression_name").to_pylist(),
            accepted.column("expression_name").to_pylist(),
        ),
    )
    similarity = _floats(accepted, "similarity")
    similarity = similarity[np.isfinite(similarity)]
    if len(similarity):
        stats.similarity_mean = float(similarity.mean())
        stats.similarity_min, stats.similarity_max = float(similarity.min()), float(similarity.max())
    faces = accepted.column("face_embedding").drop_null()
    stats.intra_class_cosine = _intra_class(vector_matrix(faces, EMBEDDING_DIM))
    stats.yaw_spread = _spread(_floats(accepted, "measured_yaw"))
    stats.pitch_spread = _spread(_floats(accepted, "measured_pitch"))
    stats.attributes = summarise(
        accepted.column("predicted_gender").to_pylist(),
        np.nan_to_num(_floats(accepted, "gender_probability"), nan=0.5),
        _floats(accepted, "predicted_age"),
        _floats(accepted, "skin_ita"),
    )
    return stats


def part_identity_stats(table: pa.Table) -> Iterator[IdentityStats]:
    """The statistics of every identity of one manifest part, in identity order."""
    if not table.num_rows:
        return
    table = table.sort_by("identity_id")
    ids = table.column("identity_id").to_pylist()
    starts = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]] + [len(ids)]
    for start, end in itertools.pairwise(starts):
        yield identity_stats(table.slice(start, end - start))


def iter_identity_stats(reader: DatasetReader) -> Iterator[IdentityStats]:
    """The statistics of every identity with a committed image, part by part."""
    for part in reader.manifest_parts():
        with reader.open(part) as handle:
            yield from part_identity_stats(pq.read_table(handle, columns=STATS_COLUMNS))
