"""Compare datasets side by side (`arc2face-synth compare DS DS [DS ...] --out DIR`).

Each dataset is audited as `audit` does (schema, checksums, integrity, the quality
metrics: images, identities, accept rate, uniqueness, intra-class consistency,
inter-class separation, near-duplicates, pose and expression coverage, and whatever the
audit reports besides), without writing into it; one more streamed pass adds what a
comparison needs and a single audit does not: accepted images per identity, the
measured head-pose distribution (imported datasets have no requested poses) and the
images of the identities shown in contact sheets.

Cross-dataset identity overlap, for each pair of datasets: the identities of one whose
centre lies within the audit's radius (cosine distance) of an identity centre of the
other. The search is exact and blocked (identities.neighbours.mutual_max_cosine: one
pass over bounded blocks gives both directions), so memory is the centres plus one
block, however many identities there are; each identity is paired with its nearest.

compare.json (CompareReport) and compare.html (plots overlaid, contact sheets of the
closest pairs) are written to --out, a local folder or fsspec URI.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from arc2face_engine.audit.compare_html import render_compare_html
from arc2face_engine.audit.compare_report import (
    CONTACT_PAIRS,
    MAX_LISTED_PAIRS,
    CompareReport,
    DatasetComparison,
    ImagesPerIdentity,
    OverlapPair,
    PairOverlap,
)
from arc2face_engine.audit.identities import Identities
from arc2face_engine.audit.report import AuditError, Histogram
from arc2face_engine.audit.run import AuditRun, run_audit
from arc2face_engine.audit.schema import iter_part_batches
from arc2face_engine.dataset import layout
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.progress import ProgressReport, no_progress
from schemas.errors import UserError
from schemas.tables import DatasetInfo

COMPARE_JSON = "compare.json"
COMPARE_HTML = "compare.html"
CONTACT_IMAGES = 4  # images per identity in a contact sheet
POSE_BINS = np.linspace(-90.0, 90.0, 37)
PROFILE_COLUMNS = ["identity_id", "accepted", "measured_yaw", "measured_pitch", "path"]


@dataclass
class _Measured:
    """A dataset audited, with what the overlap search and the profile pass need."""

    reader: DatasetReader
    info: DatasetInfo | None
    run: AuditRun
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # with a centre

    @property
    def centres(self) -> np.ndarray:
        return self.run.centres[self.rows]

    def ids(self, rows: np.ndarray) -> list[str]:
        identities: Identities = self.run.identities
        return [identities.ids[int(self.rows[row])].as_py() for row in rows.tolist()]


def _measure(
    uri: str, storage_options: dict | None, radius: float, verify_files: bool,
    progress: ProgressReport,
) -> _Measured:  # fmt: skip
    reader = DatasetReader(uri, storage_options)
    run = run_audit(uri, storage_options, radius=radius, verify_files=verify_files,
                    write_report=False, progress=progress)  # fmt: skip
    try:
        info = reader.info()
    except UserError:  # a damaged dataset.json is the audit's finding, already reported
        info = None
    measured = _Measured(reader, info, run)
    if run.centres is not None:
        measured.rows = np.flatnonzero(np.linalg.norm(run.centres, axis=1) > 0)
    return measured


def _origin(info: DatasetInfo | None) -> str:
    if info is None:
        return "unknown (dataset.json unreadable)"
    if info.imported is not None:
        return f"imported ({info.imported.format}) from {info.imported.source_uri}"
    return "generated"


def overlap(
    first: _Measured, second: _Measured, threshold: float, device: str = "cpu"
) -> PairOverlap:
    """Identities of each dataset within `threshold` cosine of the other's (exact), searched
    on `device` (auto: a GPU when there is one)."""
    import torch

    from arc2face_engine.generation.devices import resolve_device
    from arc2face_engine.identities.neighbours import mutual_max_cosine

    where = resolve_device(device)
    result = PairOverlap(first=0, second=0, threshold=threshold,
                         first_identities=len(first.rows), second_identities=len(second.rows))  # fmt: skip
    if not len(first.rows) or not len(second.rows):
        return result
    best_a, index_a, best_b, index_b = (
        tensor.cpu().numpy()
        for tensor in mutual_max_cosine(
            torch.from_numpy(np.ascontiguousarray(first.centres)).to(where),
            torch.from_numpy(np.ascontiguousarray(second.centres)).to(where),
        )
    )
    result.max_cosine = float(best_a.max())
    near_a, near_b = np.flatnonzero(best_a >= threshold), np.flatnonzero(best_b >= threshold)
    result.first_within, result.second_within = len(near_a), len(near_b)
    pairs = {(int(a), int(index_a[a])): float(best_a[a]) for a in near_a.tolist()}
    pairs.update({(int(index_b[b]), int(b)): float(best_b[b]) for b in near_b.tolist()})
    result.pair_count = len(pairs)
    ranked = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:MAX_LISTED_PAIRS]
    if ranked:
        a_ids = first.ids(np.array([a for (a, _), _ in ranked]))
        b_ids = second.ids(np.array([b for (_, b), _ in ranked]))
        result.pairs = [
            OverlapPair(first_id=a, second_id=b, cosine=cosine)
            for a, b, (_, cosine) in zip(a_ids, b_ids, ranked, strict=True)
        ]
    return result


@dataclass
class _Profile:
    per_identity: np.ndarray
    yaw: np.ndarray
    pitch: np.ndarray
    contact: dict[str, list[str]]


def _profile(measured: _Measured, wanted: set[str]) -> _Profile:
    """One streamed pass: accepted images per identity, measured pose histograms, and up
    to CONTACT_IMAGES image paths of each wanted identity."""
    identities = measured.run.identities
    count = len(identities) if identities is not None else 0
    profile = _Profile(np.zeros(count, np.int64), np.zeros(len(POSE_BINS) - 1, np.int64),
                       np.zeros(len(POSE_BINS) - 1, np.int64), {})  # fmt: skip
    for part in measured.run.parts:
        for batch in iter_part_batches(measured.reader, part, PROFILE_COLUMNS):
            accepted = batch.column("accepted").to_numpy(zero_copy_only=False)
            if identities is not None:
                index = identities.index_of(batch.column("identity_id"))
                profile.per_identity += np.bincount(index[(index >= 0) & accepted], minlength=count)
            for column, histogram in (("measured_yaw", profile.yaw), ("measured_pitch", profile.pitch)):
                values = batch.column(column).to_numpy(zero_copy_only=False).astype(float)
                chosen = np.clip(values[accepted & ~np.isnan(values)], POSE_BINS[0], POSE_BINS[-1])
                histogram += np.histogram(chosen, POSE_BINS)[0]
            if wanted:
                _contact_paths(batch, accepted, wanted, profile.contact)
    return profile


def _contact_paths(
    batch: pa.RecordBatch, accepted: np.ndarray, wanted: set[str], into: dict[str, list[str]]
) -> None:
    ids, paths = batch.column("identity_id").to_pylist(), batch.column("path").to_pylist()
    for row in np.flatnonzero(accepted).tolist():
        if ids[row] in wanted and paths[row] is not None:
            sheet = into.setdefault(ids[row], [])
            if len(sheet) < CONTACT_IMAGES:
                sheet.append(paths[row])


def _per_identity(counts: np.ndarray) -> ImagesPerIdentity:
    present = counts[counts > 0]
    if not len(present):
        return ImagesPerIdentity()
    top = int(present.max())
    edges = np.unique(np.linspace(0.5, top + 0.5, min(top, 40) + 1))
    return ImagesPerIdentity(
        identities=len(present), mean=float(present.mean()), median=float(np.median(present)),
        min=int(present.min()), max=top,
        histogram=Histogram(edges=edges.tolist(), counts=np.histogram(present, edges)[0].tolist()),
    )  # fmt: skip


def _histogram(counts: np.ndarray) -> Histogram | None:
    return Histogram(edges=POSE_BINS.tolist(), counts=counts.tolist()) if counts.sum() else None


def _search_device(device: str) -> str:
    from arc2face_engine.generation.devices import resolve_device

    return str(resolve_device(device))


def _check_uris(uris: Sequence[str]) -> None:
    if len(uris) < 2:
        raise AuditError("compare needs at least two datasets: pass DS DS [DS ...]")
    seen = set()
    for uri in uris:
        key = str(uri).rstrip("/")
        if key in seen:
            raise AuditError(f"dataset {uri} is given twice: pass each dataset once")
        seen.add(key)


def compare_datasets(
    uris: Sequence[str],
    out: str,
    storage_options: dict | None = None,
    radius: float = 0.3,
    *,
    verify_files: bool = False,
    out_storage_options: dict | None = None,
    device: str = "cpu",
    progress: ProgressReport = no_progress,
) -> CompareReport:
    """Audit every dataset, find the identities each pair shares, write compare.json and
    compare.html under `out`. `verify_files` also hashes and decodes every image (as
    `audit` does); the comparison itself needs only the manifests. The overlap search runs
    on `device` (cpu, cuda, auto)."""
    _check_uris(uris)
    if not 0.0 < radius < 2.0:
        raise AuditError(f"radius {radius} is not a cosine distance in (0, 2): pass e.g. 0.3")
    device = _search_device(device)  # an unknown device fails before any dataset is read
    output = _open_out(out, out_storage_options if out_storage_options is not None else storage_options)
    measured = [_measure(uri, storage_options, radius, verify_files, progress) for uri in uris]
    overlaps = []
    pairs = len(measured) * (len(measured) - 1) // 2
    progress("overlap", 0, pairs)
    for first in range(len(measured)):
        for second in range(first + 1, len(measured)):
            found = overlap(measured[first], measured[second], 1.0 - radius, device)
            found.first, found.second = first, second
            overlaps.append(found)
            progress("overlap", len(overlaps), pairs)
    wanted = _contact_identities(overlaps, len(measured))
    datasets, contacts = [], []
    for index, entry in enumerate(measured):
        progress("profile", index, len(measured))
        profile = _profile(entry, wanted[index])
        contacts.append(profile.contact)
        datasets.append(DatasetComparison(
            uri=str(uris[index]), name=entry.info.name if entry.info else None,
            origin=_origin(entry.info), audit=entry.run.report,
            images_per_identity=_per_identity(profile.per_identity),
            measured_yaw=_histogram(profile.yaw), measured_pitch=_histogram(profile.pitch),
        ))  # fmt: skip
    report = CompareReport(
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        radius=radius, datasets=datasets, overlaps=overlaps,
    )  # fmt: skip
    progress("report", 0, 1)
    _write(output, report, [entry.reader for entry in measured], contacts)
    progress("report", 1, 1)
    return report


def _contact_identities(overlaps: list[PairOverlap], count: int) -> list[set[str]]:
    wanted: list[set[str]] = [set() for _ in range(count)]
    for found in overlaps:
        for pair in found.pairs[:CONTACT_PAIRS]:
            wanted[found.first].add(pair.first_id)
            wanted[found.second].add(pair.second_id)
    return wanted


@dataclass
class _Output:
    fs: object
    root: str
    protocol: str


def _open_out(out: str, storage_options: dict | None) -> _Output:
    """The output folder, checked before any dataset is read: not a file."""
    fs, root = layout.open_dataset_fs(str(out), storage_options)
    if fs.isfile(root):
        raise AuditError(f"--out {out} is a file: pass a folder for compare.json and compare.html")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return _Output(fs, root, protocol)


def _write(
    output: _Output, report: CompareReport, readers: list[DatasetReader],
    contacts: list[dict[str, list[str]]],
) -> None:  # fmt: skip
    json_path, html_path = f"{output.root}/{COMPARE_JSON}", f"{output.root}/{COMPARE_HTML}"
    local = output.protocol in ("file", "local")
    report.report_uri = json_path if local else f"{output.protocol}://{json_path}"
    report.html_uri = html_path if local else f"{output.protocol}://{html_path}"
    output.fs.makedirs(output.root, exist_ok=True)
    page = render_compare_html(report, readers, contacts)
    output.fs.pipe_file(json_path, report.model_dump_json(indent=2).encode())
    output.fs.pipe_file(html_path, page.encode())
