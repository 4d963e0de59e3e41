"""WebDataset tar shards: a sample is a run of consecutive members sharing a key (the
member name up to the first dot of its last segment), one member per field: <key>.jpg,
<key>.cls, <key>.json.

SRC is one .tar file or a folder (prefix) of them, read in name order. The label is the
`.cls` member (`--label-field cls`, the default) or a field of the `.json` member
(`--label-field json.identity_id`). The sample's image is its first member among
jpg, jpeg, png, webp, bmp (else its first member that is not metadata, sniffed later).

Hostile members are rows, not errors: a member whose name is absolute or holds `..`, or
that is a link or a device, refuses its sample's image (`unsafe_name`; such a metadata
member is ignored); a key seen before (in an earlier run of members, in this tar or
another) or a field given twice refuses the sample (`duplicate_key`); an image over the
byte bound is `too_large`; a tar that ends early keeps the samples before the damage.
Planning reads only member headers and the small metadata members; images are read by
offset when their shard runs.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from arc2face_engine.dataset.layout import open_dataset_fs
from arc2face_engine.dataset.paths import is_safe_relative
from arc2face_engine.imports.base import (
    ItemRef,
    SourceError,
    SourceIdentity,
    SourceItem,
    SourcePlan,
    image_too_large,
    label_name,
    label_text,
    read_label_map,
    sort_labels,
)
from schemas.errors import first_line
from schemas.tables import BAD_RECORD, DUPLICATE_KEY, TOO_LARGE, UNREADABLE, UNSAFE_NAME

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
METADATA_EXTENSIONS = ("cls", "json", "txt", "cls2", "index", "id", "__key__")
MAX_METADATA_BYTES = 1 << 20  # a .cls or .json member read while planning


@dataclass
class _Sample:
    key: str
    tar: int
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)
    refusal: str | None = None
    unsafe_image: str | None = None  # the name of a refused image member


def _split(name: str) -> tuple[str, str]:
    """WebDataset's key and extension: the extension starts at the first dot of the last
    path segment."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (extension.lower() if dot else "")


