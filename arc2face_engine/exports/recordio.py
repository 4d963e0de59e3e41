"""insightface RecordIO (train.rec / train.idx / property), written without MXNet.

File format (dmlc-core recordio, little-endian): every record is
`magic (u32 0xced7230a) | lrecord (u32: cflag << 29 | length) | data | zero pad to 4`.
If the payload holds the magic number at a 4-byte-aligned offset, dmlc's writer
cuts the payload there, drops those 4 bytes, and writes the pieces as separate
records with cflag 1 (first), 2 (middle), 3 (last); its reader re-inserts the
magic between pieces. Cut points are aligned, so only the last piece is padded.
A reader can therefore find record starts by scanning for aligned magic words.

Payload (mxnet.recordio.pack): IRHeader `<IfQQ` = (flag, label, id, id2) and,
when flag > 0, `flag` float32 labels before the image bytes.

Layout arcface_torch's MXFaceDataset expects (insightface's RecBuilder):
records 1..N are images, header (0, label, index, 0), grouped by identity;
records N+1..N+K are one per identity with labels (first, end) of its image
indices (end exclusive); record 0, written last, has labels (N+1, N+K+1), the
range of identity records, so `range(1, header0.label[0])` lists the images.
`property` is "num_classes,height,width".

`dali=True` writes what arcface_torch's `scripts/shuffle_rec.py` makes of that
layout, which DALI's `fn.readers.mxnet` reads (it would return the header and
identity records above as empty samples): image records only, in a seeded
random order, with idx keys 0..N-1; each keeps its header (0, label, index, 0).
The records are first written in label order to a local temporary file, then
copied in the shuffled order.

label_map.csv is written after train.rec and train.idx, `property` last.
"""

from __future__ import annotations

import struct
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import IO

import numpy as np

from arc2face_engine.exports.base import (
    ExportError,
    ExportItem,
    ExportResult,
    ExportSelection,
    check_options,
    write_label_map,
)

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
IR_FORMAT = "<IfQQ"
MAX_RECORD = 1 << 29  # lrecord keeps 29 bits of length
MAX_FLOAT_INDEX = 1 << 24  # record indices travel as float32 labels: exact up to 2**24


def _lrecord(cflag: int, length: int) -> bytes:
    return struct.pack("<I", (cflag << 29) | length)


def aligned_magic_offsets(payload: bytes) -> list[int]:
    """4-byte-aligned offsets where the payload holds the magic number."""
    offsets, start = [], payload.find(MAGIC_BYTES)
    while start >= 0:
        if start % 4 == 0:
            offsets.append(start)
            start = payload.find(MAGIC_BYTES, start + 4)
        else:
            start = payload.find(MAGIC_BYTES, start + 1)
    return offsets


def encode_record(payload: bytes) -> bytes:
    """The bytes dmlc's RecordIOWriter::WriteRecord writes for one payload."""
    if len(payload) >= MAX_RECORD:
        raise ValueError(f"RecordIO payloads must be < 2**29 bytes, got {len(payload)}")
    out, start = [], 0
    for offset in aligned_magic_offsets(payload):
        out += [
            MAGIC_BYTES,
            _lrecord(1 if start == 0 else 2, offset - start),
            payload[start:offset],
        ]
        start = offset + 4  # the magic itself is dropped; the reader puts it back
    tail = payload[start:]
    out += [MAGIC_BYTES, _lrecord(3 if start else 0, len(tail)), tail, b"\0" * (-len(payload) % 4)]
    return b"".join(out)


def pack(label: float | Sequence[float], payload: bytes, record_id: int, id2: int = 0) -> bytes:
    """mxnet.recordio.pack: IRHeader (+ float32 label vector when the label is a sequence)."""
    if isinstance(label, (int, float, np.integer, np.floating)):
        return struct.pack(IR_FORMAT, 0, float(label), record_id, id2) + payload
    labels = np.asarray(label, dtype=np.float32)
    return struct.pack(IR_FORMAT, labels.size, 0.0, record_id, id2) + labels.tobytes() + payload


