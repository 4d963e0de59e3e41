"""arc2face-synth's engine: synthetic face-recognition datasets with Arc2Face, in plain Python.

The names a user or a script needs are here, at the top, as diffusers has them:

    from arc2face_engine import Arc2FaceEngine, GenerationSettings, ImageRequest
    engine = Arc2FaceEngine.from_pretrained("models")
    images = engine.generate([ImageRequest(embedding, seed=0)], GenerationSettings())

They load on first use, so `import arc2face_engine` stays cheap (no torch, diffusers or
insightface until a name that needs them is touched). The sub-packages are the
architecture (ARCHITECTURE.md); paths below this level are internal and may move.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

# name -> module that defines it
_PUBLIC = {
    # generation
    "Arc2FaceEngine": "arc2face_engine.generation.engine",
    "GenerationSettings": "arc2face_engine.generation.settings",
    "ImageRequest": "arc2face_engine.generation.settings",
    # face analysis
    "load_face_analyzer": "arc2face_engine.faces.loading",
    "FaceAnalyzer": "arc2face_engine.faces.onnxruntime_analyzer",
    "TorchFaceAnalyzer": "arc2face_engine.faces.torch_analyzer",
    "FaceRecord": "arc2face_engine.faces.records",
    "Verdict": "arc2face_engine.faces.records",
    "judge": "arc2face_engine.faces.records",
    "align_face": "arc2face_engine.faces.align",
    # controls
    "Pose": "arc2face_engine.controls.poses",
    "PoseBank": "arc2face_engine.controls.poses",
    "Expression": "arc2face_engine.controls.expressions",
    "ExpressionBank": "arc2face_engine.controls.expressions",
    # identities
    "sample_random": "arc2face_engine.identities.sources",
    "load_embedding_file": "arc2face_engine.identities.sources",
    "embed_image_folder": "arc2face_engine.identities.sources",
    # the job and the dataset
    "run_job_directly": "arc2face_engine.job.direct",
    "image_seed": "arc2face_engine.determinism",
    "DatasetReader": "arc2face_engine.dataset.reader",
    "DamagedPart": "arc2face_engine.dataset.reader",
    "DatasetIncomplete": "arc2face_engine.dataset.reader",
    "Arc2FaceDataset": "arc2face_engine.loader",
    "audit_dataset": "arc2face_engine.audit",
    "compare_datasets": "arc2face_engine.audit.compare",
    "export_dataset": "arc2face_engine.exports",
    "run_import_directly": "arc2face_engine.ingest.direct",
    # stand-in models
    "write_tiny_models": "arc2face_engine.testing.tiny_models",
}

__all__ = [
    "Arc2FaceDataset",
    "Arc2FaceEngine",
    "DamagedPart",
    "DatasetIncomplete",
    "DatasetReader",
    "Expression",
    "ExpressionBank",
    "FaceAnalyzer",
    "FaceRecord",
    "GenerationSettings",
    "ImageRequest",
    "Pose",
    "PoseBank",
    "TorchFaceAnalyzer",
    "Verdict",
    "align_face",
    "audit_dataset",
    "compare_datasets",
    "embed_image_folder",
    "export_dataset",
    "image_seed",
    "judge",
    "load_embedding_file",
    "load_face_analyzer",
    "run_import_directly",
    "run_job_directly",
    "sample_random",
    "write_tiny_models",
]

if TYPE_CHECKING:
    from arc2face_engine.audit import audit_dataset
    from arc2face_engine.audit.compare import compare_datasets
    from arc2face_engine.controls.expressions import Expression, ExpressionBank
    from arc2face_engine.controls.poses import Pose, PoseBank
    from arc2face_engine.dataset.reader import DamagedPart, DatasetIncomplete, DatasetReader
    from arc2face_engine.determinism import image_seed
    from arc2face_engine.exports import export_dataset
    from arc2face_engine.faces.align import align_face
    from arc2face_engine.faces.loading import load_face_analyzer
    from arc2face_engine.faces.onnxruntime_analyzer import FaceAnalyzer
    from arc2face_engine.faces.records import FaceRecord, Verdict, judge
    from arc2face_engine.faces.torch_analyzer import TorchFaceAnalyzer
    from arc2face_engine.generation.engine import Arc2FaceEngine
    from arc2face_engine.generation.settings import GenerationSettings, ImageRequest
    from arc2face_engine.identities.sources import (
        embed_image_folder,
        load_embedding_file,
        sample_random,
    )
    from arc2face_engine.ingest.direct import run_import_directly
    from arc2face_engine.job.direct import run_job_directly
    from arc2face_engine.loader import Arc2FaceDataset
    from arc2face_engine.testing.tiny_models import write_tiny_models


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'arc2face_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup skips this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


class _NoTorchvisionFallbackNotice(logging.Filter):
    """transformers announces, once per class, that CLIP/SigLIP image processors fall back
    to their PIL versions without torchvision (diffusers imports them with its pipelines).
    Arc2Face uses no image processor and torchvision is deliberately absent (docs/gpu.md),
    so the notice is noise in every run's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNotice())
