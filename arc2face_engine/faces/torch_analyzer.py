"""Batched face analysis in torch: insightface's pipeline for whole batches on one device.

(Just over 600 lines: the steps below form one pipeline that shares one stream and one
host copy per batch. Split up, each stage would have to hand device tensors to the next
across modules.)

The same model files as the onnxruntime path (antelopev2's SCRFD and 1k3d68, Arc2Face's
arcface.onnx), run by faces.onnx_torch, with every step insightface takes per
image done for a whole batch on the device: OpenCV's resize onto the detector canvas,
normalisation, SCRFD anchor decoding, greedy NMS (insightface's IoU with its +1 pixel
areas), the largest face, the 5-point similarity fit (Umeyama, closed form in 2-D) and
OpenCV's warp to the ArcFace crop, recognition, the 1k3d68 crop, 3D landmarks and the
head pose fit, and genderage.onnx on its own crop of the box (a separate stage,
`_gender_age`); the skin tone is measured on the host (faces.skin_tone). On CUDA it runs
in fp16; on CPU in fp32, where the tests compare it with the onnxruntime path
(onnxruntime_analyzer.FaceAnalyzer), the reference.

One batch costs the host one wait: the images go in through pinned memory without
blocking, every step runs on the analyzer's own CUDA stream (so it overlaps generation on
the default stream), and the results of the whole batch come back in one copy. For that
the shapes never depend on the data: the detector keeps the PRE_NMS_TOP_K best-scoring
candidates of every image, NMS runs as a fixed number of vectorised rounds, recognition
and head pose run on every image's largest box (rows without a face are dropped on the
host), and batches are padded to fixed sizes (cuDNN tunes each size once). An image whose
candidates overflow the top-K, or whose NMS has not settled in NMS_ROUNDS, is flagged and
analysed again exactly (all candidates, sequential NMS): agreement never depends on K.

The stages, one per network: `_detect` (SCRFD), `_embed` (ArcFace), `_head_poses`
(1k3d68); `_on_device` chains them and packs their results (`_Packed`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import pickle
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from arc2face_engine.faces.onnx_torch import OnnxModule
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
from arc2face_engine.faces.warp import invert_affine, resize_linear_u8, warp_affine_u8
from arc2face_engine.models_dir import require
from arc2face_engine.transfers import pinned_from_numpy, to_device, to_host
from schemas.errors import CheckpointMismatch

NMS_THRESHOLD = 0.4  # insightface SCRFD.nms_thresh
# Candidates per image that enter NMS: the best-scoring ones. The 29-face Solvay photo
# (scrfd 0.3.0's test image) gives 173 candidates at score 0.5 and 1,955 at 0.02 through
# the trained SCRFD-2.5G, so 2,048 covers a crowded photo at any threshold down to 0.02;
# an image with more is flagged and redone exactly. NMS then costs O(K^2) per image.
PRE_NMS_TOP_K = 2048
# Vectorised greedy NMS: round r settles every candidate whose chain of overlapping,
# better-scoring candidates is shorter than r (see greedy_nms_rounds); faces need 2-4.
NMS_ROUNDS = 8
DETECTOR_MEAN, DETECTOR_STD = 127.5, 128.0  # insightface SCRFD
LANDMARK_POINTS = 68
# insightface SCRFD._init_vars: outputs -> (feature levels, strides, anchors per location)
SCRFD_LAYOUTS = {9: (3, (8, 16, 32), 2), 15: (5, (8, 16, 32, 64, 128), 1)}


@dataclass
class _Network:
    """One converted ONNX model and the input normalisation insightface gives it."""

    module: OnnxModule
    input_size: int
    mean: float
    std: float
    output_width: int | None


# The 5-point ArcFace alignment template in a 112x112 crop (eyes, nose tip, mouth
# corners), as insightface's face_align.arcface_dst (float32 values, used in float64).
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
     [70.7299, 92.2041]], dtype=np.float32,
).astype(np.float64)  # fmt: skip


def insightface_mean_shape() -> np.ndarray:
    """insightface's 68-point 3D mean face (data/objects/meanshape_68.pkl), read from its
    installed package without importing it (its __init__ imports onnxruntime and OpenCV,
    which the GPU path does not need). A pickle of package data, as insightface reads it."""
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("insightface is not installed: pip install insightface")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "objects" / "meanshape_68.pkl"
    with path.open("rb") as file:
        return np.asarray(pickle.load(file), np.float64)


def _score_outputs(path: Path) -> int:
    """How many of an SCRFD graph's outputs are scores (its first `levels` outputs)."""
    outputs = len(onnx.load(str(path), load_external_data=False).graph.output)
    return SCRFD_LAYOUTS[outputs][0] if outputs in SCRFD_LAYOUTS else 0


