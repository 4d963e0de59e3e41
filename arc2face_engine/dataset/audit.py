"""Independent audit of a dataset: schema, integrity, quality, leakage, re-verification.

The audit trusts nothing the producer says: it re-reads every Parquet schema,
re-hashes every image file, recounts dataset.json and recomputes the quality
numbers from the stored face embeddings.

Streaming: the manifest is read one part and one record batch at a time with
only the columns a check needs; per-identity state is a few arrays of length
n_identities (plus the n_identities x 512 centre matrix), so memory does not
grow with the number of images. Image files are hashed one by one.

Quality conventions (cosine distance d(a, b) = 1 - cos(a, b), all embeddings
L2-normalised; as in the synthetic-FR literature, e.g. DCFace / IDiff-Face):

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

import datetime as dt
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, Field, ValidationError

from arc2face_engine.dataset import layout
from arc2face_engine.dataset.codec import decode_image
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.errors import UserError
from schemas.tables import (
    EMBEDDING_DIM,
    IDENTITIES_SCHEMA,
    MANIFEST_SCHEMA,
    DatasetInfo,
    l2_normalize,
    vector_matrix,
)

NEAR_DUPLICATE_COSINE = 0.98
MAX_EXAMPLES = 20  # examples kept per finding; counts are always exact
MAX_LISTED_IDENTITIES = 1000  # per-identity accept rates listed (lowest first)
BATCH_ROWS = 16_384
COSINE_BINS = np.linspace(-1.0, 1.0, 81)
BLOCK_ELEMENTS = 1 << 22  # float32 entries per similarity block (16 MB)
SCATTER_POINTS = 4000
FILE_CHECK_THREADS = 8

INTEGRITY_COLUMNS = [
    "image_id", "identity_id", "label", "shard", "path", "sha256", "size_bytes", "accepted",
    "reject_reason",
]  # fmt: skip
QUALITY_COLUMNS = [
    "identity_id", "accepted", "face_embedding", "similarity", "pose_name", "expression_name",
    "pose_yaw", "measured_yaw",
]  # fmt: skip
SECOND_PASS_COLUMNS = [
    "image_id", "identity_id", "accepted", "face_embedding", "path", "face_count", "similarity",
]  # fmt: skip


class AuditError(UserError, ValueError):
    """The audit cannot run with the options given (bad gallery, missing models dir...)."""


# --- report model -------------------------------------------------------------------------


class Finding(BaseModel):
    """One kind of problem: an exact count and the first few examples."""

    count: int = 0
    examples: list[str] = Field(default_factory=list)

    def add(self, example: str, count: int = 1) -> None:
        self.count += count
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(example)


class SchemaCheck(BaseModel):
    file: str
    table: str
    ok: bool
    errors: list[str] = Field(default_factory=list)


class SchemaSection(BaseModel):
    ok: bool = True
    files: list[SchemaCheck] = Field(default_factory=list)


class IntegritySection(BaseModel):
    ok: bool = True
    rows: int = 0
    parts: int = 0
    files_checked: int = 0
    missing_files: Finding = Field(default_factory=Finding)
    size_mismatches: Finding = Field(default_factory=Finding)
    sha256_mismatches: Finding = Field(default_factory=Finding)
    undecodable_images: Finding = Field(default_factory=Finding)
    orphan_files: Finding = Field(default_factory=Finding)
    duplicate_image_ids: Finding = Field(default_factory=Finding)
    shard_mismatches: Finding = Field(default_factory=Finding)
    accepted_without_file: Finding = Field(default_factory=Finding)
    unknown_identities: Finding = Field(default_factory=Finding)
    label_mismatches: Finding = Field(default_factory=Finding)
    count_mismatches: Finding = Field(default_factory=Finding)
    identity_table: Finding = Field(default_factory=Finding)
    uncommitted_leftovers: Finding = Field(default_factory=Finding)  # warning only

    FAILING: ClassVar[tuple[str, ...]] = (
        "missing_files", "size_mismatches", "sha256_mismatches", "undecodable_images",
        "orphan_files", "duplicate_image_ids", "shard_mismatches", "accepted_without_file",
        "unknown_identities", "label_mismatches", "count_mismatches", "identity_table",
    )  # fmt: skip

    def failures(self) -> Iterator[tuple[str, Finding]]:
        for name in self.FAILING:
            finding = getattr(self, name)
            if finding.count:
                yield name, finding


class Histogram(BaseModel):
    edges: list[float]
    counts: list[int]


class IdentityRate(BaseModel):
    identity_id: str
    accepted: int
    total: int
    rate: float


class CoverageCount(BaseModel):
    accepted: int = 0
    total: int = 0


class YawError(BaseModel):
    count: int = 0
    mean_abs: float | None = None
    rms: float | None = None
    max_abs: float | None = None


class QualitySection(BaseModel):
    radius: float
    near_duplicate_cosine: float = NEAR_DUPLICATE_COSINE
    identities: int = 0
    identities_with_accepted: int = 0
    accepted_images: int = 0
    rejected_images: int = 0
    intra_class_consistency: float | None = None
    intra_class_min_cosine: float | None = None
    uniqueness: float | None = None
    unique_balls: int = 0
    inter_class_max_cosine: float | None = None
    inter_class_closest_pair: list[str] = Field(default_factory=list)
    inter_class_close_pairs: int = 0  # centre pairs with cosine > 1 - radius
    inter_class_histogram: Histogram | None = None
    near_duplicates: Finding = Field(default_factory=Finding)
    accept_rate_min: float | None = None
    accept_rate_median: float | None = None
    accept_rate_max: float | None = None
    accept_rate_per_identity: list[IdentityRate] = Field(default_factory=list)
    pose_coverage: dict[str, CoverageCount] = Field(default_factory=dict)
    expression_coverage: dict[str, CoverageCount] = Field(default_factory=dict)
    yaw_error: YawError = Field(default_factory=YawError)
    similarity_accepted: Histogram | None = None
    similarity_rejected: Histogram | None = None


class LeakFlag(BaseModel):
    identity_id: str
    cosine: float
    gallery_id: str


class LeakageSection(BaseModel):
    gallery: str
    threshold: float
    gallery_size: int = 0
    max_cosine: float | None = None
    flagged: list[LeakFlag] = Field(default_factory=list)


class ReverifyMismatch(BaseModel):
    image_id: str
    check: str  # face_count | embedding | similarity | unreadable
    stored: float | None = None
    measured: float | None = None


class ReverifySection(BaseModel):
    requested: int
    checked: int = 0
    similarity_tolerance: float
    embedding_min_cosine: float
    mismatches: list[ReverifyMismatch] = Field(default_factory=list)


class AuditReport(BaseModel):
    """Everything the audit found; `passed` is False when a schema or integrity check fails."""

    uri: str
    created_at: str
    passed: bool = True
    problems: list[str] = Field(default_factory=list)  # failures (schema / integrity)
    warnings: list[str] = Field(default_factory=list)  # quality, leakage, reverify flags
    dataset_status: str | None = None
    schemas: SchemaSection = Field(default_factory=SchemaSection)
    integrity: IntegritySection = Field(default_factory=IntegritySection)
    quality: QualitySection | None = None
    leakage: LeakageSection | None = None
    reverify: ReverifySection | None = None
    report_uri: str | None = None
    html_uri: str | None = None

    def summary(self) -> dict[str, Any]:
        """Headline numbers (scalars only) for CLIs and Prefect artifacts."""
        quality = self.quality
        return {
            "passed": self.passed,
            "problems": len(self.problems),
            "warnings": len(self.warnings),
            "rows": self.integrity.rows,
            "parts": self.integrity.parts,
            "files_checked": self.integrity.files_checked,
            "intra_class_consistency": quality.intra_class_consistency if quality else None,
            "uniqueness": quality.uniqueness if quality else None,
            "inter_class_max_cosine": quality.inter_class_max_cosine if quality else None,
            "near_duplicates": quality.near_duplicates.count if quality else None,
            "leaked_identities": len(self.leakage.flagged) if self.leakage else None,
            "reverify_mismatches": len(self.reverify.mismatches) if self.reverify else None,
        }


# --- identities -----------------------------------------------------------------------------


@dataclass
class Identities:
    """identities.parquet as arrays: ids (arrow, for index_in), labels, embeddings."""

    ids: pa.Array
    labels: np.ndarray
    embeddings: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def index_of(self, identity_ids: pa.Array) -> np.ndarray:
        """Row index in identities.parquet of each id; -1 for unknown ids."""
        index = pc.index_in(identity_ids, value_set=self.ids)
        return index.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    return l2_normalize(matrix, axis=1)


def load_identities(reader: DatasetReader) -> Identities:
    table = reader.identities()
    return Identities(
        ids=table.column("identity_id").combine_chunks(),
        labels=table.column("label").to_numpy(),
        embeddings=normalise_rows(vector_matrix(table.column("embedding"), EMBEDDING_DIM)),
    )


# --- schema -----------------------------------------------------------------------------------


def schema_errors(found: pa.Schema, expected: pa.Schema) -> list[str]:
    """Differences in column names, types and nullability (metadata is ignored)."""
    errors = []
    found_fields = {field.name: field for field in found}
    for wanted in expected:
        have = found_fields.get(wanted.name)
        if have is None:
            errors.append(f"missing column {wanted.name!r}")
        elif have.type != wanted.type:
            errors.append(f"column {wanted.name!r} is {have.type}, expected {wanted.type}")
        elif have.nullable != wanted.nullable:
            errors.append(
                f"column {wanted.name!r} nullable={have.nullable}, expected {wanted.nullable}"
            )
    extra = sorted(set(found_fields) - set(expected.names))
    if extra:
        errors.append(f"unexpected columns {extra}")
    return errors


def check_file_schema(reader: DatasetReader, relative: str, table: str) -> SchemaCheck:
    """Read only the footer; a missing, truncated or non-Parquet file is an error, not a crash."""
    expected = IDENTITIES_SCHEMA if table == "identities" else MANIFEST_SCHEMA
    try:
        with reader.open(relative) as handle:
            found = pq.read_schema(handle)
    except FileNotFoundError:
        return SchemaCheck(file=relative, table=table, ok=False, errors=["file is missing"])
    except (pa.ArrowException, OSError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        return SchemaCheck(
            file=relative, table=table, ok=False, errors=[f"unreadable Parquet: {message}"]
        )
    errors = schema_errors(found, expected)
    return SchemaCheck(file=relative, table=table, ok=not errors, errors=errors)


def check_schemas(reader: DatasetReader) -> tuple[SchemaSection, list[str]]:
    """Check identities.parquet and every committed part; return the parts safe to stream."""
    section = SchemaSection()
    section.files.append(check_file_schema(reader, layout.IDENTITIES, "identities"))
    good_parts = []
    for part in reader.manifest_parts():
        check = check_file_schema(reader, part, "manifest")
        section.files.append(check)
        if check.ok:
            good_parts.append(part)
    section.ok = all(check.ok for check in section.files)
    return section, good_parts


def iter_part_batches(
    reader: DatasetReader, part: str, columns: list[str], batch_rows: int = BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    with reader.open(part) as handle:
        yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_rows, columns=columns)


# --- integrity --------------------------------------------------------------------------------


def id_hashes(image_ids: pa.Array) -> np.ndarray:
    """64-bit hashes of image ids: 8 bytes per row instead of a Python set of strings."""
    digests = b"".join(
        hashlib.blake2b(value.encode(), digest_size=8).digest() for value in image_ids.to_pylist()
    )
    return np.frombuffer(digests, dtype=np.uint64)


def check_image_file(
    reader: DatasetReader, path: str, sha256: str | None, size: int | None
) -> list[str]:
    """Names of the checks this file fails (missing / size / sha256 / decode)."""
    try:
        data = reader.read_image_bytes(path)
    except FileNotFoundError:
        return ["missing_files"]
    failed = []
    if size is not None and len(data) != size:
        failed.append("size_mismatches")
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        failed.append("sha256_mismatches")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # full decode: a truncated JPEG fails here, not at open()
    except Exception:
        failed.append("undecodable_images")
    return failed


@dataclass
class _IntegrityTally:
    rows: int = 0
    accepted: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)
    hashes: list[np.ndarray] = field(default_factory=list)


def _check_rows(
    batch: pa.RecordBatch,
    shard: int | None,
    identities: Identities | None,
    section: IntegritySection,
    tally: _IntegrityTally,
) -> None:
    """Row-level checks of one batch (no file access)."""
    image_ids = batch.column("image_id")
    accepted = batch.column("accepted").to_numpy(zero_copy_only=False)
    tally.rows += batch.num_rows
    tally.accepted += int(accepted.sum())
    tally.rejected += int((~accepted).sum())
    reasons = pc.filter(batch.column("reject_reason"), pc.invert(batch.column("accepted")))
    tally.reasons.update(reason or "unknown" for reason in reasons.to_pylist())
    tally.hashes.append(id_hashes(image_ids))

    def report(finding: Finding, mask: np.ndarray, what: str) -> None:
        for row in np.flatnonzero(mask)[:MAX_EXAMPLES]:
            finding.add(f"{image_ids[row].as_py()}: {what}", 0)
        finding.count += int(mask.sum())

    if shard is not None:
        shards = batch.column("shard").to_numpy(zero_copy_only=False)
        report(section.shard_mismatches, shards != shard, f"row of shard != part's shard {shard}")
        paths = batch.column("path")
        prefix = f"{layout.image_dir(shard)}/"
        outside = pc.invert(pc.starts_with(paths.fill_null(prefix), prefix))
        report(section.shard_mismatches, outside.to_numpy(zero_copy_only=False),
               f"image path outside {prefix}")  # fmt: skip
    no_file = accepted & batch.column("path").is_null().to_numpy(zero_copy_only=False)
    report(section.accepted_without_file, no_file, "accepted row without an image file")
    if identities is not None:
        index = identities.index_of(batch.column("identity_id"))
        report(section.unknown_identities, index < 0, "identity_id not in identities.parquet")
        labels = batch.column("label").to_numpy(zero_copy_only=False)
        known = index >= 0
        wrong = np.zeros(len(index), bool)
        wrong[known] = identities.labels[index[known]] != labels[known]
        report(section.label_mismatches, wrong, "label differs from identities.parquet")


def _check_files(
    reader: DatasetReader,
    batch: pa.RecordBatch,
    section: IntegritySection,
    pool: ThreadPoolExecutor,
) -> set[str]:
    """Hash and decode every file the batch points at; returns the paths it references."""
    rows = [
        (row["image_id"], row["path"], row["sha256"], row["size_bytes"])
        for row in batch.select(["image_id", "path", "sha256", "size_bytes"]).to_pylist()
        if row["path"] is not None
    ]
    results = pool.map(lambda row: check_image_file(reader, row[1], row[2], row[3]), rows)
    for (image_id, path, _, _), failed in zip(rows, results, strict=True):
        section.files_checked += 1
        for check in failed:
            getattr(section, check).add(f"{image_id}: {path}")
    return {row[1] for row in rows}


def _list_files(reader: DatasetReader, relative: str) -> list[str]:
    """Files under `relative` as dataset-relative paths (empty if the folder is absent)."""
    full = reader.path(relative)
    reader.fs.invalidate_cache(full)
    try:
        found = reader.fs.find(full)
    except FileNotFoundError:
        return []
    root = reader.root.rstrip("/") + "/"
    return [path[len(root) :] if path.startswith(root) else path for path in found]


def _check_shard_orphans(
    reader: DatasetReader, shard: int, referenced: set[str], section: IntegritySection
) -> None:
    """Files in a committed shard's folder that none of its part's rows point to."""
    for path in _list_files(reader, layout.image_dir(shard)):
        if path not in referenced:
            section.orphan_files.add(path)


def _check_other_folders(
    reader: DatasetReader,
    committed: set[int],
    status: str | None,
    section: IntegritySection,
) -> None:
    """Files under images/ outside every committed shard's folder (listed folder by folder)."""
    images = reader.path(layout.IMAGES_DIR)
    reader.fs.invalidate_cache(images)
    try:
        entries = reader.fs.ls(images, detail=True)
    except FileNotFoundError:
        return
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry["type"] != "directory":
            section.orphan_files.add(f"{layout.IMAGES_DIR}/{name}")
            continue
        shard = int(name) if name.isdigit() else None
        if shard in committed:
            continue  # checked with its part (or its part is unreadable: reported under schema)
        leftover = shard is not None and status == "in_progress"  # a shard being generated
        finding = section.uncommitted_leftovers if leftover else section.orphan_files
        for path in _list_files(reader, f"{layout.IMAGES_DIR}/{name}"):
            finding.add(path)


