"""The audit itself: run every check, collect problems and warnings, write the reports."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from arc2face_engine import stopping
from arc2face_engine.audit.checksums import verify_identities, verify_parts
from arc2face_engine.audit.composition import (
    AUDIT_IDENTITIES,
    DEFAULT_GAP_THRESHOLD,
    composition_warnings,
    measure_composition,
)
from arc2face_engine.audit.html import render_html
from arc2face_engine.audit.identities import Identities, load_identities
from arc2face_engine.audit.integrity import check_integrity
from arc2face_engine.audit.leakage import check_leakage, gallery_readable
from arc2face_engine.audit.quality import measure_quality
from arc2face_engine.audit.report import (
    AuditError,
    AuditReport,
    LeakageSection,
    PlotData,
    QualitySection,
)
from arc2face_engine.audit.reverify import reverify_models, reverify_rows
from arc2face_engine.audit.schema import check_schemas, read_dataset_info
from arc2face_engine.dataset import layout
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.progress import ProgressReport, no_progress

LEASE_FILE = getattr(layout, "LEASE_FILE", ".writer-lease.json")
MAX_LEASE_BYTES = 1 << 16
DEFAULT_LEAK_THRESHOLD = 0.5


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
    if report.composition is not None:
        report.warnings.extend(composition_warnings(report.composition))
    if report.reverify is not None and report.reverify.mismatches:
        report.warnings.append(f"reverify: {len(report.reverify.mismatches)} mismatches")
    if report.in_progress:
        report.warnings.insert(0, f"dataset in progress: {report.in_progress_reason}; "
                                  "counts are not compared until it is complete")
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


@dataclass
class AuditRun:
    """What one audit produced: the report, its plot data and, for comparisons, the identity
    centres it measured (rows of identities.parquet; zero rows: no accepted image)."""

    report: AuditReport
    plots: PlotData
    identities: Identities | None = None
    centres: np.ndarray | None = None
    parts: list[str] = field(default_factory=list)  # the parts the quality pass read


def audit_dataset(
    uri: str,
    storage_options: dict | None = None,
    gallery: str | None = None,
    gallery_threshold: float | None = None,
    reverify: int = 0,
    models_dir: str | Path | None = None,
    radius: float = 0.3,
    sample_seed: int = 0,
    **options,
) -> AuditReport:
    """Audit the dataset at `uri`; writes audit/report.json and audit/report.html into it.
    Options and keyword-only settings as `run_audit`."""
    return run_audit(
        uri, storage_options, gallery, gallery_threshold, reverify, models_dir, radius,
        sample_seed, **options,
    ).report  # fmt: skip


def run_audit(
    uri: str,
    storage_options: dict | None = None,
    gallery: str | None = None,
    gallery_threshold: float | None = None,
    reverify: int = 0,
    models_dir: str | Path | None = None,
    radius: float = 0.3,
    sample_seed: int = 0,
    *,
    verify_files: bool = True,
    write_report: bool = True,
    reverify_det_size: int | None = None,
    progress: ProgressReport = no_progress,
    fairness_gap: float = DEFAULT_GAP_THRESHOLD,
) -> AuditRun:
    """Audit the dataset at `uri`; writes audit/report.json and audit/report.html into it
    unless `write_report` is false.

    `gallery`/`gallery_threshold` default to the spec's `identities.exclusion`
    (gallery used when readable; threshold `max_cosine`, else 0.5).
    `verify_files=False` skips hashing/decoding files and the orphan listing
    (row-level integrity and quality still run): for benchmarks and quick checks.
    `fairness_gap`: a metric differing by more than this between groups is a warning.
    """
    reader = DatasetReader(uri, storage_options)
    report = AuditReport(uri=str(uri), created_at=dt.datetime.now(dt.timezone.utc).isoformat())
    integrity = report.integrity  # findings about dataset.json stay: check_integrity adds to it
    info, raw = read_dataset_info(reader, integrity)
    if reverify:  # before the long checks: a missing models folder is one line
        local_root = reader.root if reader.local else None
        models_dir, models_from = reverify_models(models_dir, (raw or {}).get("spec"), local_root)
    report.dataset_status = info.status if info else _raw_status(raw)
    report.in_progress_reason = in_progress_reason(reader, report.dataset_status)
    report.in_progress = report.in_progress_reason is not None
    report.schemas, parts = check_schemas(reader)
    all_parts = reader.manifest_parts()
    parts = verify_parts(reader, parts, integrity, _stage(progress, "checksums", len(parts)))
    identities = _identities(reader, report, raw)
    stream = _stage(progress, "integrity", len(parts))
    report.integrity, parts = check_integrity(
        reader, info, parts, identities, all_parts, verify_files, integrity,
        in_progress=report.in_progress, progress=stream,
    )  # fmt: skip
    plots, centres, identity_table = PlotData(), None, None
    if identities is not None:
        stream = _stage(progress, "quality", 2 * len(parts))
        report.quality, plots, sample_rows, centres = measure_quality(
            reader, parts, identities, radius, reverify, sample_seed, progress=stream
        )
        has_centre = np.linalg.norm(centres, axis=1) > 0
        report.leakage = _leakage(report, raw, identities, centres, has_centre, gallery,
                                  gallery_threshold, storage_options)  # fmt: skip
        report.composition, identity_table = measure_composition(
            reader, parts, identities, plots.nearest_other, raw, fairness_gap
        )
        plots.intra_class = identity_table.column("intra_class_cosine").to_numpy(
            zero_copy_only=False
        ).astype(float)
        if reverify:
            det_size, det_thresh = _reverify_detection(info, reverify_det_size)
            report.reverify = reverify_rows(
                reader, sample_rows, identities, models_dir, reverify, det_size, det_thresh
            )
            report.reverify.models_dir, report.reverify.models_from = str(models_dir), models_from
    _collect_problems(report)
    if write_report:
        with stopping.critical():  # Ctrl-C waits for every file: no half-written report
            write_audit_report(reader, report, plots, identity_table)
    return AuditRun(report, plots, identities, centres, parts)


def _leakage(
    report: AuditReport, raw: dict | None, identities: Identities, centres: np.ndarray,
    has_centre: np.ndarray, gallery: str | None, threshold: float | None,
    storage_options: dict | None,
) -> LeakageSection | None:  # fmt: skip
    """The leakage check against the given gallery, else the spec's (when usable)."""
    used, threshold = _leakage_settings(raw, gallery, threshold, storage_options, report)
    if not used:
        return None
    try:
        return check_leakage(centres, has_centre, identities, used, threshold, storage_options)
    except AuditError as error:
        if gallery:  # the user's gallery: their error to fix
            raise
        # the dataset named it: a bad file there must not stop the audit
        report.warnings.append(f"leakage: the spec's exclusion gallery is unusable: {error}")
        return None