def default_batch_sizes(batch_size: int) -> list[int]:
    """Powers of two below `batch_size`, then `batch_size`."""
    return [*(1 << p for p in range(batch_size.bit_length()) if 1 << p < batch_size), batch_size]


def _normalisation(graph: onnx.GraphProto, default_std: float, bn_data: bool) -> tuple:
    """insightface's rule: an mxnet-style graph that subtracts and scales inside (node
    names Sub/_minus and Mul/_mul among the first 8, or a leading bn_data) takes raw pixels;
    other graphs take (pixel - 127.5) / default_std."""
    find_sub = find_mul = False
    for index, node in enumerate(graph.node[:8]):
        find_sub |= node.name.startswith(("Sub", "_minus"))
        find_mul |= node.name.startswith(("Mul", "_mul"))
        if bn_data and index < 3 and node.name == "bn_data":
            find_sub = find_mul = True
    return (0.0, 1.0) if find_sub and find_mul else (127.5, default_std)


def _load_network(
    path: Path, default_std: float, bn_data: bool, device, dtype, fp32_outputs: int = 0
) -> _Network:
    """One face network on `device` in `dtype`; its first `fp32_outputs` outputs (the
    detector's scores) computed in float32 from their last convolution."""
    model = onnx.load(str(path))
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    image = next(i for i in graph.input if i.name not in initializers)
    dims = [
        d.dim_value if d.HasField("dim_value") else None for d in image.type.tensor_type.shape.dim
    ]
    out_dims = graph.output[0].type.tensor_type.shape.dim
    width = out_dims[-1].dim_value if out_dims and out_dims[-1].HasField("dim_value") else None
    mean, std = _normalisation(graph, default_std, bn_data)
    precise = [output.name for output in graph.output[:fp32_outputs]]
    module = OnnxModule(model, name=str(path), dtype=dtype, fp32_outputs=precise)
    return _Network(module.to(device=device).eval(), dims[2] or 0, mean, std, width)


