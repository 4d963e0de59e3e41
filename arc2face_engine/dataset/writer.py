"""Write a dataset through fsspec, committing one shard at a time.

Resumability follows datatrove's completion markers: a shard's manifest part is
written last and as one indivisible step, so "the part exists" means "every
image the part points at was written before it". Local disks get a temp file in
the same folder plus `os.replace` (atomic rename); object stores get a single
put of the complete bytes (an S3 PUT, or a multipart upload, only becomes
visible when complete). A re-run lists the committed parts and redoes the rest.

Each part's sha256 goes into a sidecar `part-NNNNN.parquet.sha256` written just
before the part, and identities.parquet's into dataset.json, so an audit can tell
a damaged file from a committed one. A writer that holds the output's lease
(`lease.py`) passes its token: every commit and every deletion first checks the lease
is still this run's. Generation's shard tasks write through `attempt.ShardAttempt`,
which fences the attempts at one shard against each other.

A process that is being interrupted calls `stop_writes()`: from then on no write or
commit starts in this process, and it returns once the commits in progress have landed,
so the committed shards can be counted and the lease released (flows/interrupts.py).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError

from arc2face_engine.dataset import layout, lease
from schemas.errors import DatasetCorrupt, SpecError
from schemas.job import JobSpec, describe_differences, spec_differences
from schemas.tables import (
    IDENTITIES_SCHEMA,
    MANIFEST_SCHEMA,
    PROBES_SCHEMA,
    SAFE_ID_RULE,
    DatasetInfo,
    is_safe_id,
)

TEMP_MARKER = ".tmp-"
MAX_DATASET_JSON_BYTES = 64 * 1024 * 1024


class WritesStopped(RuntimeError):
    """This process is stopping (SIGINT/SIGTERM): no write or commit starts any more."""


class _WriteGate:
    """Process-wide: open until `close()`; tracks the commits in progress."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._open = True
        self._commits = 0

    def check(self) -> None:
        if not self._open:
            raise WritesStopped("this process is stopping: nothing more is written")

    @contextmanager
    def commit(self) -> Iterator[None]:
        with self._changed:
            self.check()
            self._commits += 1
        try:
            yield
        finally:
            with self._changed:
                self._commits -= 1
                self._changed.notify_all()

    def close(self, timeout: float) -> bool:
        """Refuse new writes; wait up to `timeout` s for commits in progress (True: none left)."""
        with self._changed:
            self._open = False
            return self._changed.wait_for(lambda: self._commits == 0, timeout)


_GATE = _WriteGate()


def stop_writes(timeout: float = 5.0) -> bool:
    """No write or commit starts in this process from now on; returns once the commits in
    progress have landed (False if some still run after `timeout` seconds)."""
    return _GATE.close(timeout)


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def check_table(table: pa.Table, schema: pa.Schema, what: str) -> None:
    """Raise ValueError if `table` does not have exactly `schema`'s columns, types and non-nulls."""
    if not table.schema.equals(schema, check_metadata=False):
        expected = {field.name: field.type for field in schema}
        found = {field.name: field.type for field in table.schema}
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
        raise ValueError(
            f"{what} table does not match its schema: missing {missing}, unexpected {extra}, "
            f"wrong type {wrong}; build it with schema=schemas.tables.{what.upper()}_SCHEMA"
        )
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            raise ValueError(f"{what} column {field.name!r} holds nulls but is not nullable")


