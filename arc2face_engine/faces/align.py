"""The ArcFace crop of a face from its five keypoints (insightface's template)."""

from __future__ import annotations

import warnings

import numpy as np
from insightface.utils import face_align

from arc2face_engine.faces.records import FaceAnalysisInputError

# insightface's estimate_norm calls scikit-image's deprecated SimilarityTransform.estimate
# once per face; the warning is theirs to fix and would flood every shard's log.
warnings.filterwarnings(
    "ignore", message="`estimate` is deprecated", category=FutureWarning,
    module="insightface.utils.face_align",
)  # fmt: skip

def align_face(image: np.ndarray, keypoints: np.ndarray, size: int = 112) -> np.ndarray:
    """The ArcFace crop of a face: the similarity transform that puts the five keypoints on
    insightface's arcface template, applied to `image` (any channel order; RGB stays RGB)."""
    if size % 112 and size % 128:
        raise FaceAnalysisInputError(
            f"aligned face size {size} is not a multiple of 112 or 128: use 112 (ArcFace's input)"
        )
    keypoints = np.asarray(keypoints, np.float32).reshape(5, 2)
    return face_align.norm_crop(np.asarray(image), keypoints, image_size=size)
