"""One import shard: read its items, copy every image as it is, analyse it as generated
images are verified, judge it, and give back the shard's manifest rows, ready for the
commit that numbers its identities (`commit_shard`).

Per item: refused (the reader's reason, or its bytes are no image, too large, or, with
`aligned`, not a 112x112 crop), or decoded, written to images/<shard>/<image_id>.<ext>
(bytes and sha256 kept) and analysed in batches: detection, alignment, embedding, head
pose and feature norm, judged with the usual reasons (no_face, multiple_faces,
low_detection_score, low_feature_norm). An identity's embedding is the normalised mean
of its accepted images; every analysed image gets its cosine to it as `similarity`.
An identity without an accepted image is left out: its rows keep their reasons under
LEFT_OUT_LABEL and its files are deleted. Items that carry no label are not read.

Commits are in shard order (the flow holds the finished shards until their turn), so a
shard's identities get the labels that follow the previous shard's: labels are 0..K-1
over the kept identities, as identities.parquet needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from arc2face_engine.dataset.writer import DatasetWriter
from arc2face_engine.faces.records import FaceRecord, judge
from arc2face_engine.imports.base import SourceItem
from arc2face_engine.imports.images import InspectedImage, inspect_image
from arc2face_engine.ingest.analyzers import ImportAnalyzers
from arc2face_engine.ingest.plan import ImportWork, PlannedIdentity
from arc2face_engine.job.shard import attribute_columns
from schemas.imports import ImportSpec
from schemas.tables import (
    EMBEDDING_DIM,
    IMPORTED,
    LEFT_OUT_LABEL,
    NO_LABEL,
    NOT_ALIGNED,
    ManifestRow,
    l2_normalize,
    manifest_table,
)

ALIGNED_SIZE = 112
BATCH_IMAGES = 32
BATCH_PIXELS = 64 << 20  # decoded pixels held for one analysis batch (about 200 MB RGB)
WRITE_THREADS = 8


def image_id(identity_id: str, variant: int) -> str:
    return f"{identity_id}-v{variant:04d}-a00"


@dataclass
class _Item:
    """One item on its way through the shard."""

    identity: int  # index into the shard's identities
    variant: int
    name: str
    refusal: str | None = None
    image: InspectedImage | None = None
    data: bytes | None = None  # the bytes to copy, until written
    record: FaceRecord | None = None
    path: str | None = None
    sha256: str | None = None
    size: int | None = None


@dataclass
class AnalysedShard:
    """A shard whose images are written and analysed, waiting for its commit."""

    shard: int
    rows: list[ManifestRow]
    kept: list[str]  # identity ids with an accepted image, in plan order
    images: int = 0
    accepted: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def analyse_shard(
    spec: ImportSpec,
    work: ImportWork,
    writer: DatasetWriter,
    analyzers: ImportAnalyzers,
    on_items: Callable[[int, int], None] | None = None,
) -> AnalysedShard:
    """Read, copy and analyse one shard; its files are written, its part is not."""
    writer.clear_uncommitted(work.shard)
    items: list[_Item] = []
    with ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix=f"import{work.shard}-io") as pool:
        writes: list[tuple[_Item, Future]] = []
        for batch in _batches(work, items):
            _analyse(batch, spec.aligned, analyzers)
            for item in batch:
                writes.append((item, pool.submit(_write, writer, work, item)))
            if on_items is not None:
                on_items(len(batch), 0)
        for item, write in writes:
            item.path, item.sha256, item.size = write.result()
    return _judged(spec, work, writer, items)


def _batches(work: ImportWork, items: list[_Item]) -> Iterator[list[_Item]]:
    """Decoded items in analysis batches (bounded in images and pixels); refused and
    unlabelled items are added to `items` without a batch."""
    batch: list[_Item] = []
    pixels = 0
    for number, identity in enumerate(work.identities):
        for item in _read(work, number, identity):
            items.append(item)
            if item.image is None or item.image.pixels is None:
                continue
            batch.append(item)
            pixels += item.image.pixels.size // 3
            if len(batch) >= BATCH_IMAGES or pixels >= BATCH_PIXELS:
                yield batch
                batch, pixels = [], 0
    if batch:
        yield batch


def _read(work: ImportWork, number: int, identity: PlannedIdentity) -> Iterator[_Item]:
    if identity.source_label is None:  # no label: no identity to analyse it for
        for offset, ref in enumerate(identity.refs):
            variant = identity.first_variant + offset
            yield _Item(number, variant, ref.name, refusal=ref.refusal or NO_LABEL)
        return
    source: Iterator[SourceItem] = work.reader.read(identity.refs)
    for variant, entry in enumerate(source):
        item = _Item(number, variant, entry.name, refusal=entry.refusal)
        if entry.data is not None:
            item.image = inspect_image(entry.data)
            item.refusal = item.image.refusal
            if item.image.pixels is not None:
                item.data = entry.data
        yield item


def _analyse(batch: list[_Item], aligned: bool, analyzers: ImportAnalyzers) -> None:
    """Face records of a batch: aligned crops embedded directly (others refused
    not_aligned), other images detected at the size that suits them."""
    if aligned:
        crops = [item for item in batch if item.image.pixels.shape[:2] == (ALIGNED_SIZE,) * 2]
        for item in batch:
            if item not in crops:
                item.refusal = NOT_ALIGNED
        if crops:
            records = analyzers.aligned().analyze_aligned([item.image.pixels for item in crops])
            for item, record in zip(crops, records, strict=True):
                item.record = record
        return
    by_size: dict[tuple[int, int], list[_Item]] = {}
    for item in batch:
        by_size.setdefault(item.image.pixels.shape[:2], []).append(item)
    for (height, width), group in by_size.items():
        records = analyzers.for_size(height, width).analyze([item.image.pixels for item in group])
        for item, record in zip(group, records, strict=True):
            item.record = record


def _write(writer: DatasetWriter, work: ImportWork, item: _Item) -> tuple[str, str, int]:
    """Copy the item's bytes as they are (its bytes and pixels are dropped once written)."""
    identity = work.identities[item.identity]
    image, data = item.image, item.data
    item.image, item.data = InspectedImage(image.extension, image.width, image.height), None
    return writer.write_image(
        work.shard, image_id(identity.identity_id, item.variant), data, image.extension
    )


