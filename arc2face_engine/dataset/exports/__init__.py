"""Export a dataset for face-recognition training: RecordIO, ImageFolder, WebDataset, HF Parquet.

Every format gets the same stream of items: accepted rows by default (all rows
with a file when `include_rejected`), ordered by identity, with labels
re-numbered 0..K-1 over the identities that have at least one exported image
(FR losses want contiguous classes with no empty ones). Images are JPEG:
copied byte for byte when the source is JPEG, re-encoded otherwise, or aligned
to 112x112 from the stored keypoints with `align=True` (rows without keypoints
are then skipped).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from arc2face_engine.dataset.codec import decode_image
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.errors import UserError, first_line

FORMATS = ("recordio", "imagefolder", "webdataset", "hf")
FORMAT_ALIASES = {"hf_parquet": "hf", "huggingface": "hf", "rec": "recordio", "wds": "webdataset"}
ALIGNED_SIZE = 112
JPEG_QUALITY = 95
PLAN_COLUMNS = ["image_id", "identity_id", "label", "path", "accepted"]
ITEM_COLUMNS = [
    "image_id", "identity_id", "label", "path", "keypoints", "accepted", "reject_reason",
    "similarity", "pose_name", "expression_name", "variant", "attempt", "shard",
]  # fmt: skip
IO_THREADS = 8


class ExportError(UserError, ValueError):
    """An export cannot run as asked (unknown format, nothing to export...)."""


class DamagedDataset(ExportError):
    """A manifest part or an image file of the dataset is missing or unreadable."""


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
    files: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"{self.images} images of {self.identities} identities as {self.fmt} to {self.out_uri}"
            + (f" ({self.skipped} skipped: no keypoints to align)" if self.skipped else "")
        )


@dataclass
class ExportPlan:
    """Which rows to export, in output order, and the label of each identity."""

    parts: list[str]
    part_index: np.ndarray  # per exported row, in output order
    row_index: np.ndarray
    labels: np.ndarray  # contiguous 0..K-1
    identity_ids: list[str]  # identity of each new label

    def __len__(self) -> int:
        return len(self.row_index)


def _plan_batches(reader: DatasetReader, part: str) -> Iterator[tuple[pa.RecordBatch, int]]:
    """(batch, offset of its first row) of one manifest part, read whole before yielding so
    that a corrupt part is reported as such and not as an error of the caller."""
    batches = []
    try:
        with reader.open(part) as handle:
            batches = list(pq.ParquetFile(handle).iter_batches(columns=PLAN_COLUMNS))
    except pa.ArrowInvalid as error:
        raise _damaged(reader, f"manifest part {part} is corrupt ({first_line(error)})") from None
    offset = 0
    for batch in batches:
        yield batch, offset
        offset += batch.num_rows


def plan_export(reader: DatasetReader, include_rejected: bool = False) -> ExportPlan:
    """Stream the small columns once and decide the output order (label, part, row)."""
    parts = reader.manifest_parts()
    part_index, row_index, source_labels, identity_of_label = [], [], [], {}
    for number, part in enumerate(parts):
        for batch, offset in _plan_batches(reader, part):
            keep = batch.column("path").is_valid().to_numpy(zero_copy_only=False)
            if not include_rejected:
                keep &= batch.column("accepted").to_numpy(zero_copy_only=False)
            rows = np.flatnonzero(keep)
            labels = batch.column("label").to_numpy(zero_copy_only=False)[rows]
            ids = batch.column("identity_id").take(pa.array(rows)).to_pylist()
            identity_of_label.update(zip(labels.tolist(), ids, strict=True))
            part_index.append(np.full(len(rows), number, np.int32))
            row_index.append(rows + offset)
            source_labels.append(labels)
    if not part_index or not sum(len(rows) for rows in row_index):
        raise ExportError(
            f"dataset {reader.uri} has no images to export: check that shards committed"
        )
    part_index, row_index = np.concatenate(part_index), np.concatenate(row_index)
    source = np.concatenate(source_labels).astype(np.int64)
    order = np.lexsort((row_index, part_index, source))
    unique_sources, contiguous = np.unique(source, return_inverse=True)
    return ExportPlan(
        parts=parts,
        part_index=part_index[order],
        row_index=row_index[order],
        labels=contiguous[order].astype(np.int64),
        identity_ids=[identity_of_label[int(label)] for label in unique_sources],
    )


def _to_jpeg(data: bytes, align_keypoints: np.ndarray | None) -> tuple[bytes, int, int]:
    """JPEG bytes (pass-through when possible) plus width and height."""
    if align_keypoints is None and data[:2] == b"\xff\xd8":
        with Image.open(io.BytesIO(data)) as image:
            return data, image.width, image.height
    pixels = decode_image(data)
    if align_keypoints is not None:
        from arc2face_engine.face_analysis import align_face

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


def _iter_rows(reader: DatasetReader, plan: ExportPlan) -> Iterator[tuple[dict, int]]:
    """(row, new label) in plan order; each part is read once while its rows are consecutive."""
    loaded_part, rows = -1, []
    for part, row, label in zip(
        plan.part_index.tolist(), plan.row_index.tolist(), plan.labels.tolist(), strict=True
    ):
        if part != loaded_part:
            try:
                with reader.open(plan.parts[part]) as handle:
                    rows = pq.read_table(handle, columns=ITEM_COLUMNS).to_pylist()  # one shard
            except pa.ArrowInvalid as error:
                detail = first_line(error)
                raise _damaged(
                    reader, f"manifest part {plan.parts[part]} is corrupt ({detail})"
                ) from None
            loaded_part = part
        yield rows[row], label


def iter_items(
    reader: DatasetReader, plan: ExportPlan, align: bool = False, skipped: list[int] | None = None
) -> Iterator[ExportItem]:
    """Exported images in plan order; file reads overlap on a thread pool (object stores)."""

    def load(entry: tuple[dict, int]) -> ExportItem | None:
        row, label = entry
        keypoints = None
        if align:
            if row["keypoints"] is None:
                return None
            keypoints = np.asarray(row["keypoints"], np.float32).reshape(5, 2)
        try:
            raw = reader.read_image_bytes(row["path"])
        except FileNotFoundError:
            raise _damaged(reader, f"image {row['path']} is missing") from None
        try:
            data, width, height = _to_jpeg(raw, keypoints)
        except (UnidentifiedImageError, OSError) as error:  # truncated files raise OSError
            detail = first_line(error)
            raise _damaged(reader, f"image {row['path']} cannot be decoded ({detail})") from None
        return ExportItem(row["image_id"], row["identity_id"], label, data, width, height,
                          _metadata(row))  # fmt: skip

    rows = _iter_rows(reader, plan)
    with ThreadPoolExecutor(IO_THREADS, thread_name_prefix="export-io") as pool:
        while chunk := [entry for _, entry in zip(range(64), rows, strict=False)]:
            for item in pool.map(load, chunk):
                if item is None:
                    if skipped is not None:
                        skipped[0] += 1
                    continue
                yield item


def open_output(
    out_uri: str, storage_options: dict | None
) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(str(out_uri), **(storage_options or {}))
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    return fs, root


def export_dataset(
    uri: str,
    out_uri: str,
    fmt: str,
    storage_options: dict | None = None,
    include_rejected: bool = False,
    align: bool = False,
    out_storage_options: dict | None = None,
    **options: Any,
) -> ExportResult:
    """Export the dataset at `uri` to `out_uri` as `fmt` (recordio | imagefolder | webdataset | hf).

    `out_storage_options` defaults to `storage_options`. Extra `options` go to the
    format (webdataset: samples_per_shard; hf: rows_per_file).
    """
    name = FORMAT_ALIASES.get(fmt.lower(), fmt.lower())
    if name not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    reader = DatasetReader(uri, storage_options)
    reader.info()  # DatasetNotFound (naming the URI) before "nothing to export"
    plan = plan_export(reader, include_rejected)
    skipped = [0]
    items = iter_items(reader, plan, align=align, skipped=skipped)
    fs, root = open_output(
        out_uri, out_storage_options if out_storage_options is not None else storage_options
    )
    if name == "recordio":
        from arc2face_engine.dataset.exports.recordio import write_recordio as write
    elif name == "imagefolder":
        from arc2face_engine.dataset.exports.imagefolder import write_imagefolder as write
    elif name == "webdataset":
        from arc2face_engine.dataset.exports.webdataset import write_webdataset as write
    else:
        from arc2face_engine.dataset.exports.hf_parquet import write_hf_parquet as write
    result = write(items, plan, fs, root, **options)
    result.fmt, result.out_uri, result.skipped = name, str(out_uri), skipped[0]
    return result
