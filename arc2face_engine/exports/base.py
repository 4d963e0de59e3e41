"""What every export format shares: the selection, the item stream, the label map, the errors.

Every format gets the same stream of items: accepted rows by default (all rows
with a file when `include_rejected`), ordered by identity, labelled as the selection
says (see `ExportSelection`). Images are JPEG: aligned to 112x112 from the stored
keypoints by default (`align=True`; rows without keypoints are then skipped), or
with `align=False` copied byte for byte when the source is JPEG and re-encoded
otherwise. Every name and path taken from the dataset is checked to stay inside
its root before anything is written (`paths`).

The writers (recordio, imagefolder, webdataset, hf_parquet) import this module;
it imports none of them.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from arc2face_engine.dataset.codec import decode_image
from arc2face_engine.dataset.paths import check_name
from arc2face_engine.dataset.reader import DamagedPart, DatasetReader
from schemas.errors import UserError, first_line

FORMATS = ("recordio", "imagefolder", "webdataset", "hf")
FORMAT_ALIASES = {"hf_parquet": "hf", "huggingface": "hf", "rec": "recordio", "wds": "webdataset"}
ALIGNED_SIZE = 112
JPEG_QUALITY = 95
SELECTION_COLUMNS = ["image_id", "identity_id", "label", "path", "accepted"]
ITEM_COLUMNS = [
    "image_id", "identity_id", "label", "path", "keypoints", "accepted", "reject_reason",
    "similarity", "pose_name", "expression_name", "variant", "attempt", "shard",
]  # fmt: skip
IO_THREADS = 8
LABEL_MAP = "label_map.csv"


class ExportError(UserError, ValueError):
    """An export cannot run as asked (unknown format, nothing to export...)."""


class DamagedDataset(ExportError):
    """A manifest part or an image file of the dataset is missing or unreadable."""


def check_options(fmt: str, options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        known = ", ".join(allowed) or "none"
        raise ExportError(f"unknown {fmt} option(s) {', '.join(unknown)}: {fmt} takes {known}")


def check_count_option(name: str, value: Any) -> None:
    """A per-file count option (rows per file, samples per shard): a whole number >= 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ExportError(f"{name} must be an integer >= 1, got {value!r}")


def _damaged(reader: DatasetReader, what: str) -> DamagedDataset:
    return DamagedDataset(
        f"{what} in dataset {reader.uri}: run `arc2face-synth audit {reader.uri}` "
        "to locate the damage"
    )


@dataclass
class ExportItem:
    """One exported image: JPEG bytes, the contiguous label and the row's metadata."""

    image_id: str
    identity_id: str
    label: int
    data: bytes
    width: int
    height: int
    metadata: dict[str, Any]


@dataclass
class ExportResult:
    fmt: str
    out_uri: str
    images: int = 0
    identities: int = 0
    skipped: int = 0  # rows without keypoints when aligning
    dropped: int = 0  # identities with no exported image (not given a contiguous label)
    files: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"{self.images} images of {self.identities} identities as {self.fmt} to {self.out_uri}"
            + (f" ({self.skipped} skipped: no keypoints to align)" if self.skipped else "")
            + (f"; {self.dropped} identities without an image got no label" if self.dropped else "")
            + f"; labels in {LABEL_MAP}"
        )


LABEL_MODES = ("contiguous", "dataset")


@dataclass
class ExportSelection:
    """Which rows to export, in output order, and the label of each identity.

    `labels="contiguous"` (the default) numbers the identities that have at least one
    exported image 0..K-1 in dataset-label order (FR losses want no empty classes);
    identities without one are listed in `dropped`. `labels="dataset"` keeps the
    labels of identities.parquet, so classes with no image stay (empty). Either way
    the label map (`label_map.csv`) says which identity each label is.
    """

    parts: list[str]
    part_index: np.ndarray  # per exported row, in output order
    row_index: np.ndarray
    labels: np.ndarray  # export label of each row
    identity_ids: list[str]  # identity of each export label
    source_labels: list[int] = field(default_factory=list)  # dataset label of each export label
    dropped: list[str] = field(default_factory=list)  # identities with no exported image

    def __len__(self) -> int:
        return len(self.row_index)

    def images_per_label(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.identity_ids))


def _selection_batches(reader: DatasetReader, part: str) -> Iterator[tuple[pa.RecordBatch, int]]:
    """(batch, offset of its first row) of one manifest part, read whole before yielding so
    that a corrupt part is reported as such and not as an error of the caller."""
    batches = []
    try:  # verified against its checksum sidecar first (DamagedPart names it)
        batches = reader.read_part(part, SELECTION_COLUMNS).to_batches()
    except DamagedPart as error:
        raise DamagedDataset(str(error)) from None  # the export's own error type, same line
    except (pa.ArrowException, OSError, KeyError) as error:
        if isinstance(error, UserError):
            raise
        raise _damaged(reader, f"manifest part {part} is corrupt ({first_line(error)})") from None
    offset = 0
    for batch in batches:
        yield batch, offset
        offset += batch.num_rows




