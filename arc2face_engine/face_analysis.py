"""Face analysis: detect, align, embed with ArcFace, measure head pose, verify identity.

Arc2Face re-verifies its images with insightface's antelopev2 pack (SCRFD detector with
five keypoints, 3D 68-point landmarks that give the head pose) whose recognition model is
replaced by Arc2Face's own arcface.onnx. The models are loaded through insightface's model
zoo and run by insightface's classes; what insightface does one face at a time (landmarks,
recognition) is done here for all the faces of a batch of images in one onnxruntime call.
This onnxruntime path is the CPU reference; on CUDA, `from_models_dir(device="cuda")`
returns face_analysis_torch.TorchFaceAnalyzer, the same pipeline batched on the GPU in
fp16 (same files, same results within the tolerances its tests check).

    analyzer = FaceAnalyzer.from_models_dir("models", det_size=640)
    records = analyzer.analyze(images)                       # (B, H, W, 3) uint8 RGB
    verdicts = analyzer.verify(images, identity_embeddings)  # (B, 512)
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
from insightface.model_zoo import get_model
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.landmark import Landmark
from insightface.model_zoo.scrfd import SCRFD
from insightface.utils import face_align, transform

from arc2face_engine.errors import CheckpointMismatch, UserError
from arc2face_engine.store import require
from schemas.tables import (  # noqa: F401 - re-exported: the reject reasons' home is schemas
    EMBEDDING_DIM,
    LOW_DETECTION_SCORE,
    LOW_FEATURE_NORM,
    LOW_SIMILARITY,
    MULTIPLE_FACES,
    NO_FACE,
    REJECT_REASONS,
    l2_normalize,
)

ANTELOPEV2_DIR = "antelopev2"
DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
LANDMARK_3D_FILE = "1k3d68.onnx"
RECOGNITION_FILE = "arcface.onnx"  # Arc2Face's, in place of antelopev2's glintr100.onnx

# Arc2Face's demos: FaceAnalysis(name="antelopev2").prepare(ctx_id=0, det_size=(640, 640)),
# whose SCRFD keeps insightface's default threshold.
REFERENCE_DET_SIZE = 640
REFERENCE_DET_THRESH = 0.5
# Images smaller than this come from the tiny demo models: detected at their own size.
SMALL_IMAGE = 256


# insightface's estimate_norm calls scikit-image's deprecated SimilarityTransform.estimate
# once per face; the warning is theirs to fix and would flood every shard's log.
warnings.filterwarnings(
    "ignore", message="`estimate` is deprecated", category=FutureWarning,
    module="insightface.utils.face_align",
)  # fmt: skip


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


def detection_settings(height: int, width: int, min_det_score: float) -> tuple[int, float]:
    """(det_size, det_thresh) for verifying images of this size, and for photos.

    Arc2Face's reference settings: SCRFD at 640x640 with insightface's threshold 0.5,
    whatever the image size (SCRFD resizes every image onto its 640 canvas). Only images
    under SMALL_IMAGE pixels (the tiny demo models) are detected at their own size,
    rounded up to SCRFD's multiple of 32, which keeps the CPU demo cheap. A filter that
    accepts weaker faces than 0.5 (min_det_score below it) lowers the threshold to match,
    so those faces are found rather than counted as no_face. The job, identities from
    photos and the audit's re-verification all use this, so they measure the same way.
    """
    largest = max(height, width)
    det_size = REFERENCE_DET_SIZE if largest >= SMALL_IMAGE else -(-largest // 32) * 32
    return det_size, max(0.05, min(REFERENCE_DET_THRESH, min_det_score))


def default_providers() -> list[str]:
    """CUDA first when onnxruntime-gpu offers it, CPU otherwise (and as fallback)."""
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session_options(providers: list) -> onnxruntime.SessionOptions | None:
    """On CPU, one intra-op thread: onnxruntime splits reductions by thread count, so a
    fixed count keeps measured values bit-identical across machines and task runners."""
    if any("CUDA" in str(provider) for provider in providers):
        return None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return options


def _load_model(path: Path, expected: type, providers: list) -> object:
    """Load one ONNX file through insightface's model zoo, which routes it to a class by
    its inputs and outputs; a file routed elsewhere is not the model we need."""
    model = get_model(str(path), providers=providers, sess_options=_session_options(providers))
    if not isinstance(model, expected):
        routed = type(model).__name__ if model is not None else "nothing"
        raise CheckpointMismatch(
            f"{path} is read as {routed}, not {expected.__name__}: "
            f"replace it with the published file (`arc2face-synth models download DIR`)"
        )
    return model


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


def _as_bgr_frames(images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """Contiguous BGR frames (insightface and OpenCV work in BGR)."""
    return [np.ascontiguousarray(frame[:, :, ::-1]) for frame in rgb_frames(images)]


def _largest(boxes: np.ndarray) -> int:
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return int(np.argmax(areas))  # ties: the first, i.e. the higher score (NMS order)


def _run_batched(model: ArcFaceONNX | Landmark, blob: np.ndarray) -> np.ndarray:
    """One session.run over the whole (N, 3, S, S) blob; a model exported with a fixed
    batch size is run in chunks of that size instead."""
    fixed_batch = model.session.get_inputs()[0].shape[0]
    chunk = fixed_batch if isinstance(fixed_batch, int) and fixed_batch > 0 else len(blob)
    dtype = getattr(model, "input_dtype", np.float32)
    outputs = [
        model.session.run(
            model.output_names, {model.input_name: np.ascontiguousarray(part, dtype)}
        )[0]
        for part in (blob[start : start + chunk] for start in range(0, len(blob), chunk))
    ]
    return np.concatenate(outputs)


def _blob(model: ArcFaceONNX | Landmark, crops: list[np.ndarray]) -> np.ndarray:
    """The preprocessing insightface applies to one crop, applied to a stack of crops."""
    mean = model.input_mean
    return cv2.dnn.blobFromImages(
        crops, 1.0 / model.input_std, model.input_size, (mean, mean, mean), swapRB=True
    )


def align_face(image: np.ndarray, keypoints: np.ndarray, size: int = 112) -> np.ndarray:
    """The ArcFace crop of a face: the similarity transform that puts the five keypoints on
    insightface's arcface template, applied to `image` (any channel order; RGB stays RGB)."""
    if size % 112 and size % 128:
        raise FaceAnalysisInputError(
            f"aligned face size {size} is not a multiple of 112 or 128: use 112 (ArcFace's input)"
        )
    keypoints = np.asarray(keypoints, np.float32).reshape(5, 2)
    return face_align.norm_crop(np.asarray(image), keypoints, image_size=size)


