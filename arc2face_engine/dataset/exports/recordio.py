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
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import IO

import numpy as np

from arc2face_engine.dataset.exports import ExportItem, ExportPlan, ExportResult

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)  # 24
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


def write_recordio(
    items: Iterable[ExportItem], plan: ExportPlan, fs, root: str, **options
) -> ExportResult:
    """Write train.rec, train.idx and property under `root` (items arrive grouped by label)."""
    if options:
        raise TypeError(f"unexpected recordio options {sorted(options)}")
    if len(plan) + len(plan.identity_ids) + 1 >= MAX_FLOAT_INDEX:
        raise ValueError("RecordIO stores record indices as float32: at most 2**24 records")
    ranges: list[tuple[int, int]] = []  # per label: [first, end) image record indices
    size = (0, 0)
    with fs.open(f"{root}/train.rec", "wb") as rec, fs.open(f"{root}/train.idx", "wb") as idx:
        writer = IndexedRecordWriter(rec, idx)
        index = 1
        for item in items:
            if item.label < len(ranges) - 1:
                raise ValueError("RecordIO needs the items grouped by label in increasing order")
            while item.label >= len(ranges):  # an identity whose every row was skipped: empty range
                ranges.append((index, index))
            writer.write(index, pack(item.label, item.data, index))
            ranges[-1] = (ranges[-1][0], index + 1)
            size = size if size != (0, 0) else (item.height, item.width)
            index += 1
        ranges += [(index, index)] * (len(plan.identity_ids) - len(ranges))
        first_identity_record = index
        for start, end in ranges:
            writer.write(index, pack((start, end), b"", index))
            index += 1
        writer.write(0, pack((first_identity_record, index), b"", 0, 1))
    with fs.open(f"{root}/property", "w") as handle:
        handle.write(f"{len(ranges)},{size[0]},{size[1]}\n")
    return ExportResult(
        fmt="recordio", out_uri=root, images=first_identity_record - 1, identities=len(ranges),
        files=[f"{root}/{name}" for name in ("train.rec", "train.idx", "property")],
    )  # fmt: skip
