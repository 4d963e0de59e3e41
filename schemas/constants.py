"""The definitions the engine itself needs, with no import beyond numpy: vector sizes,
the reject reasons, the sampler defaults and the image-side rule.

`schemas.tables` and `schemas.job` take them from here and re-export them, so they still
have one home each; the engine imports them from here so that generation and face
analysis load without pydantic and pyarrow (a bare GPU image has neither: see
bench/gpu_run.py).
"""

from __future__ import annotations

import numpy as np

EMBEDDING_DIM = 512
EXPRESSION_DIM = 55
KEYPOINT_VALUES = 10  # 5 points x (x, y)

# Reject reasons, in the order arc2face_engine.faces.records.judge checks them.
NO_FACE = "no_face"
MULTIPLE_FACES = "multiple_faces"
LOW_DETECTION_SCORE = "low_detection_score"
LOW_FEATURE_NORM = "low_feature_norm"
LOW_SIMILARITY = "low_similarity"
REJECT_REASONS = (NO_FACE, MULTIPLE_FACES, LOW_DETECTION_SCORE, LOW_FEATURE_NORM, LOW_SIMILARITY)

# The sampler settings' one home: generation.GenerationSettings takes its defaults and
# checks from here. Arc2Face defaults (DPM-Solver++ 25 steps, CFG 3.0) and the LCM-LoRA
# sweet spot (4 steps, no CFG).
SCHEDULERS = ("dpmsolver++", "lcm")
DPM_STEPS, DPM_GUIDANCE, LCM_STEPS, LCM_GUIDANCE = 25, 3.0, 4, 1.0
DEFAULT_SIZE = 512
VAE_FACTOR = 8  # the VAE downsamples by 8: image sides are multiples of it


def check_image_side(name: str, size: int) -> int:
    """Raise ValueError unless `size` is a positive multiple of the VAE's factor."""
    if size < VAE_FACTOR or size % VAE_FACTOR:
        candidates = (size // VAE_FACTOR * VAE_FACTOR, size // VAE_FACTOR * VAE_FACTOR + VAE_FACTOR)
        nearest = " or ".join(str(v) for v in candidates if v > 0)
        raise ValueError(
            f"{name}={size} is not a positive multiple of {VAE_FACTOR} (the VAE downsamples "
            f"by {VAE_FACTOR}): use {nearest}"
        )
    return size


def l2_normalize(vectors: np.ndarray, axis: int = -1) -> np.ndarray:
    """Unit vectors along `axis`, in the input's float dtype; an all-zero vector stays zero
    (the one L2 normalisation of embeddings on the host)."""
    vectors = np.asarray(vectors)
    if not np.issubdtype(vectors.dtype, np.floating):
        vectors = vectors.astype(np.float64)
    norms = np.linalg.norm(vectors, axis=axis, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
