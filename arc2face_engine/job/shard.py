"""Run one shard: generate -> verify -> top up -> encode -> write -> commit.

Plain Python (no Prefect): the generate task calls `run_shard` with an engine
and an analyzer that it keeps alive for the whole worker process. The shards of a
worker share its device through `DeviceTurns`: a shard generates while it holds the
turn and gives it back while it only waits for its last verdicts, so the next shard
generates meanwhile. `run_shard` returns when the engine is done with the shard; a
writer thread finishes the image writes and the commit (`PendingCommit`). The shard's manifest part is written last, so a crash anywhere before
it leaves the shard uncommitted and a re-run redoes it from scratch with the
same seeds. Every write goes through the shard's `ShardAttempt` (dataset/attempt.py),
so a second attempt at the same shard (a re-run elsewhere while a paused worker
resumes) never replaces or deletes what the other committed.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Protocol

import numpy as np

from arc2face_engine.controls.expressions import Expression, ExpressionBank
from arc2face_engine.controls.poses import Pose, PoseBank
from arc2face_engine.dataset.attempt import ShardAttempt, ShardSuperseded, begin_shard
from arc2face_engine.dataset.codec import IMAGE_EXTENSIONS, decode_image_into, encode_image
from arc2face_engine.dataset.writer import DatasetWriter
from arc2face_engine.determinism import image_seed
from arc2face_engine.generation.settings import GenerationSettings, ImageRequest
from arc2face_engine.job.shards import ShardWork, variant_for
from schemas.tables import GENERATED, ManifestRow, manifest_table, skin_tone_of

if TYPE_CHECKING:  # the seam only needs the types
    from arc2face_engine.faces.records import FaceRecord, Verdict

logger = logging.getLogger(__name__)


@dataclass
class ShardResult:
    shard: int
    images: int = 0
    accepted: int = 0
    rejected: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    generate_seconds: float = 0.0
    # Another attempt committed (or took over) the shard; this one wrote nothing of it.
    superseded: bool = False
    # One line per problem the engine reported while this shard ran (a torch.compile
    # fallback to eager, a compile after warm-up); empty when all is well.
    warnings: list[str] = field(default_factory=list)

    def merge(self, other: ShardResult) -> None:
        """Add another shard's counts to these (running totals over a job)."""
        self.warnings += [line for line in other.warnings if line not in self.warnings]
        self.images += other.images
        self.accepted += other.accepted
        self.rejected += other.rejected
        for reason, count in other.reject_reasons.items():
            self.reject_reasons[reason] = self.reject_reasons.get(reason, 0) + count

    def add(self, accepted: bool, reason: str | None) -> None:
        self.images += 1
        if accepted:
            self.accepted += 1
        else:
            self.rejected += 1
            key = reason or "unknown"
            self.reject_reasons[key] = self.reject_reasons.get(key, 0) + 1


@dataclass(frozen=True)
class _Item:
    """One image to make: which identity (position in the shard), variant and attempt."""

    position: int
    variant: int
    attempt: int


def image_id(identity_id: str, variant: int, attempt: int) -> str:
    return f"{identity_id}-v{variant:04d}-a{attempt:02d}"


@dataclass(frozen=True)
class _Generated:
    batch: list[_Item]
    requests: list[ImageRequest]
    images: np.ndarray


@dataclass(frozen=True)
class _Checked:
    generated: _Generated
    encoded: list[bytes]
    verdicts: list[Verdict]

    def entries(self):
        generated = self.generated
        return zip(
            generated.batch,
            generated.requests,
            generated.images,
            self.encoded,
            self.verdicts,
            strict=True,
        )


class ImageGenerator(Protocol):
    """What a shard needs from the diffusion side (generation.Arc2FaceEngine); a compiled
    engine also has `warm_up` and `compile_problems`."""

    def generate(
        self, requests: Sequence[ImageRequest], settings: GenerationSettings
    ) -> np.ndarray: ...


class FaceVerifier(Protocol):
    """What a shard and the identity sources need from face analysis
    (faces.load_face_analyzer)."""

    def analyze(self, images: np.ndarray | Sequence[np.ndarray]) -> list[FaceRecord]: ...

    def embed_largest_face(self, image: np.ndarray) -> FaceRecord: ...

    def verify(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        identity_embeddings: np.ndarray,
        min_similarity: float = ...,
        min_det_score: float = ...,
        require_single_face: bool = ...,
        min_feature_norm: float = ...,
        max_similarity: float = ...,
    ) -> list[Verdict]: ...


def io_workers() -> int:
    """Threads that encode, decode and write images: JPEG codecs and file writes release
    the GIL, so one per core (at least 2, at most 32) keeps up with the accelerator."""
    return max(2, min(32, os.cpu_count() or 1))