def _stage(progress: ProgressReport, stage: str, total: int) -> Callable[[int], None]:
    """A per-unit callback that reports `stage` advancing to `total`."""
    done = [0]
    progress(stage, 0, total)

    def advance(units: int) -> None:
        done[0] += units
        progress(stage, done[0], total)

    return advance


def _raw_status(raw: dict | None) -> str | None:
    status = raw.get("status") if raw else None
    return status if isinstance(status, str) else None


def in_progress_reason(reader: DatasetReader, status: str | None) -> str | None:
    """Why the dataset counts as still being written (None when it does not)."""
    if status == "in_progress":
        return "dataset.json status is in_progress"
    lease = lease_state(reader)
    if lease is not None:
        return lease
    return None


def lease_state(reader: DatasetReader) -> str | None:
    """'writer lease held by ... until ...' when a live writer lease exists, else None.

    A lease whose expiry has passed belongs to a killed run: not live. A lease that
    cannot be read is taken as live (a writer may be replacing it right now).
    """
    if not reader.exists(LEASE_FILE):
        return None
    try:
        with reader.open(LEASE_FILE) as handle:
            lease = json.loads(handle.read(MAX_LEASE_BYTES))
        expires = _expiry(lease.get("expires_at", lease.get("expires")))
    except (ValueError, AttributeError, OSError, OverflowError, TypeError):
        return f"{LEASE_FILE} present (unreadable)"
    if expires is not None and expires < dt.datetime.now(dt.timezone.utc):
        return None
    owner = lease.get("owner", lease.get("holder", "unknown"))
    return f"writer lease held by {owner}"