class WebDatasetSource:
    """Tar shards of samples; `label_field` is `cls` or `json.<field>`."""

    def __init__(
        self, uri: str, storage_options: dict[str, Any] | None = None, label_field: str = "cls"
    ) -> None:
        if label_field != "cls" and not label_field.startswith("json."):
            raise SourceError(
                f"--label-field {label_field!r} is not for WebDataset: use cls (the .cls member) "
                "or json.FIELD (a field of the .json member)"
            )
        self.uri = str(uri)
        self.storage_options = dict(storage_options or {})
        self.label_field = label_field
        self.fs, self.root = open_dataset_fs(self.uri, self.storage_options)
        self._tars: list[str] | None = None

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "storage_options": self.storage_options,
                "label_field": self.label_field}  # fmt: skip

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["uri"], state["storage_options"], state["label_field"])

    def check(self) -> None:
        self.tars()

    def tars(self) -> list[str]:
        if self._tars is None:
            if self.root.lower().endswith(".tar") and self.fs.isfile(self.root):
                self._tars = [self.root]
            elif self.fs.isdir(self.root):
                found = self.fs.find(self.root, withdirs=False)
                self._tars = sorted(path for path in found if path.lower().endswith(".tar"))
            else:
                raise SourceError(f"no .tar file or folder at {self.uri}: check the path")
            if not self._tars:
                raise SourceError(
                    f"no .tar files under {self.uri}: pass the folder of WebDataset shards"
                )
        return self._tars

    def _tar_name(self, index: int) -> str:
        path = self.tars()[index]
        return path[len(self.root) + 1 :] if path.startswith(self.root + "/") else path.rsplit("/", 1)[-1]

    # --- planning -------------------------------------------------------------------------

    def plan(self) -> SourcePlan:
        folder = self.root if self.fs.isdir(self.root) else self.root.rsplit("/", 1)[0]
        names = read_label_map(self.fs, folder)
        by_label: dict[str, list[ItemRef]] = {}
        unlabelled: list[ItemRef] = []
        seen_keys: set[bytes] = set()
        for index, path in enumerate(self.tars()):
            with self.fs.open(path, "rb") as handle:
                for sample, tar in self._samples(index, handle, unlabelled):
                    ref = self._ref(sample, seen_keys)
                    label = self._label(sample, tar)
                    (by_label.setdefault(label, []) if label is not None else unlabelled).append(ref)
        identities = [
            SourceIdentity(label, by_label[label], label_name(names, label))
            for label in sort_labels(list(by_label))
        ]
        return SourcePlan(identities, unlabelled)

    def _samples(
        self, index: int, handle, unlabelled: list[ItemRef]
    ) -> Iterator[tuple[_Sample, tarfile.TarFile]]:
        """Runs of members sharing a key; a damaged tar ends after its last good member."""
        current: _Sample | None = None
        try:
            tar = tarfile.open(fileobj=handle, mode="r:")  # noqa: SIM115 (closed with `handle`)
            for member in tar:
                if member.isdir():
                    continue
                key, extension = _split(member.name)
                if current is not None and key != current.key:
                    yield current, tar
                    current = None
                if current is None:
                    current = _Sample(key, index)
                self._add_member(current, member, extension)
            if current is not None:
                yield current, tar
        except (tarfile.TarError, OSError, EOFError) as error:
            name = f"{self._tar_name(index)}: {first_line(error)}"
            unlabelled.append(ItemRef(name, None, BAD_RECORD))

    def _add_member(self, sample: _Sample, member: tarfile.TarInfo, extension: str) -> None:
        safe = member.isfile() and is_safe_relative(member.name)
        if not safe:
            if extension not in METADATA_EXTENSIONS:
                sample.unsafe_image = member.name
            return
        if extension in sample.members:
            sample.refusal = DUPLICATE_KEY  # a field given twice: which one is meant?
        sample.members[extension] = member

    def _image_member(self, sample: _Sample) -> tarfile.TarInfo | None:
        for extension in IMAGE_EXTENSIONS:
            if extension in sample.members:
                return sample.members[extension]
        others = [ext for ext in sample.members if ext not in METADATA_EXTENSIONS]
        return sample.members[others[0]] if others else None

    def _ref(self, sample: _Sample, seen_keys: set[bytes]) -> ItemRef:
        digest = hashlib.blake2b(sample.key.encode(), digest_size=12).digest()
        duplicate = digest in seen_keys
        seen_keys.add(digest)
        image = self._image_member(sample)
        member = image.name if image else (sample.unsafe_image or sample.key)
        name = f"{self._tar_name(sample.tar)}:{member}"
        refusal = sample.refusal or (DUPLICATE_KEY if duplicate else None)
        if refusal is None and sample.unsafe_image:
            refusal = UNSAFE_NAME
        if refusal is None and image is None:
            refusal = UNREADABLE  # metadata only: no image
        if refusal is None and image_too_large(image.size):
            refusal = TOO_LARGE
        if refusal is not None:
            return ItemRef(name, None, refusal)
        return ItemRef(name, (sample.tar, image.offset_data, image.size))

    def _label(self, sample: _Sample, tar: tarfile.TarFile) -> str | None:
        wanted = "cls" if self.label_field == "cls" else "json"
        member = sample.members.get(wanted)
        if member is None or member.size > MAX_METADATA_BYTES:
            return None
        try:
            text = tar.extractfile(member).read().decode("utf-8")
        except (tarfile.TarError, OSError, UnicodeDecodeError):
            return None
        if wanted == "cls":
            return text.strip() or None
        try:
            value = json.loads(text)
        except ValueError:
            return None
        key = self.label_field.removeprefix("json.")
        return label_text(value.get(key)) if isinstance(value, dict) else None

    # --- reading --------------------------------------------------------------------------

    def read(self, refs: Sequence[ItemRef]) -> Iterator[SourceItem]:
        handles: dict[int, Any] = {}
        sizes: dict[int, int] = {}
        try:
            for ref in refs:
                if ref.refusal is not None:
                    yield SourceItem(ref.name, None, ref.refusal)
                    continue
                tar, offset, size = ref.locator
                if tar not in handles:
                    path = self.tars()[tar]
                    handles[tar] = self.fs.open(path, "rb")
                    sizes[tar] = self.fs.size(path)
                if offset < 0 or offset + size > sizes[tar]:
                    yield SourceItem(ref.name, None, BAD_RECORD)
                    continue
                handles[tar].seek(offset)
                data = handles[tar].read(size)
                yield SourceItem(ref.name, data) if len(data) == size else SourceItem(
                    ref.name, None, BAD_RECORD
                )
        finally:
            for handle in handles.values():
                handle.close()
