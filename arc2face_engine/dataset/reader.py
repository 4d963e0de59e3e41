"""Read a dataset through fsspec: dataset.json, identities and the committed manifest.

The manifest is streamed part by part and batch by batch, so counting or
filtering a 10M-row manifest holds one record batch in memory at a time.
Only committed parts are read: a crashed shard's temp files are invisible.

Nothing committed is trusted without its checksum: this module owns "read a part and
verify it". Every part is hashed (streamed, 1 MiB at a time) against its `.sha256`
sidecar before a row of it is used, and identities.parquet against dataset.json's
`identities_sha256`; a damaged file raises `DamagedPart` / `DamagedIdentities`, naming
the file and the repair. Consumers (resume, export, the loader, the card) read through
here; the audit uses `check_part` to report every damaged part instead of stopping at
the first. `DatasetIncomplete` is how a consumer refuses a dataset still being made.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from arc2face_engine.dataset import layout
from arc2face_engine.dataset.paths import LocalRoot, check_relative
from schemas.errors import DatasetCorrupt, UserError, first_line
from schemas.tables import MANIFEST_SCHEMA, DatasetInfo


class DatasetNotFound(UserError, FileNotFoundError):
    """The URI holds no dataset (or not the file asked for)."""


class DatasetUriError(UserError, ValueError):
    """The dataset URI names no filesystem fsspec can open (unknown protocol, bad options)."""


class DatasetInfoInvalid(DatasetCorrupt):
    """dataset.json is not valid JSON or does not match schemas.tables.DatasetInfo."""


HASH_CHUNK = 1 << 20  # bytes hashed at a time: memory stays bounded whatever a part's size
MAX_SIDECAR_BYTES = 1024
_HEX_DIGEST = frozenset("0123456789abcdef")
REPAIR_HINT = (
    "repair it with `arc2face-synth generate SPEC --redo-damaged` (the dataset's spec: "
    "damaged shards are moved aside and redone), or restore the file from a copy"
)


@dataclass(frozen=True)
class PartProblem:
    """Why a committed part cannot be trusted. `kind`: "no_checksum" (no sidecar),
    "bad_checksum" (the sidecar holds no sha256), "mismatch" (its bytes changed),
    "unreadable" (it cannot be read at all)."""

    part: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.part}: {self.detail}"


class DamagedPart(DatasetCorrupt):
    """A committed manifest part whose bytes do not match its checksum sidecar (or that has
    none, or does not read as Parquet). `part` is its path relative to the dataset root."""

    def __init__(self, uri: str, problem: PartProblem, damaged: int = 1) -> None:
        self.uri, self.part, self.problem, self.damaged = uri, problem.part, problem, damaged
        more = f" (and {damaged - 1} more damaged parts)" if damaged > 1 else ""
        super().__init__(
            f"manifest part {problem.part} of dataset {uri} is damaged ({problem.detail}){more}: "
            f"{REPAIR_HINT}; `arc2face-synth audit {uri}` lists every damaged file"
        )

    def __reduce__(self):  # pickles with its fields (task results cross processes)
        return type(self), (self.uri, self.problem, self.damaged)


class DamagedIdentities(DatasetCorrupt):
    """identities.parquet does not match the sha256 that dataset.json recorded."""


class DatasetIncomplete(UserError, ValueError):
    """A consumer was given a dataset whose generation has not finished."""


@dataclass(frozen=True)
class Completeness:
    """How far a dataset's generation got: dataset.json's status and the committed shards
    out of those its identities and spec make (None when that cannot be told yet)."""

    status: str
    committed: int
    total: int | None

    @property
    def complete(self) -> bool:
        return self.status == "complete" and (self.total is None or self.committed >= self.total)

    @property
    def missing(self) -> int | None:
        return None if self.total is None else max(0, self.total - self.committed)


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
        self._identities_verified = False

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
        """identities.parquet (only `columns` when given: the embeddings are the bulk),
        verified against dataset.json's `identities_sha256` when it recorded one."""
        if not self.has_identities():
            raise DatasetNotFound(
                f"no identities.parquet at {self.uri}: run the generate job first or check the URI"
            )
        self.verify_identities()
        with self.open(layout.IDENTITIES) as handle:
            try:
                return pq.read_table(handle, columns=list(columns) if columns is not None else None)
            except pa.ArrowException as error:
                raise DamagedIdentities(
                    f"identities.parquet of dataset {self.uri} does not read "
                    f"({first_line(error)}): restore it from a copy"
                ) from None

    def identities_problem(self) -> str | None:
        """Why identities.parquet cannot be trusted (None when it matches dataset.json's
        `identities_sha256`, or none was recorded yet: a run stopped before recording it).
        Hashed once per reader."""
        if self._identities_verified:
            return None
        try:
            recorded = self.info().identities_sha256
        except (DatasetNotFound, DatasetInfoInvalid):
            return None  # nothing recorded to check against (the audit reports dataset.json)
        if recorded is None:
            return None
        actual = self.sha256_of(layout.IDENTITIES)
        if actual != recorded.lower():
            return (
                f"sha256 {actual[:16]}... differs from dataset.json's identities_sha256 "
                f"{recorded[:16]}..."
            )
        self._identities_verified = True
        return None

    def verify_identities(self) -> None:
        """Raise DamagedIdentities unless identities.parquet matches its recorded sha256."""
        problem = self.identities_problem()
        if problem is not None:
            raise DamagedIdentities(
                f"identities.parquet of dataset {self.uri} is damaged ({problem}): restore it "
                "from a copy; every shard depends on it"
            )

    def identity_count(self) -> int:
        """Rows of identities.parquet, from its footer (0 before it is written)."""
        if not self.has_identities():
            return 0
        with self.open(layout.IDENTITIES) as handle:
            return pq.ParquetFile(handle).metadata.num_rows

    # --- verified parts -------------------------------------------------------------------

    def sha256_of(self, relative: str) -> str:
        """The hex sha256 of a file, streamed."""
        with self.open(relative) as handle:
            return _stream_sha256(handle)

    def recorded_part_sha256(self, part: str) -> str | None:
        """What the part's sidecar records (lower-case, maybe not a digest); None if absent."""
        try:
            with self.open(layout.checksum_path_of(part)) as handle:
                text = handle.read(MAX_SIDECAR_BYTES).decode("ascii", "replace")
        except FileNotFoundError:
            return None
        fields = text.split()
        return fields[0].lower() if fields else ""

    def check_part(self, part: str) -> PartProblem | None:
        """Why a committed part cannot be trusted, or None when its bytes match its sidecar."""
        recorded = self.recorded_part_sha256(part)
        sidecar = layout.checksum_path_of(part)
        if recorded is None:
            return PartProblem(part, "no_checksum", f"it has no checksum sidecar {sidecar}")
        if len(recorded) != 64 or not set(recorded) <= _HEX_DIGEST:
            return PartProblem(part, "bad_checksum", f"{sidecar} does not hold a sha256 digest")
        try:
            actual = self.sha256_of(part)
        except OSError as error:
            return PartProblem(part, "unreadable", f"it cannot be read: {first_line(error)}")
        if actual != recorded:
            return PartProblem(
                part, "mismatch", f"sha256 {actual[:16]}... differs from its sidecar {recorded[:16]}..."
            )
        return None

    def damaged_parts(self, parts: Sequence[str] | None = None, threads: int = 8) -> list[PartProblem]:
        """Every committed part that fails `check_part` (hashed on a few threads: object
        stores answer each read with latency), in shard order."""
        from concurrent.futures import ThreadPoolExecutor

        parts = self.manifest_parts() if parts is None else list(parts)
        with ThreadPoolExecutor(max(1, min(threads, len(parts) or 1))) as pool:
            problems = list(pool.map(self.check_part, parts))
        return [problem for problem in problems if problem is not None]

    @contextmanager
    def open_part(self, part: str) -> Iterator[IO]:
        """A committed part, opened once: hashed to the end against its sidecar, rewound and
        handed over only when it matches (DamagedPart otherwise). Hashing and reading the
        same open file means the bytes checked are the bytes parsed."""
        recorded = self.recorded_part_sha256(part)
        with self.open(part) as handle:
            problem = None
            if recorded is None or len(recorded) != 64:
                problem = self.check_part(part)
            else:
                actual = _stream_sha256(handle)
                if actual != recorded:
                    problem = PartProblem(
                        part, "mismatch",
                        f"sha256 {actual[:16]}... differs from its sidecar {recorded[:16]}...",
                    )  # fmt: skip
            if problem is not None:
                raise DamagedPart(self.uri, problem)
            handle.seek(0)
            yield handle

    def read_part(self, part: str, columns: Sequence[str] | None = None) -> pa.Table:
        """One committed part, verified, as a table (one shard's rows)."""
        with self.open_part(part) as handle:
            try:
                return pq.read_table(handle, columns=list(columns) if columns is not None else None)
            except pa.ArrowException as error:
                raise self._unparsable(part, error) from None

    def _unparsable(self, part: str, error: Exception) -> DamagedPart:
        detail = f"it matches its checksum but does not read as a manifest part: {first_line(error)}"
        return DamagedPart(self.uri, PartProblem(part, "unreadable", detail))

    # --- completeness ---------------------------------------------------------------------

    def completeness(self) -> Completeness:
        """dataset.json's status and the committed shards out of the planned ones."""
        info = self.info()
        committed = len(self.manifest_parts())
        total = info.counts.shards or None  # what finalize last counted, if it ran
        try:
            per_identity = int(info.spec["variations"]["images_per_identity"])
            shard_size = int(info.spec["output"]["shard_size"])
            if self.has_identities():
                total = layout.shard_count(self.identity_count(), per_identity, shard_size)
        except (KeyError, TypeError, ValueError, pa.ArrowException):
            pass  # no usable spec or identities yet: the recorded count, if any
        return Completeness(info.status, committed, total)

    def require_complete(self, allow_incomplete: bool, option: str) -> Completeness:
        """Raise DatasetIncomplete unless the dataset is complete or `allow_incomplete`;
        `option` is how the caller's user allows it (`--allow-incomplete`)."""
        state = self.completeness()
        if state.complete or allow_incomplete:
            return state
        missing = (
            f"{state.missing} of {state.total} shards missing"
            if state.total is not None
            else f"{state.committed} shards committed, the total is not known yet"
        )
        raise DatasetIncomplete(
            f"dataset {self.uri} is not complete (status {state.status}; {missing}): finish it "
            f"by re-running its generate command (it resumes), or pass {option} to use the "
            f"{state.committed} committed shards"
        )

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
        """Stream the manifest: one part open at a time, each verified against its sidecar
        before its first batch (DamagedPart otherwise), `batch_size` rows per batch."""
        columns = list(columns) if columns is not None else None
        for part in self.manifest_parts():
            with self.open_part(part) as handle:
                try:
                    batches = pq.ParquetFile(handle).iter_batches(
                        batch_size=batch_size, columns=columns
                    )
                    yield from batches
                except pa.ArrowException as error:
                    raise self._unparsable(part, error) from None

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


def _stream_sha256(handle: IO) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()
