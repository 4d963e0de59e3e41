"""Aligned crops embedded without detection (`analyze_aligned`, the import's --aligned):
the embedding is the one the detected face gets, and the batched torch analyzer agrees
with the onnxruntime reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from arc2face_engine.faces.align import align_face
from arc2face_engine.faces.onnxruntime_analyzer import FaceAnalyzer
from arc2face_engine.faces.records import FaceAnalysisInputError, aligned_keypoints
from arc2face_engine.faces.torch_analyzer import TorchFaceAnalyzer
from tests.dataset_factory import face_like_image

CPU = ["CPUExecutionProvider"]
pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def crops(tiny_models):
    """Faces the tiny detector finds, and their ArcFace crops."""
    analyzer = FaceAnalyzer.from_models_dir(tiny_models, providers=CPU, det_size=64)
    images = [face_like_image(64, index, np.random.default_rng(index)) for index in range(12)]
    records = analyzer.analyze(images)
    found = [(image, record) for image, record in zip(images, records, strict=True)
             if record.face_count == 1]  # fmt: skip
    assert len(found) >= 3
    return [(align_face(image, record.keypoints), record) for image, record in found]


def test_an_aligned_crop_embeds_as_its_detected_face(tiny_models, crops) -> None:
    analyzer = FaceAnalyzer.from_models_dir(tiny_models, providers=CPU)
    records = analyzer.analyze_aligned([crop for crop, _ in crops])
    for record, (_, detected) in zip(records, crops, strict=True):
        assert float(record.embedding @ detected.embedding) > 1 - 1e-5
        assert record.embedding_norm == pytest.approx(detected.embedding_norm, rel=1e-4)
        assert (record.face_count, math.isnan(record.det_score)) == (1, True)
        assert np.array_equal(record.keypoints, aligned_keypoints(112))
        assert record.pose is not None
    with pytest.raises(FaceAnalysisInputError, match="not the recognizer's 112x112"):
        analyzer.analyze_aligned([np.zeros((64, 64, 3), np.uint8)])


def test_torch_aligned_analysis_agrees_with_onnxruntime(tiny_models, crops) -> None:
    images = [crop for crop, _ in crops]
    reference = FaceAnalyzer.from_models_dir(tiny_models, providers=CPU).analyze_aligned(images)
    torch_analyzer = TorchFaceAnalyzer.from_models_dir(tiny_models, device="cpu", batch_size=2)
    got = torch_analyzer.analyze_aligned(images)
    for want, have in zip(reference, got, strict=True):
        assert float(want.embedding @ have.embedding) > 1 - 1e-4
        assert have.embedding_norm == pytest.approx(want.embedding_norm, rel=1e-3)
        assert np.allclose(have.pose, want.pose, atol=0.5)
        assert np.array_equal(have.bbox, want.bbox) and np.allclose(have.keypoints, want.keypoints)
