"""The models of compare.json: each dataset's audit and what a comparison adds, and the
identity overlap of each pair. Both the comparison and its HTML page import this module;
it imports neither."""

from __future__ import annotations

from pydantic import BaseModel, Field

from arc2face_engine.audit.report import AuditReport, Histogram

MAX_LISTED_PAIRS = 1000  # pairs listed per dataset pair (the count is always exact)
CONTACT_PAIRS = 8  # closest pairs shown with images


class ImagesPerIdentity(BaseModel):
    """Accepted images per identity, over identities with at least one."""

    identities: int = 0
    mean: float | None = None
    median: float | None = None
    min: int | None = None
    max: int | None = None
    histogram: Histogram | None = None


class DatasetComparison(BaseModel):
    """One dataset of a comparison: its audit and what the comparison adds."""

    uri: str
    name: str | None = None
    origin: str = Field(description="generated, or imported and from which format")
    audit: AuditReport
    images_per_identity: ImagesPerIdentity = Field(default_factory=ImagesPerIdentity)
    measured_yaw: Histogram | None = Field(None, description="accepted images, degrees")
    measured_pitch: Histogram | None = Field(None, description="accepted images, degrees")


class OverlapPair(BaseModel):
    first_id: str
    second_id: str
    cosine: float


class PairOverlap(BaseModel):
    """Identities of two datasets whose centres are within the radius of each other."""

    first: int = Field(description="index of the first dataset in `datasets`")
    second: int
    threshold: float = Field(description="cosine of the audit's radius: 1 - radius")
    first_identities: int = 0  # identity centres searched
    second_identities: int = 0
    first_within: int = Field(0, description="identities of the first near one of the second")
    second_within: int = Field(0, description="identities of the second near one of the first")
    max_cosine: float | None = None
    pair_count: int = 0
    pairs: list[OverlapPair] = Field(
        default_factory=list, description=f"closest first, at most {MAX_LISTED_PAIRS}"
    )


class CompareReport(BaseModel):
    created_at: str
    radius: float
    datasets: list[DatasetComparison]
    overlaps: list[PairOverlap] = Field(default_factory=list)
    report_uri: str | None = None
    html_uri: str | None = None

    def summary_rows(self) -> list[dict]:
        """One row per dataset (scalars), for CLIs and Prefect artifacts."""
        rows = []
        for entry in self.datasets:
            quality = entry.audit.quality
            rows.append({
                "dataset": entry.name or entry.uri,
                "passed": entry.audit.passed,
                "identities": quality.identities_with_accepted if quality else None,
                "accepted": quality.accepted_images if quality else None,
                "uniqueness": quality.uniqueness if quality else None,
                "intra_class_consistency": quality.intra_class_consistency if quality else None,
                "inter_class_max_cosine": quality.inter_class_max_cosine if quality else None,
            })  # fmt: skip
        return rows
