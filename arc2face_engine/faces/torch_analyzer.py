"""Batched face analysis in torch: insightface's pipeline for whole batches on one device.

The same model files as the onnxruntime path (antelopev2's SCRFD and 1k3d68, Arc2Face's
arcface.onnx), run by faces.onnx_torch, with every step insightface takes per
image done for a whole batch on the device: OpenCV's resize onto the detector canvas,
normalisation, SCRFD anchor decoding, greedy NMS (insightface's IoU with its +1 pixel
areas), the largest face, the 5-point similarity fit (Umeyama, closed form in 2-D) and
OpenCV's warp to the ArcFace crop, recognition, the 1k3d68 crop, 3D landmarks and the
head pose fit. On CUDA it runs in fp16; on CPU in fp32, where the tests compare it with
the onnxruntime path (onnxruntime_analyzer.FaceAnalyzer), the reference.

The only host synchronisations per batch: the number of NMS candidates (one integer)
and the final copy of the results.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from insightface.data import get_object
from insightface.utils.face_align import arcface_dst

from arc2face_engine.faces.onnx_torch import OnnxModule
from arc2face_engine.faces.pack import (
    ANTELOPEV2_DIR,
    DETECTOR_FILE,
    LANDMARK_3D_FILE,
    RECOGNITION_FILE,
)
from arc2face_engine.faces.records import (
    AnalyzerBase,
    FaceRecord,
    aligned_keypoints,
    check_aligned,
    check_det_size,
    rgb_frames,
)
from arc2face_engine.faces.warp import invert_affine, resize_linear_u8, warp_affine_u8
from arc2face_engine.models_dir import require
from schemas.errors import CheckpointMismatch

NMS_THRESHOLD = 0.4  # insightface SCRFD.nms_thresh
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


def _load_network(path: Path, default_std: float, bn_data: bool, device, dtype) -> _Network:
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
    module = OnnxModule(model, name=str(path)).to(device=device, dtype=dtype).eval()
    return _Network(module, dims[2] or 0, mean, std, width)


def _to_blob(images: torch.Tensor, mean: float, std: float, dtype: torch.dtype) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) (pixel - mean) / std, as cv2.dnn.blobFromImages."""
    scaled = (images.to(torch.float32) - mean) * np.float32(1.0 / std)
    return scaled.permute(0, 3, 1, 2).contiguous().to(dtype)


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
    """insightface's NMS for every image at once. boxes (B, K, 4) sorted by descending
    score, valid (B, K); returns the kept mask (B, K). Boxes overlap when
    IoU > threshold, areas counted as (x2 - x1 + 1) * (y2 - y1 + 1)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)

    def overlap(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        inner = torch.minimum(high[:, :, None], high[:, None, :])
        outer = torch.maximum(low[:, :, None], low[:, None, :])
        return (inner - outer + 1).clamp(min=0)

    inter = overlap(x1, x2) * overlap(y1, y2)
    overlaps = inter / (areas[:, :, None] + areas[:, None, :] - inter) > threshold
    kept = torch.zeros_like(valid)
    alive = valid.clone()
    for index in range(boxes.shape[1]):
        keep_now = alive[:, index]
        kept[:, index] = keep_now
        alive &= ~(overlaps[:, index, :] & keep_now[:, None])
    return kept


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
    """The largest face of every image of a batch (rows without a face are garbage)."""

    count: torch.Tensor  # (B,) faces kept by NMS
    score: torch.Tensor  # (B,)
    box: torch.Tensor  # (B, 4) float32 image pixels
    keypoints: torch.Tensor  # (B, 5, 2)


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
    ) -> None:
        self.detector, self.landmark_3d, self.recognizer = detector, landmark_3d, recognizer
        self.det_size = check_det_size(det_size)  # (width, height), as insightface
        self.det_thresh = float(det_thresh)
        self.device = torch.device(device)
        self.dtype = next(iter(recognizer.module.buffers())).dtype
        self.batch_size = int(batch_size)
        crop = recognizer.input_size
        ratio, shift = (
            (crop / 112.0, 0.0) if crop % 112 == 0 else (crop / 128.0, 8.0 * crop / 128.0)
        )
        template = arcface_dst.astype(np.float64) * ratio
        template[:, 0] += shift
        self.template = torch.from_numpy(template).to(self.device)
        mean_shape = np.asarray(get_object("meanshape_68.pkl"), np.float64)
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
    ) -> TorchFaceAnalyzer:
        """Load models_dir/antelopev2; fp16 on CUDA and fp32 elsewhere unless `dtype`."""
        require(models_dir, "core", under=ANTELOPEV2_DIR)
        pack = Path(models_dir) / ANTELOPEV2_DIR
        device = torch.device(device)
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        detector = _load_network(pack / DETECTOR_FILE, DETECTOR_STD, False, device, dtype)
        detector.mean, detector.std = DETECTOR_MEAN, DETECTOR_STD  # SCRFD's fixed values
        landmark_3d = _load_network(pack / LANDMARK_3D_FILE, 128.0, True, device, dtype)
        recognizer = _load_network(pack / RECOGNITION_FILE, 127.5, False, device, dtype)
        if len(detector.module.output_names) not in SCRFD_LAYOUTS:
            raise CheckpointMismatch(
                f"{pack / DETECTOR_FILE} is not a keypoint SCRFD detector (9 or 15 outputs): "
                f"replace it with the published file (`arc2face-synth models download DIR`)"
            )
        if landmark_3d.output_width != 3309 or recognizer.input_size <= 0:
            raise CheckpointMismatch(
                f"{pack} lacks 3D 68-point landmarks or a fixed-size recognizer: "
                f"replace it with the published antelopev2 files (`arc2face-synth models download DIR`)"
            )
        return cls(detector, landmark_3d, recognizer, det_size, det_thresh, device, batch_size)

    # --- analysis ------------------------------------------------------------------------

    @torch.inference_mode()
    def analyze(self, images: np.ndarray | Sequence[np.ndarray]) -> list[FaceRecord]:
        frames = rgb_frames(images)
        records: list[FaceRecord] = [FaceRecord.no_face() for _ in frames]
        by_shape: dict[tuple, list[int]] = {}
        for index, frame in enumerate(frames):
            by_shape.setdefault(frame.shape, []).append(index)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = torch.from_numpy(np.stack([frames[i] for i in chunk])).to(self.device)
                for index, record in zip(chunk, self._analyze_batch(batch), strict=True):
                    records[index] = record
        return records

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
            for embedding, norm, pose in zip(
                embeddings.cpu().numpy(), norms.cpu().numpy(), poses, strict=True
            ):
                records.append(FaceRecord(
                    1, math.nan, np.array([0, 0, size, size], np.float32), keypoints.copy(),
                    embedding.astype(np.float32), tuple(float(v) for v in pose), float(norm),
                ))  # fmt: skip
        return records

    def _analyze_batch(self, batch: torch.Tensor) -> list[FaceRecord]:
        detections = self._detect(batch)
        faces = torch.nonzero(detections.count > 0).flatten()
        if len(faces) == 0:
            return [FaceRecord.no_face() for _ in range(len(batch))]
        embeddings, norms = self._embed(batch, detections.keypoints[faces], faces)
        poses = self._head_poses(batch, detections.box[faces], faces)
        return self._records(len(batch), detections, faces, embeddings, norms, poses)

    def _records(self, size, detections, faces, embeddings, norms, poses) -> list[FaceRecord]:
        """One copy to the host, then plain FaceRecords."""
        count, score, box, keypoints = (
            t.detach().cpu().numpy()
            for t in (detections.count, detections.score, detections.box, detections.keypoints)
        )
        embeddings, norms, poses = (t.float().cpu().numpy() for t in (embeddings, norms, poses))
        records = [FaceRecord.no_face() for _ in range(size)]
        for row, index in enumerate(faces.cpu().tolist()):
            records[index] = FaceRecord(
                face_count=int(count[index]),
                det_score=float(score[index]),
                bbox=box[index].astype(np.float32),
                keypoints=keypoints[index].astype(np.float32),
                embedding=embeddings[row].astype(np.float32),
                pose=tuple(float(v) for v in poses[row]),
                embedding_norm=float(norms[row]),
            )
        return records

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

    def _detect(self, batch: torch.Tensor) -> _Detections:
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
        score = torch.cat(scores, 1)
        box = torch.cat(boxes, 1) / scale
        kps = torch.cat(keypoints, 1) / scale
        valid = score >= self.det_thresh
        candidates = max(int(valid.sum(1).max()), 1)  # one host sync per batch
        top_score, order = torch.sort(
            torch.where(valid, score, -1.0), dim=1, descending=True, stable=True
        )
        order, top_score = order[:, :candidates], top_score[:, :candidates]
        top_box = box.gather(1, order[..., None].expand(-1, -1, 4))
        top_kps = kps.gather(1, order[..., None, None].expand(-1, -1, 5, 2))
        kept = greedy_nms(top_box, valid.gather(1, order), NMS_THRESHOLD)
        areas = (top_box[..., 2] - top_box[..., 0]) * (top_box[..., 3] - top_box[..., 1])
        largest = torch.where(kept, areas, -math.inf).argmax(1)  # ties: the higher score
        rows = torch.arange(size, device=self.device)
        return _Detections(
            count=kept.sum(1),
            score=top_score[rows, largest],
            box=top_box[rows, largest],
            keypoints=top_kps[rows, largest],
        )

    # --- recognition and pose ---------------------------------------------------------------

    def _embed(self, batch, keypoints, faces) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 512) L2-normalised embeddings and the norms before normalising."""
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
        center_x = (boxes[:, 0] + boxes[:, 2]) / 2
        center_y = (boxes[:, 1] + boxes[:, 3]) / 2
        extent = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        scale = np.float32(size) / (extent * np.float32(1.5))
        half = float(size // 2)
        s64 = scale.to(torch.float64)
        zeros = torch.zeros_like(s64)
        matrices = torch.stack(
            [
                torch.stack([s64, zeros, -(center_x * scale).to(torch.float64) + half], -1),
                torch.stack([zeros, s64, -(center_y * scale).to(torch.float64) + half], -1),
            ],
            dim=1,
        )
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