class DatasetWriter:
    """Writes one dataset (local folder or object-store prefix)."""

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        lease_token: str | None = None,
    ):
        self.uri = str(uri)
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = layout.open_dataset_fs(self.uri, self.storage_options)
        self.local = layout.is_local(self.fs)
        self.lease_token = lease_token  # the writer lease this writer works under, if any

    def __repr__(self) -> str:
        return f"DatasetWriter({self.uri!r})"

    def path(self, relative: str) -> str:
        return layout.join(self.root, relative)

    def check_lease(self) -> None:
        """Raise LeaseLost unless this writer's lease is live (no-op without a lease)."""
        if self.lease_token is not None:
            lease.verify(self.fs, self.root, self.uri, self.lease_token)

    # --- plain and atomic writes ----------------------------------------------------------

    def _ensure_parent(self, full_path: str) -> None:
        # Object stores have no folders; local disks need them before writing.
        if self.local:
            self.fs.makedirs(full_path.rsplit("/", 1)[0], exist_ok=True)

    def write_bytes(
        self, relative: str, data: bytes, *, exclusive: bool = False, durable: bool = True
    ) -> str:
        """Write a whole file atomically: readers see the old file or the new one, never half.

        `exclusive`: create it only if absent, or raise FileExistsError (a hard link on a
        local disk; `If-None-Match: *` on S3, a check then a write elsewhere). `durable`
        False skips the fsync (files that only matter while their process lives)."""
        _GATE.check()
        return self._put(relative, data, exclusive=exclusive, durable=durable)

    def _put(
        self, relative: str, data: bytes, *, exclusive: bool = False, durable: bool = True
    ) -> str:
        full = self.path(relative)
        try:
            return self._write_atomic(full, data, exclusive, durable)
        except OSError as error:
            if exclusive and isinstance(error, FileExistsError):
                raise  # the file is there: the caller decides
            # A full or read-only disk is the user's to fix.
            raise (layout.write_failure(self.uri, full, error) or error) from None

    def _write_atomic(self, full: str, data: bytes, exclusive: bool, durable: bool) -> str:
        self._ensure_parent(full)
        if not self.local:
            # One PUT: the object appears complete or not at all.
            self.fs.pipe_file(full, data, **({"mode": "create"} if exclusive else {}))
            return full
        folder, name = full.rsplit("/", 1)
        temp = f"{folder}/.{name}{TEMP_MARKER}{uuid.uuid4().hex}"
        try:
            with open(temp, "wb") as handle:
                handle.write(data)
                if durable:
                    handle.flush()
                    os.fsync(handle.fileno())  # the rename must not land before the bytes do
            if exclusive:
                os.link(temp, full)  # fails if the file exists: atomic create-if-absent
            else:
                os.replace(temp, full)
        finally:
            if os.path.exists(temp):
                os.remove(temp)
        return full

    def write_image(self, shard: int, image_id: str, data: bytes, ext: str) -> tuple[str, str, int]:
        """Write one image file; returns (relative path, sha256 hex, size in bytes).

        Not atomic on its own: until the shard's part is committed the file is a
        leftover, which the attempt that commits the shard overwrites or removes
        (`remove_unnamed_files`).
        """
        relative = layout.image_path(shard, image_id, ext)
        full = self.path(relative)
        _GATE.check()
        try:
            self._ensure_parent(full)
            self.fs.pipe_file(full, data)
        except OSError as error:
            raise (layout.write_failure(self.uri, full, error) or error) from None
        return relative, hashlib.sha256(data).hexdigest(), len(data)

    # --- tables ---------------------------------------------------------------------------

    def write_identities(self, table: pa.Table) -> str:
        """Validate and write identities.parquet; returns the sha256 of its bytes."""
        check_table(table, IDENTITIES_SCHEMA, "identities")
        labels = table.column("label")
        if table.num_rows and labels.to_pylist() != list(range(table.num_rows)):
            raise ValueError("identity labels must be 0..N-1 in row order")
        if pc.count_distinct(table.column("identity_id")).as_py() != table.num_rows:
            raise ValueError("identity_id values must be unique")
        ids = table.column("identity_id").to_pylist()
        unsafe = next((value for value in ids if not is_safe_id(value)), None)
        if unsafe is not None:
            raise ValueError(f"identity_id {unsafe!r} is not a safe name: {SAFE_ID_RULE}")
        data = table_to_parquet_bytes(table)
        self.check_lease()
        self.write_bytes(layout.IDENTITIES, data)
        return hashlib.sha256(data).hexdigest()

    def write_probes(self, table: pa.Table, files: Iterable[tuple[str, bytes]]) -> str:
        """Write a balanced job's probe images (relative paths under probes/), then
        probes/manifest.parquet; returns the sha256 of the manifest's bytes."""
        check_table(table, PROBES_SCHEMA, "probes")
        self.check_lease()
        for relative, data in files:
            if not relative.startswith(f"{layout.PROBES_DIR}/"):
                raise ValueError(f"probe image {relative!r} is not under {layout.PROBES_DIR}/")
            self.write_bytes(relative, data)
        data = table_to_parquet_bytes(table)
        self.write_bytes(layout.PROBES_MANIFEST, data)
        return hashlib.sha256(data).hexdigest()

    def commit_shard(self, shard: int, table: pa.Table, *, exclusive: bool = False) -> str:
        """Validate and write the shard's manifest part in one atomic step (the commit).

        `exclusive` (a shard attempt's commit, see attempt.py): never replace a committed
        part. If one is there already, its own checksum goes back into the sidecar and
        FileExistsError is raised, unless it holds these very bytes (a retried write
        that had landed)."""
        check_table(table, MANIFEST_SCHEMA, "manifest")
        shards = pc.unique(table.column("shard")).to_pylist()
        if shards and shards != [shard]:
            raise ValueError(f"manifest for shard {shard} holds rows of shards {shards}")
        if pc.count_distinct(table.column("image_id")).as_py() != table.num_rows:
            raise ValueError(f"manifest for shard {shard} repeats an image_id")
        data = table_to_parquet_bytes(table)
        with _GATE.commit():
            self.check_lease()
            # The checksum first: a crash between the two leaves a sidecar without a part,
            # which is not a commit; the next attempt's commit writes it again.
            digest = hashlib.sha256(data).hexdigest()
            # Inside the gate: a stop waits for both writes instead of splitting them.
            self._put(layout.part_checksum_path(shard), f"{digest}\n".encode("ascii"))
            try:
                return self._put(layout.manifest_part(shard), data, exclusive=exclusive)
            except FileExistsError:
                if self.restore_part_checksum(shard) != digest:
                    raise
                return self.path(layout.manifest_part(shard))

    def is_committed(self, shard: int) -> bool:
        """Whether `shard`'s part exists (one look-up, whatever the number of shards)."""
        part = self.path(layout.manifest_part(shard))
        self.fs.invalidate_cache(part)  # another process may have committed since
        return self.fs.exists(part)

    def committed_shards(self) -> set[int]:
        """Shards whose manifest part exists; temp files of a crashed write do not count."""
        folder = self.path(layout.MANIFEST_DIR)
        self.fs.invalidate_cache(folder)  # another process may have committed since
        try:
            names = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return set()
        shards = (layout.shard_of_part(name) for name in names)
        return {shard for shard in shards if shard is not None}

    def restore_part_checksum(self, shard: int) -> str:
        """Write the committed part's own sha256 into its sidecar (after a late attempt
        overwrote it) and return it."""
        data = self.fs.cat_file(self.path(layout.manifest_part(shard)))
        digest = hashlib.sha256(data).hexdigest()
        self._put(layout.part_checksum_path(shard), f"{digest}\n".encode("ascii"))
        return digest

    def remove_unnamed_files(self, shard: int, named: set[str]) -> None:
        """After `shard` is committed: delete the files in its folder that its part does
        not name (an interrupted attempt's leftovers)."""
        folder = self.path(layout.image_dir(shard))
        self.fs.invalidate_cache(folder)
        try:
            found = self.fs.find(folder)
        except FileNotFoundError:
            found = []
        prefix = self.path(layout.IMAGES_DIR) + "/"
        unnamed = [
            path for path in found if f"{layout.IMAGES_DIR}/{path[len(prefix) :]}" not in named
        ]
        if unnamed:
            self.fs.rm(unnamed)

    def clear_leftovers(self) -> None:
        """Once every shard is committed: remove the claims of interrupted attempts
        (attempt.py) and the temp files of writes a crash cut short. One listing each,
        not one per shard (a listing of the manifest folder grows with the dataset)."""
        claims = self.path(layout.ATTEMPTS_DIR)
        self.fs.invalidate_cache(claims)
        if self.fs.exists(claims):
            self.fs.rm(claims, recursive=True)
        if self.local:
            manifest = self.path(layout.MANIFEST_DIR)
            for stale in self.fs.glob(f"{manifest}/.*{TEMP_MARKER}*"):  # parts and sidecars
                self.fs.rm(stale)
    def clear_uncommitted(self, shard: int) -> None:
        """Remove leftovers of an interrupted attempt at `shard` before redoing it (imports,
        whose shards one process runs; generation's attempts use attempt.py instead).

        Only under the writer lease: without it another live run could be producing
        exactly these files.
        """
        if self.lease_token is None:
            raise ValueError("clear_uncommitted deletes files: hold the writer lease first")
        self.check_lease()
        if self.is_committed(shard):
            raise ValueError(f"shard {shard} is committed; refusing to delete its images")
        folder = self.path(layout.image_dir(shard))
        self.fs.invalidate_cache(folder)
        if self.fs.exists(folder):
            self.fs.rm(folder, recursive=True)
        sidecar = self.path(layout.part_checksum_path(shard))
        if self.fs.exists(sidecar):
            self.fs.rm_file(sidecar)
        if self.local:
            self._remove_stale_temps(shard)

    def set_aside(self, shard: int, folder: str) -> list[str]:
        """Move a committed shard's part, sidecar and images under `folder` (relative to the
        root, e.g. damaged/<time>), keeping their relative paths; returns what moved.

        The part goes first: from then on the shard is uncommitted, so an interruption
        anywhere after leaves a dataset a re-run completes (its leftovers are cleared).
        Only under the writer lease.
        """
        if self.lease_token is None:
            raise ValueError("set_aside moves committed files: hold the writer lease first")
        self.check_lease()
        _GATE.check()
        moved = []
        for relative in (
            layout.manifest_part(shard),
            layout.part_checksum_path(shard),
            layout.image_dir(shard),
        ):
            source = self.path(relative)
            self.fs.invalidate_cache(source.rsplit("/", 1)[0])
            if not self.fs.exists(source):
                continue
            target = self.path(f"{folder}/{relative}")
            self._ensure_parent(target)
            self.fs.mv(source, target, recursive=True)
            moved.append(relative)
        self.fs.invalidate_cache(self.path(layout.MANIFEST_DIR))
        return moved

    def _remove_stale_temps(self, shard: int) -> None:
        part = self.path(layout.manifest_part(shard))
        folder, name = part.rsplit("/", 1)
        for stale in self.fs.glob(f"{folder}/.{name}*{TEMP_MARKER}*"):  # part and its sidecar
            self.fs.rm(stale)

    # --- dataset.json ---------------------------------------------------------------------

    def write_dataset_json(self, info: DatasetInfo) -> None:
        self.check_lease()
        self.write_bytes(layout.DATASET_JSON, info.model_dump_json(indent=2).encode("utf-8"))

    def read_dataset_json(self) -> DatasetInfo | None:
        """The dataset.json at this output, or None if there is none yet."""
        full = self.path(layout.DATASET_JSON)
        self.fs.invalidate_cache(self.root)
        try:
            if self.fs.size(full) > MAX_DATASET_JSON_BYTES:
                raise DatasetCorrupt(
                    f"output {self.uri} has a dataset.json over {MAX_DATASET_JSON_BYTES} bytes: "
                    "it is not one this tool wrote; choose a new output.uri"
                )
            raw = self.fs.cat_file(full)
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raw = b""
        try:
            return DatasetInfo.model_validate_json(raw)
        except ValidationError as error:
            raise DatasetCorrupt(
                f"output {self.uri} has a corrupt dataset.json ({_first_problem(error)}): "
                "restore it from a copy, or choose a new output.uri to start a new dataset"
            ) from None

    def check_compatible(self, spec_hash: str, spec: JobSpec | None = None) -> DatasetInfo | None:
        """Refuse an output made from another spec (naming the fields that differ from the
        recorded one when `spec` is given); return the existing info to resume from."""
        info = self.read_dataset_json()
        if info is not None:
            if info.spec_hash != spec_hash:
                changed = spec_differences(info.spec, spec) if spec is not None else []
                if changed:
                    raise SpecError(
                        f"output {self.uri} already holds a dataset made from a different "
                        f"spec; it differs in {describe_differences(changed)}: set those back "
                        "to resume it, or choose a new output.uri (or delete it) for a new dataset"
                    )
                raise SpecError(
                    f"output {self.uri} already holds a dataset made from a different spec "
                    f"(hash {info.spec_hash[:12]} != {spec_hash[:12]}): "
                    "choose a new output.uri or delete it"
                )
            return info
        if self._has_content():
            raise SpecError(
                f"output {self.uri} is not empty and holds no dataset.json: "
                "choose a new output.uri or empty it"
            )
        return None

    def _has_content(self) -> bool:
        """Whether the output holds anything but a writer lease."""
        self.fs.invalidate_cache(self.root)
        try:
            names = self.fs.ls(self.root, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return any(not name.rsplit("/", 1)[-1].startswith(layout.LEASE_FILE) for name in names)


def _first_problem(error: ValidationError) -> str:
    """pydantic's first problem as 'field: message' (its str() spans several lines)."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "top level"
    return f"{where}: {first['msg']}"
