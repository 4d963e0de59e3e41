"""One folder per identity (torchvision's ImageFolder layout, as IDiff-Face, UIFace and
CASIA-WebFace are distributed): SRC/<label>/<file>, files at any depth under the label.

The label is the folder name. Every file under a label folder is an item (a file that is
no image is refused as `unreadable` after its bytes are sniffed); hidden names (a leading
dot) are skipped; files at the root are `no_label` items, except the metadata a dataset
folder carries there (csv, json, txt, md, yaml). On a local disk a name is refused
(`unsafe_name`) when it, or a link on its way, leads out of SRC: a link to a folder is
never followed, a link to a file only when it stays inside. Object stores are checked
lexically (no `..`, no absolute keys).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from arc2face_engine.dataset.layout import is_local, join, open_dataset_fs
from arc2face_engine.dataset.paths import LocalRoot, UnsafePath, check_relative
from arc2face_engine.imports.base import (
    ItemRef,
    SourceError,
    SourceIdentity,
    SourceItem,
    SourcePlan,
    image_too_large,
    label_name,
    read_label_map,
    sort_labels,
)
from schemas.tables import TOO_LARGE, UNREADABLE, UNSAFE_NAME

METADATA_SUFFIXES = (".csv", ".json", ".txt", ".md", ".yaml", ".yml", ".parquet")


def _hidden(name: str) -> bool:
    return name.startswith(".")


class ImageFolderSource:
    """SRC/<label>/**/<file>, local or on an object store."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = str(uri)
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = open_dataset_fs(self.uri, self.storage_options)
        self.local = is_local(self.fs)
        self._local_root = LocalRoot(self.root) if self.local else None

    def __getstate__(self) -> dict:  # for Dask/Prefect: reopen the filesystem there
        return {"uri": self.uri, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["uri"], state["storage_options"])

    # --- planning -------------------------------------------------------------------------

    def check(self) -> None:
        if not self.fs.isdir(self.root):
            raise SourceError(
                f"no folder at {self.uri}: pass the folder that holds one sub-folder per identity"
            )

    def plan(self) -> SourcePlan:
        self.check()
        names = read_label_map(self.fs, self.root)
        labels, unlabelled = [], []
        for entry in sorted(self.fs.ls(self.root, detail=True), key=lambda e: e["name"]):
            base = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if _hidden(base):
                continue
            if self._is_folder(base, entry):
                labels.append(base)
            elif not base.lower().endswith(METADATA_SUFFIXES):
                unlabelled.append(self._ref(base))
        identities = [
            SourceIdentity(label, self._items(label), label_name(names, label))
            for label in sort_labels(labels)
        ]
        return SourcePlan(identities, unlabelled)

    def _is_folder(self, base: str, entry: dict) -> bool:
        if self.local:  # a link to a folder counts as a label (refused when it leaves SRC)
            return os.path.isdir(os.path.join(self.root, base))
        return entry.get("type") == "directory"

    def _ref(self, relative: str) -> ItemRef:
        """The item at `relative`, refused when its name or a link leaves the root."""
        try:
            self._full(relative)
        except UnsafePath:
            return ItemRef(relative, None, UNSAFE_NAME)
        return ItemRef(relative, relative)

    def _items(self, label: str) -> list[ItemRef]:
        try:
            self._full(label)
        except UnsafePath:
            return [ItemRef(label, None, UNSAFE_NAME)]  # the whole label folder leaves SRC
        if self.local:
            return [self._ref(relative) for relative in self._walk_local(label)]
        found = sorted(self.fs.find(f"{self.root}/{label}", withdirs=False))
        prefix = f"{self.root}/"
        return [
            self._ref(path[len(prefix) :]) if path.startswith(prefix) else ItemRef(path, None, UNSAFE_NAME)
            for path in found
            if not any(_hidden(part) for part in path[len(prefix) :].split("/"))
        ]

    def _walk_local(self, label: str) -> list[str]:
        """Relative paths of the files under SRC/label, links to folders listed as items
        (refused: never followed)."""
        top = os.path.join(self.root, label)
        found = []
        for folder, dirs, files in os.walk(top, followlinks=False):
            relative_folder = os.path.relpath(folder, self.root).replace(os.sep, "/")
            dirs[:] = sorted(name for name in dirs if not _hidden(name))
            linked = [name for name in dirs if os.path.islink(os.path.join(folder, name))]
            dirs[:] = [name for name in dirs if name not in linked]
            for name in sorted(files) + linked:
                if not _hidden(name):
                    found.append(f"{relative_folder}/{name}")
        return sorted(found)

    def _full(self, relative: str) -> str:
        if self._local_root is not None:
            full = self._local_root.resolve(relative, f"source {self.uri}")
            if os.path.islink(full) and os.path.isdir(full):
                raise UnsafePath(f"{relative} is a link to a folder")
            return full
        return join(self.root, check_relative(relative, f"source {self.uri}"))

    # --- reading --------------------------------------------------------------------------

    def read(self, refs: Sequence[ItemRef]) -> Iterator[SourceItem]:
        for ref in refs:
            yield self._read_one(ref)

    def _read_one(self, ref: ItemRef) -> SourceItem:
        if ref.refusal is not None:
            return SourceItem(ref.name, None, ref.refusal)
        try:
            path = self._full(ref.locator)  # again: a link swapped in since planning is caught
            if image_too_large(self.fs.size(path)):
                return SourceItem(ref.name, None, TOO_LARGE)
            data = self.fs.cat_file(path)
        except UnsafePath:
            return SourceItem(ref.name, None, UNSAFE_NAME)
        except OSError:  # vanished, a folder now, unreadable
            return SourceItem(ref.name, None, UNREADABLE)
        if image_too_large(len(data)):
            return SourceItem(ref.name, None, TOO_LARGE)
        return SourceItem(ref.name, data)
