"""What every source format shares: the item a reader yields, the plan of a source (its
identities and where their items are), the bounds, the label names and the errors.

A source is untrusted data. A reader never raises on what one item holds: an item whose
name leaves the source root, whose record lies about its length, whose bytes are over
the bound or are no image is yielded with a refusal reason (schemas.tables
IMPORT_REFUSALS) and becomes a manifest row. A reader raises `SourceError` only for what
makes the whole source unusable (not found, not the format asked for, over the image
bound), before anything is written.

Names read from a source are never used as output paths: the dataset's files are named
from safe identity ids (`safe_identity_ids`), so nothing an archive says can place a file
outside `--out`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fsspec import AbstractFileSystem

from schemas.errors import UserError
from schemas.tables import UNLABELLED_ID, is_safe_id

MAX_IMAGE_BYTES = 64 << 20  # one image file or record payload
MAX_IMAGE_SIDE = 16_384  # pixels, either side
MAX_RECORD_BYTES = 1 << 29  # RecordIO's lrecord keeps 29 bits of length
MAX_IMAGES = 10_000_000  # per import, unless raised (--max-images)
MAX_LABEL_MAP_BYTES = 64 << 20
LABEL_MAP = "label_map.csv"  # written by arc2face-synth's exports: label -> identity_id


class SourceError(UserError, ValueError):
    """The source cannot be imported as asked (not found, not that format, too many images)."""


@dataclass(frozen=True)
class SourceItem:
    """One item of a source: its bytes, or why it was refused before analysis."""

    name: str  # where it is in the source (relative path, tar member, record key, file#row)
    data: bytes | None
    refusal: str | None = None  # an IMPORT_REFUSALS reason when data is None


@dataclass(frozen=True)
class ItemRef:
    """Where one item is, in the reader's own terms (`locator`), and its name; `refusal` is
    set when planning already decided the item cannot be read (an unsafe name, a key seen
    before, a record outside the file)."""

    name: str
    locator: Any = None
    refusal: str | None = None


@dataclass
class SourceIdentity:
    """One label of the source and its items, in source order."""

    label: str  # the source's label as text (folder name, integer label, column value)
    refs: list[ItemRef] = field(default_factory=list)
    name: str | None = None  # a display name for the label (label_map.csv, ClassLabel names)


@dataclass
class SourcePlan:
    """Everything the source holds, grouped by label; items without a label apart."""

    identities: list[SourceIdentity]
    unlabelled: list[ItemRef] = field(default_factory=list)
    layout: str | None = None  # recordio: insightface | shuffled

    @property
    def items(self) -> int:
        return sum(len(identity.refs) for identity in self.identities) + len(self.unlabelled)

    def fingerprint(self) -> str:
        """sha256 of the labels and item names in plan order: a resumed import must see the
        same source."""
        digest = hashlib.sha256()
        for identity in self.identities:
            digest.update(f"L{identity.label}\0{identity.name}\0".encode())
            for ref in identity.refs:
                digest.update(f"{ref.name}\0{ref.refusal}\0".encode())
        for ref in self.unlabelled:
            digest.update(f"U{ref.name}\0{ref.refusal}\0".encode())
        return digest.hexdigest()


class SourceReader(Protocol):
    """A source format: plan it once, then read the items of any refs (in any process)."""

    uri: str

    def check(self) -> None:
        """The source is there and is of this format (cheap: no listing of items)."""

    def plan(self) -> SourcePlan: ...

    def read(self, refs: Sequence[ItemRef]) -> Iterator[SourceItem]: ...


def sort_labels(labels: Sequence[str]) -> list[str]:
    """Integer labels in numeric order, anything else in string order (ImageFolder's)."""
    if labels and all(re.fullmatch(r"-?\d+", label) for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def label_text(value: Any) -> str | None:
    """A label value as text: integral floats (RecordIO) as integers; None stays None."""
    if value is None:
        return None
    if isinstance(value, float):
        if value != value:  # NaN
            return None
        if value.is_integer():
            return str(int(value))
    return str(value)


def read_label_map(fs: AbstractFileSystem, root: str) -> dict[str, str]:
    """{label: identity_id} from `label_map.csv` at the source root (this project's exports
    write it), or {} when there is none. Untrusted: bounded, and only the two columns."""
    path = f"{root.rstrip('/')}/{LABEL_MAP}"
    try:
        if not fs.isfile(path):
            return {}
        if fs.size(path) > MAX_LABEL_MAP_BYTES:
            raise SourceError(
                f"{path} is over {MAX_LABEL_MAP_BYTES >> 20} MB: it is not a label map; remove it"
            )
        text = fs.cat_file(path).decode("utf-8")
    except UnicodeDecodeError:
        raise SourceError(f"{path} is not UTF-8 text: remove it or fix it") from None
    rows = csv.DictReader(io.StringIO(text))
    if not rows.fieldnames or not {"label", "identity_id"} <= set(rows.fieldnames):
        raise SourceError(
            f"{path} has no 'label' and 'identity_id' columns: remove it or fix its header"
        )
    names: dict[str, str] = {}
    for row in rows:
        label, name = row.get("label"), row.get("identity_id")
        if label is not None and name:
            names[label.strip()] = name.strip()
    return names


def label_name(names: dict[str, str], label: str) -> str | None:
    """The label map's name for `label`; an integer label matches however it is padded
    (ImageFolder exports name their folders 00000, 00001, ...)."""
    if label in names:
        return names[label]
    if re.fullmatch(r"\d+", label):
        return names.get(str(int(label)))
    return None


def safe_identity_ids(identities: Sequence[SourceIdentity]) -> list[str]:
    """One identity id per identity: its name (or label) when it passes the safe-id rule,
    else `id-` and a hash of it; unique, and never the id of unlabelled items."""
    taken: set[str] = set()
    ids = []
    for identity in identities:
        wanted = identity.name or identity.label
        candidate = wanted if is_safe_id(wanted) and wanted != UNLABELLED_ID else None
        if candidate is None or candidate in taken:
            digest = hashlib.sha256(f"{identity.label}\0{wanted}".encode()).hexdigest()
            candidate = f"id-{digest[:16]}"
            suffix = 0
            while candidate in taken:
                suffix += 1
                candidate = f"id-{digest[:16]}-{suffix}"
        taken.add(candidate)
        ids.append(candidate)
    return ids


def image_too_large(size: int | None) -> bool:
    return size is not None and size > MAX_IMAGE_BYTES
