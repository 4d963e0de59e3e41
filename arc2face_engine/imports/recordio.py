"""insightface RecordIO (train.rec + train.idx), read without MXNet: both layouts that
exports/recordio.py writes (its docstring has the file format).

- insightface's layout (MS1M, Glint, DCFace releases): record 0's header holds two labels
  (first identity record, end); records 1..first-1 are images and each identity record
  holds the [start, end) range of its images. The plan takes identities from the ranges
  (one small read per identity, plus the header of each identity's first image for its
  label); every image's own header label must then agree, or it is refused.
- the shuffled layout (shuffle_rec.py, DALI): every key of train.idx is an image; the
  plan reads every record's header for its label.

SRC is the folder holding train.rec and train.idx (or the .rec path, its .idx beside
it). Records are untrusted: an offset past the file, a missing magic number, a length
that runs past the file or a chain of parts that does not end, a header whose label
count overruns its payload, or a label that disagrees with the identity range make the
item `bad_record`; a payload over the image bound is `too_large`. A line of train.idx
that is not `key<TAB>offset` is a `bad_record` row of its own.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import IO, Any

import numpy as np

from arc2face_engine.dataset.layout import open_dataset_fs
from arc2face_engine.exports.recordio import IR_FORMAT, MAGIC, MAGIC_BYTES, MAX_RECORD
from arc2face_engine.imports.base import (
    MAX_IMAGE_BYTES,
    ItemRef,
    SourceError,
    SourceIdentity,
    SourceItem,
    SourcePlan,
    label_name,
    label_text,
    read_label_map,
    sort_labels,
)
from schemas.tables import BAD_RECORD, TOO_LARGE

IR_SIZE = struct.calcsize(IR_FORMAT)
LENGTH_MASK = (1 << 29) - 1
MAX_LABELS = 1 << 16  # float labels in one header (identity records hold 2)
HEADER_LIMIT = 1 << 20  # a header record, read whole when the magic number cuts it
IMAGE_RECORD_LIMIT = MAX_IMAGE_BYTES + IR_SIZE + 4 * MAX_LABELS


class BadRecord(ValueError):
    """A record that lies about where it is or how long it is."""


class RecordTooLarge(BadRecord):
    """A well-formed record whose payload is over the bound asked for."""


def read_payload(handle: IO[bytes], offset: int, file_size: int, limit: int = MAX_RECORD) -> bytes:
    """The payload of the record at `offset` (parts joined with the magic number between
    them, as dmlc's reader does); BadRecord when the record is malformed or over `limit`."""
    parts: list[bytes] = []
    position, total = offset, 0
    while True:
        if position < 0 or position + 8 > file_size:
            raise BadRecord(f"record at {position} is outside the file ({file_size} bytes)")
        handle.seek(position)
        magic, lrecord = struct.unpack("<II", handle.read(8))
        if magic != MAGIC:
            raise BadRecord(f"no RecordIO magic number at {position}")
        cflag, length = lrecord >> 29, lrecord & LENGTH_MASK
        total += length + (4 if parts else 0)
        if position + 8 + length > file_size:
            raise BadRecord(f"record at {position} runs past the end of the file")
        if total > limit:
            raise RecordTooLarge(f"record at {offset} is over {limit} bytes")
        expected = (0, 1) if not parts else (2, 3)
        if cflag not in expected:
            raise BadRecord(f"record part at {position} has flag {cflag}, expected {expected}")
        parts.append(handle.read(length))
        if cflag in (0, 3):
            return MAGIC_BYTES.join(parts)
        position += 8 + ((length + 3) & ~3)


def read_labels(handle: IO[bytes], offset: int, file_size: int) -> tuple[float, ...]:
    """The labels of the record at `offset`, reading only its header (a header cut by the
    magic number, which dmlc splits records at, is read whole)."""
    if offset < 0 or offset + 8 > file_size:
        raise BadRecord(f"record at {offset} is outside the file ({file_size} bytes)")
    handle.seek(offset)
    magic, lrecord = struct.unpack("<II", handle.read(8))
    cflag, length = lrecord >> 29, lrecord & LENGTH_MASK
    if magic != MAGIC or cflag not in (0, 1) or offset + 8 + length > file_size:
        raise BadRecord(f"no well-formed record at {offset}")
    head = handle.read(min(length, IR_SIZE + 8))
    if cflag == 1 and len(head) < IR_SIZE + 8:
        head = read_payload(handle, offset, file_size, HEADER_LIMIT)
    flag = struct.unpack("<I", head[:4])[0] if len(head) >= 4 else 0
    if flag > 2:  # a long label vector: its first two labels are all a plan needs
        head = head[: IR_SIZE + 8]
        return tuple(np.frombuffer(head[IR_SIZE:], dtype="<f4").astype(float).tolist())
    return unpack_header(head)[1]


def unpack_header(payload: bytes) -> tuple[float, tuple[float, ...], bytes]:
    """(first label, all labels, image bytes) of an mxnet.recordio.pack payload."""
    if len(payload) < IR_SIZE:
        raise BadRecord(f"payload of {len(payload)} bytes has no IRHeader")
    flag, label, _, _ = struct.unpack(IR_FORMAT, payload[:IR_SIZE])
    if flag == 0:
        return label, (label,), payload[IR_SIZE:]
    end = IR_SIZE + 4 * flag
    if flag > MAX_LABELS or end > len(payload):
        raise BadRecord(f"header says {flag} labels, more than its payload holds")
    labels = tuple(np.frombuffer(payload[IR_SIZE:end], dtype="<f4").astype(float).tolist())
    return labels[0], labels, payload[end:]


class RecordIOSource:
    """train.rec + train.idx in insightface's layout or the shuffled one."""

    def __init__(
        self, uri: str, storage_options: dict[str, Any] | None = None, max_records: int | None = None
    ) -> None:
        self.uri = str(uri)
        self.storage_options = dict(storage_options or {})
        self.max_records = max_records
        self.fs, root = open_dataset_fs(self.uri, self.storage_options)
        if root.lower().endswith(".rec"):
            self.folder, self.rec = root.rsplit("/", 1)[0], root
            self.idx = root[: -len(".rec")] + ".idx"
        else:
            self.folder, self.rec, self.idx = root, f"{root}/train.rec", f"{root}/train.idx"
        self._file_size: int | None = None

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "storage_options": self.storage_options,
                "max_records": self.max_records}  # fmt: skip

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @property
    def file_size(self) -> int:
        if self._file_size is None:
            self._file_size = int(self.fs.size(self.rec))
        return self._file_size

    def _name(self, key: int) -> str:
        return f"{self.rec.rsplit('/', 1)[-1]} key {key}"

    # --- planning -------------------------------------------------------------------------

    def check(self) -> None:
        for path in (self.rec, self.idx):
            if not self.fs.isfile(path):
                raise SourceError(
                    f"no {path.rsplit('/', 1)[-1]} at {self.uri}: pass the folder holding "
                    "train.rec and train.idx"
                )

    def plan(self) -> SourcePlan:
        self.check()
        keys, offsets, unlabelled = self._index()
        names = read_label_map(self.fs, self.folder)
        with self.fs.open(self.rec, "rb") as handle:
            header = self._header_zero(handle, keys, offsets)
            if header is not None:
                by_label, layout = self._ranges(handle, keys, offsets, header, unlabelled), "insightface"
            else:
                by_label, layout = self._scan(handle, keys, offsets, unlabelled), "shuffled"
        identities = [
            SourceIdentity(label, by_label[label], label_name(names, label))
            for label in sort_labels(list(by_label))
        ]
        return SourcePlan(identities, unlabelled, layout)

    def _index(self) -> tuple[np.ndarray, np.ndarray, list[ItemRef]]:
        """train.idx as sorted (keys, offsets); bad lines become bad_record rows."""
        keys, offsets, bad = [], [], []
        limit = None if self.max_records is None else self.max_records + 1
        with self.fs.open(self.idx, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                fields = line.split()
                try:
                    key, offset = int(fields[0]), int(fields[1])
                    if len(fields) != 2 or key < 0 or offset < 0:
                        raise ValueError
                except (ValueError, IndexError):
                    bad.append(ItemRef(f"{self.idx.rsplit('/', 1)[-1]} line {number}", None, BAD_RECORD))
                    continue
                keys.append(key)
                offsets.append(offset)
                if limit is not None and len(keys) > 2 * limit + 1:  # images + identities
                    raise SourceError(
                        f"{self.idx} lists more than {limit} records: raise --max-images"
                    )
        keys_array = np.asarray(keys, np.int64)
        order = np.argsort(keys_array, kind="stable")
        keys_array, offsets_array = keys_array[order], np.asarray(offsets, np.int64)[order]
        first = np.r_[True, keys_array[1:] != keys_array[:-1]]
        for key in keys_array[~first].tolist():  # a key listed twice: the first one counts
            bad.append(ItemRef(f"{self._name(key)} (listed again)", None, BAD_RECORD))
        return keys_array[first], offsets_array[first], bad

    def _offset(self, keys: np.ndarray, offsets: np.ndarray, key: int) -> int | None:
        position = int(np.searchsorted(keys, key))
        if position < len(keys) and keys[position] == key:
            return int(offsets[position])
        return None

    def _labels_at(self, handle: IO[bytes], offset: int | None) -> tuple[float, ...] | None:
        if offset is None:
            return None
        try:
            return read_labels(handle, offset, self.file_size)
        except (BadRecord, struct.error):
            return None

    def _header_zero(self, handle, keys, offsets) -> tuple[int, int] | None:
        """(first identity record, end) when record 0 is insightface's header record."""
        labels = self._labels_at(handle, self._offset(keys, offsets, 0))
        if labels is None or len(labels) < 2:
            return None
        first, end = int(labels[0]), int(labels[1])
        if not 1 <= first <= end or labels[0] != first or labels[1] != end:
            return None
        return first, end

    def _ranges(self, handle, keys, offsets, header, unlabelled) -> dict[str, list[ItemRef]]:
        first, end = header
        if self.max_records is not None and first - 1 > self.max_records:
            raise SourceError(f"{self.rec} holds {first - 1} images: raise --max-images")
        claimed = np.zeros(first, bool)
        claimed[0] = True  # the header record
        by_label: dict[str, list[ItemRef]] = {}
        for record in range(first, end):
            labels = self._labels_at(handle, self._offset(keys, offsets, record))
            if labels is None or len(labels) < 2:
                unlabelled.append(ItemRef(f"{self._name(record)} (identity record)", None, BAD_RECORD))
                continue
            start, stop = max(1, int(labels[0])), min(first, int(labels[1]))
            if stop <= start:
                continue
            label = self._range_label(handle, keys, offsets, start, stop)
            refs = by_label.setdefault(label, [])
            for key in range(start, stop):
                refs.append(self._image_ref(keys, offsets, key, label, claimed))
        for key in np.flatnonzero(~claimed).tolist():  # images no range claims
            unlabelled.append(self._image_ref(keys, offsets, key, None, claimed))
        return by_label

    def _range_label(self, handle, keys, offsets, start: int, stop: int) -> str:
        """The label of the range's first image whose header reads (its others must agree)."""
        for key in range(start, stop):
            labels = self._labels_at(handle, self._offset(keys, offsets, key))
            if labels:
                return label_text(labels[0])
        return f"range-{start}"

    def _image_ref(self, keys, offsets, key: int, label: str | None, claimed: np.ndarray) -> ItemRef:
        offset = self._offset(keys, offsets, key)
        if claimed[key] or offset is None:  # claimed twice, or not in train.idx
            return ItemRef(self._name(key), None, BAD_RECORD)
        claimed[key] = True
        return ItemRef(self._name(key), (key, offset, label))

    def _scan(self, handle, keys, offsets, unlabelled) -> dict[str, list[ItemRef]]:
        """Every record is an image: read each header (in file order) for its label."""
        if self.max_records is not None and len(keys) > self.max_records:
            raise SourceError(f"{self.rec} holds {len(keys)} records: raise --max-images")
        by_label: dict[str, list[ItemRef]] = {}
        found: dict[int, tuple[str | None, int]] = {}
        for position in np.argsort(offsets, kind="stable").tolist():
            key, offset = int(keys[position]), int(offsets[position])
            labels = self._labels_at(handle, offset)
            found[key] = (label_text(labels[0]) if labels else None, offset)
        for key in sorted(found):
            label, offset = found[key]
            if label is None:
                unlabelled.append(ItemRef(self._name(key), None, BAD_RECORD))
            else:
                by_label.setdefault(label, []).append(ItemRef(self._name(key), (key, offset, label)))
        return by_label

    # --- reading --------------------------------------------------------------------------

    def read(self, refs: Sequence[ItemRef]) -> Iterator[SourceItem]:
        with self.fs.open(self.rec, "rb") as handle:
            for ref in refs:
                yield self._read_one(handle, ref)

    def _read_one(self, handle: IO[bytes], ref: ItemRef) -> SourceItem:
        if ref.refusal is not None:
            return SourceItem(ref.name, None, ref.refusal)
        _, offset, label = ref.locator
        try:
            payload = read_payload(handle, offset, self.file_size, IMAGE_RECORD_LIMIT)
            first, _, image = unpack_header(payload)
        except RecordTooLarge:
            return SourceItem(ref.name, None, TOO_LARGE)
        except (BadRecord, struct.error):
            return SourceItem(ref.name, None, BAD_RECORD)
        if label is not None and label_text(first) != label:
            return SourceItem(ref.name, None, BAD_RECORD)  # its header disagrees with its range
        if len(image) > MAX_IMAGE_BYTES:
            return SourceItem(ref.name, None, TOO_LARGE)
        return SourceItem(ref.name, image)