def _report_duplicates(
    reader: DatasetReader, parts: list[str], tally: _IntegrityTally, section: IntegritySection
) -> None:
    hashes = np.sort(np.concatenate(tally.hashes)) if tally.hashes else np.empty(0, np.uint64)
    repeated = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    if not len(repeated):
        return
    # Rare path: re-read the ids to name the duplicates (the hashes cannot).
    seen: Counter = Counter()
    for part in parts:
        for batch in iter_part_batches(reader, part, ["image_id"]):
            ids = batch.column("image_id")
            for row in np.flatnonzero(np.isin(id_hashes(ids), repeated)):
                seen[ids[row].as_py()] += 1
    for image_id, times in sorted(seen.items()):
        if times > 1:
            section.duplicate_image_ids.add(f"{image_id} appears {times} times")


def _check_counts(
    info: DatasetInfo | None,
    tally: _IntegrityTally,
    n_parts: int,
    identities: Identities | None,
    section: IntegritySection,
) -> None:
    if info is None:
        return
    counts = info.counts
    measured = {
        "images": tally.rows,
        "accepted": tally.accepted,
        "rejected": tally.rejected,
        "committed_shards": n_parts,
    }
    if identities is not None:
        measured["identities"] = len(identities)
    for name, value in measured.items():
        stated = getattr(counts, name)
        if stated != value:
            section.count_mismatches.add(
                f"dataset.json counts.{name}={stated}, manifest has {value}"
            )
    if counts.reject_reasons and dict(counts.reject_reasons) != dict(tally.reasons):
        section.count_mismatches.add(
            f"dataset.json reject_reasons={dict(counts.reject_reasons)}, manifest has "
            f"{dict(tally.reasons)}"
        )
    if info.status == "complete" and counts.shards != n_parts:
        section.count_mismatches.add(
            f"dataset is complete with {counts.shards} shards but {n_parts} parts are committed"
        )


