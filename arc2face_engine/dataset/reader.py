"""Read a dataset through fsspec: dataset.json, identities and the committed manifest.

The manifest is streamed part by part and batch by batch, so counting or
filtering a 10M-row manifest holds one record batch in memory at a time.
Only committed parts are read: a crashed shard's temp files are invisible.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from arc2face_engine.dataset import layout
from arc2face_engine.dataset.paths import LocalRoot, check_relative
from schemas.errors import DatasetCorrupt, UserError
from schemas.tables import MANIFEST_SCHEMA, DatasetInfo


class DatasetNotFound(UserError, FileNotFoundError):
    """The URI holds no dataset (or not the file asked for)."""


class DatasetUriError(UserError, ValueError):
    """The dataset URI names no filesystem fsspec can open (unknown protocol, bad options)."""


class DatasetInfoInvalid(DatasetCorrupt):
    """dataset.json is not valid JSON or does not match schemas.tables.DatasetInfo."""


class DatasetReader:
    """Reads one dataset (local folder or object-store prefix)."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.uri = str(uri)
        self.storage_options = dict(storage_options or {})
        try:
            self.fs, self.root = layout.open_dataset_fs(self.uri, self.storage_options)
        except (ValueError, ImportError, TypeError) as error:  # unknown protocol, bad options
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DatasetUriError(
                f"cannot open dataset {self.uri} ({first}): pass a local folder or an fsspec "
                "URI such as s3://bucket/prefix"
            ) from None
        self.local = layout.is_local(self.fs)
        self._local_root: LocalRoot | None = None  # made on the first local path

    def __repr__(self) -> str:
        return f"DatasetReader({self.uri!r})"

    def path(self, relative: str, where: str = "dataset path") -> str:
        """The full path of `relative`; `paths.UnsafePath` (naming `where`) when it would
        leave the root, lexically or, on local disks, through a symlink."""
        if self.local:
            if self._local_root is None:
                self._local_root = LocalRoot(self.root)
            return self._local_root.resolve(relative, where)
        return layout.join(self.root, check_relative(relative, where))

    def exists(self, relative: str) -> bool:
        full = self.path(relative)
        self.fs.invalidate_cache(full.rsplit("/", 1)[0])
        return self.fs.exists(full)

    def info(self) -> DatasetInfo:
        try:
            raw = self.fs.cat_file(self.path(layout.DATASET_JSON))
        except FileNotFoundError:
            raise DatasetNotFound(
                f"no dataset at {self.uri} (dataset.json missing): check the URI"
            ) from None
        try:
            return DatasetInfo.model_validate(json.loads(raw))
        except ValueError as error:  # JSONDecodeError and pydantic's ValidationError
            first = " ".join(str(error).split())[:200]
            raise DatasetInfoInvalid(
                f"dataset.json of {self.uri} is not a valid dataset description ({first}): "
                f"run `arc2face-synth audit {self.uri}`; the dataset is damaged"
            ) from None

    def has_identities(self) -> bool:
        return self.exists(layout.IDENTITIES)

    def identities(self, columns: Sequence[str] | None = None) -> pa.Table:
        """identities.parquet (only `columns` when given: the embeddings are the bulk)."""
        if not self.has_identities():
            raise DatasetNotFound(
                f"no identities.parquet at {self.uri}: run the generate job first or check the URI"
            )
        with self.open(layout.IDENTITIES) as handle:
            return pq.read_table(handle, columns=list(columns) if columns is not None else None)

    def manifest_parts(self) -> list[str]:
        """Relative paths of the committed manifest parts, in shard order."""
        folder = self.path(layout.MANIFEST_DIR)
        self.fs.invalidate_cache(folder)
        try:
            names = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        by_shard = {}
        for name in names:
            shard = layout.shard_of_part(name)
            if shard is not None:
                by_shard[shard] = layout.manifest_part(shard)
        return [by_shard[shard] for shard in sorted(by_shard)]

    def iter_manifest(
        self, columns: Sequence[str] | None = None, batch_size: int = 65_536
    ) -> Iterator[pa.RecordBatch]:
        """Stream the manifest: one part open at a time, `batch_size` rows per batch."""
        columns = list(columns) if columns is not None else None
        for part in self.manifest_parts():
            with self.open(part) as handle:
                parquet = pq.ParquetFile(handle)
                yield from parquet.iter_batches(batch_size=batch_size, columns=columns)

    def manifest(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The whole manifest as one table: for small datasets (use iter_manifest otherwise)."""
        schema = MANIFEST_SCHEMA
        if columns is not None:
            schema = pa.schema([MANIFEST_SCHEMA.field(name) for name in columns])
        batches = list(self.iter_manifest(columns))
        if not batches:
            return schema.empty_table()
        # Parts written before a column existed (or became nullable) differ in schema:
        # promoted to one table, a missing column reads as nulls.
        tables = [pa.Table.from_batches([batch]) for batch in batches]
        return pa.concat_tables(tables, promote_options="default")

    def read_image_bytes(self, relative: str, where: str = "image") -> bytes:
        return self.fs.cat_file(self.path(relative, where))

    def open(self, relative: str, mode: str = "rb") -> IO:
        return self.fs.open(self.path(relative), mode)
