"""Privacy by construction: keep every identity away from a gallery of real people.

`identities.exclusion: {gallery, max_cosine}` says no identity may have a cosine above
`max_cosine` to any gallery embedding (e.g. the faces of the benchmarks an FR model
trained on the dataset will be evaluated on). Each source meets it its own way:

- random: candidates too close to the gallery are rejected while sampling (the next
  candidate of the seeded stream takes their place);
- packed: identities that end too close are rotated away from their nearest gallery
  embedding, in the plane the two span, to exactly `max_cosine - PUSH_MARGIN`;
- file: the file is the user's chosen set, so a violation is refused (naming the first
  identity) instead of silently changing it;
- images: photos too close to the gallery are dropped and listed, like photos without a
  face, and the rest relabelled 0..N-1.

Whatever the source, the final identities are checked against the whole gallery (exact
blocked search, `neighbours.max_cosine`) and the result is recorded in dataset.json as
`schemas.tables.ExclusionReport`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from arc2face_engine.determinism import pinned_cpu_threads
from arc2face_engine.identities import sources
from arc2face_engine.identities.neighbours import max_cosine
from schemas.errors import SpecError
from schemas.tables import EMBEDDING_DIM, ExclusionReport, vector_matrix

SETTING = "identities.exclusion.gallery"
# Packed identities pushed out of the excluded zone land this far inside the limit, so
# float rounding in a later re-check cannot put them back over it.
PUSH_MARGIN = 1e-3
PUSH_ROUNDS = 8
# Sampling filters keep this far below the limit: matmul blocks of other sizes may round
# the same cosine differently in the last bit, and the final check must still pass.
ROUNDING_GUARD = 1e-6


@dataclass
class ExclusionGallery:
    """Unit gallery rows (on the search device), the limit and the file's identity."""

    embeddings: torch.Tensor
    max_cosine: float
    sha256: str
    uri: str

    @classmethod
    def load(
        cls,
        uri: str,
        max_cosine: float,
        storage_options: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
    ) -> ExclusionGallery:
        matrix, digest = sources.read_embedding_matrix(uri, storage_options, SETTING)
        return cls.from_matrix(matrix, max_cosine, digest, uri, device)

    @classmethod
    def from_matrix(
        cls,
        matrix: np.ndarray,
        max_cosine: float,
        sha256: str,
        uri: str,
        device: str | torch.device = "cpu",
    ) -> ExclusionGallery:
        """A gallery of unit rows already read (e.g. a dataset's identities)."""
        rows = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))
        return cls(rows.to(device), float(max_cosine), sha256, str(uri))

    def nearest(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(largest cosine to the gallery, its gallery row) per embedding."""
        # A copy: rows read from Arrow are read-only, which torch warns about.
        queries = torch.tensor(np.asarray(embeddings, dtype=np.float32))
        with pinned_cpu_threads(self.embeddings.device):
            best, index = max_cosine(queries.to(self.embeddings.device), self.embeddings)
        return best.cpu().numpy(), index.cpu().numpy()

    def allowed(self, embeddings: np.ndarray) -> np.ndarray:
        """Mask of the embeddings below the limit (the filter random sampling uses)."""
        return self.nearest(embeddings)[0] <= self.max_cosine - ROUNDING_GUARD

    def report(self, best: np.ndarray, excluded: int) -> ExclusionReport:
        top = float(best.max()) if len(best) else -1.0
        return ExclusionReport(
            gallery_sha256=self.sha256,
            gallery_size=len(self.embeddings),
            max_cosine=self.max_cosine,
            min_margin=self.max_cosine - top,
            excluded=excluded,
        )


def push_away(embeddings: np.ndarray, gallery: ExclusionGallery) -> tuple[np.ndarray, int]:
    """Rotate each embedding above the limit away from its nearest gallery row until none is.

    Returns (embeddings, how many rows were moved). A rotation away from one gallery row
    can approach another, so violators are re-checked, a few rounds at most.
    """
    moved = np.ascontiguousarray(embeddings, dtype=np.float32).copy()
    touched = np.zeros(len(moved), dtype=bool)
    rows = np.arange(len(moved))
    for _ in range(PUSH_ROUNDS):
        best, index = gallery.nearest(moved[rows])
        over = best > gallery.max_cosine
        if not over.any():
            return moved, int(touched.sum())
        rows, index = rows[over], index[over]
        nearest = gallery.embeddings[torch.as_tensor(index).to(gallery.embeddings.device)]
        nearest = nearest.cpu().numpy()
        moved[rows] = _rotate_to(moved[rows], nearest, gallery.max_cosine - PUSH_MARGIN)
        touched[rows] = True
    raise SpecError(
        f"{len(rows)} packed identities stay above identities.exclusion.max_cosine "
        f"{gallery.max_cosine:g} after {PUSH_ROUNDS} rounds: raise max_cosine or lower "
        "identities.packing.manifold_weight"
    )


def _rotate_to(points: np.ndarray, anchors: np.ndarray, cosine: float) -> np.ndarray:
    """Points moved on the great circle through them and `anchors` to cosine `cosine`."""
    along = (points * anchors).sum(axis=1, keepdims=True)
    across = points - along * anchors
    norms = np.linalg.norm(across, axis=1, keepdims=True)
    # A point exactly on its anchor has no direction to leave by: pick a fixed one.
    fallback = np.zeros_like(points)
    fallback[:, 0] = 1.0
    fallback -= (fallback * anchors).sum(axis=1, keepdims=True) * anchors
    across = np.where(norms > 1e-6, across, fallback)
    across /= np.linalg.norm(across, axis=1, keepdims=True)
    rotated = cosine * anchors + np.sqrt(1.0 - cosine**2) * across
    return (rotated / np.linalg.norm(rotated, axis=1, keepdims=True)).astype(np.float32)


def apply_exclusion(
    table: pa.Table, gallery: ExclusionGallery, source: str, excluded: int = 0
) -> tuple[pa.Table, ExclusionReport, list[str]]:
    """Make `table` meet the limit as its source allows; (table, report, dropped provenance).

    `excluded`: candidates already rejected while sampling (random), for the report.
    """
    embeddings = vector_matrix(table.column("embedding"), EMBEDDING_DIM)
    if source == "packed":
        embeddings, moved = push_away(embeddings, gallery)
        table = table.set_column(
            table.schema.get_field_index("embedding"),
            table.schema.field("embedding"),
            pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel()), EMBEDDING_DIM),
        )
        excluded += moved
    best, index = gallery.nearest(embeddings)
    over = np.flatnonzero(best > gallery.max_cosine)
    dropped: list[str] = []
    if len(over) and source == "images":
        dropped = [table.column("provenance")[int(row)].as_py() for row in over]
        table, best = _drop_rows(table, best, over, gallery)
        excluded += len(over)
    elif len(over):
        raise _violation(table, best, index, over, gallery)
    return table, gallery.report(best, excluded), dropped


def _drop_rows(
    table: pa.Table, best: np.ndarray, rows: np.ndarray, gallery: ExclusionGallery
) -> tuple[pa.Table, np.ndarray]:
    keep = np.setdiff1d(np.arange(table.num_rows), rows)
    if len(keep) == 0:
        raise SpecError(
            f"every photo is within cosine {gallery.max_cosine:g} of the exclusion gallery "
            f"{gallery.uri}: use other photos or raise identities.exclusion.max_cosine"
        )
    kept = table.take(pa.array(keep))
    rebuilt = sources.build_identities_table(
        vector_matrix(kept.column("embedding"), EMBEDDING_DIM),
        "images",
        kept.column("provenance").to_pylist(),
    )
    return rebuilt, best[keep]


def _violation(
    table: pa.Table,
    best: np.ndarray,
    index: np.ndarray,
    over: np.ndarray,
    gallery: ExclusionGallery,
) -> SpecError:
    row = int(over[np.argmax(best[over])])
    name = table.column("identity_id")[row].as_py()
    return SpecError(
        f"identity {name} has cosine {best[row]:.3f} to row {int(index[row])} of the exclusion "
        f"gallery {gallery.uri} (limit {gallery.max_cosine:g}; {len(over)} identities over it): "
        "remove those rows from identities.path or raise identities.exclusion.max_cosine"
    )