def _check_identity_table(identities: Identities, section: IntegritySection) -> None:
    if not np.array_equal(identities.labels, np.arange(len(identities))):
        section.identity_table.add("identities.parquet labels are not 0..N-1 in row order")
    if pc.count_distinct(identities.ids).as_py() != len(identities):
        section.identity_table.add("identities.parquet repeats an identity_id")


def check_integrity(
    reader: DatasetReader,
    info: DatasetInfo | None,
    parts: list[str],
    identities: Identities | None,
    all_parts: list[str],
    verify_files: bool = True,
) -> IntegritySection:
    """Rows, files, orphans, duplicates and counts; streams one batch at a time."""
    section = IntegritySection(parts=len(all_parts))
    tally = _IntegrityTally()
    if identities is not None:
        _check_identity_table(identities, section)
    with ThreadPoolExecutor(FILE_CHECK_THREADS, thread_name_prefix="audit-files") as pool:
        for part in parts:
            shard = layout.shard_of_part(part)
            part_paths: set[str] = set()  # bounded by one shard's rows
            for batch in iter_part_batches(reader, part, INTEGRITY_COLUMNS):
                _check_rows(batch, shard, identities, section, tally)
                if verify_files:
                    part_paths |= _check_files(reader, batch, section, pool)
            if verify_files and shard is not None:
                _check_shard_orphans(reader, shard, part_paths, section)
    if verify_files:
        committed = {layout.shard_of_part(part) for part in all_parts}
        _check_other_folders(reader, committed, info.status if info else None, section)
    _report_duplicates(reader, parts, tally, section)
    _check_counts(info, tally, len(all_parts), identities, section)
    section.rows = tally.rows
    section.ok = not any(True for _ in section.failures())
    return section


