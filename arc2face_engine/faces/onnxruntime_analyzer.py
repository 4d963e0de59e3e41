"""Face analysis: detect, align, embed with ArcFace, measure head pose, verify identity.

Arc2Face re-verifies its images with insightface's antelopev2 pack (SCRFD detector with
five keypoints, 3D 68-point landmarks that give the head pose) whose recognition model is
replaced by Arc2Face's own arcface.onnx; the pack's genderage.onnx predicts gender and
age, and faces.skin_tone measures the skin tone (ITA) of the aligned face. The models are loaded through insightface's model
zoo and run by insightface's classes; what insightface does one face at a time (landmarks,
recognition) is done here for all the faces of a batch of images in one onnxruntime call.
This onnxruntime path is the CPU reference; on CUDA, `faces.load_face_analyzer` gives
torch_analyzer.TorchFaceAnalyzer instead, the same pipeline batched on the GPU in fp16
(same files, same results within the tolerances its tests check).

    analyzer = FaceAnalyzer.from_models_dir("models", det_size=640)
    records = analyzer.analyze(images)                       # (B, H, W, 3) uint8 RGB
    verdicts = analyzer.verify(images, identity_embeddings)  # (B, 512)
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
from insightface.model_zoo import get_model
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.attribute import Attribute
from insightface.model_zoo.landmark import Landmark
from insightface.model_zoo.scrfd import SCRFD
from insightface.utils import face_align, transform

from arc2face_engine.faces.pack import (
    ANTELOPEV2_DIR,
    DETECTOR_FILE,
    GENDERAGE_FILE,
    LANDMARK_3D_FILE,
    RECOGNITION_FILE,
)
from arc2face_engine.faces.records import (
    AnalyzerBase,
    FaceRecord,
    aligned_keypoints,
    check_aligned,
    check_det_size,
    read_gender_age,
    rgb_frames,
    with_gender_age,
)
from arc2face_engine.faces.skin_tone import measure_skin_tones
from arc2face_engine.models_dir import require
from schemas.errors import CheckpointMismatch
from schemas.tables import (
    l2_normalize,
)

# insightface's estimate_norm calls scikit-image's deprecated SimilarityTransform.estimate
# once per face; the warning is theirs to fix and would flood every shard's log.
warnings.filterwarnings(
    "ignore", message="`estimate` is deprecated", category=FutureWarning,
    module="insightface.utils.face_align",
)  # fmt: skip


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


def _as_bgr_frames(images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """Contiguous BGR frames (insightface and OpenCV work in BGR)."""
    return [np.ascontiguousarray(frame[:, :, ::-1]) for frame in rgb_frames(images)]


def _largest(boxes: np.ndarray) -> int:
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return int(np.argmax(areas))  # ties: the first, i.e. the higher score (NMS order)


def _run_batched(model: ArcFaceONNX | Landmark | Attribute, blob: np.ndarray) -> np.ndarray:
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


def _blob(model: ArcFaceONNX | Landmark | Attribute, crops: list[np.ndarray]) -> np.ndarray:
    """The preprocessing insightface applies to one crop, applied to a stack of crops."""
    mean = model.input_mean
    return cv2.dnn.blobFromImages(
        crops, 1.0 / model.input_std, model.input_size, (mean, mean, mean), swapRB=True
    )


class FaceAnalyzer(AnalyzerBase):
    """SCRFD detection, 3D-landmark head pose, ArcFace embedding, predicted gender and age
    and measured skin tone of the largest face."""

    def __init__(
        self,
        detector: SCRFD,
        landmark_3d: Landmark,
        recognizer: ArcFaceONNX,
        genderage: Attribute,
        det_size: int | tuple[int, int] = 640,
        det_thresh: float = 0.5,
    ) -> None:
        self.detector = detector
        self.landmark_3d = landmark_3d
        self.recognizer = recognizer
        self.genderage = genderage
        self.det_size = check_det_size(det_size)
        self.det_thresh = float(det_thresh)
        # ctx_id 0 keeps the providers the sessions were created with.
        detector.prepare(0, input_size=self.det_size, det_thresh=self.det_thresh)
        landmark_3d.prepare(0)
        recognizer.prepare(0)
        genderage.prepare(0)

    @classmethod
    def from_models_dir(
        cls,
        models_dir: str | os.PathLike,
        providers: Sequence | None = None,
        det_size: int | tuple[int, int] = 640,
        det_thresh: float = 0.5,
    ) -> FaceAnalyzer:
        """Load models_dir/antelopev2 (scrfd_10g_bnkps.onnx, 1k3d68.onnx, arcface.onnx,
        genderage.onnx) into
        onnxruntime sessions on `providers` (default: CUDA first when onnxruntime-gpu
        offers it). `faces.load_face_analyzer` picks between this and the torch analyzer."""
        require(models_dir, "core", under=ANTELOPEV2_DIR)
        pack = Path(models_dir) / ANTELOPEV2_DIR
        providers = list(providers) if providers else default_providers()
        detector = _load_model(pack / DETECTOR_FILE, SCRFD, providers)
        landmark_3d = _load_model(pack / LANDMARK_3D_FILE, Landmark, providers)
        recognizer = _load_model(pack / RECOGNITION_FILE, ArcFaceONNX, providers)
        genderage = _load_model(pack / GENDERAGE_FILE, Attribute, providers)
        if not detector.use_kps or not landmark_3d.require_pose or genderage.taskname != "genderage":
            raise CheckpointMismatch(
                f"{pack} lacks a keypoint detector, 3D 68-point landmarks or a gender/age model: "
                f"replace it with the published antelopev2 files (`arc2face-synth models download DIR`)"
            )
        return cls(detector, landmark_3d, recognizer, genderage, det_size, det_thresh)

    # --- analysis ------------------------------------------------------------------------

    def analyze(self, images: np.ndarray | Sequence[np.ndarray]) -> list[FaceRecord]:
        """One FaceRecord per image: the face count and the largest face's score, box,
        keypoints, normalised embedding, head pose, predicted gender and age, and skin tone."""
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
        readings = self._gender_age(face_frames, [box[:4] for _, box, _, _ in faces])
        for (index, box, keypoints, count), embedding, norm, pose, reading in zip(
            faces, embeddings, norms, poses, readings, strict=True
        ):
            records[index] = with_gender_age(
                FaceRecord(
                    face_count=count,
                    det_score=float(box[4]),
                    bbox=box[:4].astype(np.float32),
                    keypoints=keypoints.astype(np.float32),
                    embedding=embedding,
                    pose=pose,
                    embedding_norm=float(norm),
                ),
                reading,
            )
        measure_skin_tones(rgb_frames(images), records)  # in sRGB, not the BGR copies
        return records

    def analyze_aligned(self, images: np.ndarray | Sequence[np.ndarray]) -> list[FaceRecord]:
        """Records of aligned ArcFace crops (the recognizer's input size, e.g. 112x112 RGB),
        embedded without detection, as FR training sets store faces: one face each, its box
        the whole crop, its keypoints the ArcFace template, its pose from the 3D landmarks
        over the crop, gender, age and skin tone as `analyze` measures them. The detection
        score stays nan (nothing was detected)."""
        frames = _as_bgr_frames(images)
        if not frames:
            return []
        size = self.recognizer.input_size[0]
        check_aligned(frames, size)
        features = _run_batched(self.recognizer, _blob(self.recognizer, frames))
        features = features.astype(np.float32, copy=False)
        embeddings, norms = l2_normalize(features), np.linalg.norm(features, axis=-1)
        box = np.array([0, 0, size, size], np.float32)
        poses = self._head_poses(frames, [box] * len(frames))
        readings = self._gender_age(frames, [box] * len(frames))
        keypoints = aligned_keypoints(size)
        records = [
            with_gender_age(
                FaceRecord(1, math.nan, box.copy(), keypoints.copy(), embedding, pose, float(norm)),
                reading,
            )
            for embedding, norm, pose, reading in zip(embeddings, norms, poses, readings, strict=True)
        ]
        measure_skin_tones(rgb_frames(images), records)  # the template keypoints: the crop itself
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

    def _gender_age(
        self, frames: list[np.ndarray], boxes: list[np.ndarray]
    ) -> list[tuple[str, float, float]]:
        """(gender, probability, age) per face: insightface Attribute.get's crop of 1.5x
        the box at the model's 96x96 input, one batched call for all the faces."""
        model = self.genderage
        size = model.input_size[0]
        crops = []
        for frame, box in zip(frames, boxes, strict=True):
            center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            scale = size / (max(box[2] - box[0], box[3] - box[1]) * 1.5)
            crops.append(face_align.transform(frame, center, size, scale, 0)[0])
        return read_gender_age(_run_batched(model, _blob(model, crops)))

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
