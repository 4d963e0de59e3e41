"""Promises about what a generated dataset holds, checked against independent references,
so that each fails when its promise breaks (issue 17 planted a bug under each one):

- every accepted row meets every threshold of the spec's `filter`, and every rejected row
  fails the check its reason names (a shard that ignored `filter.min_similarity` passed
  every test before);
- verification judges the stored file: re-analysing the decoded JPEG gives the recorded
  detection, similarity and verdict (judging the generator's raw pixels passed before);
- export alignment is insightface's `face_align.norm_crop` on the stored keypoints (a
  plain resize to 112x112 passed before: tests checked only the size).

One small job on the tiny models (8 identities x 4 images, up to 3 attempts, JPEG at
quality 40 so that the stored pixels differ from the generated ones) whose thresholds
are set where the tiny models' measurements fall on both sides of each.
"""

from __future__ import annotations

import io
import operator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arc2face_engine.dataset.reader import DatasetReader
from schemas.job import FilterSpec, JobSpec
from schemas.tables import (
    LOW_DETECTION_SCORE,
    LOW_FEATURE_NORM,
    LOW_SIMILARITY,
    MULTIPLE_FACES,
    NO_FACE,
    TOO_SIMILAR,
    l2_normalize,
)

FILTER = {
    "min_similarity": 0.0,
    "min_det_score": 0.6,
    "require_single_face": True,
    "min_feature_norm": 60.0,
    "max_similarity": 0.06,
    "max_attempts": 3,
}
SIZE = 64

# filter setting -> (manifest column, the test an accepted row passes)
THRESHOLDS = {
    "min_similarity": ("similarity", operator.ge),
    "min_det_score": ("det_score", operator.ge),
    "min_feature_norm": ("feature_norm", operator.ge),
    "require_single_face": ("face_count", lambda count, required: count == 1 or not required),
    "max_similarity": ("similarity", lambda similarity, limit: limit >= 1.0 or similarity <= limit),
}
NOT_A_THRESHOLD = {"max_attempts"}
# reject reason -> the setting whose check the row fails
REASON_SETTING = {
    LOW_SIMILARITY: "min_similarity",
    LOW_DETECTION_SCORE: "min_det_score",
    LOW_FEATURE_NORM: "min_feature_norm",
    MULTIPLE_FACES: "require_single_face",
    TOO_SIMILAR: "max_similarity",
}


