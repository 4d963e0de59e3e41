"""What face analysis reports and the rule that judges it: `FaceRecord` (one image's face
count and largest face), `Verdict` and `judge` (the reject reasons in order),
`read_gender_age` (insightface's reading of genderage.onnx's output) and `AnalyzerBase`,
the verification every analyzer offers on top of its `analyze`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from schemas.constants import (
    EMBEDDING_DIM,
    GENDERS,
    LOW_DETECTION_SCORE,
    LOW_FEATURE_NORM,
    LOW_SIMILARITY,
    MULTIPLE_FACES,
    NO_FACE,
    TOO_SIMILAR,
    l2_normalize,
)
from schemas.errors import UserError


class FaceAnalysisInputError(UserError, ValueError):
    """Images or identity embeddings handed to the face analyzer are malformed."""


@dataclass(eq=False)
class FaceRecord:
    """What the analyzer saw in one image: the number of faces and the largest face."""

    face_count: int
    det_score: float  # nan when there is no face
    bbox: np.ndarray | None  # (4,) float32 x1, y1, x2, y2 in image pixels
    keypoints: np.ndarray | None  # (5, 2) float32: eyes, nose, mouth corners
    embedding: np.ndarray | None  # (512,) float32, L2-normalised ArcFace embedding
    pose: tuple[float, float, float] | None  # (yaw, pitch, roll) in degrees
    embedding_norm: float = math.nan  # ArcFace feature norm before L2 normalisation
    # Predicted by genderage.onnx on insightface's own crop of the box (see read_gender_age)
    # and measured on the aligned face (faces.skin_tone): attributes of a synthetic image.
    gender: str | None = None  # GENDERS: "female" or "male"
    gender_probability: float = math.nan  # softmax probability of `gender`
    age: float = math.nan  # years (100 x the model's third output)
    skin_ita: float = math.nan  # ITA degrees; nan: greyscale or outside ITA's domain

    @classmethod
    def no_face(cls) -> FaceRecord:
        return cls(0, math.nan, None, None, None, None)


@dataclass(eq=False)
class Verdict:
    """Whether an image shows the identity it was generated for, and if not, why."""

    record: FaceRecord
    similarity: float  # cosine of the face and identity embeddings; nan when no face
    accepted: bool
    reason: str | None  # one of REJECT_REASONS, None when accepted


def read_gender_age(predictions: np.ndarray) -> list[tuple[str, float, float]]:
    """(gender, its probability, age in years) per (N, 3) genderage output row, read as
    insightface's Attribute.get reads it: gender = argmax of the two logits (0 female,
    1 male), age = 100 x the third value (insightface rounds it to an integer; the
    unrounded value is kept). The probability is the softmax of the two logits."""
    predictions = np.asarray(predictions, np.float64).reshape(-1, 3)
    logits = predictions[:, :2]
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    chosen = np.argmax(logits, axis=1)
    return [
        (GENDERS[int(index)], float(probabilities[row, index]), float(100.0 * predictions[row, 2]))
        for row, index in enumerate(chosen)
    ]


def with_gender_age(record: FaceRecord, reading: tuple[str, float, float]) -> FaceRecord:
    """`record` with a read_gender_age reading filled in (returns the same object)."""
    record.gender, record.gender_probability, record.age = reading
    return record


def check_det_size(det_size: int | tuple[int, int]) -> tuple[int, int]:
    size = (det_size, det_size) if isinstance(det_size, int) else tuple(det_size)
    if len(size) != 2 or any(int(side) < 32 or int(side) % 32 for side in size):
        raise FaceAnalysisInputError(
            f"det_size {det_size!r} is not a multiple of 32: use e.g. 640 (or 128 for tiny images)"
        )
    return int(size[0]), int(size[1])


def rgb_frames(images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """(B, H, W, 3) or a list of (H, W, 3) uint8 RGB -> a list of checked (H, W, 3) arrays."""
    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise FaceAnalysisInputError(
            f"images have shape {images.shape}: pass (B, H, W, 3) uint8 RGB or a list of (H, W, 3)"
        )
    frames = [np.asarray(frame) for frame in images]
    for index, frame in enumerate(frames):
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise FaceAnalysisInputError(
                f"image {index} is {frame.dtype} {frame.shape}: pass uint8 RGB arrays of shape (H, W, 3)"
            )
    return frames


def aligned_keypoints(size: int = 112) -> np.ndarray:
    """The five keypoints of an aligned ArcFace crop of `size` (insightface's template)."""
    from insightface.utils.face_align import arcface_dst

    ratio, shift = (size / 112.0, 0.0) if size % 112 == 0 else (size / 128.0, 8.0 * size / 128.0)
    points = arcface_dst.astype(np.float32) * ratio
    points[:, 0] += shift
    return points


def check_aligned(frames: Sequence[np.ndarray], size: int) -> None:
    """Refuse frames that are not size x size crops (the recognizer's input)."""
    for index, frame in enumerate(frames):
        if frame.shape[:2] != (size, size):
            raise FaceAnalysisInputError(
                f"aligned image {index} is {frame.shape[1]}x{frame.shape[0]}, not the "
                f"recognizer's {size}x{size}: pass aligned ArcFace crops"
            )


def judge(
    record: FaceRecord,
    identity_embedding: np.ndarray,
    min_similarity: float = 0.4,
    min_det_score: float = 0.5,
    require_single_face: bool = True,
    min_feature_norm: float = 0.0,
    max_similarity: float = 1.0,
) -> Verdict:
    """The verdict on one analysed image; reasons are checked in REJECT_REASONS order.
    The similarity is reported whenever there is a face, also for rejected images.
    `min_feature_norm` 0 is off; otherwise an unknown (nan) norm fails it too.
    `max_similarity` 1 is off; below it, a face closer to the identity than that is a
    near-copy of the identity (too_similar): it adds no intra-class variation."""
    if record.face_count == 0 or record.embedding is None:
        return Verdict(record, math.nan, False, NO_FACE)
    similarity = float(record.embedding @ l2_normalize(np.asarray(identity_embedding, np.float32)))
    reason = None
    if require_single_face and record.face_count > 1:
        reason = MULTIPLE_FACES
    elif record.det_score < min_det_score:
        reason = LOW_DETECTION_SCORE
    elif min_feature_norm > 0 and not feature_norm(record) >= min_feature_norm:
        reason = LOW_FEATURE_NORM
    elif similarity < min_similarity:
        reason = LOW_SIMILARITY
    elif max_similarity < 1.0 and similarity > max_similarity:
        reason = TOO_SIMILAR
    return Verdict(record, similarity, reason is None, reason)


def feature_norm(record: FaceRecord) -> float:
    """The face's ArcFace feature norm before normalisation (nan when unknown)."""
    return float(getattr(record, "embedding_norm", math.nan))


class AnalyzerBase:
    """What every face analyzer offers on top of `analyze` (onnxruntime or torch)."""

    def analyze(self, images: np.ndarray | Sequence[np.ndarray]) -> list[FaceRecord]:
        raise NotImplementedError

    def analyze_aligned(self, images: np.ndarray | Sequence[np.ndarray]) -> list[FaceRecord]:
        """Records of aligned ArcFace crops, embedded without detection."""
        raise NotImplementedError

    def embed_largest_face(self, image: np.ndarray) -> FaceRecord:
        """The record of one image (for identity sources: photos -> embeddings)."""
        return self.analyze([image])[0]

    def records_for(
        self, images: np.ndarray | Sequence[np.ndarray], identities: np.ndarray
    ) -> list[FaceRecord]:
        """The records `verify` judges: what `analyze` sees (a stand-in analyzer that
        makes its faces from the identities overrides this)."""
        return self.analyze(images)

    def verify(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        identity_embeddings: np.ndarray,
        min_similarity: float = 0.4,
        min_det_score: float = 0.5,
        require_single_face: bool = True,
        min_feature_norm: float = 0.0,
        max_similarity: float = 1.0,
    ) -> list[Verdict]:
        """Does image i show identity i? Cosine of its largest face's embedding with
        identity_embeddings[i], after the face-count, detection-score and feature-norm
        checks, and not a near-copy of it (max_similarity)."""
        identities = np.asarray(identity_embeddings, np.float32)
        if identities.ndim != 2 or identities.shape != (len(images), EMBEDDING_DIM):
            raise FaceAnalysisInputError(
                f"identity embeddings have shape {identities.shape} for {len(images)} images: "
                f"pass one {EMBEDDING_DIM}-d embedding per image"
            )
        records = self.records_for(images, identities)
        return [
            judge(
                record, identity, min_similarity, min_det_score, require_single_face,
                min_feature_norm, max_similarity,
            )
            for record, identity in zip(records, identities, strict=True)
        ]
