"""Hugging Face `datasets` Parquet files (no hub: local or on an object store): an image
column and a label column.

SRC is one .parquet file or a folder (prefix) of them, read in path order. The image
column (`--image-field`, default `image`) holds `datasets`' Image struct
(`{bytes, path}`) or plain binary; the label column (`--label-field`, default `label`)
an integer or a string. A ClassLabel's names (in the files' `huggingface` schema
metadata, as `datasets` writes it) name the integer labels.

Planning reads only the label column. A row group is read when its shard runs, one at a
time; one whose stated size is over the bound is refused row by row (`too_large`), as
is an image over the byte bound; a null image is `unreadable`, a null label `no_label`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from arc2face_engine.dataset.layout import open_dataset_fs
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
from schemas.tables import BAD_RECORD, TOO_LARGE, UNREADABLE

MAX_ROW_GROUP_BYTES = 1 << 31  # decoded size of one row group read at a time


class HfParquetSource:
    """Parquet files with an image column and a label column."""

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        label_field: str = "label",
        image_field: str = "image",
    ) -> None:
        self.uri = str(uri)
        self.storage_options = dict(storage_options or {})
        self.label_field, self.image_field = label_field, image_field
        self.fs, self.root = open_dataset_fs(self.uri, self.storage_options)
        self._files: list[str] | None = None

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "storage_options": self.storage_options,
                "label_field": self.label_field, "image_field": self.image_field}  # fmt: skip

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def check(self) -> None:
        self._check_columns(self._open(0), 0)

    def files(self) -> list[str]:
        if self._files is None:
            if self.root.lower().endswith(".parquet") and self.fs.isfile(self.root):
                self._files = [self.root]
            elif self.fs.isdir(self.root):
                found = self.fs.find(self.root, withdirs=False)
                self._files = sorted(p for p in found if p.lower().endswith(".parquet"))
            else:
                raise SourceError(f"no .parquet file or folder at {self.uri}: check the path")
            if not self._files:
                raise SourceError(f"no .parquet files under {self.uri}: pass the folder of data files")
        return self._files

    def _file_name(self, index: int) -> str:
        path = self.files()[index]
        return path[len(self.root) + 1 :] if path.startswith(self.root + "/") else path.rsplit("/", 1)[-1]

    def _open(self, index: int) -> pq.ParquetFile:
        path = self.files()[index]
        try:
            return pq.ParquetFile(self.fs.open(path, "rb"))
        except (pa.ArrowException, OSError) as error:
            raise SourceError(
                f"{path} is not a readable Parquet file ({first_line(error)}): remove it from {self.uri}"
            ) from None

    # --- planning -------------------------------------------------------------------------

    def plan(self) -> SourcePlan:
        folder = self.root if self.fs.isdir(self.root) else self.root.rsplit("/", 1)[0]
        names = read_label_map(self.fs, folder)
        by_label: dict[str, list[ItemRef]] = {}
        unlabelled: list[ItemRef] = []
        for index in range(len(self.files())):
            parquet = self._open(index)
            self._check_columns(parquet, index)
            names = names or self._class_names(parquet)
            row = 0
            for batch in parquet.iter_batches(columns=[self.label_field], batch_size=65_536):
                for value in batch.column(0).to_pylist():
                    ref = ItemRef(f"{self._file_name(index)}#{row}", (index, row))
                    label = label_text(value)
                    (by_label.setdefault(label, []) if label is not None else unlabelled).append(ref)
                    row += 1
        identities = [
            SourceIdentity(label, by_label[label], label_name(names, label))
            for label in sort_labels(list(by_label))
        ]
        return SourcePlan(identities, unlabelled)

    def _check_columns(self, parquet: pq.ParquetFile, index: int) -> None:
        schema = parquet.schema_arrow
        for wanted, option in ((self.label_field, "--label-field"), (self.image_field, "--image-field")):
            if wanted not in schema.names:
                raise SourceError(
                    f"{self.files()[index]} has no column {wanted!r} (found {schema.names}): "
                    f"name the column with {option}"
                )
        kind = schema.field(self.image_field).type
        if not (pa.types.is_struct(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            raise SourceError(
                f"{self.files()[index]} column {self.image_field!r} is {kind}, not an image "
                "(datasets' Image struct or binary): name the image column with --image-field"
            )

    def _class_names(self, parquet: pq.ParquetFile) -> dict[str, str]:
        """The ClassLabel names of the label column, from `datasets`' schema metadata."""
        metadata = parquet.schema_arrow.metadata or {}
        try:
            features = json.loads(metadata.get(b"huggingface", b"{}"))["info"]["features"]
            names = features[self.label_field]["names"]
        except (ValueError, KeyError, TypeError):
            return {}
        if not isinstance(names, list):
            return {}
        return {str(label): str(name) for label, name in enumerate(names)}

    # --- reading --------------------------------------------------------------------------

    def read(self, refs: Sequence[ItemRef]) -> Iterator[SourceItem]:
        cache: tuple[tuple[int, int], list | None] | None = None
        files: dict[int, pq.ParquetFile] = {}
        for ref in refs:
            if ref.refusal is not None:
                yield SourceItem(ref.name, None, ref.refusal)
                continue
            index, row = ref.locator
            if index not in files:
                files = {index: self._open(index)}  # one file open at a time
            group, offset = _row_group(files[index].metadata, row)
            if cache is None or cache[0] != (index, group):
                cache = ((index, group), self._read_group(files[index], group))
            values = cache[1]
            if values is None:
                yield SourceItem(ref.name, None, TOO_LARGE)
            elif offset is None or offset >= len(values):
                yield SourceItem(ref.name, None, BAD_RECORD)
            else:
                yield _item(ref.name, values[offset])

    def _read_group(self, parquet: pq.ParquetFile, group: int | None) -> list | None:
        if group is None:
            return []
        if parquet.metadata.row_group(group).total_byte_size > MAX_ROW_GROUP_BYTES:
            return None
        column = parquet.read_row_group(group, columns=[self.image_field]).column(0)
        return column.to_pylist()


def _row_group(metadata: pq.FileMetaData, row: int) -> tuple[int | None, int | None]:
    start = 0
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        if row < start + rows:
            return group, row - start
        start += rows
    return None, None


def _item(name: str, value: Any) -> SourceItem:
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, (bytes, bytearray)):
        return SourceItem(name, None, UNREADABLE)
    if image_too_large(len(data)):
        return SourceItem(name, None, TOO_LARGE)
    return SourceItem(name, bytes(data))