# --- quality ----------------------------------------------------------------------------------


@dataclass
class PlotData:
    """What the HTML report draws that is not in report.json (bounded samples)."""

    yaw_pairs: np.ndarray = field(default_factory=lambda: np.empty((0, 2), np.float32))
    accept_rates: np.ndarray = field(default_factory=lambda: np.empty(0))
    contact_sheet: dict[str, list[str]] = field(default_factory=dict)  # identity -> paths


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
    yaw_pairs: list[np.ndarray] = field(default_factory=list)
    yaw_kept: int = 0

    def __post_init__(self) -> None:
        self.sums = np.zeros((self.n, EMBEDDING_DIM), np.float64)
        self.accepted = np.zeros(self.n, np.int64)
        self.total = np.zeros(self.n, np.int64)


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


def _accumulate_yaw(
    batch: pa.RecordBatch, acc: _QualityAccumulator, rng: np.random.Generator
) -> None:
    requested = batch.column("pose_yaw").to_numpy(zero_copy_only=False)
    measured = batch.column("measured_yaw").to_numpy(zero_copy_only=False)
    both = ~(np.isnan(requested.astype(float)) | np.isnan(measured.astype(float)))
    if not both.any():
        return
    requested, measured = requested[both].astype(float), measured[both].astype(float)
    error = measured - requested
    acc.yaw_count += len(error)
    acc.yaw_abs_sum += float(np.abs(error).sum())
    acc.yaw_sq_sum += float((error**2).sum())
    acc.yaw_max_abs = max(acc.yaw_max_abs, float(np.abs(error).max()))
    pairs = np.stack([requested, measured], axis=1).astype(np.float32)
    keep = min(len(pairs), SCATTER_POINTS // 4)
    acc.yaw_pairs.append(pairs[rng.choice(len(pairs), keep, replace=False)])
    acc.yaw_kept += keep
    if acc.yaw_kept > 2 * SCATTER_POINTS:  # keep the sample bounded
        merged = np.concatenate(acc.yaw_pairs)
        acc.yaw_pairs = [merged[rng.choice(len(merged), SCATTER_POINTS, replace=False)]]
        acc.yaw_kept = SCATTER_POINTS


def _first_pass(
    reader: DatasetReader, parts: list[str], identities: Identities, seed: int
) -> _QualityAccumulator:
    acc = _QualityAccumulator(len(identities))
    rng = np.random.default_rng(seed)
    for part in parts:
        for batch in iter_part_batches(reader, part, QUALITY_COLUMNS):
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
    centres: np.ndarray, block_rows: int | None = None
) -> tuple[float | None, tuple[int, int] | None, np.ndarray]:
    """(max off-diagonal cosine, its pair, histogram over COSINE_BINS of i<j cosines).

    Row blocks of the upper triangle only, sized to BLOCK_ELEMENTS: memory stays
    bounded however many identities there are.
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
) -> tuple[int, float]:
    """Distances to centres, near-duplicates, contact-sheet paths, reverify sample."""
    within, min_cos, ordinal = 0, np.inf, 0
    wanted = set(sample.ordinals.tolist())
    contact_ids = set(identities.ids[:contact_identities].to_pylist())
    for part in parts:
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
) -> tuple[QualitySection, PlotData, list[dict], np.ndarray]:
    """Quality metrics from stored embeddings; returns (section, plot data, reverify rows, centres)."""
    if not 0.0 < radius < 2.0:
        raise AuditError(f"radius {radius} is not a cosine distance in (0, 2): pass e.g. 0.3")
    acc = _first_pass(reader, parts, identities, sample_seed)
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
    _fill_accept_rates(quality, acc, identities)
    _fill_yaw(quality, acc)
    plots = PlotData(
        yaw_pairs=np.concatenate(acc.yaw_pairs) if acc.yaw_pairs else PlotData().yaw_pairs,
        accept_rates=np.divide(acc.accepted, np.maximum(acc.total, 1))[acc.total > 0],
    )
    valid_centres = centres[has_centre]
    if len(valid_centres):
        balls = greedy_ball_count(valid_centres, radius)
        quality.unique_balls = balls
        quality.uniqueness = balls / len(valid_centres)
        best, pair, counts = inter_class_stats(valid_centres)
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
                                   sample, contact_identities, contact_images)  # fmt: skip
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


# --- leakage ----------------------------------------------------------------------------------


def _open_gallery(gallery: str, storage_options: dict | None) -> pq.ParquetFile:
    fs, path = fsspec.core.url_to_fs(str(gallery), **(storage_options or {}))
    try:
        parquet = pq.ParquetFile(fs.open(path, "rb"))
    except FileNotFoundError:
        raise AuditError(
            f"gallery {gallery} not found: pass a Parquet file of embeddings"
        ) from None
    except (pa.ArrowException, OSError) as error:
        raise AuditError(
            f"gallery {gallery} is not a readable Parquet file ({error}): fix the path"
        ) from None
    if "embedding" not in parquet.schema_arrow.names:
        raise AuditError(
            f"gallery {gallery} has no 'embedding' column: write one list<float32> column of 512 values"
        )
    return parquet


def check_leakage(
    centres: np.ndarray,
    has_centre: np.ndarray,
    identities: Identities,
    gallery: str,
    threshold: float,
    storage_options: dict | None = None,
    gallery_rows: int = 4096,
    centre_rows: int = 8192,
) -> LeakageSection:
    """Max cosine of each identity centre to a gallery of real-person embeddings (chunked)."""
    parquet = _open_gallery(gallery, storage_options)
    columns = ["embedding"] + (["id"] if "id" in parquet.schema_arrow.names else [])
    best = np.full(len(centres), -np.inf, np.float32)
    best_id = np.full(len(centres), "", dtype=object)
    seen = 0
    for batch in parquet.iter_batches(batch_size=gallery_rows, columns=columns):
        column = batch.column("embedding")
        if column.null_count:
            raise AuditError(f"gallery {gallery} has null embeddings: drop those rows")
        flat = column.flatten().to_numpy(zero_copy_only=False)
        if len(flat) != batch.num_rows * EMBEDDING_DIM:
            raise AuditError(
                f"gallery {gallery} embeddings are not {EMBEDDING_DIM}-d: use ArcFace embeddings"
            )
        embeddings = normalise_rows(np.asarray(flat, np.float32).reshape(-1, EMBEDDING_DIM))
        names = batch.column("id").cast(pa.string()).to_pylist() if "id" in columns else None
        for start in range(0, len(centres), centre_rows):
            sims = centres[start : start + centre_rows] @ embeddings.T
            arg = sims.argmax(axis=1)
            top = sims[np.arange(len(arg)), arg]
            better = top > best[start : start + len(arg)]
            rows = np.flatnonzero(better) + start
            best[rows] = top[better]
            best_id[rows] = [names[i] if names else str(seen + i) for i in arg[better].tolist()]
        seen += batch.num_rows
    section = LeakageSection(gallery=str(gallery), threshold=threshold, gallery_size=seen)
    scored = has_centre & np.isfinite(best)
    if scored.any():
        section.max_cosine = float(best[scored].max())
    for row in np.flatnonzero(scored & (best > threshold)):
        section.flagged.append(
            LeakFlag(
                identity_id=identities.ids[int(row)].as_py(),
                cosine=float(best[row]),
                gallery_id=str(best_id[row]),
            )
        )
    section.flagged.sort(key=lambda flag: -flag.cosine)
    return section


# --- reverify -----------------------------------------------------------------------------------


def reverify_rows(
    reader: DatasetReader,
    rows: list[dict],
    identities: Identities,
    models_dir: str | Path,
    requested: int,
    det_size: int = 640,
    det_thresh: float = 0.5,
    similarity_tolerance: float = 0.05,
    embedding_min_cosine: float = 0.95,
) -> ReverifySection:
    """Re-run face analysis on sampled images and compare with the stored analysis.

    The job verifies the decoded stored file with the same detection settings, so a
    faithful dataset matches up to float noise across machines; tolerances absorb that.
    """
    from arc2face_engine.face_analysis import FaceAnalyzer

    analyzer = FaceAnalyzer.from_models_dir(models_dir, det_size=det_size, det_thresh=det_thresh)
    section = ReverifySection(
        requested=requested,
        similarity_tolerance=similarity_tolerance,
        embedding_min_cosine=embedding_min_cosine,
    )
    known = {identity: i for i, identity in enumerate(identities.ids.to_pylist())}
    for row in rows:
        try:
            image = decode_image(reader.read_image_bytes(row["path"]))
        except Exception:
            section.mismatches.append(
                ReverifyMismatch(image_id=row["image_id"], check="unreadable")
            )
            continue
        record = analyzer.analyze([image])[0]
        section.checked += 1
        section.mismatches.extend(
            _compare(
                row,
                record,
                identities.embeddings[known[row["identity_id"]]],
                similarity_tolerance,
                embedding_min_cosine,
            )
        )
    return section


def _compare(
    row: dict, record, identity_embedding: np.ndarray, similarity_tolerance: float,
    embedding_min_cosine: float,
) -> list[ReverifyMismatch]:  # fmt: skip
    image_id = row["image_id"]
    found = []
    if record.face_count != row["face_count"]:
        found.append(ReverifyMismatch(image_id=image_id, check="face_count",
                                      stored=row["face_count"], measured=record.face_count))  # fmt: skip
    if record.embedding is None or row["face_embedding"] is None:
        return found
    measured = np.asarray(record.embedding, np.float32)
    measured = measured / max(float(np.linalg.norm(measured)), 1e-12)
    stored = np.asarray(row["face_embedding"], np.float32)
    agreement = float(measured @ (stored / max(float(np.linalg.norm(stored)), 1e-12)))
    if agreement < embedding_min_cosine:
        found.append(ReverifyMismatch(image_id=image_id, check="embedding", stored=1.0,
                                      measured=agreement))  # fmt: skip
    similarity = float(measured @ identity_embedding)
    if row["similarity"] is not None and abs(similarity - row["similarity"]) > similarity_tolerance:
        found.append(ReverifyMismatch(image_id=image_id, check="similarity",
                                      stored=row["similarity"], measured=similarity))  # fmt: skip
    return found


# --- the audit ------------------------------------------------------------------------------------


def _read_info(reader: DatasetReader, report: AuditReport) -> DatasetInfo | None:
    try:
        return reader.info()
    except (ValidationError, ValueError) as error:
        if isinstance(error, UserError):
            raise
        report.integrity.count_mismatches.add(
            f"dataset.json is unreadable: {str(error).splitlines()[0]}"
        )
        return None


def _collect_problems(report: AuditReport) -> None:
    for check in report.schemas.files:
        report.problems.extend(f"schema: {check.file}: {error}" for error in check.errors)
    for name, finding in report.integrity.failures():
        shown = "; ".join(finding.examples[:3])
        report.problems.append(f"integrity: {name} x{finding.count}: {shown}")
    if report.integrity.uncommitted_leftovers.count:
        report.warnings.append(
            f"integrity: {report.integrity.uncommitted_leftovers.count} files of uncommitted shards"
        )
    quality = report.quality
    if quality is not None and quality.near_duplicates.count:
        report.warnings.append(f"quality: {quality.near_duplicates.count} near-duplicate pairs")
    if quality is not None:
        report.warnings.extend(_separation_warnings(quality))
    if report.leakage is not None and report.leakage.flagged:
        report.warnings.append(
            f"leakage: {len(report.leakage.flagged)} identities above cosine "
            f"{report.leakage.threshold} to the gallery"
        )
    if report.reverify is not None and report.reverify.mismatches:
        report.warnings.append(f"reverify: {len(report.reverify.mismatches)} mismatches")
    report.passed = report.schemas.ok and report.integrity.ok


def _separation_warnings(quality: QualitySection) -> list[str]:
    """Identities that collapse together at the audit's radius (warnings, not failures)."""
    warnings = []
    threshold = 1.0 - quality.radius
    if quality.uniqueness is not None and quality.uniqueness < 1.0:
        inside = quality.identities_with_accepted - quality.unique_balls
        warnings.append(
            f"quality: uniqueness {quality.uniqueness:.3f}: {inside} of "
            f"{quality.identities_with_accepted} identity centres fall inside another "
            f"identity's radius-{quality.radius:g} ball (cosine >= {threshold:.2f})"
        )
    best = quality.inter_class_max_cosine
    if best is not None and best > threshold:
        pair = " ~ ".join(quality.inter_class_closest_pair)
        warnings.append(
            f"quality: inter-class max cosine {best:.3f} exceeds 1 - radius = {threshold:.2f}: "
            f"{quality.inter_class_close_pairs} centre pairs above it (closest: {pair})"
        )
    return warnings


