"""Which face analyzer a job gets, and where it runs: `load_face_analyzer` is the one way
the rest of the project obtains one.

On CPU: the onnxruntime analyzer (insightface's classes, the reference). On a CUDA
device: the batched torch analyzer on that GPU, provided the torch runner holds every op
of the four graphs; otherwise onnxruntime on its best provider (CUDA only with
onnxruntime-gpu installed). Preflight asks `face_analysis_placement` before any model is
loaded, so a GPU job whose verification would fall back to the CPU is refused up front.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from arc2face_engine.faces.pack import (
    ANTELOPEV2_DIR,
    DETECTOR_FILE,
    GENDERAGE_FILE,
    LANDMARK_3D_FILE,
    RECOGNITION_FILE,
    REFERENCE_DET_SIZE,
    REFERENCE_DET_THRESH,
)
from arc2face_engine.faces.records import AnalyzerBase


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

    from arc2face_engine.faces.onnx_torch import OPS

    pack = Path(models_dir) / ANTELOPEV2_DIR
    missing = {}
    for name in (DETECTOR_FILE, LANDMARK_3D_FILE, RECOGNITION_FILE, GENDERAGE_FILE):
        graph = onnx.load(str(pack / name), load_external_data=False).graph
        ops = sorted({node.op_type for node in graph.node} - set(OPS))
        if ops:
            missing[name] = ops
    return missing


def face_analysis_placement(models_dir: str | os.PathLike, device: str) -> tuple[str, str]:
    """(runtime, device) face analysis gets when the job runs on `device`: torch on the
    GPU when the device is CUDA and the graphs convert, else onnxruntime on its best
    provider (CUDA only with onnxruntime-gpu installed)."""
    from arc2face_engine.faces.onnxruntime_analyzer import default_providers

    if _is_cuda(device):
        if not unsupported_ops(models_dir):
            return "torch", "cuda"
        if "CUDAExecutionProvider" in default_providers():
            return "onnxruntime", "cuda"
    return "onnxruntime", "cpu"


def load_face_analyzer(
    models_dir: str | os.PathLike,
    device: str | None = None,
    det_size: int | tuple[int, int] = REFERENCE_DET_SIZE,
    det_thresh: float = REFERENCE_DET_THRESH,
    providers: Sequence | None = None,
    batch_size: int = 32,
) -> AnalyzerBase:
    """The face analyzer for `models_dir/antelopev2` on `device`.

    None or cpu: the onnxruntime analyzer (`providers`, default CUDA when onnxruntime-gpu
    offers it, else CPU). A CUDA device (or auto with a GPU): the batched torch analyzer
    on that GPU in fp16, `batch_size` images per forward, unless its graphs hold ops the
    torch runner lacks (then onnxruntime)."""
    if _is_cuda(device) and face_analysis_placement(models_dir, device)[0] == "torch":
        from arc2face_engine.faces.torch_analyzer import TorchFaceAnalyzer

        target = "cuda" if str(device) == "auto" else device
        return TorchFaceAnalyzer.from_models_dir(
            models_dir, det_size, det_thresh, device=target, batch_size=batch_size
        )
    from arc2face_engine.faces.onnxruntime_analyzer import FaceAnalyzer

    return FaceAnalyzer.from_models_dir(models_dir, providers, det_size, det_thresh)