def _expiry(value: object) -> dt.datetime | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return dt.datetime.fromtimestamp(value, dt.timezone.utc)
    if isinstance(value, str):
        when = dt.datetime.fromisoformat(value)
        return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
    return None


def _identities(reader: DatasetReader, report: AuditReport, raw: dict | None) -> Identities | None:
    """identities.parquet when its schema and recorded checksum hold and it reads through."""
    if not report.schemas.files[0].ok:
        return None
    recorded = raw.get("identities_sha256") if raw else None
    if not verify_identities(reader, recorded, report.integrity):
        return None
    try:
        return load_identities(reader)
    except (pa.ArrowException, OSError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        report.integrity.identity_table.add(f"identities.parquet does not read through: {first}")
        return None


def _leakage_settings(
    raw: dict | None,
    gallery: str | None,
    threshold: float | None,
    storage_options: dict | None,
    report: AuditReport,
) -> tuple[str | None, float]:
    """The gallery and threshold: given ones first, then the spec's identities.exclusion."""
    exclusion = _spec_exclusion(raw)
    if threshold is None:
        threshold = exclusion.get("max_cosine", DEFAULT_LEAK_THRESHOLD)
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
            threshold = DEFAULT_LEAK_THRESHOLD
    if gallery is None and isinstance(exclusion.get("gallery"), str):
        spec_gallery = exclusion["gallery"]
        if gallery_readable(spec_gallery, storage_options):
            gallery = spec_gallery
        else:
            report.warnings.append(
                f"leakage: the spec's exclusion gallery {spec_gallery} is not readable here; "
                "pass --gallery to check leakage"
            )
    return gallery, float(threshold)


def _spec_exclusion(raw: dict | None) -> dict:
    try:
        exclusion = raw["spec"]["identities"]["exclusion"]
    except (KeyError, TypeError):
        return {}
    return exclusion if isinstance(exclusion, dict) else {}


def _reverify_detection(info, det_size: int | None) -> tuple[int, float]:
    """Detect as the job that made the dataset did (from its recorded spec)."""
    from arc2face_engine.faces.pack import detection_settings

    try:
        generation, filters = info.spec["generation"], info.spec["filter"]
        size, thresh = detection_settings(
            generation["height"], generation["width"], filters["min_det_score"]
        )
    except (AttributeError, KeyError, TypeError):  # no usable spec recorded
        size, thresh = 640, 0.5
    return det_size or size, thresh


def write_audit_report(
    reader: DatasetReader, report: AuditReport, plots: PlotData, identity_table=None
) -> None:
    """audit/report.json, the self-contained audit/report.html and (with the composition
    section) audit/identities.parquet, through fsspec."""
    json_path = reader.path(layout.AUDIT_REPORT_JSON)
    html_path = reader.path(layout.AUDIT_REPORT_HTML)
    report.report_uri = _as_uri(reader, json_path)
    report.html_uri = _as_uri(reader, html_path)
    reader.fs.makedirs(reader.path(layout.AUDIT_DIR), exist_ok=True)
    html = render_html(report, plots, reader)
    reader.fs.pipe_file(json_path, report.model_dump_json(indent=2).encode())
    reader.fs.pipe_file(html_path, html.encode())
    if identity_table is not None:
        sink = pa.BufferOutputStream()
        pq.write_table(identity_table, sink)
        reader.fs.pipe_file(reader.path(AUDIT_IDENTITIES), sink.getvalue().to_pybytes())


def _as_uri(reader: DatasetReader, path: str) -> str:
    protocol = reader.fs.protocol if isinstance(reader.fs.protocol, str) else reader.fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def load_report(uri: str, storage_options: dict | None = None) -> AuditReport:
    """Read back audit/report.json of a dataset."""
    reader = DatasetReader(uri, storage_options)
    return AuditReport.model_validate(
        json.loads(reader.fs.cat_file(reader.path(layout.AUDIT_REPORT_JSON)))
    )