def _check(
    work: ShardWork, analyzer: FaceVerifier, generated: _Generated, io_pool: ThreadPoolExecutor
) -> _Checked:
    """Encode a generated batch and verify what will be stored."""
    encoding = partial(encode_image, image_format=work.output.image_format, quality=work.output.quality)
    encoded = list(io_pool.map(encoding, generated.images))
    stored = _as_stored(generated.images, encoded, work.output.image_format, io_pool)
    verdicts = analyzer.verify(
        stored,
        work.identities.embeddings[[item.position for item in generated.batch]],
        min_similarity=work.filter.min_similarity,
        min_det_score=work.filter.min_det_score,
        require_single_face=work.filter.require_single_face,
        min_feature_norm=work.filter.min_feature_norm,
        max_similarity=work.filter.max_similarity,
    )
    return _Checked(generated, encoded, verdicts)


class PendingCommit:
    """A shard whose images are all generated and verified; a writer thread finishes its
    image writes and then commits its manifest part. The accelerator is free meanwhile:
    the next shard generates while this one drains (see job/direct.py)."""

    def __init__(self, shard: int, future: Future[ShardResult]) -> None:
        self.shard = shard
        self._future = future

    @classmethod
    def done(cls, result: ShardResult) -> PendingCommit:
        future: Future[ShardResult] = Future()
        future.set_result(result)
        return cls(result.shard, future)

    def result(self) -> ShardResult:
        """Wait for the commit; re-raises any write or commit error (the shard then stays
        uncommitted, and a re-run redoes it)."""
        return self._future.result()

    def settle(self) -> None:
        """Wait for the commit to succeed or fail, without raising (used while another
        error propagates: started commits land before the job stops)."""
        wait([self._future])


class DeviceTurns:
    """How the shards of one worker share its device.

    - `generation`: whose turn it is to generate. A shard holds it while it has images
      to generate and gives it back while it only waits for verdicts, so the next shard's
      first batch generates while this shard's last batch is verified (and it takes the
      turn again for its top-ups).
    - `verifier`: one thread per device verifies every shard's batches in the order they
      were generated (the torch analyzer runs on its own CUDA stream, so verification
      overlaps generation on the GPU too).
    - `waiting`: at most one generated batch per device waits for the verifier; a shard
      generates its next batch only once the previous one is being verified (memory stays
      bounded whatever the number of shards in flight).
    """

    def __init__(self) -> None:
        self.generation = threading.Lock()
        self.verifier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")
        self.waiting = threading.BoundedSemaphore(1)


