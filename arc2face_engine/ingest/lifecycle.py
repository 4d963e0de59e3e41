"""An imported dataset's life: checked before anything is written, opened under the writer
lease, marked in progress (dataset.json, with the plan's fingerprint), resumed from its
committed shards, and finalised: identities.parquet from the committed manifest, the
counts and provenance in dataset.json, the card.

Light: no model library is imported here.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from arc2face_engine import models_dir
from arc2face_engine.dataset.attributes import with_attributes
from arc2face_engine.dataset.card import write_dataset_card
from arc2face_engine.dataset.lease import WriterLease, check_free
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.dataset.writer import DatasetWriter
from arc2face_engine.faces.pack import ANTELOPEV2_DIR
from arc2face_engine.identities.sources import build_identities_table
from arc2face_engine.imports import open_source
from arc2face_engine.imports.base import SourceError
from arc2face_engine.ingest.plan import ImportPlan
from arc2face_engine.job import output_checks
from arc2face_engine.job.identity_attributes import identity_attributes
from arc2face_engine.job.lifecycle import count_manifest, package_versions
from schemas.errors import DatasetCorrupt, ResumeMismatch
from schemas.imports import ImportSpec, import_spec_hash, recorded_import_spec
from schemas.tables import (
    EMBEDDING_DIM,
    IMPORT_REFUSALS,
    LEFT_OUT_LABEL,
    UNLABELLED_ID,
    DatasetInfo,
    ImportProvenance,
    l2_normalize,
    vector_matrix,
)

NEW_OUT_HINT = "import into a new --out, or re-run with the options it was started with"


def open_writer(spec: ImportSpec, lease_token: str | None = None) -> DatasetWriter:
    return DatasetWriter(spec.out, spec.out_storage_options, lease_token)


def writer_lease(spec: ImportSpec) -> WriterLease:
    writer = open_writer(spec)
    return WriterLease(writer.fs, writer.root, writer.uri)


def quick_checks(spec: ImportSpec) -> None:
    """What needs no model library and reads no item: the face models are there, the
    source is there in its format, the output is not inside it (nor it inside the output),
    can hold the dataset and is free, and an existing one was started with these options."""
    models_dir.require(spec.models_dir, "core", under=ANTELOPEV2_DIR)
    open_source(spec).check()
    writer = open_writer(spec)
    _check_not_the_source(spec, writer)
    output_checks.check_output_location(writer)
    check_free(writer.fs, writer.root, writer.uri)
    writer.check_compatible(import_spec_hash(spec))


def _check_not_the_source(spec: ImportSpec, writer: DatasetWriter) -> None:
    source = DatasetWriter(spec.source, spec.storage_options)
    if type(source.fs) is not type(writer.fs):
        return
    out, src = writer.root.rstrip("/"), source.root.rstrip("/")
    if out == src or out.startswith(src + "/") or src.startswith(out + "/"):
        raise SourceError(
            f"--out {spec.out} and the source {spec.source} overlap: choose an --out outside it"
        )


def face_model_hashes(spec: ImportSpec) -> dict[str, str]:
    return models_dir.file_hashes(spec.models_dir, under=ANTELOPEV2_DIR)


def prepare_import(spec: ImportSpec, plan: ImportPlan, lease_token: str) -> tuple[set[int], int]:
    """Mark the dataset in progress (or check a resumed one); returns the committed shards
    and the first free identity label."""
    writer = open_writer(spec, lease_token)
    digest = import_spec_hash(spec)
    info = writer.check_compatible(digest)
    hashes = face_model_hashes(spec)
    if info is None:
        writer.write_dataset_json(
            DatasetInfo(
                name=spec.name or _default_name(spec.source),
                status="in_progress",
                spec=recorded_import_spec(spec),
                spec_hash=digest,
                versions=package_versions(),
                model_hashes=hashes,
                created_at=_now(),
                imported=ImportProvenance(
                    source_uri=spec.source,
                    format=spec.format,
                    layout=plan.layout,
                    aligned=spec.aligned,
                    plan_sha256=plan.fingerprint,
                ),
            )
        )
        return set(), 0
    _check_resume(spec, info, plan, hashes)
    committed = writer.committed_shards()
    expected = set(range(len(committed)))
    if committed != expected:
        missing = min(expected - committed)
        raise DatasetCorrupt(
            f"output {spec.out} holds committed import shards without shard {missing:05d} "
            "(an import commits in order): restore it, or import into a new --out"
        )
    return committed, _next_label(DatasetReader(spec.out, spec.out_storage_options))


def _check_resume(spec: ImportSpec, info: DatasetInfo, plan: ImportPlan, hashes: dict) -> None:
    if info.imported is None:
        raise ResumeMismatch(f"output {spec.out} holds a generated dataset: {NEW_OUT_HINT}")
    if info.imported.plan_sha256 != plan.fingerprint:
        raise ResumeMismatch(
            f"the source {spec.source} changed since this import started (its items or "
            f"labels differ): {NEW_OUT_HINT}"
        )
    if info.model_hashes != hashes:
        raise ResumeMismatch(
            f"the face models in {spec.models_dir} differ from those this import started "
            f"with: pass the same --models, or {NEW_OUT_HINT}"
        )


def _next_label(reader: DatasetReader) -> int:
    top = -1
    for batch in reader.iter_manifest(columns=["label"]):
        labels = batch.column("label").to_numpy(zero_copy_only=False)
        if len(labels):
            top = max(top, int(labels.max()))
    return top + 1


@dataclass
class _Identities:
    """Per label: id, the source's label, and the sum of accepted face embeddings."""

    ids: dict[int, str]
    source_labels: dict[int, str | None]
    sums: dict[int, np.ndarray]