def audit_dataset(
    uri: str,
    storage_options: dict | None = None,
    gallery: str | None = None,
    gallery_threshold: float = 0.5,
    reverify: int = 0,
    models_dir: str | Path | None = None,
    radius: float = 0.3,
    sample_seed: int = 0,
    *,
    verify_files: bool = True,
    write_report: bool = True,
    reverify_det_size: int | None = None,
) -> AuditReport:
    """Audit the dataset at `uri`; writes audit/report.json and audit/report.html into it.

    `verify_files=False` skips hashing/decoding files and the orphan listing
    (row-level integrity and quality still run): for benchmarks and quick checks.
    """
    if reverify and models_dir is None:
        raise AuditError("--reverify needs the models directory: pass --models DIR")
    reader = DatasetReader(uri, storage_options)
    report = AuditReport(uri=str(uri), created_at=dt.datetime.now(dt.timezone.utc).isoformat())
    info = _read_info(reader, report)
    report.dataset_status = info.status if info else None
    report.schemas, parts = check_schemas(reader)
    identities = load_identities(reader) if report.schemas.files[0].ok else None
    all_parts = reader.manifest_parts()
    report.integrity = check_integrity(reader, info, parts, identities, all_parts, verify_files)
    plots = PlotData()
    if identities is not None:
        report.quality, plots, sample_rows, centres = measure_quality(
            reader, parts, identities, radius, reverify, sample_seed
        )
        has_centre = np.linalg.norm(centres, axis=1) > 0
        if gallery:
            report.leakage = check_leakage(
                centres, has_centre, identities, gallery, gallery_threshold, storage_options
            )
        if reverify:
            det_size, det_thresh = _reverify_detection(info, reverify_det_size)
            report.reverify = reverify_rows(
                reader, sample_rows, identities, models_dir, reverify, det_size, det_thresh
            )
    _collect_problems(report)
    if write_report:
        write_audit_report(reader, report, plots)
    return report