class _Turn:
    """One shard's hold on its device's generation turn: the turns' lock and the
    orchestrator's device slot (`hold_device`), taken and given back together."""

    def __init__(
        self, turns: DeviceTurns, hold_device: Callable[[], AbstractContextManager]
    ) -> None:
        self._turns, self._hold_device = turns, hold_device
        self._held: ExitStack | None = None

    def take(self) -> None:
        if self._held is not None:
            return
        held = ExitStack()
        held.enter_context(self._turns.generation)
        try:
            held.enter_context(self._hold_device())
        except BaseException:
            held.close()
            raise
        self._held = held

    def give_back(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.close()


def _generate(
    work: ShardWork, engine: ImageGenerator, turns: DeviceTurns, batch: list[_Item],
    poses: PoseBank | None, expressions: ExpressionBank | None,
) -> _Generated:
    """One batch, once the device's previous batch has reached the verifier."""
    requests = [_request(work, item, poses, expressions) for item in batch]
    turns.waiting.acquire()  # released when this batch's verification starts
    try:
        images = engine.generate(requests, work.settings)
    except BaseException:
        turns.waiting.release()
        raise
    return _Generated(batch, requests, images)


def _verification(
    turns: DeviceTurns, work: ShardWork, analyzer: FaceVerifier, generated: _Generated,
    io_pool: ThreadPoolExecutor,
) -> _Checked:
    turns.waiting.release()  # this batch no longer waits: the next one may generate
    return _check(work, analyzer, generated, io_pool)


def run_shard(
    work: ShardWork,
    writer: DatasetWriter,
    engine: ImageGenerator,
    analyzer: FaceVerifier,
    poses: PoseBank | None = None,
    expressions: ExpressionBank | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    turns: DeviceTurns | None = None,
    hold_device: Callable[[], AbstractContextManager] = nullcontext,
    warm_up: Callable[[], None] | None = None,
) -> PendingCommit:
    """Generate and verify one shard, top-ups included; returns once the engine is no
    longer needed, with the writes and the commit left to a writer thread
    (`.result()` waits for them and gives the shard's counts).

    `turns` is the device this shard shares with others (a private one when None);
    `hold_device()` is held with its generation turn; `warm_up()` runs once, holding
    the turn, before the first batch. `on_batch(images, accepted)` is called after every
    verified batch (progress).
    """
    shard = work.range.shard
    attempt = begin_shard(writer, shard)
    if attempt is None:  # committed by another attempt (a re-run elsewhere): nothing to do
        return PendingCommit.done(ShardResult(shard=shard, superseded=True))
    private = turns is None
    turns = turns or DeviceTurns()
    turn = _Turn(turns, hold_device)
    result = ShardResult(shard=shard)
    queue = deque(
        _Item(position, variant, 0)
        for position in range(len(work.identities.indices))
        for variant in range(work.variations.images_per_identity)
    )
    rows: list[ManifestRow] = []
    pending_writes: list[Future] = []
    io_pool = ThreadPoolExecutor(max_workers=io_workers(), thread_name_prefix=f"shard{shard}-io")
    checking: Future[_Checked] | None = None
    try:
        # The accelerator generates batch k+1 while the verifier encodes, decodes and
        # verifies batch k; its top-ups join the queue after that. The order is fixed, and
        # every rejected item gets its next attempt whatever the batching, so the shard's
        # content does not depend on this overlap, nor on other shards sharing the device.
        turn.take()
        if warm_up is not None:
            warm_up()
        while queue or checking is not None:
            generated = None
            if queue:
                turn.take()
                batch = [queue.popleft() for _ in range(min(work.generation.batch_size, len(queue)))]
                generated = _generate(work, engine, turns, batch, poses, expressions)
            if not queue:
                turn.give_back()  # only verdicts to wait for: another shard may generate
            if checking is not None:
                checked = checking.result()
                checking = None
                accepted = 0
                for item, request, pixels, data, verdict in checked.entries():
                    result.add(verdict.accepted, verdict.reason)
                    accepted += int(verdict.accepted)
                    if not verdict.accepted and item.attempt + 1 < work.filter.max_attempts:
                        queue.append(_Item(item.position, item.variant, item.attempt + 1))
                    row = _row(work, item, request, pixels, verdict, poses, expressions)
                    rows.append(row)
                    if verdict.accepted or work.output.keep_rejected_images:
                        write = io_pool.submit(_write_image, attempt, work, row, data)
                        pending_writes.append(write)
                if on_batch is not None:
                    on_batch(len(checked.generated.batch), accepted)
            if generated is not None:
                checking = turns.verifier.submit(
                    _verification, turns, work, analyzer, generated, io_pool
                )
    except BaseException:
        if checking is not None:
            wait([checking])  # it uses io_pool: let it finish first
        io_pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        turn.give_back()
        if private:
            turns.verifier.shutdown(wait=False)
    result.warnings = _compile_warnings(engine, shard)
    committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"shard{shard}-commit")
    future = committer.submit(_commit, attempt, rows, pending_writes, io_pool, result)
    committer.shutdown(wait=False)  # the thread ends with the commit
    return PendingCommit(shard, future)


def _compile_warnings(engine: ImageGenerator, shard: int) -> list[str]:
    """What the engine's compiler reported (a fallback to eager, a compile after warm-up),
    logged once per shard and kept in its result."""
    problems = getattr(engine, "compile_problems", lambda: [])()
    for problem in problems:
        logger.warning(f"shard {shard:05d}: {problem}")
    return problems


def _commit(
    attempt: ShardAttempt,
    rows: list[ManifestRow],
    pending_writes: list[Future],
    io_pool: ThreadPoolExecutor,
    result: ShardResult,
) -> ShardResult:
    """Wait for every image write, then write the manifest part: the commit. A failed
    write raises before the part exists, so the shard stays uncommitted. An attempt that
    another one superseded stops without an error: the shard is that one's."""
    try:
        try:
            for write in pending_writes:
                write.result()
        finally:
            io_pool.shutdown(wait=True, cancel_futures=True)
        rows.sort(key=lambda row: row.image_id)
        attempt.commit(manifest_table(rows))
    except ShardSuperseded:
        return ShardResult(shard=attempt.shard, superseded=True)
    return result


def _controls(
    work: ShardWork, item: _Item, poses: PoseBank | None, expressions: ExpressionBank | None
) -> tuple[Pose | None, Expression | None]:
    """The pose and expression of an item's grid cell (None where the bank is absent)."""
    variant = variant_for(
        work.identities.indices[item.position],
        item.variant,
        len(poses) if poses else 0,
        len(expressions) if expressions else 0,
        work.variations.images_per_identity,
    )
    pose = poses[variant.pose_index] if variant.pose_index is not None else None
    expression = (
        expressions[variant.expression_index] if variant.expression_index is not None else None
    )
    return pose, expression