@pytest.fixture(scope="module")
def job(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[JobSpec, Path]:
    from arc2face_engine.job.direct import run_job_directly

    out = tmp_path_factory.mktemp("promises") / "ds"
    spec = JobSpec.model_validate(
        {
            "name": "promises",
            "seed": 3,
            "models": {"dir": str(tiny_models), "device": "cpu", "precision": "fp32"},
            "identities": {"source": "random", "count": 8},
            "variations": {"images_per_identity": 4},
            "generation": {"steps": 2, "batch_size": 8, "height": SIZE, "width": SIZE},
            "filter": FILTER,
            "output": {"uri": str(out), "shard_size": 8, "image_format": "jpeg",
                       "quality": 40, "keep_rejected_images": True},
            "compute": {"task_runner": "local", "devices": ["cpu"]},
        }
    )  # fmt: skip
    run_job_directly(spec)
    return spec, out


def rows_of(out: Path) -> list[dict]:
    return sorted(DatasetReader(str(out)).manifest().to_pylist(), key=lambda row: row["image_id"])


def identity_embeddings(out: Path) -> dict[str, np.ndarray]:
    table = DatasetReader(str(out)).identities(["identity_id", "embedding"])
    return {
        row["identity_id"]: np.asarray(row["embedding"], np.float32) for row in table.to_pylist()
    }


def stored_rgb(out: Path, row: dict) -> np.ndarray:
    with Image.open(io.BytesIO((out / row["path"]).read_bytes())) as image:
        return np.asarray(image.convert("RGB"))


# --- thresholds ----------------------------------------------------------------------------------


def test_the_threshold_table_covers_every_filter_setting() -> None:
    """A threshold added to the spec's filter must be added to the checks below."""
    assert set(FilterSpec.model_fields) == set(THRESHOLDS) | NOT_A_THRESHOLD


def test_every_accepted_row_meets_every_threshold_and_every_reject_fails_its_own(job) -> None:
    spec, out = job
    rows = rows_of(out)
    embeddings = identity_embeddings(out)
    settings = spec.filter.model_dump()
    for row in rows:
        if row["face_count"]:  # the recorded similarity is the embedding's, not a claim
            similarity = float(
                l2_normalize(np.asarray(row["face_embedding"], np.float32))
                @ l2_normalize(embeddings[row["identity_id"]])
            )
            assert row["similarity"] == pytest.approx(similarity, abs=1e-5), row["image_id"]
        if row["accepted"]:
            assert row["face_count"] >= 1, row["image_id"]
            for setting, (column, passes) in THRESHOLDS.items():
                assert passes(row[column], settings[setting]), (row["image_id"], setting, row[column])
        elif row["reject_reason"] == NO_FACE:
            assert row["face_count"] == 0
        else:
            setting = REASON_SETTING[row["reject_reason"]]
            column, passes = THRESHOLDS[setting]
            assert not passes(row[column], settings[setting]), (row["image_id"], row[column])
    # The job sits across every threshold: each check above was exercised from both sides.
    reasons = {row["reject_reason"] for row in rows}
    assert {None, LOW_SIMILARITY, LOW_DETECTION_SCORE, LOW_FEATURE_NORM, MULTIPLE_FACES, TOO_SIMILAR} <= reasons


# --- verification judges the stored file ---------------------------------------------------------


def test_verification_judges_the_decoded_stored_file(job, tiny_models: Path) -> None:
    """Analysing each stored JPEG again (decoded as any reader decodes it) gives exactly the
    detection, similarity and verdict the job recorded; the generator's pixels would not."""
    from arc2face_engine.faces.onnxruntime_analyzer import FaceAnalyzer
    from arc2face_engine.faces.pack import detection_settings
    from arc2face_engine.faces.records import judge

    spec, out = job
    rows = [row for row in rows_of(out) if row["path"]]
    assert len(rows) == len(rows_of(out))  # keep_rejected_images: every row has its file
    det_size, det_thresh = detection_settings(SIZE, SIZE, spec.filter.min_det_score)
    analyzer = FaceAnalyzer.from_models_dir(
        tiny_models, providers=["CPUExecutionProvider"], det_size=det_size, det_thresh=det_thresh
    )
    records = analyzer.analyze([stored_rgb(out, row) for row in rows])
    embeddings = identity_embeddings(out)
    settings = spec.filter.model_dump(exclude={"max_attempts"})
    for row, record in zip(rows, records, strict=True):
        assert record.face_count == row["face_count"], row["image_id"]
        if not record.face_count:
            continue
        assert float(record.det_score) == pytest.approx(row["det_score"], abs=1e-5)
        verdict = judge(record, embeddings[row["identity_id"]], **settings)
        assert verdict.similarity == pytest.approx(row["similarity"], abs=1e-5), row["image_id"]
        assert (verdict.accepted, verdict.reason) == (row["accepted"], row["reject_reason"])


# --- export alignment ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")
def test_export_alignment_is_norm_crop_on_the_stored_keypoints(job, tmp_path: Path) -> None:
    """Each exported face equals insightface's ArcFace crop (`face_align.norm_crop`) of the
    stored image at the row's keypoints, up to the export's JPEG re-encoding."""
    from insightface.utils import face_align

    from arc2face_engine.exports import export_dataset

    _spec, out = job
    result = export_dataset(str(out), str(tmp_path / "export"), "imagefolder")
    accepted = {row["image_id"]: row for row in rows_of(out) if row["accepted"]}
    exported = sorted((tmp_path / "export").glob("*/*.jpg"))
    assert result.images == len(exported) == len(accepted) > 0
    for path in exported:
        row = accepted[path.stem]
        keypoints = np.asarray(row["keypoints"], np.float32).reshape(5, 2)
        expected = face_align.norm_crop(stored_rgb(out, row), keypoints, image_size=112)
        with Image.open(path) as image:
            crop = np.asarray(image.convert("RGB"))
        assert crop.shape == expected.shape == (112, 112, 3)
        difference = np.abs(crop.astype(np.int16) - expected.astype(np.int16))
        assert difference.mean() < 2.0, (path.name, difference.mean())