class IndexedRecordWriter:
    """MXIndexedRecordIO's writer: records to `rec`, "key\\toffset\\n" lines to `idx`."""

    def __init__(self, rec: IO[bytes], idx: IO[bytes]):
        self.rec, self.idx = rec, idx
        self.position = 0

    def write(self, key: int, payload: bytes) -> None:
        data = encode_record(payload)
        self.idx.write(f"{key}\t{self.position}\n".encode())
        self.rec.write(data)
        self.position += len(data)


def _write_images(
    items: Iterable[ExportItem], n_labels: int, writer: IndexedRecordWriter, per_label: Counter
) -> tuple[list[tuple[int, int]], tuple[int, int], list[tuple[int, int]]]:
    """Image records 1..N grouped by label; returns the per-label [first, end) ranges, the
    (height, width) of the first image and each record's (offset, length) in the file."""
    ranges: list[tuple[int, int]] = []
    spans: list[tuple[int, int]] = []
    size = (0, 0)
    index = 1
    for item in items:
        if item.label < len(ranges) - 1:
            raise ValueError("RecordIO needs the items grouped by label in increasing order")
        while item.label >= len(ranges):  # an identity whose every row was skipped: empty range
            ranges.append((index, index))
        start = writer.position
        writer.write(index, pack(item.label, item.data, index))
        spans.append((start, writer.position - start))
        ranges[-1] = (ranges[-1][0], index + 1)
        size = size if size != (0, 0) else (item.height, item.width)
        per_label[item.label] += 1
        index += 1
    ranges += [(index, index)] * (n_labels - len(ranges))
    return ranges, size, spans


def _shuffled_copy(source: IO[bytes], spans: list[tuple[int, int]], rec: IO[bytes],
                   idx: IO[bytes], seed: int) -> None:  # fmt: skip
    """shuffle_rec.py's output: the image records in a seeded random order, keys 0..N-1."""
    order = np.random.default_rng(seed).permutation(len(spans))
    position = 0
    for key, record in enumerate(order.tolist()):
        offset, length = spans[record]
        source.seek(offset)
        data = source.read(length)
        idx.write(f"{key}\t{position}\n".encode())
        rec.write(data)
        position += length


def write_recordio(
    items: Iterable[ExportItem], selection: ExportSelection, fs, root: str, info=None, *,
    dali: bool = False, shuffle_seed: int = 0, **options,
) -> ExportResult:  # fmt: skip
    """Write train.rec, train.idx, label_map.csv and property under `root` (items arrive
    grouped by label); `dali=True` writes the shuffled images-only layout instead."""
    check_options("recordio", options, ("dali", "shuffle_seed"))
    if len(selection) + len(selection.identity_ids) + 1 >= MAX_FLOAT_INDEX:
        raise ExportError("RecordIO stores record indices as float32: at most 2**24 records")
    per_label: Counter = Counter()
    if dali:
        with tempfile.TemporaryFile(prefix="arc2face-rec-") as source:
            _, size, spans = _write_images(items, len(selection.identity_ids),
                                           IndexedRecordWriter(source, _Discard()), per_label)  # fmt: skip
            with fs.open(f"{root}/train.rec", "wb") as rec, fs.open(f"{root}/train.idx", "wb") as idx:
                _shuffled_copy(source, spans, rec, idx, shuffle_seed)
        images = len(spans)
    else:
        with fs.open(f"{root}/train.rec", "wb") as rec, fs.open(f"{root}/train.idx", "wb") as idx:
            writer = IndexedRecordWriter(rec, idx)
            ranges, size, spans = _write_images(items, len(selection.identity_ids), writer, per_label)
            index = first_identity_record = len(spans) + 1
            for start, end in ranges:
                writer.write(index, pack((start, end), b"", index))
                index += 1
            writer.write(0, pack((first_identity_record, index), b"", 0, 1))
        images = len(spans)
    label_map = write_label_map(fs, root, selection, per_label)
    with fs.open(f"{root}/property", "w") as handle:  # last: the marker
        handle.write(f"{len(selection.identity_ids)},{size[0]},{size[1]}\n")
    return ExportResult(
        fmt="recordio", out_uri=root, images=images, identities=len(selection.identity_ids),
        files=[f"{root}/{name}" for name in ("train.rec", "train.idx", "property")] + [label_map],
    )  # fmt: skip


class _Discard:
    """An idx sink for the temporary file (its offsets are kept in memory instead)."""

    def write(self, data: bytes) -> int:
        return len(data)