def judge(
    record: FaceRecord,
    identity_embedding: np.ndarray,
    min_similarity: float = 0.4,
    min_det_score: float = 0.5,
    require_single_face: bool = True,
    min_feature_norm: float = 0.0,
) -> Verdict:
    """The verdict on one analysed image; reasons are checked in REJECT_REASONS order.
    The similarity is reported whenever there is a face, also for rejected images.
    `min_feature_norm` 0 is off; otherwise an unknown (nan) norm fails it too."""
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
    return Verdict(record, similarity, reason is None, reason)


def feature_norm(record: FaceRecord) -> float:
    """The face's ArcFace feature norm before normalisation (nan when unknown)."""
    return float(getattr(record, "embedding_norm", math.nan))


class AnalyzerBase:
    """What every face analyzer offers on top of `analyze` (onnxruntime or torch)."""

    def analyze(self, images: np.ndarray | Sequence[np.ndarray]) -> list[FaceRecord]:
        raise NotImplementedError

    def embed_largest_face(self, image: np.ndarray) -> FaceRecord:
        """The record of one image (for identity sources: photos -> embeddings)."""
        return self.analyze([image])[0]

    def verify(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        identity_embeddings: np.ndarray,
        min_similarity: float = 0.4,
        min_det_score: float = 0.5,
        require_single_face: bool = True,
        min_feature_norm: float = 0.0,
    ) -> list[Verdict]:
        """Does image i show identity i? Cosine of its largest face's embedding with
        identity_embeddings[i], after the face-count, detection-score and feature-norm
        checks."""
        identities = np.asarray(identity_embeddings, np.float32)
        if identities.ndim != 2 or identities.shape != (len(images), EMBEDDING_DIM):
            raise FaceAnalysisInputError(
                f"identity embeddings have shape {identities.shape} for {len(images)} images: "
                f"pass one {EMBEDDING_DIM}-d embedding per image"
            )
        records = self.analyze(images)
        return [
            judge(
                record, identity, min_similarity, min_det_score, require_single_face,
                min_feature_norm,
            )
            for record, identity in zip(records, identities, strict=True)
        ]


