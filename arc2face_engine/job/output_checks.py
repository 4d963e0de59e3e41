"""Checks that keep a dataset whole, run before a job writes anything.

- the output location can hold a dataset (not a file, not under a file, writable);
- a resumed dataset is continued only with what decides its pixels: the same model
  files (sha256 of every file the spec uses) and the same resolved precision;
- a resumed dataset's identities.parquet opens, matches its recorded sha256 and
  holds only safe identity ids;
- every part a resumed dataset committed matches its checksum sidecar (a resume skips
  committed shards: it must not skip a damaged one).

Each failure is a one-line UserError naming the problem and the fix.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from arc2face_engine import models_dir
from arc2face_engine.dataset import layout
from arc2face_engine.dataset.reader import DamagedPart, DatasetReader
from arc2face_engine.dataset.writer import check_table
from schemas.errors import DatasetCorrupt, OutputError, ResumeMismatch, SpecError
from schemas.tables import IDENTITIES_SCHEMA, DatasetInfo, is_safe_id

if TYPE_CHECKING:
    from arc2face_engine.dataset.writer import DatasetWriter
    from schemas.job import JobSpec

NEW_DATASET_HINT = "set output.uri to a new location to start a new dataset"
MAX_IDENTITIES_BYTES = 8 << 30  # 1M identities take about 2.1 GiB; anything far over is not ours


# --- the output location ----------------------------------------------------------------------


def check_output_location(writer: DatasetWriter) -> None:
    """Refuse an output that is a file, sits under a file, or (locally) cannot be written."""
    fs, root, uri = writer.fs, writer.root, writer.uri
    if fs.isfile(root):
        raise OutputError(f"output {uri} is a file: set output.uri to a folder (new or a dataset)")
    if not writer.local:
        return
    existing = os.path.abspath(root)
    while not os.path.lexists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        raise OutputError(
            f"output {uri} cannot be created: {existing} is a file, not a folder: "
            "set output.uri to a path under a folder"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "read-only filesystem" if _read_only(existing) else "permission denied"
        raise OutputError(
            f"output {uri} cannot be written ({why} at {existing}): "
            "set output.uri to a writable location"
        )


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# --- what decides the pixels ------------------------------------------------------------------


def resolved_precision(spec: JobSpec) -> str:
    """The dtype the job's devices run at ("fp32", "fp16", "bf16"); `auto` differs per
    device, so a spec whose devices would run at different dtypes is refused."""
    from arc2face_engine.generation.devices import PRECISIONS, resolve_device, resolve_dtype

    names = {dtype: name for name, dtype in PRECISIONS.items()}
    found = {
        names[resolve_dtype(spec.models.precision, resolve_device(device))]
        for device in spec.compute.devices
    }
    if len(found) > 1:
        raise SpecError(
            f"models.precision auto runs the devices {spec.compute.devices} at "
            f"{' and '.join(sorted(found))}, which would mix precisions in one dataset: "
            "set models.precision to one of them"
        )
    return found.pop()


def check_resume(spec: JobSpec, info: DatasetInfo, components: list[str], precision: str) -> None:
    """Refuse to continue `info`'s dataset with other model files or another precision."""
    if info.precision is not None and info.precision != precision:
        raise ResumeMismatch(
            f"output {spec.output.uri} was generated at {info.precision} but this run would "
            f"use {precision}: set models.precision to {info.precision} to resume, or "
            f"{NEW_DATASET_HINT}"
        )
    current = models_dir.component_hashes(spec.models.dir, components)
    for relative, digest in sorted(current.items()):
        recorded = info.model_hashes.get(relative)
        if recorded != digest:
            what = "was not used" if recorded is None else "differs"
            raise ResumeMismatch(
                f"output {spec.output.uri} was generated with other model files "
                f"({relative} {what} in {spec.models.dir}): resuming would mix models in "
                f"one dataset; restore the recorded weights (dataset.json model_hashes) "
                f"to resume, or {NEW_DATASET_HINT}"
            )


# --- identities.parquet of a resumed dataset --------------------------------------------------


def read_recorded_identities(writer: DatasetWriter, info: DatasetInfo | None) -> pa.Table:
    """identities.parquet, checked: it opens, has the schema, matches the sha256 that
    dataset.json recorded (when it did) and holds only safe identity ids."""
    path = writer.path(layout.IDENTITIES)
    problem = f"output {writer.uri} has a damaged identities.parquet"
    fix = f"restore it from a copy, or {NEW_DATASET_HINT}"
    if writer.fs.size(path) > MAX_IDENTITIES_BYTES:
        raise DatasetCorrupt(f"{problem} (over {MAX_IDENTITIES_BYTES} bytes): {fix}")
    data = writer.fs.cat_file(path)
    recorded = info.identities_sha256 if info is not None else None
    if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
        raise DatasetCorrupt(f"{problem} (sha256 differs from dataset.json): {fix}")
    try:
        table = pq.read_table(io.BytesIO(data))
        check_identities(table)
    except (pa.ArrowException, ValueError, OSError) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DatasetCorrupt(f"{problem} ({detail}): {fix}") from None
    return table


def check_identities(table: pa.Table) -> None:
    """Raise ValueError unless `table` is an identities table with safe ids."""
    check_table(table, IDENTITIES_SCHEMA, "identities")
    for row, identity_id in enumerate(table.column("identity_id").to_pylist()):
        if not is_safe_id(identity_id):
            raise ValueError(f"row {row} has an unsafe identity_id {identity_id!r}")


# --- committed parts of a resumed dataset -------------------------------------------------------


def check_committed_parts(writer: DatasetWriter) -> None:
    """Raise DamagedPart (naming the first damaged part and the repair) unless every
    committed part matches its sidecar."""
    reader = DatasetReader(writer.uri, writer.storage_options)
    problems = reader.damaged_parts()
    if problems:
        raise DamagedPart(writer.uri, problems[0], damaged=len(problems))