def _judged(
    spec: ImportSpec, work: ImportWork, writer: DatasetWriter, items: list[_Item]
) -> AnalysedShard:
    """Verdicts, identity embeddings, similarities and rows; left-out identities' files
    deleted."""
    verdicts = {id(item): _verdict(spec, item) for item in items}
    centres = _centres(work, items, verdicts)
    result = AnalysedShard(work.shard, [], [])
    for number, identity in enumerate(work.identities):
        if centres[number] is not None:
            result.kept.append(identity.identity_id)
    for item in items:
        accepted, reason = verdicts[id(item)]
        centre = centres[item.identity]
        if centre is None and item.path is not None:  # left out: its files go
            writer.fs.rm_file(writer.path(item.path))
            item.path = item.sha256 = item.size = None
        result.rows.append(_row(work, item, accepted, reason, centre))
        result.images += 1
        result.accepted += int(accepted)
        if reason is not None:
            result.reasons[reason] = result.reasons.get(reason, 0) + 1
    return result


def _verdict(spec: ImportSpec, item: _Item) -> tuple[bool, str | None]:
    """(accepted, reason): the reader's or the bytes' refusal, else the usual face checks
    (judge, with no identity to compare with yet)."""
    if item.refusal is not None or item.record is None:
        return False, item.refusal
    record = item.record
    reference = record.embedding if record.embedding is not None else np.zeros(EMBEDDING_DIM)
    verdict = judge(
        record, reference, min_similarity=-math.inf, min_det_score=spec.min_det_score,
        require_single_face=True, min_feature_norm=spec.min_feature_norm,
    )  # fmt: skip
    return verdict.accepted, verdict.reason


def _centres(
    work: ImportWork, items: list[_Item], verdicts: dict[int, tuple[bool, str | None]]
) -> list[np.ndarray | None]:
    """Each identity's normalised mean accepted embedding (None: no accepted image)."""
    sums = np.zeros((len(work.identities), EMBEDDING_DIM), np.float64)
    counts = np.zeros(len(work.identities), np.int64)
    for item in items:
        if verdicts[id(item)][0]:
            sums[item.identity] += item.record.embedding
            counts[item.identity] += 1
    centres = l2_normalize(sums).astype(np.float32)
    return [centres[index] if counts[index] else None for index in range(len(counts))]


def _optional_list(values: np.ndarray | None) -> list[float] | None:
    return None if values is None else np.asarray(values, np.float32).ravel().tolist()


def _row(
    work: ImportWork, item: _Item, accepted: bool, reason: str | None, centre: np.ndarray | None
) -> ManifestRow:
    identity = work.identities[item.identity]
    record = item.record or FaceRecord.no_face()
    pose = record.pose or (None, None, None)
    has_face = record.embedding is not None
    similarity = float(record.embedding @ centre) if has_face and centre is not None else None
    image = item.image
    return ManifestRow(
        image_id=image_id(identity.identity_id, item.variant),
        identity_id=identity.identity_id,
        label=LEFT_OUT_LABEL,  # numbered at the commit
        shard=work.shard,
        variant=item.variant,
        attempt=0,
        seed=None,
        path=item.path,
        sha256=item.sha256,
        size_bytes=item.size,
        width=image.width if image is not None else None,
        height=image.height if image is not None else None,
        pose_name=None, pose_yaw=None, pose_pitch=None, pose_roll=None,
        expression_name=None, expression=None,
        scheduler=None, steps=None, guidance=None, controlnet_scale=None, expression_scale=None,
        face_count=record.face_count,
        det_score=None if not has_face or math.isnan(record.det_score) else float(record.det_score),
        bbox=_optional_list(record.bbox),
        keypoints=_optional_list(record.keypoints),
        measured_yaw=pose[0], measured_pitch=pose[1], measured_roll=pose[2],
        face_embedding=_optional_list(record.embedding),
        feature_norm=None if math.isnan(record.embedding_norm) else float(record.embedding_norm),
        similarity=similarity,
        **attribute_columns(item.record),
        accepted=accepted,
        reject_reason=reason,
        source=IMPORTED,
        source_label=identity.source_label,
        source_name=item.name,
    )  # fmt: skip


def commit_shard(writer: DatasetWriter, analysed: AnalysedShard, first_label: int) -> int:
    """Number the shard's kept identities from `first_label` (in plan order) and commit its
    manifest part; returns the next free label."""
    labels = {identity_id: first_label + index for index, identity_id in enumerate(analysed.kept)}
    for row in analysed.rows:
        row.label = labels.get(row.identity_id, LEFT_OUT_LABEL)
    writer.commit_shard(analysed.shard, manifest_table(analysed.rows))
    return first_label + len(labels)
