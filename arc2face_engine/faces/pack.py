"""The antelopev2 face-analysis pack as Arc2Face uses it: its files (with Arc2Face's own
arcface.onnx as the recognition model) and the detection settings of Arc2Face's demos."""

from __future__ import annotations

ANTELOPEV2_DIR = "antelopev2"
DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
LANDMARK_3D_FILE = "1k3d68.onnx"
GENDERAGE_FILE = "genderage.onnx"  # 2 gender logits (female, male) and age / 100
RECOGNITION_FILE = "arcface.onnx"  # Arc2Face's, in place of antelopev2's glintr100.onnx

# Arc2Face's demos: FaceAnalysis(name="antelopev2").prepare(ctx_id=0, det_size=(640, 640)),
# whose SCRFD keeps insightface's default threshold.
REFERENCE_DET_SIZE = 640
REFERENCE_DET_THRESH = 0.5
# Images smaller than this come from the tiny demo models: detected at their own size.
SMALL_IMAGE = 256


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
