"""Composition measured and audited: the manifest's predicted and measured columns, the
identities' attributes at finalize, filter.max_similarity, and the audit's composition,
fairness and difficulty sections (numbers checked against an independent recount)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from arc2face_engine.audit import audit_dataset
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.job.direct import run_job_directly
from arc2face_engine.job.lifecycle import finalize_dataset
from schemas.job import JobSpec
from schemas.tables import GENDERS, TOO_SIMILAR, skin_tone_of
from tests.dataset_factory import make_dataset
from tests.test_bad_inputs import assert_intact, assert_one_line_error, run_cli

pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")
ATTRIBUTES = ["predicted_gender", "gender_probability", "predicted_age", "skin_ita", "skin_tone"]


@pytest.fixture(scope="module")
def job(tiny_models, tmp_path_factory) -> tuple[JobSpec, Path]:
    """A tiny job whose filter also rejects near-copies: the tiny models' similarities
    scatter around 0, so max_similarity 0 rejects about half of the faces."""
    out = tmp_path_factory.mktemp("composition") / "ds"
    spec = JobSpec.model_validate({
        "name": "composition", "seed": 11,
        "models": {"dir": str(tiny_models), "device": "cpu", "precision": "fp32"},
        "identities": {"source": "random", "count": 4},
        "variations": {"images_per_identity": 4},
        "generation": {"steps": 2, "batch_size": 8, "height": 64, "width": 64},
        "filter": {"min_similarity": -0.5, "max_similarity": 0.0, "require_single_face": False,
                   "max_attempts": 1},
        "output": {"uri": str(out), "shard_size": 8},
        "compute": {"task_runner": "local", "devices": ["cpu"]},
    })  # fmt: skip
    info = run_job_directly(spec)
    assert info.status == "complete"
    return spec, out


def test_every_image_with_a_face_carries_its_attributes(job):
    _, out = job
    rows = DatasetReader(str(out)).manifest().to_pylist()
    with_face = [row for row in rows if row["face_count"]]
    assert with_face and any(not row["accepted"] for row in with_face)  # rejected ones too
    for row in rows:
        if not row["face_count"]:
            assert all(row[name] is None for name in ATTRIBUTES)
            continue
        assert row["predicted_gender"] in GENDERS
        assert 0.5 <= row["gender_probability"] <= 1.0
        assert 0.0 < row["predicted_age"] < 100.0
        assert row["skin_tone"] == skin_tone_of(row["skin_ita"])
    assert {row["predicted_gender"] for row in with_face} == set(GENDERS)


def test_near_copies_are_rejected_as_too_similar(job):
    _, out = job
    rows = DatasetReader(str(out)).manifest().to_pylist()
    too_similar = [row for row in rows if row["reject_reason"] == TOO_SIMILAR]
    assert too_similar and all(row["similarity"] > 0.0 for row in too_similar)
    assert all(-0.5 <= row["similarity"] <= 0.0 for row in rows if row["accepted"])
    info = json.loads((out / "dataset.json").read_text())
    assert info["counts"]["reject_reasons"][TOO_SIMILAR] == len(too_similar)


def test_identities_get_their_accepted_images_attributes_at_finalize(job):
    """Recounted here without the project's code: majority gender (ties to the larger
    summed probability), mean probability of it, median age and ITA."""
    spec, out = job
    rows = DatasetReader(str(out)).manifest().to_pylist()
    identities = pq.read_table(out / "identities.parquet").to_pylist()
    for identity in identities:
        accepted = [r for r in rows if r["identity_id"] == identity["identity_id"]
                    and r["accepted"] and r["predicted_gender"]]  # fmt: skip
        if not accepted:
            assert identity["attributes_from"] is None and identity["gender"] is None
            continue
        votes = Counter(r["predicted_gender"] for r in accepted)
        mass = {g: sum(r["gender_probability"] if r["predicted_gender"] == g
                       else 1 - r["gender_probability"] for r in accepted) for g in GENDERS}  # fmt: skip
        gender = max(GENDERS, key=lambda g: (votes[g], mass[g]))
        assert identity["attributes_from"] == "accepted images"
        assert identity["gender"] == gender
        assert identity["gender_probability"] == pytest.approx(mass[gender] / len(accepted), abs=1e-6)
        assert identity["age"] == pytest.approx(np.median([r["predicted_age"] for r in accepted]), abs=1e-4)
        itas = [r["skin_ita"] for r in accepted if r["skin_ita"] is not None]
        if itas:
            assert identity["skin_ita"] == pytest.approx(np.median(itas), abs=1e-4)
            assert identity["skin_tone"] == skin_tone_of(identity["skin_ita"])
    assert_intact(out)  # identities.parquet rewritten, its sha256 recorded
    before = (out / "identities.parquet").read_bytes()
    finalize_dataset(spec)
    assert (out / "identities.parquet").read_bytes() == before  # unchanged: not rewritten
    report = audit_dataset(str(out), write_report=False)  # the audit's own recount agrees
    assert {axis.axis: axis.agreement for axis in report.composition.axes if axis.agreement} == {
        "gender": 1.0, "age": 1.0, "skin_tone": 1.0}  # fmt: skip


# --- the audit's composition section --------------------------------------------------------------


def _attributes(index: int) -> tuple[str, float, float]:
    """Identity i: female when even, male when odd; ages 25 or 55; ITA 30 or -40."""
    return (GENDERS[index % 2], 25.0 + 30.0 * (index % 4 >= 2), 30.0 if index < 10 else -40.0)


@pytest.fixture(scope="module")
def gapped(tmp_path_factory) -> str:
    """20 identities, 10 per gender; the men's accepted faces are much noisier, so their
    similarity to the identity is lower: a gap the audit must find."""
    root = str(tmp_path_factory.mktemp("gapped") / "ds")
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((20, 512))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def noisy(identity: int, variant: int, draw: np.random.Generator):
        spread = 0.3 if identity % 2 == 0 else 1.6
        return centres[identity] + spread * draw.standard_normal(512) / np.sqrt(512)

    make_dataset(root, identity_embeddings=centres, images_per_identity=5, shards=4,
                 face_embedding_fn=noisy, attributes_fn=_attributes)  # fmt: skip
    return root


def test_audit_finds_the_gap_between_groups_and_warns_above_the_threshold(gapped):
    root = gapped
    report = audit_dataset(root)
    gender = next(axis for axis in report.composition.axes if axis.axis == "gender")
    assert gender.identity_counts == {"female": 10, "male": 10}
    groups = {group.group: group for group in gender.groups}
    rows = DatasetReader(root).manifest().to_pylist()
    for name, group in groups.items():
        mine = [r for r in rows if int(r["identity_id"][3:]) % 2 == GENDERS.index(name)]
        accepted = [r for r in mine if r["accepted"]]
        assert group.images == len(mine) and group.accepted == len(accepted)
        assert group.mean_similarity == pytest.approx(np.mean([r["similarity"] for r in accepted]), abs=1e-5)
    similarity_gap = next(gap for gap in gender.gaps if gap.metric == "mean_similarity")
    expected = groups["female"].mean_similarity - groups["male"].mean_similarity
    assert similarity_gap.gap == pytest.approx(expected) and similarity_gap.gap > 0.3
    assert (similarity_gap.low, similarity_gap.high, similarity_gap.compared) == ("male", "female", True)
    assert any("composition: mean_similarity differs by" in w and "gender" in w for w in report.warnings)
    calm = audit_dataset(root, fairness_gap=0.95, write_report=False)
    assert not any(w.startswith("composition:") for w in calm.warnings)


def test_audit_shares_nearest_identity_and_per_identity_difficulty(gapped):
    root = gapped
    report = audit_dataset(root)
    skin = next(axis for axis in report.composition.axes if axis.axis == "skin_tone")
    assert skin.identity_shares == {"intermediate": 0.5, "dark": 0.5}  # ITA 30 and -40
    age = next(axis for axis in report.composition.axes if axis.axis == "age")
    assert age.identity_counts == {"20-30": 10, "50-60": 10}
    assert age.agreement is None  # identities.parquet records no attributes to compare
    table = pq.read_table(Path(root) / "audit" / "identities.parquet").to_pylist()
    assert len(table) == 20
    manifest = DatasetReader(root).manifest().to_pylist()
    faces = {}
    for row in manifest:
        if row["accepted"] and row["face_embedding"] is not None:
            faces.setdefault(row["identity_id"], []).append(np.asarray(row["face_embedding"]))
    centres = {k: np.mean(v, axis=0) / np.linalg.norm(np.mean(v, axis=0)) for k, v in faces.items()}
    for row in table:
        stack = np.stack(faces[row["identity_id"]])
        pairs = [float(a @ b) for i, a in enumerate(stack) for b in stack[i + 1 :]]
        assert row["intra_class_cosine"] == pytest.approx(np.mean(pairs), abs=1e-5)
        others = [float(centres[row["identity_id"]] @ c) for k, c in centres.items()
                  if k != row["identity_id"]]  # fmt: skip
        assert row["nearest_other_identity"] == pytest.approx(max(others), abs=1e-5)
        assert row["expression_coverage"] == 1.0 and row["yaw_spread"] > 5.0
    difficulty = report.composition.difficulty
    assert difficulty.identities == 20 and difficulty.expression_coverage.median == 1.0
    html = (Path(root) / "audit" / "report.html").read_text()
    assert "Composition and fairness" in html and "no ethnicity or race" in html


def test_fairness_gap_option_is_checked(gapped, monkeypatch, capsys):
    root = gapped
    code, _, err = run_cli(["audit", root, "--fairness-gap", "-1", "--no-progress"], monkeypatch, capsys)
    assert code == 2
    assert_one_line_error(err, "--fairness-gap -1 is not a gap >= 0")