def _reverify_detection(info, det_size: int | None) -> tuple[int, float]:
    """Detect as the job that made the dataset did (from its recorded spec)."""
    from arc2face_engine.face_analysis import detection_settings

    try:
        generation, filters = info.spec["generation"], info.spec["filter"]
        size, thresh = detection_settings(
            generation["height"], generation["width"], filters["min_det_score"]
        )
    except (AttributeError, KeyError, TypeError):  # no usable spec recorded
        size, thresh = 640, 0.5
    return det_size or size, thresh


def write_audit_report(reader: DatasetReader, report: AuditReport, plots: PlotData) -> None:
    """audit/report.json and the self-contained audit/report.html, through fsspec."""
    from arc2face_engine.dataset.report_html import render_html

    json_path = reader.path(layout.AUDIT_REPORT_JSON)
    html_path = reader.path(layout.AUDIT_REPORT_HTML)
    report.report_uri = _as_uri(reader, json_path)
    report.html_uri = _as_uri(reader, html_path)
    reader.fs.makedirs(reader.path(layout.AUDIT_DIR), exist_ok=True)
    html = render_html(report, plots, reader)
    reader.fs.pipe_file(json_path, report.model_dump_json(indent=2).encode())
    reader.fs.pipe_file(html_path, html.encode())


def _as_uri(reader: DatasetReader, path: str) -> str:
    protocol = reader.fs.protocol if isinstance(reader.fs.protocol, str) else reader.fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def load_report(uri: str, storage_options: dict | None = None) -> AuditReport:
    """Read back audit/report.json of a dataset."""
    reader = DatasetReader(uri, storage_options)
    return AuditReport.model_validate(
        json.loads(reader.fs.cat_file(reader.path(layout.AUDIT_REPORT_JSON)))
    )