def _is_cuda(device: str | None) -> bool:
    if device is None:
        return False
    if str(device) == "auto":
        import torch

        return torch.cuda.is_available()
    return str(device).startswith("cuda")


def unsupported_ops(models_dir: str | os.PathLike) -> dict[str, list[str]]:
    """{file: ops} of the face models the torch runner cannot run (empty: it runs all)."""
    import onnx

    from arc2face_engine.onnx_torch import OPS

    pack = Path(models_dir) / ANTELOPEV2_DIR
    missing = {}
    for name in (DETECTOR_FILE, LANDMARK_3D_FILE, RECOGNITION_FILE):
        graph = onnx.load(str(pack / name), load_external_data=False).graph
        ops = sorted({node.op_type for node in graph.node} - set(OPS))
        if ops:
            missing[name] = ops
    return missing


def face_analysis_placement(models_dir: str | os.PathLike, device: str) -> tuple[str, str]:
    """(runtime, device) face analysis gets when the job runs on `device`: torch on the
    GPU when the device is CUDA and the graphs convert, else onnxruntime on its best
    provider (CUDA only with onnxruntime-gpu installed)."""
    if _is_cuda(device):
        if not unsupported_ops(models_dir):
            return "torch", "cuda"
        if "CUDAExecutionProvider" in default_providers():
            return "onnxruntime", "cuda"
    return "onnxruntime", "cpu"


