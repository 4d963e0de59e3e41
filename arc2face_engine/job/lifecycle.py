"""A dataset's life as a job sees it: opened under the writer lease, marked in progress
(dataset.json), and finalised (counted, marked complete, its card written).

Light: no model library is imported here.
"""

from __future__ import annotations

import datetime as dt
import time
from importlib import metadata

from arc2face_engine import models_dir
from arc2face_engine.dataset import layout
from arc2face_engine.dataset.card import write_dataset_card
from arc2face_engine.dataset.lease import WriterLease
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.dataset.writer import DatasetWriter
from arc2face_engine.job import output_checks
from arc2face_engine.job.identity_attributes import refresh_identity_attributes
from arc2face_engine.job.shards import shard_count
from schemas.job import JobSpec, recorded_spec, spec_hash
from schemas.tables import DatasetCounts, DatasetInfo

# Recorded in dataset.json: the versions that decide a dataset's pixels.
PACKAGES = ("arc2face-synth", "torch", "diffusers", "transformers", "insightface", "onnxruntime")


def required_components(spec: JobSpec) -> list[str]:
    """The parts of the models directory this spec uses."""
    components = ["core"]
    if spec.variations.poses.kind != "none":
        components.append("controlnet")
    if spec.variations.expressions.kind != "none":
        components.append("expression")
    balance = spec.identities.balance
    if spec.generation.scheduler == "lcm" or (balance and balance.probe_scheduler == "lcm"):
        components.append("lcm")
    return components


def open_writer(spec: JobSpec, lease_token: str | None = None) -> DatasetWriter:
    return DatasetWriter(spec.output.uri, spec.output.storage_options, lease_token)


def writer_lease(spec: JobSpec) -> WriterLease:
    """The output's writer lease; hold it (`with`) around everything a job writes."""
    writer = open_writer(spec)
    return WriterLease(writer.fs, writer.root, writer.uri)


def prepare_dataset(spec: JobSpec, lease_token: str | None = None) -> DatasetWriter:
    """Refuse an output made from another spec, other models or another precision; mark
    the dataset in progress."""
    writer = open_writer(spec, lease_token)
    digest = spec_hash(spec)
    precision = output_checks.resolved_precision(spec)
    info = writer.check_compatible(digest, spec)
    if info is not None:
        output_checks.check_resume(spec, info, required_components(spec), precision)
    else:
        writer.write_dataset_json(
            DatasetInfo(
                name=spec.name,
                status="in_progress",
                spec=recorded_spec(spec),
                spec_hash=digest,
                versions=package_versions(),
                model_hashes=models_dir.file_hashes(spec.models.dir),
                precision=precision,
                created_at=_now(),
            )
        )
    return writer


def nothing_to_do(spec: JobSpec, info: DatasetInfo | None) -> str | None:
    """What to tell a re-run of a finished job (None when there is work): the output's
    dataset.json (`info`, already checked to be of this spec) says complete and every one
    of its shards is committed, so the run must not rewrite anything."""
    if info is None or info.status != "complete":
        return None
    if not open_writer(spec).committed_shards() >= set(range(info.counts.shards)):
        return None  # a part went missing since: the run redoes it
    counts = info.counts
    return (
        f"nothing to do: {spec.output.uri} already holds the complete dataset of this spec "
        f"({counts.committed_shards} shards, {counts.images} images, {counts.accepted} "
        "accepted); to generate it again, set output.uri to a new location"
    )


# How long the flow waits for shards whose attempt found itself superseded: the attempt
# that took a shard over (a re-run elsewhere while this worker was paused) is usually
# still generating it when the paused one returns.
SUPERSEDED_WAIT_S = 600.0


def wait_for_commits(
    spec: JobSpec, shards: list[int], timeout_s: float = SUPERSEDED_WAIT_S, every_s: float = 1.0
) -> list[int]:
    """Wait until `shards` are committed by whichever attempt holds them; returns those
    still uncommitted after `timeout_s` (a re-run redoes them)."""
    writer = open_writer(spec)
    deadline = time.monotonic() + timeout_s
    waiting = sorted(shards)
    while True:
        waiting = [shard for shard in waiting if not writer.is_committed(shard)]
        if not waiting or time.monotonic() >= deadline:
            return waiting
        time.sleep(every_s)


def finalize_dataset(spec: JobSpec, lease_token: str | None = None) -> DatasetInfo:
    """Count the committed manifest, fill the identities' attributes over their accepted
    images, write dataset.json (complete) and the card."""
    writer = open_writer(spec, lease_token)
    reader = DatasetReader(spec.output.uri, spec.output.storage_options)
    counts = count_manifest(reader)
    counts.identities = reader.identities().num_rows
    counts.shards = shard_count(
        counts.identities, spec.variations.images_per_identity, spec.output.shard_size
    )
    info = writer.read_dataset_json()
    info.counts = counts
    complete = counts.committed_shards == counts.shards
    info.status = "complete" if complete else "in_progress"
    info.finished_at = _now() if complete else None
    info = refresh_identity_attributes(writer, info)
    writer.write_dataset_json(info)
    if complete:
        writer.clear_leftovers()  # of attempts that were interrupted
    write_dataset_card(writer, info)
    return info


def set_aside_damaged(spec: JobSpec, lease_token: str) -> tuple[list[int], str]:
    """Move every committed shard whose part fails its checksum into damaged/<UTC time>/
    (part, sidecar, images), so that the run generates it again; returns the shards and
    the folder. dataset.json is marked in progress first: until they are redone, the
    dataset is not complete."""
    reader = DatasetReader(spec.output.uri, spec.output.storage_options)
    problems = reader.damaged_parts()
    if not problems:
        return [], ""
    writer = open_writer(spec, lease_token)
    info = writer.read_dataset_json()
    if info is not None and info.status != "in_progress":
        info.status, info.finished_at = "in_progress", None
        writer.write_dataset_json(info)
    folder = layout.damaged_dir(dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    shards = [layout.shard_of_part(problem.part) for problem in problems]
    for shard in shards:
        writer.set_aside(shard, folder)
    return shards, folder


def count_manifest(reader: DatasetReader) -> DatasetCounts:
    counts = DatasetCounts(committed_shards=len(reader.manifest_parts()))
    for batch in reader.iter_manifest(columns=["accepted", "reject_reason"]):
        accepted = batch.column("accepted").to_numpy(zero_copy_only=False)
        counts.images += len(accepted)
        counts.accepted += int(accepted.sum())
        for reason in batch.column("reject_reason").drop_null().to_pylist():
            counts.reject_reasons[reason] = counts.reject_reasons.get(reason, 0) + 1
    counts.rejected = counts.images - counts.accepted
    return counts


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
