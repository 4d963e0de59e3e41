"""The definitions the engine itself needs, with no import beyond numpy: vector sizes,
the reject reasons, the composition values (genders, skin-tone categories, age bands),
the sampler defaults and the image-side rule.

`schemas.tables` and `schemas.job` take them from here and re-export them, so they still
have one home each; the engine imports them from here so that generation and face
analysis load without pydantic and pyarrow (a bare GPU image has neither: see
bench/gpu_run.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

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
TOO_SIMILAR = "too_similar"  # filter.max_similarity: a near-copy of the identity
REJECT_REASONS = (
    NO_FACE, MULTIPLE_FACES, LOW_DETECTION_SCORE, LOW_FEATURE_NORM, LOW_SIMILARITY, TOO_SIMILAR,
)  # fmt: skip

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


# --- composition: the values of the attribute columns -----------------------------------------
# Predictions and measurements on synthetic images (docs/composition.md); no ethnicity or
# race is inferred anywhere.

# insightface's genderage.onnx: argmax 0 is female, 1 is male.
GENDERS = ("female", "male")
# The six Individual Typology Angle categories (Chardon et al. 1991, as fairness audits of
# face recognition use them), lightest first, each with its lower boundary in degrees. A
# category includes its lower boundary: ITA 55 is very_light, 41 light, -30 brown.
ITA_LOWER_BOUNDS: dict[str, float] = {
    "very_light": 55.0,
    "light": 41.0,
    "intermediate": 28.0,
    "tan": 10.0,
    "brown": -30.0,
    "dark": -math.inf,
}
SKIN_TONES = tuple(ITA_LOWER_BOUNDS)
# Age bands are given by their lower edges (years); a band includes its lower edge and
# the last one is open: edges [0, 20, 40] are bands "0-20", "20-40" and "40+".
DEFAULT_AGE_EDGES = (0, 20, 30, 40, 50, 60)


def skin_tone_of(ita: float | None) -> str | None:
    """The ITA category of an angle in degrees (None for None or nan)."""
    if ita is None or math.isnan(ita):
        return None
    return next(name for name, lower in ITA_LOWER_BOUNDS.items() if ita >= lower)


def age_band_names(edges: Sequence[float]) -> list[str]:
    """Band names of ascending lower edges: "0-20", "20-40", ..., "60+"."""
    shown = [f"{edge:g}" for edge in edges]
    return [f"{low}-{high}" for low, high in itertools.pairwise(shown)] + [f"{shown[-1]}+"]


def age_band_of(age: float | None, edges: Sequence[float]) -> str | None:
    """The band of an age (None for None, nan, or an age below the first edge)."""
    if age is None or math.isnan(age) or age < edges[0]:
        return None
    index = max(i for i, edge in enumerate(edges) if age >= edge)
    return age_band_names(edges)[index]