def _to_blob(images: torch.Tensor, mean: float, std: float, dtype: torch.dtype) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) (pixel - mean) / std, as cv2.dnn.blobFromImages,
    channels-last in memory (the pixels' own layout: no transposing copy)."""
    scaled = (images.to(torch.float32) - mean) * np.float32(1.0 / std)
    return scaled.permute(0, 3, 1, 2).to(dtype).contiguous(memory_format=torch.channels_last)


def similarity_transforms(keypoints: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """(N, 5, 2) points -> (N, 2, 3) float64 least-squares similarity onto `template`
    (what skimage's SimilarityTransform.estimate finds: Umeyama, no reflection)."""
    src = keypoints.to(torch.float64)
    dst = template.to(src.device, torch.float64).expand_as(src)
    src_mean, dst_mean = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    s, d = src - src_mean, dst - dst_mean
    energy = (s**2).sum((1, 2))
    a = ((s[..., 0] * d[..., 0] + s[..., 1] * d[..., 1]).sum(1)) / energy
    b = ((s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(1)) / energy
    rotation = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], 1)
    translation = dst_mean[:, 0] - (rotation @ src_mean[:, 0, :, None])[..., 0]
    return torch.cat([rotation, translation[..., None]], dim=2)


def greedy_nms(boxes: torch.Tensor, valid: torch.Tensor, threshold: float) -> torch.Tensor:
    """insightface's NMS for every image at once, one candidate at a time (exact, K steps:
    used for the images `greedy_nms_rounds` flags). boxes (B, K, 4) sorted by descending
    score, valid (B, K); returns the kept mask (B, K). Boxes overlap when
    IoU > threshold, areas counted as (x2 - x1 + 1) * (y2 - y1 + 1)."""
    overlaps = _overlaps(boxes, threshold)
    kept = torch.zeros_like(valid)
    alive = valid.clone()
    for index in range(boxes.shape[1]):
        keep_now = alive[:, index]
        kept[:, index] = keep_now
        alive &= ~(overlaps[:, index, :] & keep_now[:, None])
    return kept


def greedy_nms_rounds(
    boxes: torch.Tensor, valid: torch.Tensor, threshold: float, rounds: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`greedy_nms` as a fixed number of vectorised rounds; returns (kept, settled).

    Greedy NMS keeps candidate j when no kept, better-scoring candidate overlaps it. Each
    round applies that rule to the previous round's kept set, starting from all valid
    candidates; round r is right for every candidate whose chain of overlapping
    better-scoring candidates is shorter than r, and the rule's fixed point is the greedy
    result. `settled` (B,) says one more round changes nothing, i.e. the result is exact."""
    later = torch.ones(boxes.shape[1], boxes.shape[1], dtype=torch.bool, device=boxes.device)
    suppresses = _overlaps(boxes, threshold) & later.triu(diagonal=1)  # i < j only
    kept = valid
    for _ in range(rounds):
        kept = valid & ~(suppresses & kept[:, :, None]).any(1)
    again = valid & ~(suppresses & kept[:, :, None]).any(1)
    return kept, (again == kept).all(1)


def _overlaps(boxes: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, K, K): IoU > threshold, areas counted as insightface does (+1 pixel)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)

    def overlap(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        inner = torch.minimum(high[:, :, None], high[:, None, :])
        outer = torch.maximum(low[:, :, None], low[:, None, :])
        return (inner - outer + 1).clamp(min=0)

    inter = overlap(x1, x2) * overlap(y1, y2)
    return inter / (areas[:, :, None] + areas[:, None, :] - inter) > threshold


def pose_angles(landmarks: torch.Tensor, mean_shape_pinv: torch.Tensor) -> torch.Tensor:
    """(N, 68, 3) landmarks in image pixels -> (N, 3) yaw, pitch, roll in degrees:
    insightface's affine fit to its mean shape, P2sRt and matrix2angle."""
    affine = (mean_shape_pinv @ landmarks.to(torch.float64)).transpose(1, 2)  # (N, 3, 4)
    r1, r2 = affine[:, 0, :3], affine[:, 1, :3]
    r1 = r1 / r1.norm(dim=1, keepdim=True)
    r2 = r2 / r2.norm(dim=1, keepdim=True)
    r3 = torch.linalg.cross(r1, r2, dim=1)
    rotation = torch.stack([r1, r2, r3], dim=1)
    sy = torch.sqrt(rotation[:, 0, 0] ** 2 + rotation[:, 1, 0] ** 2)
    singular = sy < 1e-6
    pitch = torch.where(
        singular,
        torch.atan2(-rotation[:, 1, 2], rotation[:, 1, 1]),
        torch.atan2(rotation[:, 2, 1], rotation[:, 2, 2]),
    )
    yaw = torch.atan2(-rotation[:, 2, 0], sy)
    roll = torch.where(
        singular, torch.zeros_like(sy), torch.atan2(rotation[:, 1, 0], rotation[:, 0, 0])
    )
    return torch.stack([yaw, pitch, roll], dim=1) * (180.0 / math.pi)


@dataclass
class _Detections:
    """The largest face of every image of a batch (rows without a face hold a stand-in
    box and keypoints, so the later stages run on every row)."""

    count: torch.Tensor  # (B,) faces kept by NMS
    score: torch.Tensor  # (B,) float32
    box: torch.Tensor  # (B, 4) float32 image pixels
    keypoints: torch.Tensor  # (B, 5, 2)
    unsure: torch.Tensor  # (B,) the top-K overflowed or NMS did not settle: redo exactly


# One row per image in the single copy back to the host: count, score, box (4),
# keypoints (10), unsure, embedding norm, pose (3), genderage's 3 outputs (nan without the
# network), then the embedding.
_HEAD = 24


def _pack(detections: _Detections, embeddings, norms, poses, gender_age) -> torch.Tensor:
    return torch.cat(
        [
            detections.count[:, None].float(),
            detections.score[:, None],
            detections.box,
            detections.keypoints.reshape(-1, 10),
            detections.unsure[:, None].float(),
            norms[:, None],
            poses.float(),
            gender_age,
            embeddings,
        ],
        dim=1,
    )


def _unpack_record(row: np.ndarray) -> FaceRecord:
    count = int(row[0])
    if count == 0:
        return FaceRecord.no_face()
    record = FaceRecord(
        face_count=count,
        det_score=float(row[1]),
        bbox=row[2:6].astype(np.float32),
        keypoints=row[6:16].reshape(5, 2).astype(np.float32),
        embedding=row[_HEAD:].astype(np.float32),
        pose=tuple(float(v) for v in row[18:21]),
        embedding_norm=float(row[17]),
    )
    if np.isfinite(row[21:24]).all():
        with_gender_age(record, read_gender_age(row[21:24])[0])
    return record


class TorchFaceAnalyzer(AnalyzerBase):
    """SCRFD, 5-point alignment, ArcFace and 1k3d68 head pose, batched on one device."""

    def __init__(
        self,
        detector: _Network,
        landmark_3d: _Network,
        recognizer: _Network,
        det_size: int | tuple[int, int] = 640,
        det_thresh: float = 0.5,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        genderage: _Network | None = None,
        skin_tone: bool = True,
    ) -> None:
        self.detector, self.landmark_3d, self.recognizer = detector, landmark_3d, recognizer
        self.genderage = genderage  # None: no gender/age predicted
        # The skin tone is measured on the host with scikit-image (faces.skin_tone); a bare
        # GPU image without it (bench/gpu_run.py) turns it off rather than failing.
        self.skin_tone = skin_tone
        self.det_size = check_det_size(det_size)  # (width, height), as insightface
        self.det_thresh = float(det_thresh)
        self.device = torch.device(device)
        self.dtype = recognizer.module.dtype
        self.batch_size = int(batch_size)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        crop = recognizer.input_size
        ratio, shift = (
            (crop / 112.0, 0.0) if crop % 112 == 0 else (crop / 128.0, 8.0 * crop / 128.0)
        )
        template = ARCFACE_TEMPLATE_112 * ratio
        template[:, 0] += shift
        self.template = torch.from_numpy(template).to(self.device)
        mean_shape = insightface_mean_shape()
        homogeneous = np.hstack([mean_shape, np.ones((len(mean_shape), 1))])
        self.mean_shape_pinv = torch.from_numpy(np.linalg.pinv(homogeneous)).to(self.device)

    @classmethod
    def from_models_dir(
        cls,
        models_dir: str | os.PathLike,
        det_size: int | tuple[int, int] = 640,
        det_thresh: float = 0.5,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        batch_size: int = 32,
        skin_tone: bool = True,
    ) -> TorchFaceAnalyzer:
        """Load models_dir/antelopev2; fp16 on CUDA and fp32 elsewhere unless `dtype`."""
        require(models_dir, "core", under=ANTELOPEV2_DIR)
        pack = Path(models_dir) / ANTELOPEV2_DIR
        device = torch.device(device)
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        scores = _score_outputs(pack / DETECTOR_FILE)
        detector = _load_network(pack / DETECTOR_FILE, DETECTOR_STD, False, device, dtype, scores)
        detector.mean, detector.std = DETECTOR_MEAN, DETECTOR_STD  # SCRFD's fixed values
        landmark_3d = _load_network(pack / LANDMARK_3D_FILE, 128.0, True, device, dtype)
        recognizer = _load_network(pack / RECOGNITION_FILE, 127.5, False, device, dtype)
        genderage = _load_network(pack / GENDERAGE_FILE, 128.0, True, device, dtype)
        if len(detector.module.output_names) not in SCRFD_LAYOUTS:
            raise CheckpointMismatch(
                f"{pack / DETECTOR_FILE} is not a keypoint SCRFD detector (9 or 15 outputs): "
                f"replace it with the published file (`arc2face-synth models download DIR`)"
            )
        if (
            landmark_3d.output_width != 3309
            or recognizer.input_size <= 0
            or genderage.output_width != 3
            or genderage.input_size <= 0
        ):
            raise CheckpointMismatch(
                f"{pack} lacks 3D 68-point landmarks, a fixed-size recognizer or a gender/age "
                f"model: replace it with the published antelopev2 files "
                f"(`arc2face-synth models download DIR`)"
            )
        return cls(
            detector, landmark_3d, recognizer, det_size, det_thresh, device, batch_size,
            genderage=genderage, skin_tone=skin_tone,
        )  # fmt: skip

    # --- analysis ------------------------------------------------------------------------

    @torch.inference_mode()
    def analyze(self, images: np.ndarray | Sequence[np.ndarray]) -> list[FaceRecord]:
        frames = rgb_frames(images)
        records: list[FaceRecord] = [FaceRecord.no_face() for _ in frames]
        by_shape: dict[tuple, list[int]] = {}
        for index, frame in enumerate(frames):
            by_shape.setdefault(frame.shape, []).append(index)
        with self._on_own_stream():
            for indices in by_shape.values():
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    batch = self._upload([frames[i] for i in chunk])
                    for index, record in zip(chunk, self._analyze_batch(batch, len(chunk)), strict=False):
                        records[index] = record
        if self.skin_tone:
            from arc2face_engine.faces.skin_tone import measure_skin_tones  # see __init__

            measure_skin_tones(frames, records)
        return records

    def _on_own_stream(self) -> AbstractContextManager:
        """On CUDA every step runs on the analyzer's stream: verification overlaps the
        generation queued on the default stream."""
        if self.stream is None:
            return nullcontext()
        return torch.cuda.stream(self.stream)

    @torch.inference_mode()
    def analyze_aligned(self, images: np.ndarray | Sequence[np.ndarray]) -> list[FaceRecord]:
        """Records of aligned ArcFace crops, embedded without detection (see the onnxruntime
        analyzer's analyze_aligned: the same records, batched on the device)."""
        frames = rgb_frames(images)
        size = self.recognizer.input_size
        check_aligned(frames, size)
        records: list[FaceRecord] = []
        keypoints = aligned_keypoints(size)
        for start in range(0, len(frames), self.batch_size):
            batch = torch.from_numpy(np.stack(frames[start : start + self.batch_size]))
            batch = batch.to(self.device)
            net = self.recognizer
            features = net.module(_to_blob(batch, net.mean, net.std, self.dtype))[0].float()
            norms = features.norm(dim=1)
            embeddings = features / norms.clamp(min=1e-12)[:, None]
            faces = torch.arange(len(batch), device=self.device)
            boxes = torch.tensor([[0.0, 0.0, size, size]] * len(batch), device=self.device)
            poses = self._head_poses(batch, boxes, faces).float().cpu().numpy()
            gender_age = to_host(self._gender_age(batch, boxes, faces).float())
            for embedding, norm, pose, reading in zip(
                embeddings.cpu().numpy(), norms.cpu().numpy(), poses, gender_age, strict=True
            ):
                record = FaceRecord(
                    1, math.nan, np.array([0, 0, size, size], np.float32), keypoints.copy(),
                    embedding.astype(np.float32), tuple(float(v) for v in pose), float(norm),
                )  # fmt: skip
                if np.isfinite(reading).all():
                    with_gender_age(record, read_gender_age(reading)[0])
                records.append(record)
        if self.skin_tone:
            from arc2face_engine.faces.skin_tone import measure_skin_tones  # see __init__

            measure_skin_tones(frames, records)
        return records

    def batch_sizes(self) -> list[int]:
        """The fixed batch sizes the networks see: powers of two up to batch_size."""
        return default_batch_sizes(self.batch_size)

    def _upload(self, frames: list[np.ndarray]) -> torch.Tensor:
        """The frames padded with black images to a fixed batch size, stacked into pinned
        memory and copied to the device without blocking."""
        size = next(s for s in self.batch_sizes() if s >= len(frames))
        padding = [np.zeros_like(frames[0])] * (size - len(frames))
        return to_device(pinned_from_numpy([*frames, *padding]), self.device)

    def _analyze_batch(self, batch: torch.Tensor, count: int) -> list[FaceRecord]:
        """The first `count` images of `batch`: one copy back, then FaceRecords; images
        the fast path is unsure of are analysed again with exact NMS."""
        rows = to_host(self._on_device(batch, exact=False))[:count]
        records = [_unpack_record(row) for row in rows]
        for index in np.flatnonzero(rows[:, 16] > 0):
            exact = to_host(self._on_device(batch[index : index + 1], exact=True))
            records[index] = _unpack_record(exact[0])
        return records

    def _on_device(self, batch: torch.Tensor, exact: bool) -> torch.Tensor:
        """Detection, recognition and head pose of every image, packed (`_pack`)."""
        detections = self._detect(batch, exact)
        rows = torch.arange(len(batch), device=batch.device)
        embeddings, norms = self._embed(batch, detections.keypoints, rows)
        poses = self._head_poses(batch, detections.box, rows)
        gender_age = self._gender_age(batch, detections.box, rows)
        return _pack(detections, embeddings, norms, poses, gender_age)

    # --- detection -------------------------------------------------------------------------

    def _detector_input(self, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        """insightface SCRFD.detect's canvas: the image resized into the top-left corner
        of the det_size canvas, keeping its aspect ratio; and the resize factor."""
        height, width = batch.shape[1:3]
        canvas_w, canvas_h = self.det_size
        if height / width > canvas_h / canvas_w:
            new_h, new_w = canvas_h, int(canvas_h / (height / width))
        else:
            new_w, new_h = canvas_w, int(canvas_w * (height / width))
        scale = new_h / height
        canvas = torch.zeros(
            (len(batch), canvas_h, canvas_w, 3), dtype=torch.uint8, device=batch.device
        )
        canvas[:, :new_h, :new_w] = resize_linear_u8(batch, new_h, new_w)
        return _to_blob(canvas, self.detector.mean, self.detector.std, self.dtype), scale

    def _candidates(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every anchor's score (float32: the score convolutions run in float32), box and
        keypoints in image pixels, (B, A), (B, A, 4), (B, A, 5, 2)."""
        blob, scale = self._detector_input(batch)
        outputs = self.detector.module(blob)
        levels, strides, anchors = SCRFD_LAYOUTS[len(outputs)]
        size = len(batch)
        scores, boxes, keypoints = [], [], []
        for level, stride in enumerate(strides):
            rows, cols = blob.shape[2] // stride, blob.shape[3] // stride
            ys, xs = torch.meshgrid(
                torch.arange(rows, device=self.device),
                torch.arange(cols, device=self.device),
                indexing="ij",
            )
            centers = (torch.stack([xs, ys], -1).reshape(-1, 2) * stride).to(torch.float32)
            centers = centers.repeat_interleave(anchors, dim=0)
            scores.append(outputs[level].reshape(size, -1).float())
            box = outputs[level + levels].reshape(size, -1, 4).float() * stride
            boxes.append(torch.cat([centers - box[..., :2], centers + box[..., 2:]], -1))
            kps = outputs[level + 2 * levels].reshape(size, -1, 5, 2).float() * stride
            keypoints.append(centers[:, None, :] + kps)
        return torch.cat(scores, 1), torch.cat(boxes, 1) / scale, torch.cat(keypoints, 1) / scale

    def _detect(self, batch: torch.Tensor, exact: bool = False) -> _Detections:
        """SCRFD with insightface's decoding and NMS, then the largest kept face. Fast
        path: the PRE_NMS_TOP_K best candidates, NMS_ROUNDS vectorised rounds, no host
        sync. `exact`: every candidate over the threshold, sequential NMS (one sync)."""
        score, box, kps = self._candidates(batch)
        valid = score >= self.det_thresh
        count = valid.sum(1)
        # exact: as many as the most crowded image needs (the one host sync of this path)
        top_k = max(int(count.max()), 1) if exact else min(PRE_NMS_TOP_K, score.shape[1])
        top_score, order = torch.sort(
            torch.where(valid, score, -1.0), dim=1, descending=True, stable=True
        )
        order, top_score = order[:, :top_k], top_score[:, :top_k]
        top_box = box.gather(1, order[..., None].expand(-1, -1, 4))
        top_kps = kps.gather(1, order[..., None, None].expand(-1, -1, 5, 2))
        top_valid = valid.gather(1, order)
        if exact:
            kept = greedy_nms(top_box, top_valid, NMS_THRESHOLD)
            unsure = torch.zeros_like(count, dtype=torch.bool)
        else:
            kept, settled = greedy_nms_rounds(top_box, top_valid, NMS_THRESHOLD, NMS_ROUNDS)
            unsure = ~settled | (count > top_k)
        areas = (top_box[..., 2] - top_box[..., 0]) * (top_box[..., 3] - top_box[..., 1])
        largest = torch.where(kept, areas, -math.inf).argmax(1)  # ties: the higher score
        rows = torch.arange(len(batch), device=self.device)
        found = kept.any(1)
        # Rows without a face get a stand-in (the recognizer's own template, a unit box)
        # so recognition and head pose run on every row with finite numbers.
        stand_in_kps = self.template.to(torch.float32).expand(len(batch), -1, -1)
        stand_in_box = torch.tensor([0.0, 0.0, 1.0, 1.0], device=self.device).expand(len(batch), -1)
        return _Detections(
            count=kept.sum(1),
            score=top_score[rows, largest],
            box=torch.where(found[:, None], top_box[rows, largest], stand_in_box),
            keypoints=torch.where(found[:, None, None], top_kps[rows, largest], stand_in_kps),
            unsure=unsure,
        )

    # --- recognition and pose ---------------------------------------------------------------

    def _embed(self, batch, keypoints, faces) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) float32 L2-normalised embeddings and the norms before normalising."""
        net = self.recognizer
        matrices = similarity_transforms(keypoints, self.template)
        crops = warp_affine_u8(batch, matrices, net.input_size, faces)
        features = net.module(_to_blob(crops, net.mean, net.std, self.dtype))[0].float()
        norms = features.norm(dim=1)
        return features / norms.clamp(min=1e-12)[:, None], norms
    def _head_poses(self, batch, boxes, faces) -> torch.Tensor:
        """insightface Landmark.get: a crop of 1.5x the box, 3D landmarks back in image
        pixels, the pose fit."""
        net = self.landmark_3d
        size = net.input_size
        matrices = box_crop_matrices(boxes, size)
        crops = warp_affine_u8(batch, matrices, size, faces)
        prediction = net.module(_to_blob(crops, net.mean, net.std, self.dtype))[0].float()
        points = prediction.reshape(len(faces), -1, 3)[:, -LANDMARK_POINTS:]
        points = torch.cat([points[..., :2] + 1, points[..., 2:]], -1) * float(size // 2)
        # Back to image pixels with the inverse crop map (insightface trans_points3d).
        inverse = invert_affine(matrices)
        xy = (
            points[..., :2].to(torch.float64) @ inverse[:, :, :2].transpose(1, 2)
            + inverse[:, None, :, 2]
        )
        z = points[..., 2:] * inverse[:, 0, :2].norm(dim=1)[:, None, None]
        landmarks = torch.cat([xy.to(torch.float32), z.to(torch.float32)], -1)
        return pose_angles(landmarks, self.mean_shape_pinv)

    # --- gender and age ----------------------------------------------------------------------

    def _gender_age(self, batch, boxes, faces) -> torch.Tensor:
        """(N, 3) genderage.onnx outputs on insightface Attribute.get's crop: 1.5x the box
        at the model's input size (96), as 1k3d68's crop at its own size; nan rows when
        the analyzer has no gender/age network."""
        net = self.genderage
        if net is None:
            return torch.full((len(faces), 3), math.nan, device=boxes.device)
        matrices = box_crop_matrices(boxes, net.input_size)
        crops = warp_affine_u8(batch, matrices, net.input_size, faces)
        return net.module(_to_blob(crops, net.mean, net.std, self.dtype))[0].float()


def box_crop_matrices(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 2, 3) float64 maps of insightface's face_align.transform(image, box centre,
    size, size / (1.5 x the box's longer side), 0), computed in its float32 steps."""
    center_x = (boxes[:, 0] + boxes[:, 2]) / 2
    center_y = (boxes[:, 1] + boxes[:, 3]) / 2
    extent = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    scale = np.float32(size) / (extent * np.float32(1.5))
    half = float(size // 2)
    s64 = scale.to(torch.float64)
    zeros = torch.zeros_like(s64)
    return torch.stack(
        [
            torch.stack([s64, zeros, -(center_x * scale).to(torch.float64) + half], -1),
            torch.stack([zeros, s64, -(center_y * scale).to(torch.float64) + half], -1),
        ],
        dim=1,
    )