def _collect_identities(reader: DatasetReader) -> tuple[_Identities, Counter]:
    """Stream the manifest: kept identities' sums; rows and ids of left-out identities."""
    found = _Identities({}, {}, {})
    left_out_rows: Counter = Counter()
    columns = ["identity_id", "label", "accepted", "face_embedding", "source_label"]
    for batch in reader.iter_manifest(columns=columns):
        labels = batch.column("label").to_numpy(zero_copy_only=False)
        ids = batch.column("identity_id").to_pylist()
        source_labels = batch.column("source_label").to_pylist()
        accepted = batch.column("accepted").to_numpy(zero_copy_only=False)
        for row in np.flatnonzero(labels == LEFT_OUT_LABEL).tolist():
            left_out_rows[ids[row]] += 1
        use = accepted & (labels >= 0) & batch.column("face_embedding").is_valid().to_numpy(
            zero_copy_only=False
        )
        embeddings = vector_matrix(batch.column("face_embedding").filter(pa.array(use)), EMBEDDING_DIM)
        for label, embedding in zip(labels[use].tolist(), l2_normalize(embeddings), strict=True):
            if label not in found.sums:
                found.sums[label] = np.zeros(EMBEDDING_DIM, np.float64)
            found.sums[label] += embedding
        for row in np.flatnonzero(labels >= 0).tolist():
            if found.ids.setdefault(int(labels[row]), ids[row]) != ids[row]:
                raise DatasetCorrupt(
                    f"label {labels[row]} belongs to both {found.ids[int(labels[row])]!r} and "
                    f"{ids[row]!r} in {reader.uri}: the dataset is damaged; import into a new --out"
                )
            found.source_labels.setdefault(int(labels[row]), source_labels[row])
    return found, left_out_rows


def _identities_table(found: _Identities, fmt: str) -> pa.Table:
    labels = sorted(found.ids)
    if labels != list(range(len(labels))) or set(found.sums) != set(labels):
        raise DatasetCorrupt(
            "the committed import shards do not number their identities 0..K-1 with an "
            "accepted image each: the dataset is damaged; import into a new --out"
        )
    sums = np.stack([found.sums[label] for label in labels]) if labels else np.zeros((0, EMBEDDING_DIM))
    provenance = [f"imported {fmt} label {found.source_labels[label]!r}"[:512] for label in labels]
    ids = [found.ids[label] for label in labels]
    return build_identities_table(l2_normalize(sums).astype(np.float32), "imported", provenance, ids)


def finalize_import(spec: ImportSpec, plan: ImportPlan, lease_token: str) -> DatasetInfo:
    """identities.parquet from the committed manifest; dataset.json counts, provenance and
    status (complete once every planned shard is committed); the card."""
    writer = open_writer(spec, lease_token)
    reader = DatasetReader(spec.out, spec.out_storage_options)
    found, left_out_rows = _collect_identities(reader)
    table = _identities_table(found, spec.format)
    table = with_attributes(table, identity_attributes(reader, table))  # over accepted images
    info = writer.read_dataset_json()
    info.identities_sha256 = writer.write_identities(table)
    counts = count_manifest(reader)
    counts.identities = table.num_rows
    counts.shards = len(plan.works)
    info.counts = counts
    unlabelled = left_out_rows.pop(UNLABELLED_ID, 0)
    provenance = info.imported
    provenance.source_items = plan.items
    provenance.source_identities = plan.labels
    provenance.identities_left_out = len(left_out_rows)
    provenance.images_left_out = sum(left_out_rows.values())
    provenance.unlabelled = unlabelled
    provenance.refused = {
        reason: count for reason, count in counts.reject_reasons.items() if reason in IMPORT_REFUSALS
    }
    complete = counts.committed_shards == counts.shards
    info.status = "complete" if complete else "in_progress"
    info.finished_at = _now() if complete else None
    writer.write_dataset_json(info)
    write_dataset_card(writer, info)
    return info


def _default_name(source: str) -> str:
    name = source.rstrip("/").rsplit("/", 1)[-1]
    return f"imported {name}" if name else "imported dataset"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