def _check_row_paths(
    reader: DatasetReader, part: str, image_ids: list, identity_ids: list, paths: list
) -> None:
    """Every name an export uses as a file or member name, and every path it reads, stays
    inside its root (symlinks resolved on local disks); the first bad row is named."""
    for image_id, identity_id, path in zip(image_ids, identity_ids, paths, strict=True):
        where = f"manifest {part}, row {image_id!r}"
        check_name(image_id, f"{where}: image_id")
        check_name(identity_id, f"{where}: identity_id")
        reader.path(path, where)


@dataclass
class _Collected:
    part_index: list[np.ndarray] = field(default_factory=list)
    row_index: list[np.ndarray] = field(default_factory=list)
    source_labels: list[np.ndarray] = field(default_factory=list)
    identity_of_label: dict[int, str] = field(default_factory=dict)


def _collect_batch(
    reader: DatasetReader, part: str, number: int, batch: pa.RecordBatch, offset: int,
    include_rejected: bool, collected: _Collected,
) -> None:  # fmt: skip
    try:
        keep = batch.column("path").is_valid().to_numpy(zero_copy_only=False)
        if not include_rejected:
            keep &= batch.column("accepted").fill_null(False).to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(keep)
        taken = batch.take(pa.array(rows))
        labels = taken.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
        ids = taken.column("identity_id").to_pylist()
    except (pa.ArrowException, ValueError, TypeError) as error:
        raise _damaged(reader, f"manifest part {part} has bad rows ({first_line(error)})") from None
    _check_row_paths(reader, part, taken.column("image_id").to_pylist(), ids,
                     taken.column("path").to_pylist())  # fmt: skip
    for label, identity_id in zip(labels.tolist(), ids, strict=True):
        known = collected.identity_of_label.setdefault(label, identity_id)
        if known != identity_id:
            raise _damaged(
                reader, f"label {label} belongs to both {known!r} and {identity_id!r} ({part})"
            )
    collected.part_index.append(np.full(len(rows), number, np.int32))
    collected.row_index.append(rows + offset)
    collected.source_labels.append(labels)


def _dataset_labels(reader: DatasetReader) -> list[str]:
    """identities.parquet's identity ids in label order (labels are 0..N-1 by contract)."""
    try:
        table = reader.identities(["identity_id", "label"])
    except (pa.ArrowException, OSError, KeyError) as error:
        if isinstance(error, UserError):
            raise
        raise _damaged(reader, f"identities.parquet is unreadable ({first_line(error)})") from None
    labels = table.column("label").to_pylist()
    if labels != list(range(len(labels))):
        raise _damaged(reader, "identities.parquet labels are not 0..N-1")
    ids = table.column("identity_id").to_pylist()
    for identity_id in ids:
        check_name(identity_id, "identities.parquet: identity_id")
    return ids


def select_export(
    reader: DatasetReader, include_rejected: bool = False, labels: str = "contiguous"
) -> ExportSelection:
    """Stream the small columns once, check every name and path, and decide the output
    order (label, part, row) and the labels (see ExportSelection)."""
    if labels not in LABEL_MODES:
        raise ExportError(f"unknown label mode {labels!r}: use one of {', '.join(LABEL_MODES)}")
    parts = reader.manifest_parts()
    collected = _Collected()
    for number, part in enumerate(parts):
        for batch, offset in _selection_batches(reader, part):
            _collect_batch(reader, part, number, batch, offset, include_rejected, collected)
    if not sum(len(rows) for rows in collected.row_index):
        raise ExportError(
            f"dataset {reader.uri} has no images to export: check that shards committed"
        )
    part_index = np.concatenate(collected.part_index)
    row_index = np.concatenate(collected.row_index)
    source = np.concatenate(collected.source_labels)
    order = np.lexsort((row_index, part_index, source))
    if labels == "dataset":
        all_ids = _dataset_labels(reader)
        for label, identity_id in collected.identity_of_label.items():
            if not 0 <= label < len(all_ids) or all_ids[label] != identity_id:
                raise _damaged(reader, f"label {label} of {identity_id!r} disagrees with identities.parquet")
        exported = set(collected.identity_of_label.values())
        return ExportSelection(parts, part_index[order], row_index[order], source[order], all_ids,
                          list(range(len(all_ids))), [i for i in all_ids if i not in exported])  # fmt: skip
    unique_sources, contiguous = np.unique(source, return_inverse=True)
    identity_ids = [collected.identity_of_label[int(label)] for label in unique_sources]
    return ExportSelection(
        parts=parts,
        part_index=part_index[order],
        row_index=row_index[order],
        labels=contiguous[order].astype(np.int64),
        identity_ids=identity_ids,
        source_labels=unique_sources.tolist(),
        dropped=_dropped(reader, set(identity_ids)),
    )