class FaceAnalyzer(AnalyzerBase):
    """SCRFD detection, 3D-landmark head pose and ArcFace embedding of the largest face."""

    def __init__(
        self,
        detector: SCRFD,
        landmark_3d: Landmark,
        recognizer: ArcFaceONNX,
        det_size: int | tuple[int, int] = 640,
        det_thresh: float = 0.5,
    ) -> None:
        self.detector = detector
        self.landmark_3d = landmark_3d
        self.recognizer = recognizer
        self.det_size = check_det_size(det_size)
        self.det_thresh = float(det_thresh)
        # ctx_id 0 keeps the providers the sessions were created with.
        detector.prepare(0, input_size=self.det_size, det_thresh=self.det_thresh)
        landmark_3d.prepare(0)
        recognizer.prepare(0)

    @classmethod
    def from_models_dir(
        cls,
        models_dir: str | os.PathLike,
        providers: Sequence | None = None,
        det_size: int | tuple[int, int] = 640,
        det_thresh: float = 0.5,
        device: str | None = None,
        batch_size: int = 32,
    ) -> AnalyzerBase:
        """Load models_dir/antelopev2 (scrfd_10g_bnkps.onnx, 1k3d68.onnx, arcface.onnx).

        device None or cpu: this onnxruntime analyzer (the reference). A CUDA device (or
        auto with a GPU): the batched torch analyzer on that GPU in fp16, `batch_size`
        images per forward; onnxruntime only if the graphs hold ops it cannot convert."""
        require(models_dir, "core", under=ANTELOPEV2_DIR)
        if _is_cuda(device) and face_analysis_placement(models_dir, device)[0] == "torch":
            from arc2face_engine.face_analysis_torch import TorchFaceAnalyzer

            target = "cuda" if str(device) == "auto" else device
            return TorchFaceAnalyzer.from_models_dir(
                models_dir, det_size, det_thresh, device=target, batch_size=batch_size
            )
        pack = Path(models_dir) / ANTELOPEV2_DIR
        providers = list(providers) if providers else default_providers()
        detector = _load_model(pack / DETECTOR_FILE, SCRFD, providers)
        landmark_3d = _load_model(pack / LANDMARK_3D_FILE, Landmark, providers)
        recognizer = _load_model(pack / RECOGNITION_FILE, ArcFaceONNX, providers)
        if not detector.use_kps or not landmark_3d.require_pose:
            raise CheckpointMismatch(
                f"{pack} lacks a keypoint detector or 3D 68-point landmarks: "
                f"replace it with the published antelopev2 files (`arc2face-synth models download DIR`)"
            )
        return cls(detector, landmark_3d, recognizer, det_size, det_thresh)

    # --- analysis ------------------------------------------------------------------------

    def analyze(self, images: np.ndarray | Sequence[np.ndarray]) -> list[FaceRecord]:
        """One FaceRecord per image: the face count and the largest face's score, box,
        keypoints, normalised embedding and head pose."""
        frames = _as_bgr_frames(images)
        faces = []  # (image index, detection row (5,), keypoints (5, 2), face count)
        for index, frame in enumerate(frames):
            boxes, keypoints = self.detector.detect(frame, max_num=0)
            if len(boxes):
                largest = _largest(boxes)
                faces.append((index, boxes[largest], keypoints[largest], len(boxes)))
        records = [FaceRecord.no_face() for _ in frames]
        if not faces:
            return records
        face_frames = [frames[index] for index, *_ in faces]
        embeddings, norms = self._embed(face_frames, [keypoints for _, _, keypoints, _ in faces])
        poses = self._head_poses(face_frames, [box[:4] for _, box, _, _ in faces])
        for (index, box, keypoints, count), embedding, norm, pose in zip(
            faces, embeddings, norms, poses, strict=True
        ):
            records[index] = FaceRecord(
                face_count=count,
                det_score=float(box[4]),
                bbox=box[:4].astype(np.float32),
                keypoints=keypoints.astype(np.float32),
                embedding=embedding,
                pose=pose,
                embedding_norm=float(norm),
            )
        return records

    # --- batched stages -------------------------------------------------------------------

    def _embed(
        self, frames: list[np.ndarray], keypoints: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(N, 512) normalised embeddings of the faces and their norms before normalising,
        one batched recognition call."""
        size = self.recognizer.input_size[0]
        crops = [
            face_align.norm_crop(frame, kps, image_size=size)
            for frame, kps in zip(frames, keypoints, strict=True)
        ]
        features = _run_batched(self.recognizer, _blob(self.recognizer, crops))
        features = features.astype(np.float32, copy=False)
        return l2_normalize(features), np.linalg.norm(features, axis=-1)

    def _head_poses(
        self, frames: list[np.ndarray], boxes: list[np.ndarray]
    ) -> list[tuple[float, float, float]]:
        """(yaw, pitch, roll) per face: insightface Landmark.get's crop, 3D landmarks and
        pose fit, with one batched landmark call for all the faces."""
        model = self.landmark_3d
        size = model.input_size[0]
        crops, transforms = [], []
        for frame, box in zip(frames, boxes, strict=True):
            center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            scale = size / (max(box[2] - box[0], box[3] - box[1]) * 1.5)
            crop, matrix = face_align.transform(frame, center, size, scale, 0)
            crops.append(crop)
            transforms.append(matrix)
        predictions = _run_batched(model, _blob(model, crops))
        return [
            self._pose(prediction, matrix)
            for prediction, matrix in zip(predictions, transforms, strict=True)
        ]

    def _pose(self, prediction: np.ndarray, matrix: np.ndarray) -> tuple[float, float, float]:
        model = self.landmark_3d
        half = model.input_size[0] // 2
        points = prediction.reshape(-1, 3)[-model.lmk_num :].astype(np.float32)
        points[:, :2] += 1  # [-1, 1] crop coordinates -> crop pixels
        points *= half
        points = face_align.trans_points(points, cv2.invertAffineTransform(matrix))
        affine = transform.estimate_affine_matrix_3d23d(model.mean_lmk, points)
        _, rotation, _ = transform.P2sRt(affine)
        pitch, yaw, roll = transform.matrix2angle(rotation)
        return float(yaw), float(pitch), float(roll)
