"""Quality metrics from the stored face embeddings.


- centre of an identity = normalised mean of its accepted face embeddings;
- intra-class consistency = share of accepted images with d(face, centre) <= radius;
- uniqueness = (number of greedy radius-balls needed to cover the centres) / identities:
  centres are visited in label order, each one not within `radius` of an existing
  ball centre opens a new ball; 1.0 means no two identities collapse together;
- inter-class separability = max and histogram of the off-diagonal centre-to-centre cosines;
- near-duplicates = pairs of accepted images of one identity with cosine >= 0.98
  (pairs are looked for within a manifest part; identities never span parts because
  shards hold whole identities).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from arc2face_engine.audit.identities import Identities, normalise_rows
from arc2face_engine.audit.report import (
    NEAR_DUPLICATE_COSINE,
    AuditError,
    CoverageCount,
    FeatureNormStats,
    Finding,
    Histogram,
    IdentityRate,
    PlotData,
    QualitySection,
    YawError,
)
from arc2face_engine.audit.schema import iter_part_batches
from arc2face_engine.dataset.reader import DatasetReader
from schemas.tables import EMBEDDING_DIM, vector_matrix

MAX_LISTED_IDENTITIES = 1000  # per-identity accept rates listed (lowest first)
COSINE_BINS = np.linspace(-1.0, 1.0, 81)
BLOCK_ELEMENTS = 1 << 22  # float32 entries per similarity block (16 MB)
SCATTER_POINTS = 4000
NORM_BINS = np.linspace(0.0, 64.0, 65)  # ArcFace feature norms; larger values land in the last bin
NORM_SAMPLE = 65_536  # values kept per kind for the quantiles
QUALITY_COLUMNS = [
    "identity_id", "accepted", "face_embedding", "similarity", "pose_name", "expression_name",
    "pose_yaw", "measured_yaw", "pose_pitch", "measured_pitch",
]  # fmt: skip
SECOND_PASS_COLUMNS = [
    "image_id", "identity_id", "accepted", "face_embedding", "path", "face_count", "similarity",
]  # fmt: skip


@dataclass
class _QualityAccumulator:
    """Per-identity sums and counts of the first pass."""

    n: int
    sums: np.ndarray = field(init=False)
    accepted: np.ndarray = field(init=False)
    total: np.ndarray = field(init=False)
    similarity_accepted: np.ndarray = field(default_factory=lambda: np.zeros(80, np.int64))
    similarity_rejected: np.ndarray = field(default_factory=lambda: np.zeros(80, np.int64))
    poses: dict[str, CoverageCount] = field(default_factory=dict)
    expressions: dict[str, CoverageCount] = field(default_factory=dict)
    yaw_count: int = 0
    yaw_abs_sum: float = 0.0
    yaw_sq_sum: float = 0.0
    yaw_max_abs: float = 0.0
    yaw_pairs: _PairSample = field(default_factory=lambda: _PairSample())
    pitch_pairs: _PairSample = field(default_factory=lambda: _PairSample())
    pitch_rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(1))
    norms: _NormAccumulator = field(default_factory=lambda: _NormAccumulator())

    def __post_init__(self) -> None:
        self.sums = np.zeros((self.n, EMBEDDING_DIM), np.float64)
        self.accepted = np.zeros(self.n, np.int64)
        self.total = np.zeros(self.n, np.int64)


class _NormAccumulator:
    """Streaming distribution of the `feature_norm` column, for accepted and rejected rows:
    exact count, mean, min, max and a fixed-bin histogram; quantiles from a bounded sample."""

    def __init__(self) -> None:
        self.present = False
        self.count = {True: 0, False: 0}
        self.total = {True: 0.0, False: 0.0}
        self.low = {True: np.inf, False: np.inf}
        self.high = {True: -np.inf, False: -np.inf}
        self.bins = {True: np.zeros(len(NORM_BINS) - 1, np.int64),
                     False: np.zeros(len(NORM_BINS) - 1, np.int64)}  # fmt: skip
        self.sample: dict[bool, list[np.ndarray]] = {True: [], False: []}

    def add(self, norms: pa.Array, accepted: pa.Array, rng: np.random.Generator) -> None:
        self.present = True
        values = norms.to_numpy(zero_copy_only=False).astype(np.float64)
        is_accepted = accepted.to_numpy(zero_copy_only=False).astype(bool)
        for kind in (True, False):
            chosen = values[(is_accepted == kind) & np.isfinite(values)]
            if not len(chosen):
                continue
            self.count[kind] += len(chosen)
            self.total[kind] += float(chosen.sum())
            self.low[kind] = min(self.low[kind], float(chosen.min()))
            self.high[kind] = max(self.high[kind], float(chosen.max()))
            clipped = np.clip(chosen, NORM_BINS[0], np.nextafter(NORM_BINS[-1], 0))
            self.bins[kind] += np.histogram(clipped, NORM_BINS)[0]
            self.sample[kind].append(chosen)
            merged = np.concatenate(self.sample[kind])
            if len(merged) > NORM_SAMPLE:  # keep the sample bounded
                merged = merged[rng.choice(len(merged), NORM_SAMPLE, replace=False)]
            self.sample[kind] = [merged]

    def stats(self, accepted: bool) -> FeatureNormStats | None:
        if not self.present:
            return None
        count = self.count[accepted]
        stats = FeatureNormStats(count=count, histogram=Histogram(
            edges=NORM_BINS.tolist(), counts=self.bins[accepted].tolist()))  # fmt: skip
        if count:
            sample = np.concatenate(self.sample[accepted])
            p1, p5, p50, p95 = np.percentile(sample, [1, 5, 50, 95]).tolist()
            stats.mean = self.total[accepted] / count
            stats.min, stats.max = self.low[accepted], self.high[accepted]
            stats.p1, stats.p5, stats.median, stats.p95 = p1, p5, p50, p95
        return stats


def _add_grouped(sums: np.ndarray, index: np.ndarray, rows: np.ndarray) -> None:
    """sums[index[i]] += rows[i], via sort + reduceat (np.add.at is ~50x slower)."""
    if not len(index):
        return
    order = np.argsort(index, kind="stable")
    index, rows = index[order], rows[order]
    starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
    sums[index[starts]] += np.add.reduceat(rows.astype(np.float64), starts, axis=0)


def _count_names(column: pa.Array, accepted: np.ndarray, into: dict[str, CoverageCount]) -> None:
    names = column.fill_null("(none)").to_pylist()
    for name, is_accepted in zip(names, accepted.tolist(), strict=True):
        entry = into.setdefault(name, CoverageCount())
        entry.total += 1
        entry.accepted += int(is_accepted)


class _PairSample:
    """A bounded random sample of (requested, measured) angle pairs for a scatter plot."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.kept = 0

    def add(self, pairs: np.ndarray, rng: np.random.Generator) -> None:
        keep = min(len(pairs), SCATTER_POINTS // 4)
        self.chunks.append(pairs[rng.choice(len(pairs), keep, replace=False)])
        self.kept += keep
        if self.kept > 2 * SCATTER_POINTS:  # keep the sample bounded
            merged = np.concatenate(self.chunks)
            self.chunks = [merged[rng.choice(len(merged), SCATTER_POINTS, replace=False)]]
            self.kept = SCATTER_POINTS

    def array(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.empty((0, 2), np.float32)


def _angle_pairs(batch: pa.RecordBatch, angle: str) -> np.ndarray:
    """(requested, measured) float32 pairs of the rows that have both values of `angle`."""
    requested = batch.column(f"pose_{angle}").to_numpy(zero_copy_only=False).astype(float)
    measured = batch.column(f"measured_{angle}").to_numpy(zero_copy_only=False).astype(float)
    both = ~(np.isnan(requested) | np.isnan(measured))
    return np.stack([requested[both], measured[both]], axis=1).astype(np.float32)


def _accumulate_yaw(
    batch: pa.RecordBatch, acc: _QualityAccumulator, rng: np.random.Generator
) -> None:
    pitch = _angle_pairs(batch, "pitch")
    if len(pitch):  # its own generator: the shared one's draws stay as they were
        acc.pitch_pairs.add(pitch, acc.pitch_rng)
    pairs = _angle_pairs(batch, "yaw")
    if not len(pairs):
        return
    error = pairs[:, 1].astype(float) - pairs[:, 0].astype(float)
    acc.yaw_count += len(error)
    acc.yaw_abs_sum += float(np.abs(error).sum())
    acc.yaw_sq_sum += float((error**2).sum())
    acc.yaw_max_abs = max(acc.yaw_max_abs, float(np.abs(error).max()))
    acc.yaw_pairs.add(pairs, rng)


def _first_pass(
    reader: DatasetReader,
    parts: list[str],
    identities: Identities,
    seed: int,
    progress: Callable[[int], None],
) -> _QualityAccumulator:
    acc = _QualityAccumulator(len(identities))
    rng = np.random.default_rng(seed)
    for part in parts:
        progress(1)
        for batch in iter_part_batches(reader, part, QUALITY_COLUMNS, optional=("feature_norm",)):
            if "feature_norm" in batch.schema.names:
                acc.norms.add(batch.column("feature_norm"), batch.column("accepted"), rng)
            index = identities.index_of(batch.column("identity_id"))
            known = index >= 0
            accepted = batch.column("accepted").to_numpy(zero_copy_only=False)
            acc.total += np.bincount(index[known], minlength=acc.n)
            acc.accepted += np.bincount(index[known & accepted], minlength=acc.n)
            has_face = batch.column("face_embedding").is_valid().to_numpy(zero_copy_only=False)
            use = known & accepted & has_face
            embeddings = vector_matrix(
                batch.column("face_embedding").filter(pa.array(use)), EMBEDDING_DIM
            )
            _add_grouped(acc.sums, index[use], normalise_rows(embeddings))
            similarity = batch.column("similarity").to_numpy(zero_copy_only=False).astype(float)
            valid = ~np.isnan(similarity)
            acc.similarity_accepted += np.histogram(similarity[valid & accepted], COSINE_BINS)[0]
            acc.similarity_rejected += np.histogram(similarity[valid & ~accepted], COSINE_BINS)[0]
            _count_names(batch.column("pose_name"), accepted, acc.poses)
            _count_names(batch.column("expression_name"), accepted, acc.expressions)
            _accumulate_yaw(batch, acc, rng)
    return acc


def _block_rows(columns: int, most: int = 2048) -> int:
    """Rows of a similarity block with `columns` columns that fit in BLOCK_ELEMENTS floats."""
    return max(1, min(most, BLOCK_ELEMENTS // max(columns, 1)))


def greedy_ball_count(centres: np.ndarray, radius: float, chunk: int = 1024) -> int:
    """Number of radius-balls (cosine distance) a greedy pass in row order needs to cover `centres`."""
    threshold = 1.0 - radius
    balls = np.empty((0, centres.shape[1]), np.float32)
    start = 0
    while start < len(centres):
        block = centres[start : start + min(chunk, _block_rows(len(balls)))]
        start += len(block)
        covered = np.zeros(len(block), bool)
        if len(balls):
            covered = (block @ balls.T).max(axis=1) >= threshold
        fresh = np.empty((len(block), centres.shape[1]), np.float32)
        n_fresh = 0
        for row in np.flatnonzero(~covered):
            if n_fresh and (fresh[:n_fresh] @ block[row]).max() >= threshold:
                continue
            fresh[n_fresh] = block[row]
            n_fresh += 1
        balls = np.concatenate([balls, fresh[:n_fresh]])
    return len(balls)


def inter_class_stats(
    centres: np.ndarray, block_rows: int | None = None, nearest: np.ndarray | None = None
) -> tuple[float | None, tuple[int, int] | None, np.ndarray]:
    """(max off-diagonal cosine, its pair, histogram over COSINE_BINS of i<j cosines).

    Row blocks of the upper triangle only, sized to BLOCK_ELEMENTS: memory stays
    bounded however many identities there are. `nearest` (n,), when given, receives each
    centre's largest cosine to another centre (-inf for a lone centre).
    """
    n = len(centres)
    counts = np.zeros(len(COSINE_BINS) - 1, np.int64)
    best, pair = -np.inf, None
    rows_per_block = block_rows or _block_rows(n)
    for start in range(0, n, rows_per_block):
        block = centres[start : start + rows_per_block] @ centres[start:].T
        # column c is centre start + c, row r is centre start + r: keep c > r (each pair once)
        upper = np.arange(block.shape[1])[None, :] > np.arange(len(block))[:, None]
        counts += np.histogram(np.clip(block[upper], -1, 1), COSINE_BINS)[0]
        block[~upper] = -np.inf
        if nearest is not None:  # each pair once: row r with column c, and c with r
            rows = slice(start, start + len(block))
            nearest[rows] = np.maximum(nearest[rows], block.max(axis=1))
            nearest[start:] = np.maximum(nearest[start:], block.max(axis=0))
        flat = int(np.argmax(block))
        if upper.any() and block.flat[flat] > best:
            best = float(block.flat[flat])
            row, column = divmod(flat, block.shape[1])
            pair = (start + row, start + column)
    return (None if pair is None else best), pair, counts


def close_pair_count(centres: np.ndarray, threshold: float, block_rows: int | None = None) -> int:
    """Number of centre pairs i < j with cosine > `threshold`, in bounded row blocks."""
    n, total = len(centres), 0
    rows_per_block = block_rows or _block_rows(n)
    for start in range(0, n, rows_per_block):
        block = centres[start : start + rows_per_block] @ centres[start:].T
        upper = np.arange(block.shape[1])[None, :] > np.arange(len(block))[:, None]
        total += int((block[upper] > threshold).sum())
    return total


@dataclass
class _ReverifySample:
    ordinals: np.ndarray  # sorted positions among accepted rows with a file
    rows: list[dict] = field(default_factory=list)


def _near_duplicates(part_rows: dict[int, list[tuple[str, np.ndarray]]], finding: Finding) -> None:
    for items in part_rows.values():
        if len(items) < 2:
            continue
        matrix = np.stack([embedding for _, embedding in items])
        gram = matrix @ matrix.T
        first, second = np.nonzero(np.triu(gram >= NEAR_DUPLICATE_COSINE, k=1))
        for a, b in zip(first.tolist(), second.tolist(), strict=True):
            finding.add(f"{items[a][0]} ~ {items[b][0]} (cos {gram[a, b]:.4f})")


def _second_pass(
    reader: DatasetReader,
    parts: list[str],
    identities: Identities,
    centres: np.ndarray,
    radius: float,
    quality: QualitySection,
    plots: PlotData,
    sample: _ReverifySample,
    contact_identities: int,
    contact_images: int,
    progress: Callable[[int], None],
) -> tuple[int, float]:
    """Distances to centres, near-duplicates, contact-sheet paths, reverify sample."""
    within, min_cos, ordinal = 0, np.inf, 0
    wanted = set(sample.ordinals.tolist())
    contact_ids = set(identities.ids[:contact_identities].to_pylist())
    for part in parts:
        progress(1)
        part_rows: dict[int, list[tuple[str, np.ndarray]]] = {}  # bounded by one part
        for batch in iter_part_batches(reader, part, SECOND_PASS_COLUMNS):
            index = identities.index_of(batch.column("identity_id"))
            accepted = batch.column("accepted").to_numpy(zero_copy_only=False)
            has_face = batch.column("face_embedding").is_valid().to_numpy(zero_copy_only=False)
            use = (index >= 0) & accepted & has_face
            embeddings = normalise_rows(
                vector_matrix(batch.column("face_embedding").filter(pa.array(use)), EMBEDDING_DIM)
            )
            cosines = np.einsum("ij,ij->i", embeddings, centres[index[use]])
            within += int((1.0 - cosines <= radius).sum())
            if len(cosines):
                min_cos = min(min_cos, float(cosines.min()))
            used_ids = batch.column("image_id").filter(pa.array(use)).to_pylist()
            for image_id, row_index, embedding in zip(
                used_ids, index[use].tolist(), embeddings, strict=True
            ):
                part_rows.setdefault(row_index, []).append((image_id, embedding))
            ordinal = _collect_rows(batch, accepted, contact_ids, plots, sample, wanted,
                                    ordinal, contact_images)  # fmt: skip
        _near_duplicates(part_rows, quality.near_duplicates)
    return within, min_cos


def _collect_rows(
    batch: pa.RecordBatch,
    accepted: np.ndarray,
    contact_ids: set[str],
    plots: PlotData,
    sample: _ReverifySample,
    wanted: set[int],
    ordinal: int,
    contact_images: int,
) -> int:
    """Contact-sheet paths and the seeded reverify sample (accepted rows with a file)."""
    paths = batch.column("path").to_pylist()
    identity_ids = batch.column("identity_id").to_pylist()
    for row in np.flatnonzero(accepted).tolist():
        if paths[row] is None:
            continue
        identity_id = identity_ids[row]
        if identity_id in contact_ids:
            sheet = plots.contact_sheet.setdefault(identity_id, [])
            if len(sheet) < contact_images:
                sheet.append(paths[row])
        if ordinal in wanted:
            sample.rows.append(batch.slice(row, 1).to_pylist()[0])
        ordinal += 1
    return ordinal


def measure_quality(
    reader: DatasetReader,
    parts: list[str],
    identities: Identities,
    radius: float,
    reverify: int = 0,
    sample_seed: int = 0,
    contact_identities: int = 12,
    contact_images: int = 6,
    progress: Callable[[int], None] = lambda units: None,
) -> tuple[QualitySection, PlotData, list[dict], np.ndarray]:
    """Quality metrics from stored embeddings; returns (section, plot data, reverify rows, centres)."""
    if not 0.0 < radius < 2.0:
        raise AuditError(f"radius {radius} is not a cosine distance in (0, 2): pass e.g. 0.3")
    acc = _first_pass(reader, parts, identities, sample_seed, progress)
    has_centre = acc.accepted > 0
    centres = normalise_rows(acc.sums).astype(np.float32)
    quality = QualitySection(
        radius=radius,
        identities=len(identities),
        identities_with_accepted=int(has_centre.sum()),
        accepted_images=int(acc.accepted.sum()),
        rejected_images=int((acc.total - acc.accepted).sum()),
        pose_coverage=acc.poses,
        expression_coverage=acc.expressions,
        similarity_accepted=Histogram(edges=COSINE_BINS.tolist(), counts=acc.similarity_accepted.tolist()),
        similarity_rejected=Histogram(edges=COSINE_BINS.tolist(), counts=acc.similarity_rejected.tolist()),
    )  # fmt: skip
    quality.feature_norm_accepted = acc.norms.stats(accepted=True)
    quality.feature_norm_rejected = acc.norms.stats(accepted=False)
    _fill_accept_rates(quality, acc, identities)
    _fill_yaw(quality, acc)
    plots = PlotData(
        yaw_pairs=acc.yaw_pairs.array(),
        pitch_pairs=acc.pitch_pairs.array(),
        accept_rates=np.divide(acc.accepted, np.maximum(acc.total, 1))[acc.total > 0],
    )
    valid_centres = centres[has_centre]
    if len(valid_centres):
        balls = greedy_ball_count(valid_centres, radius)
        quality.unique_balls = balls
        quality.uniqueness = balls / len(valid_centres)
        nearest = np.full(len(valid_centres), -np.inf)
        best, pair, counts = inter_class_stats(valid_centres, nearest=nearest)
        plots.nearest_other = np.full(len(identities), np.nan)
        plots.nearest_other[has_centre] = np.where(np.isfinite(nearest), nearest, np.nan)
        quality.inter_class_max_cosine = best
        if best is not None and best > 1.0 - radius:
            quality.inter_class_close_pairs = close_pair_count(valid_centres, 1.0 - radius)
        quality.inter_class_histogram = Histogram(
            edges=COSINE_BINS.tolist(), counts=counts.tolist()
        )
        if pair is not None:
            ids = np.flatnonzero(has_centre)
            quality.inter_class_closest_pair = [identities.ids[int(ids[i])].as_py() for i in pair]
    n_with_file = quality.accepted_images  # upper bound; the sample skips rows without a file
    rng = np.random.default_rng(sample_seed)
    ordinals = np.sort(rng.choice(n_with_file, min(reverify, n_with_file), replace=False))
    sample = _ReverifySample(ordinals=ordinals)
    within, min_cos = _second_pass(reader, parts, identities, centres, radius, quality, plots,
                                   sample, contact_identities, contact_images, progress)  # fmt: skip
    if quality.accepted_images:
        faces = int(acc.accepted.sum())
        quality.intra_class_consistency = within / faces if faces else None
        quality.intra_class_min_cosine = None if np.isinf(min_cos) else min_cos
    return quality, plots, sample.rows, centres


def _fill_accept_rates(
    quality: QualitySection, acc: _QualityAccumulator, identities: Identities
) -> None:
    present = np.flatnonzero(acc.total > 0)
    if not len(present):
        return
    rates = acc.accepted[present] / acc.total[present]
    quality.accept_rate_min = float(rates.min())
    quality.accept_rate_median = float(np.median(rates))
    quality.accept_rate_max = float(rates.max())
    order = np.argsort(rates, kind="stable")[:MAX_LISTED_IDENTITIES]
    quality.accept_rate_per_identity = [
        IdentityRate(
            identity_id=identities.ids[int(present[i])].as_py(),
            accepted=int(acc.accepted[present[i]]),
            total=int(acc.total[present[i]]),
            rate=float(rates[i]),
        )
        for i in order
    ]


def _fill_yaw(quality: QualitySection, acc: _QualityAccumulator) -> None:
    if acc.yaw_count:
        quality.yaw_error = YawError(
            count=acc.yaw_count,
            mean_abs=acc.yaw_abs_sum / acc.yaw_count,
            rms=float(np.sqrt(acc.yaw_sq_sum / acc.yaw_count)),
            max_abs=acc.yaw_max_abs,
        )