def _dropped(reader: DatasetReader, exported: set[str]) -> list[str]:
    """Identities of identities.parquet with no exported image (none when it is unreadable)."""
    try:
        ids = reader.identities(["identity_id"]).column("identity_id").to_pylist()
    except (pa.ArrowException, OSError, KeyError):
        return []
    return [identity_id for identity_id in ids if identity_id not in exported]


def label_map_csv(selection: ExportSelection, images: Mapping[int, int]) -> bytes:
    """label,identity_id,source_label,images: which identity each export label is, its label
    in the dataset and how many images it got."""
    buffer = io.StringIO()
    table = csv.writer(buffer, lineterminator="\n")
    table.writerow(["label", "identity_id", "source_label", "images"])
    sources = selection.source_labels or list(range(len(selection.identity_ids)))
    for label, (identity_id, source) in enumerate(zip(selection.identity_ids, sources, strict=True)):
        table.writerow([label, identity_id, source, int(images.get(label, 0))])
    return buffer.getvalue().encode()


def write_label_map(fs, root: str, selection: ExportSelection, images: Mapping[int, int]) -> str:
    """`label_map.csv` under `root`; returns its path."""
    path = f"{root}/{LABEL_MAP}"
    fs.pipe_file(path, label_map_csv(selection, images))
    return path


def _to_jpeg(data: bytes, align_keypoints: np.ndarray | None) -> tuple[bytes, int, int]:
    """JPEG bytes (pass-through when possible) plus width and height."""
    if align_keypoints is None and data[:2] == b"\xff\xd8":
        with Image.open(io.BytesIO(data)) as image:
            return data, image.width, image.height
    pixels = decode_image(data)
    if align_keypoints is not None:
        from arc2face_engine.faces.align import align_face

        pixels = align_face(pixels, align_keypoints, size=ALIGNED_SIZE)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), pixels.shape[1], pixels.shape[0]


def _metadata(row: dict) -> dict[str, Any]:
    return {
        "image_id": row["image_id"],
        "identity_id": row["identity_id"],
        "source_label": row["label"],
        "accepted": row["accepted"],
        "reject_reason": row["reject_reason"],
        "similarity": row["similarity"],
        "pose_name": row["pose_name"],
        "expression_name": row["expression_name"],
        "variant": row["variant"],
        "attempt": row["attempt"],
    }


def _iter_rows(reader: DatasetReader, selection: ExportSelection) -> Iterator[tuple[dict, int]]:
    """(row, new label) in selection order; each part is read once while its rows are consecutive."""
    loaded_part, rows = -1, []
    for part, row, label in zip(
        selection.part_index.tolist(), selection.row_index.tolist(), selection.labels.tolist(), strict=True
    ):
        if part != loaded_part:
            try:  # one shard's rows, verified against its checksum again
                rows = reader.read_part(selection.parts[part], ITEM_COLUMNS).to_pylist()
            except DamagedPart as error:
                raise DamagedDataset(str(error)) from None
            except (pa.ArrowException, OSError, KeyError) as error:
                if isinstance(error, UserError):
                    raise
                detail = first_line(error)
                raise _damaged(
                    reader, f"manifest part {selection.parts[part]} is corrupt ({detail})"
                ) from None
            loaded_part = part
        yield rows[row], label


def iter_items(
    reader: DatasetReader,
    selection: ExportSelection,
    align: bool = True,
    skipped: list[int] | None = None,
    advance: Callable[[int], None] | None = None,
) -> Iterator[ExportItem]:
    """Exported images in selection order; file reads overlap on a thread pool (object stores)."""

    def load(entry: tuple[dict, int]) -> ExportItem | None:
        row, label = entry
        where = f"manifest row {row['image_id']!r}"
        check_name(row["image_id"], where)  # re-read since the selection: checked again
        check_name(row["identity_id"], where)
        keypoints = None
        if align:
            if row["keypoints"] is None:
                return None
            keypoints = np.asarray(row["keypoints"], np.float32)
            if keypoints.size != 10 or not np.isfinite(keypoints).all():
                raise _damaged(reader, f"{where} has malformed keypoints")
            keypoints = keypoints.reshape(5, 2)
        try:
            raw = reader.read_image_bytes(row["path"], where)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise _damaged(reader, f"image {row['path']} is missing") from None
        try:
            data, width, height = _to_jpeg(raw, keypoints)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
            # truncated files raise OSError; absurd sizes DecompressionBombError
            detail = first_line(error)
            raise _damaged(reader, f"image {row['path']} cannot be decoded ({detail})") from None
        return ExportItem(row["image_id"], row["identity_id"], label, data, width, height,
                          _metadata(row))  # fmt: skip

    rows = _iter_rows(reader, selection)
    with ThreadPoolExecutor(IO_THREADS, thread_name_prefix="export-io") as pool:
        while chunk := [entry for _, entry in zip(range(64), rows, strict=False)]:
            for item in pool.map(load, chunk):
                if advance is not None:
                    advance(1)
                if item is None:
                    if skipped is not None:
                        skipped[0] += 1
                    continue
                yield item
