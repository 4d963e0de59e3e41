"""Image-quality signal: the manifest's feature_norm column and filter.min_feature_norm."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.faces.onnxruntime_analyzer import FaceAnalyzer
from arc2face_engine.faces.records import FaceRecord, judge
from arc2face_engine.job import direct
from schemas.job import JobSpec
from schemas.tables import (
    LOW_DETECTION_SCORE,
    LOW_FEATURE_NORM,
    LOW_SIMILARITY,
    MANIFEST_SCHEMA,
    REJECT_REASONS,
)


def face(norm: float | None, det_score: float = 0.9) -> FaceRecord:
    embedding = np.zeros(512, np.float32)
    embedding[0] = 1.0
    record = FaceRecord(1, det_score, np.zeros(4, np.float32), None, embedding, (0.0, 0.0, 0.0))
    if norm is not None:
        record.embedding_norm = norm  # FaceRecord's last field once gpu-face lands
    return record


def test_judge_checks_the_feature_norm_after_detection_and_before_similarity():
    identity = np.eye(512, dtype=np.float32)[0]
    assert judge(face(5.0), identity).accepted  # 0 = off
    assert judge(face(5.0), identity, min_feature_norm=4.0).accepted
    assert judge(face(5.0), identity, min_feature_norm=6.0).reason == LOW_FEATURE_NORM
    assert judge(face(math.nan), identity, min_feature_norm=1.0).reason == LOW_FEATURE_NORM
    low_det = face(5.0, det_score=0.1)
    assert judge(low_det, identity, min_feature_norm=6.0).reason == LOW_DETECTION_SCORE
    other = np.eye(512, dtype=np.float32)[1]
    assert judge(face(5.0), other, min_feature_norm=6.0).reason == LOW_FEATURE_NORM
    assert judge(face(7.0), other, min_feature_norm=6.0).reason == LOW_SIMILARITY
    order = list(REJECT_REASONS)
    assert order.index("low_detection_score") < order.index(LOW_FEATURE_NORM)
    assert order.index(LOW_FEATURE_NORM) < order.index("low_similarity")


@pytest.fixture
def measured_norms(monkeypatch: pytest.MonkeyPatch):
    """The analyzer's records carry `embedding_norm` (branch gpu-face adds it to FaceRecord).
    Until then, each face gets a stand-in that varies with the image (10 x its detection
    score), so the column and the filter are exercised on real tiny-model images."""
    if any(field.name == "embedding_norm" for field in dataclasses.fields(FaceRecord)):
        return
    real = FaceAnalyzer.analyze

    def analyze(self, images):
        records = real(self, images)
        for record in records:
            record.embedding_norm = 10.0 * record.det_score if record.face_count else math.nan
        return records

    monkeypatch.setattr(FaceAnalyzer, "analyze", analyze)


def spec_for(models: Path, out: Path, min_feature_norm: float) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "quality",
            "seed": 11,
            "models": {"dir": str(models), "device": "cpu", "precision": "fp32"},
            "identities": {"source": "random", "count": 3, "separation": 0.3},
            "variations": {"images_per_identity": 2},
            "generation": {"steps": 2, "batch_size": 4, "height": 64, "width": 64},
            "filter": {
                "min_similarity": -1.0,
                "min_det_score": 0.05,
                "require_single_face": False,
                "max_attempts": 1,
                "min_feature_norm": min_feature_norm,
            },
            "output": {"uri": str(out), "shard_size": 4},
            "compute": {"task_runner": "local", "devices": ["cpu"]},
        }
    )


def test_manifest_records_feature_norms_and_the_filter_rejects_low_ones(
    tiny_models, tmp_path, measured_norms
):
    direct.run_job_directly(spec_for(tiny_models, tmp_path / "open", 0.0))
    part = next((tmp_path / "open" / "manifest").glob("part-*.parquet"))
    assert pq.read_schema(part).field("feature_norm").type == pa.float32()
    assert MANIFEST_SCHEMA.field("feature_norm").nullable
    rows = DatasetReader(str(tmp_path / "open")).manifest().to_pylist()
    with_face = [row for row in rows if row["face_count"] > 0]
    assert with_face, "the tiny detector should find faces in tiny-model images"
    norms = np.array([row["feature_norm"] for row in with_face])
    assert np.isfinite(norms).all() and (norms > 0).all()
    assert all(row["feature_norm"] is None for row in rows if row["face_count"] == 0)
    assert len(set(norms.tolist())) > 1, "norms should differ between images"

    # A threshold between two measured norms: the same images (same seeds) split by it.
    distinct = np.unique(norms)
    middle = len(distinct) // 2
    threshold = float(distinct[middle - 1] + distinct[middle]) / 2
    direct.run_job_directly(spec_for(tiny_models, tmp_path / "filtered", threshold))
    manifest = DatasetReader(str(tmp_path / "filtered")).manifest().to_pylist()
    filtered = {row["image_id"]: row for row in manifest}
    rejected = 0
    for row in with_face:
        again = filtered[row["image_id"]]
        assert again["feature_norm"] == row["feature_norm"]
        low = row["feature_norm"] < threshold
        assert again["accepted"] == (not low and row["accepted"])
        if low and row["accepted"]:
            assert again["reject_reason"] == LOW_FEATURE_NORM
            rejected += 1
    assert rejected > 0
    info = json.loads((tmp_path / "filtered" / "dataset.json").read_text())
    assert info["counts"]["reject_reasons"][LOW_FEATURE_NORM] == rejected
    assert info["spec"]["filter"]["min_feature_norm"] == threshold