def _request(
    work: ShardWork, item: _Item, poses: PoseBank | None, expressions: ExpressionBank | None
) -> ImageRequest:
    identity_index = work.identities.indices[item.position]
    pose, expression = _controls(work, item, poses, expressions)
    return ImageRequest(
        embedding=work.identities.embeddings[item.position],
        seed=image_seed(work.seed, identity_index, item.variant, item.attempt),
        pose_image=pose.image if pose is not None else None,
        expression=expression.values if expression is not None else None,
    )


def _optional_float(value: float) -> float | None:
    return None if np.isnan(value) else value


def _optional_list(values: np.ndarray | None) -> list[float] | None:
    return None if values is None else np.asarray(values, dtype=np.float32).ravel().tolist()


def _row(
    work: ShardWork,
    item: _Item,
    request: ImageRequest,
    pixels: np.ndarray,
    verdict: Verdict,
    poses: PoseBank | None,
    expressions: ExpressionBank | None,
) -> ManifestRow:
    """The image's manifest row; its file columns are filled when the file is written."""
    pose, expression = _controls(work, item, poses, expressions)
    record = verdict.record
    measured = record.pose if record.pose is not None else (None, None, None)
    identity_id = work.identities.identity_ids[item.position]
    settings = work.settings
    return ManifestRow(
        image_id=image_id(identity_id, item.variant, item.attempt),
        identity_id=identity_id,
        label=work.identities.labels[item.position],
        shard=work.range.shard,
        variant=item.variant,
        attempt=item.attempt,
        seed=request.seed,
        path=None,
        sha256=None,
        size_bytes=None,
        width=int(pixels.shape[1]),
        height=int(pixels.shape[0]),
        pose_name=pose.name if pose else None,
        pose_yaw=pose.yaw if pose else None,
        pose_pitch=pose.pitch if pose else None,
        pose_roll=pose.roll if pose else None,
        expression_name=expression.name if expression else None,
        expression=_optional_list(expression.values) if expression else None,
        scheduler=settings.scheduler,
        steps=settings.num_inference_steps,
        guidance=settings.guidance_scale,
        controlnet_scale=settings.controlnet_scale,
        expression_scale=settings.expression_scale,
        face_count=record.face_count,
        det_score=None if record.face_count == 0 else float(record.det_score),
        bbox=_optional_list(record.bbox),
        keypoints=_optional_list(record.keypoints),
        measured_yaw=measured[0],
        measured_pitch=measured[1],
        measured_roll=measured[2],
        face_embedding=_optional_list(record.embedding),
        # FaceRecord.embedding_norm: the ArcFace norm before normalisation (nan: no face).
        feature_norm=_optional_float(getattr(record, "embedding_norm", math.nan)),
        similarity=_optional_float(float(verdict.similarity)),
        **attribute_columns(record),
        accepted=bool(verdict.accepted),
        reject_reason=verdict.reason,
        source=GENERATED,
        source_label=None,
        source_name=None,
    )


def attribute_columns(record: FaceRecord | None) -> dict:
    """The composition columns of a face record (manifest and probe rows): predicted
    gender and age, measured skin tone; null where there is no face or no value (all
    null for no record)."""
    if record is None:
        return dict.fromkeys(
            ["predicted_gender", "gender_probability", "predicted_age", "skin_ita", "skin_tone"]
        )
    ita = _optional_float(float(getattr(record, "skin_ita", math.nan)))
    return {
        "predicted_gender": getattr(record, "gender", None),
        "gender_probability": _optional_float(float(getattr(record, "gender_probability", math.nan))),
        "predicted_age": _optional_float(float(getattr(record, "age", math.nan))),
        "skin_ita": ita,
        "skin_tone": skin_tone_of(ita),
    }


def _as_stored(
    images: np.ndarray, encoded: list[bytes], image_format: str, pool: ThreadPoolExecutor
) -> np.ndarray:
    """The pixels a reader of the dataset will see. Verification judges these, not the
    generator's output: a lossy codec can move a face across a threshold, and the audit
    re-verifies the stored file."""
    if image_format == "png":  # lossless: decoding gives the same pixels back
        return images
    stored = np.empty_like(images)
    list(pool.map(decode_image_into, encoded, stored))  # straight into the batch: one copy
    return stored


def _write_image(attempt: ShardAttempt, work: ShardWork, row: ManifestRow, data: bytes) -> None:
    ext = IMAGE_EXTENSIONS[work.output.image_format]
    row.path, row.sha256, row.size_bytes = attempt.write_image(row.image_id, data, ext)
