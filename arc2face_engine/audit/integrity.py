"""Integrity: rows, files (hash, size, decode), orphans, duplicates and counts.

Streams one manifest batch at a time; image ids are kept as 8-byte hashes and
files are hashed one by one on a small thread pool.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from arc2face_engine.audit.identities import Identities
from arc2face_engine.audit.report import MAX_EXAMPLES, Finding, IntegritySection
from arc2face_engine.audit.schema import iter_part_batches
from arc2face_engine.dataset import layout
from arc2face_engine.dataset.paths import UnsafePath, is_safe_name, is_safe_relative
from arc2face_engine.dataset.reader import DatasetReader
from schemas.tables import LEFT_OUT_LABEL, DatasetInfo

FILE_CHECK_THREADS = 8
INTEGRITY_COLUMNS = [
    "image_id", "identity_id", "label", "shard", "path", "sha256", "size_bytes", "accepted",
    "reject_reason",
]  # fmt: skip


def id_hashes(image_ids: pa.Array) -> np.ndarray:
    """64-bit hashes of image ids: 8 bytes per row instead of a Python set of strings."""
    digests = b"".join(
        hashlib.blake2b(value.encode(), digest_size=8).digest() for value in image_ids.to_pylist()
    )
    return np.frombuffer(digests, dtype=np.uint64)


def check_image_file(
    reader: DatasetReader, path: str, sha256: str | None, size: int | None
) -> list[str]:
    """Names of the checks this file fails (unsafe / missing / size / sha256 / decode)."""
    try:
        data = reader.read_image_bytes(path)
    except UnsafePath:
        return ["unsafe_paths"]  # a symlink out of the root: never read
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
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
    _check_names(batch, section)
    no_file = accepted & batch.column("path").is_null().to_numpy(zero_copy_only=False)
    report(section.accepted_without_file, no_file, "accepted row without an image file")
    if identities is not None:
        index = identities.index_of(batch.column("identity_id"))
        # Imported identities without an accepted image are left out of identities.parquet;
        # their rejected rows stay, under LEFT_OUT_LABEL.
        labels = batch.column("label").to_numpy(zero_copy_only=False)
        left_out = (labels == LEFT_OUT_LABEL) & ~accepted
        report(section.unknown_identities, (index < 0) & ~left_out,
               "identity_id not in identities.parquet")  # fmt: skip
        known = index >= 0
        wrong = np.zeros(len(index), bool)
        wrong[known] = identities.labels[index[known]] != labels[known]
        report(section.label_mismatches, wrong, "label differs from identities.parquet")


def _check_names(batch: pa.RecordBatch, section: IntegritySection) -> None:
    """Paths and ids that would leave the dataset root (or an export's folder) if used."""
    rows = zip(
        batch.column("image_id").to_pylist(),
        batch.column("identity_id").to_pylist(),
        batch.column("path").to_pylist(),
        strict=True,
    )
    for image_id, identity_id, path in rows:
        if not is_safe_name(image_id):
            section.unsafe_paths.add(f"image_id {image_id!r} is not a safe file name")
        if not is_safe_name(identity_id):
            section.unsafe_paths.add(f"{image_id!r}: identity_id {identity_id!r} is not a safe name")
        if path is not None and not is_safe_relative(path):
            section.unsafe_paths.add(f"{image_id!r}: path {path!r} leaves the dataset root")


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
        if row["path"] is not None and is_safe_relative(row["path"])  # unsafe: never read
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
    base = full.rstrip("/") + "/"  # the listing is under the (resolved) folder asked for
    return [f"{relative}/{path[len(base):]}" if path.startswith(base) else path for path in found]


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
    for identity_id in identities.ids.to_pylist():
        if not is_safe_name(identity_id):
            section.unsafe_paths.add(f"identities.parquet: identity_id {identity_id!r} is unsafe")
    if not np.array_equal(identities.labels, np.arange(len(identities))):
        section.identity_table.add("identities.parquet labels are not 0..N-1 in row order")
    if pc.count_distinct(identities.ids).as_py() != len(identities):
        section.identity_table.add("identities.parquet repeats an identity_id")


def _check_part(
    reader: DatasetReader,
    part: str,
    identities: Identities | None,
    section: IntegritySection,
    tally: _IntegrityTally,
    pool: ThreadPoolExecutor | None,
) -> bool:
    """Stream one part's rows (and files when `pool`); False when the part cannot be read
    through (a page that does not decompress), which is reported, not raised."""
    shard = layout.shard_of_part(part)
    part_paths: set[str] = set()  # bounded by one shard's rows
    try:
        for batch in iter_part_batches(reader, part, INTEGRITY_COLUMNS):
            _check_rows(batch, shard, identities, section, tally)
            if pool is not None:
                part_paths |= _check_files(reader, batch, section, pool)
    except (pa.ArrowException, OSError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        section.unreadable_parts.add(f"{part}: {first}")
        return False
    if pool is not None and shard is not None:
        _check_shard_orphans(reader, shard, part_paths, section)
    return True


def check_integrity(
    reader: DatasetReader,
    info: DatasetInfo | None,
    parts: list[str],
    identities: Identities | None,
    all_parts: list[str],
    verify_files: bool = True,
    section: IntegritySection | None = None,
    in_progress: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[IntegritySection, list[str]]:
    """Rows, files, orphans, duplicates and counts; streams one batch at a time.

    Fills `section` (findings made before, e.g. about dataset.json, are kept) and
    returns it with the parts that could be read through. Counts are not compared
    while the dataset is `in_progress`.
    """
    section = section if section is not None else IntegritySection()
    section.parts = len(all_parts)
    tally = _IntegrityTally()
    if identities is not None:
        _check_identity_table(identities, section)
    readable = []
    with ThreadPoolExecutor(FILE_CHECK_THREADS, thread_name_prefix="audit-files") as pool:
        for part in parts:
            if _check_part(reader, part, identities, section, tally, pool if verify_files else None):
                readable.append(part)
            if progress is not None:
                progress(1)
    if verify_files:
        committed = {layout.shard_of_part(part) for part in all_parts}
        status = "in_progress" if in_progress else (info.status if info else None)
        _check_other_folders(reader, committed, status, section)
    _report_duplicates(reader, readable, tally, section)
    if not in_progress:
        _check_counts(info, tally, len(all_parts), identities, section)
    section.rows = tally.rows
    section.ok = not any(True for _ in section.failures())
    return section, readable
