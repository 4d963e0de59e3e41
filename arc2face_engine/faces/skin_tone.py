"""Skin tone, measured without a model: the Individual Typology Angle (ITA) of the cheeks.

ITA = atan((L* - 50) / b*) in degrees (Chardon et al. 1991), with CIELAB from
scikit-image's `rgb2lab` (sRGB, D65). Fairness audits of face recognition use it in place
of inferred ethnicity or race; its six categories are `schemas.tables.SKIN_TONES`.

The region (docs/composition.md shows it): the face is aligned as ArcFace aligns it (its
five detected keypoints mapped onto insightface's 112x112 template by the same
least-squares similarity: the ArcFace crop), and the skin is two rectangles of that
template, `CHEEKS`, on the inner cheeks: x 30-44 and 68-82 (the nose wings sit at
about x 46-66, the eye centres at x 38 and 74), y 62-80 (ten pixels below the eye centres
at y 51.6, twelve above the mouth corners at y 92.3). Eyes, brows, mouth, nose, hair and
background stay outside for faces within about 30 degrees of frontal; the outer cheeks
are left out because they turn away from the light and the camera first (and, under yaw,
reach the background). Among a few candidate boxes this one moved least when the
test photos' crops shifted by 2 pixels (tests/test_skin_tone.py). In the region, pixels whose L* lies outside its 10th-90th
percentiles (shadows, specular highlights, a stray strand of hair) are dropped and ITA is
taken from the mean L* and b* of the rest: the mean keeps a 2-pixel shift of the crop
from moving the angle by more than a degree or two; the trimming keeps outliers out.

ITA is undefined (nan) for a greyscale image (b* near 0 over the whole aligned face) and
where b* <= 0 (a grey or bluish face lies outside the angle's domain).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from insightface.utils import face_align
from skimage.color import rgb2lab

from arc2face_engine.faces.records import FaceRecord

TEMPLATE_SIZE = 112  # insightface's ArcFace template
# (x0, y0, x1, y1), half-open, in 112x112 template pixels: left cheek, right cheek.
CHEEKS = ((30, 62, 44, 80), (68, 62, 82, 80))
TRIM_PERCENTILES = (10.0, 90.0)
# A greyscale image has a* = b* = 0; JPEG's chroma rounding leaves a unit or so.
GREY_CHROMA = 2.0


def ita_degrees(lightness: float, yellowness: float) -> float:
    """atan((L* - 50) / b*) in degrees; nan where b* <= 0 (outside the angle's domain)."""
    if not yellowness > 0:
        return math.nan
    return math.degrees(math.atan((lightness - 50.0) / yellowness))


def _lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 sRGB -> (n, 3) CIELAB (scikit-image, D65)."""
    return rgb2lab(np.asarray(rgb, np.uint8).reshape(-1, 1, 3)).reshape(-1, 3)


def ita_of_pixels(rgb: np.ndarray) -> float:
    """ITA of (..., 3) uint8 sRGB skin pixels: the mean L* and b* of the pixels whose L*
    lies within the TRIM_PERCENTILES of the region."""
    return _ita_of_lab(_lab(rgb))


def _ita_of_lab(lab: np.ndarray) -> float:
    low, high = np.percentile(lab[:, 0], TRIM_PERCENTILES)
    kept = lab[(lab[:, 0] >= low) & (lab[:, 0] <= high)]
    return ita_degrees(float(kept[:, 0].mean()), float(kept[:, 2].mean()))


def aligned_face(frame_rgb: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """The ArcFace-aligned 112x112 face (insightface's norm_crop)."""
    return face_align.norm_crop(
        frame_rgb, np.asarray(keypoints, np.float32).reshape(5, 2), TEMPLATE_SIZE
    )


def cheek_mask() -> np.ndarray:
    """(112, 112) bool: the CHEEKS region of the aligned face."""
    mask = np.zeros((TEMPLATE_SIZE, TEMPLATE_SIZE), bool)
    for x0, y0, x1, y1 in CHEEKS:
        mask[y0:y1, x0:x1] = True
    return mask


_CHEEKS = cheek_mask()


def _is_greyscale(face_lab: np.ndarray) -> bool:
    """b* (and a*) near 0 over the aligned face: no colour to measure."""
    chroma = np.hypot(face_lab[:, 1], face_lab[:, 2])
    return float(np.percentile(chroma, 99)) < GREY_CHROMA


def skin_ita(frame_rgb: np.ndarray, keypoints: np.ndarray) -> float:
    """ITA in degrees of the face with these five keypoints (nan: greyscale image, or
    outside the angle's domain). One CIELAB conversion: the region's pixels and every
    4th pixel of the aligned face (plenty to see colour)."""
    face = aligned_face(frame_rgb, keypoints)
    region = face[_CHEEKS]
    lab = _lab(np.concatenate([region, face[::4, ::4].reshape(-1, 3)]))
    if _is_greyscale(lab[len(region) :]):
        return math.nan
    return _ita_of_lab(lab[: len(region)])


def measure_skin_tones(frames: Sequence[np.ndarray], records: Sequence[FaceRecord]) -> None:
    """Fill `skin_ita` of every record that has a face, from its RGB frame (on the host:
    a 112x112 warp and about 1,300 CIELAB conversions per face)."""
    for frame, record in zip(frames, records, strict=True):
        if record.keypoints is not None:
            record.skin_ita = skin_ita(frame, record.keypoints)
