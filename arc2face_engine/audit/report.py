"""The audit's report: pydantic models written to audit/report.json, and the plot data.

Both the checks and the HTML renderer import this module; it imports neither.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, Field

from schemas.errors import UserError

NEAR_DUPLICATE_COSINE = 0.98
MAX_EXAMPLES = 20  # examples kept per finding; counts are always exact
NOT_CHECKED = "not checked"


class AuditError(UserError, ValueError):
    """The audit cannot run with the options given (bad gallery, missing models dir...)."""



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
    dataset_json: Finding = Field(default_factory=Finding)  # unreadable or not DatasetInfo
    unsafe_paths: Finding = Field(default_factory=Finding)  # paths or ids leaving the root
    missing_checksums: Finding = Field(default_factory=Finding)  # part without .sha256
    checksum_mismatches: Finding = Field(default_factory=Finding)  # part / identities bytes
    unreadable_parts: Finding = Field(default_factory=Finding)  # footer fine, pages not

    FAILING: ClassVar[tuple[str, ...]] = (
        "dataset_json", "unsafe_paths", "missing_checksums", "checksum_mismatches",
        "unreadable_parts", "missing_files", "size_mismatches", "sha256_mismatches",
        "undecodable_images", "orphan_files", "duplicate_image_ids", "shard_mismatches", "accepted_without_file",
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


class FeatureNormStats(BaseModel):
    """Distribution of the ArcFace feature norm before normalisation (an image-quality proxy,
    as in AdaFace); quantiles come from a random sample of at most 65,536 values."""

    count: int = 0
    mean: float | None = None
    min: float | None = None
    p1: float | None = None
    p5: float | None = None
    median: float | None = None
    p95: float | None = None
    max: float | None = None
    histogram: Histogram | None = None


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
    feature_norm_accepted: FeatureNormStats | None = None  # None: no feature_norm column
    feature_norm_rejected: FeatureNormStats | None = None


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
    models_dir: str | None = None  # the models folder used
    models_from: str | None = None  # "--models", or the dataset.json models.dir it came from
    checked: int = 0
    similarity_tolerance: float
    embedding_min_cosine: float
    mismatches: list[ReverifyMismatch] = Field(default_factory=list)


class Quantiles(BaseModel):
    """A distribution over identities: how many, and its 10th, 50th and 90th percentiles."""

    count: int = 0
    p10: float | None = None
    median: float | None = None
    p90: float | None = None


class IdentityDifficulty(BaseModel):
    identity_id: str
    accepted: int
    similarity_mean: float | None
    intra_class_cosine: float | None
    yaw_spread: float | None
    pitch_spread: float | None
    expression_coverage: float | None


class DifficultySection(BaseModel):
    """Intra-class difficulty and diversity, per identity over its accepted images
    (dataset.identity_stats), summarised over identities; every identity's values are in
    audit/identities.parquet."""

    identities: int = 0
    similarity_mean: Quantiles = Field(default_factory=Quantiles)
    similarity_min: Quantiles = Field(default_factory=Quantiles)
    intra_class_cosine: Quantiles = Field(default_factory=Quantiles)
    yaw_spread: Quantiles = Field(default_factory=Quantiles)
    pitch_spread: Quantiles = Field(default_factory=Quantiles)
    expression_coverage: Quantiles = Field(default_factory=Quantiles)
    most_uniform: list[IdentityDifficulty] = Field(
        default_factory=list, description="highest intra-class cosine first: least varied"
    )


class GroupStats(BaseModel):
    """How one group (identities with one attribute value) is served."""

    group: str
    identities: int = 0
    images: int = 0
    accepted: int = 0
    accept_rate: float | None = None
    reject_reasons: dict[str, int] = Field(default_factory=dict)
    mean_similarity: float | None = None  # accepted images, to their identity
    intra_class_cosine: float | None = None  # mean over the group's identities
    nearest_other_identity: float | None = None  # mean of each identity's largest centre cosine


class GroupGap(BaseModel):
    metric: str
    gap: float
    low: str  # the group with the lowest value
    high: str
    compared: bool = Field(
        description="both groups hold at least min_group_identities identities: a gap above "
        "the threshold is then a warning (smaller groups are too noisy to warn about)"
    )


class AxisComposition(BaseModel):
    axis: str  # gender | age | skin_tone
    image_counts: dict[str, int] = Field(default_factory=dict)  # accepted images, own values
    image_shares: dict[str, float] = Field(default_factory=dict)
    images_without_value: int = 0
    identity_counts: dict[str, int] = Field(default_factory=dict)
    identity_shares: dict[str, float] = Field(default_factory=dict)
    identities_without_value: int = 0
    targets: dict[str, float] | None = None  # identities.balance, when it balanced this axis
    deviations: dict[str, float] | None = None  # identity share - target
    max_abs_deviation: float | None = None
    agreement: float | None = None  # identities whose accepted images agree with their value
    groups: list[GroupStats] = Field(default_factory=list)
    gaps: list[GroupGap] = Field(default_factory=list)


class PlacementCheck(BaseModel):
    """A balanced job's probes/manifest.parquet, checked against the spec's quotas."""

    candidates: int = 0
    kept: int = 0
    quotas_met: bool = False
    cells: dict[str, list[int]] = Field(
        default_factory=dict, description="cell -> [kept identities, quota]"
    )
    problems: list[str] = Field(default_factory=list)


class CompositionSection(BaseModel):
    """Who is in the dataset, as predicted (gender, age) and measured (skin tone, ITA) on
    its synthetic images, and how well each group is served. No ethnicity or race is
    inferred. Identities are grouped by identities.parquet's attributes (the probe's for
    a balanced job), images by their own."""

    age_edges: list[float]
    gap_threshold: float
    min_group_identities: int
    axes: list[AxisComposition] = Field(default_factory=list)
    placement: PlacementCheck | None = None
    difficulty: DifficultySection = Field(default_factory=DifficultySection)


class AuditReport(BaseModel):
    """Everything the audit found; `passed` is False when a schema or integrity check fails."""

    uri: str
    created_at: str
    passed: bool = True
    problems: list[str] = Field(default_factory=list)  # failures (schema / integrity)
    warnings: list[str] = Field(default_factory=list)  # quality, leakage, reverify flags
    dataset_status: str | None = None
    in_progress: bool = False  # dataset.json not complete, or a live writer lease
    in_progress_reason: str | None = None
    schemas: SchemaSection = Field(default_factory=SchemaSection)
    integrity: IntegritySection = Field(default_factory=IntegritySection)
    quality: QualitySection | None = None
    leakage: LeakageSection | None = None
    reverify: ReverifySection | None = None
    composition: CompositionSection | None = None
    report_uri: str | None = None
    html_uri: str | None = None

    def summary(self) -> dict[str, Any]:
        """Headline numbers (scalars only) for CLIs and Prefect artifacts."""
        quality = self.quality
        return {
            "passed": self.passed,
            "in_progress": self.in_progress,
            "problems": len(self.problems),
            "warnings": len(self.warnings),
            "rows": self.integrity.rows,
            "parts": self.integrity.parts,
            "files_checked": self.integrity.files_checked,
            "intra_class_consistency": quality.intra_class_consistency if quality else None,
            "uniqueness": quality.uniqueness if quality else None,
            "inter_class_max_cosine": quality.inter_class_max_cosine if quality else None,
            "near_duplicates": quality.near_duplicates.count if quality else None,
            # Not None: an empty cell reads as "none leaked" / "no mismatch".
            "leaked_identities": len(self.leakage.flagged) if self.leakage else NOT_CHECKED,
            "reverify_mismatches": len(self.reverify.mismatches) if self.reverify else NOT_CHECKED,
        }

    def leakage_status(self) -> str:
        """'not checked (no gallery)' when no gallery was used, else what leaked."""
        if self.leakage is None:
            return f"{NOT_CHECKED} (no gallery)"
        flagged = len(self.leakage.flagged)
        return f"{flagged} identities above cosine {self.leakage.threshold:g} to the gallery"

    def headline(self, width: int = 160) -> str:
        """One line for a console: how many warnings and the first one (cut to `width`
        characters), and whether leakage was checked."""
        count = len(self.warnings)
        warnings = "no warnings"
        if count:
            first = self.warnings[0]
            first = first if len(first) <= width else first[: width - 3] + "..."
            warnings = f"{count} warning{'s' if count > 1 else ''} (first: {first})"
        return f"{warnings}; leakage: {self.leakage_status()}"



@dataclass
class PlotData:
    """What the HTML report draws that is not in report.json (bounded samples)."""

    yaw_pairs: np.ndarray = field(default_factory=lambda: np.empty((0, 2), np.float32))
    pitch_pairs: np.ndarray = field(default_factory=lambda: np.empty((0, 2), np.float32))
    accept_rates: np.ndarray = field(default_factory=lambda: np.empty(0))
    contact_sheet: dict[str, list[str]] = field(default_factory=dict)  # identity -> paths
    # Each identity's largest centre cosine to another identity (nan: no centre), for the
    # composition section's groups; filled by the quality pass's inter-class search.
    nearest_other: np.ndarray = field(default_factory=lambda: np.empty(0))
    # Each identity's intra-class cosine (composition section), for its histogram.
    intra_class: np.ndarray = field(default_factory=lambda: np.empty(0))
