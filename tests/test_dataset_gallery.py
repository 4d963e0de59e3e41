"""A dataset folder is accepted wherever an embeddings file is: the exclusion gallery of
a job and `audit --gallery` ("keep my identities away from CASIA-WebFace" is an import
and a generate), trusted only when identities.parquet matches its dataset.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arc2face_engine.audit import AuditError, audit_dataset
from schemas.errors import SpecError
from schemas.job import JobSpec
from tests.dataset_factory import make_dataset, normalise


@pytest.fixture()
def datasets(tmp_path: Path):
    """A (4 identities) and a gallery dataset G holding A's identity 2 among strangers."""
    rng = np.random.default_rng(11)
    a = make_dataset(str(tmp_path / "a"), n_identities=4, images_per_identity=3, seed=1)
    strangers = normalise(rng.standard_normal((2, 512)))
    gallery = np.vstack([strangers[:1], a.identity_embeddings[2:3], strangers[1:]])
    g = make_dataset(str(tmp_path / "g"), identity_embeddings=gallery, images_per_identity=2,
                     shards=1, seed=2)  # fmt: skip
    return a, g


def test_audit_takes_a_dataset_as_gallery(datasets) -> None:
    a, g = datasets
    report = audit_dataset(a.uri, gallery=g.uri, gallery_threshold=0.9)
    assert [(flag.identity_id, flag.gallery_id) for flag in report.leakage.flagged] == [
        ("id-000002", "id-000001")
    ]
    assert report.leakage.gallery_size == 3


def test_a_gallery_dataset_whose_identities_changed_is_refused(datasets) -> None:
    a, g = datasets
    path = Path(g.uri) / "identities.parquet"
    table = pq.read_table(path)
    pq.write_table(table.slice(0, 2), path)  # dataset.json still names the old sha256
    with pytest.raises(AuditError, match="does not match the sha256"):
        audit_dataset(a.uri, gallery=g.uri)


def _job(models: Path, out: Path, embeddings: np.ndarray, gallery: str, tmp: Path) -> JobSpec:
    source = tmp / "ids.parquet"
    pq.write_table(pa.table({"embedding": [row.tolist() for row in embeddings]}), source)
    return JobSpec.model_validate({
        "name": "gallery", "seed": 1,
        "models": {"dir": str(models), "device": "cpu", "precision": "fp32"},
        "identities": {"source": "file", "path": str(source),
                       "exclusion": {"gallery": gallery, "max_cosine": 0.5}},
        "variations": {"images_per_identity": 1},
        "generation": {"steps": 1, "batch_size": 2, "height": 64, "width": 64},
        "filter": {"min_similarity": 0.0, "max_attempts": 1},
        "output": {"uri": str(out), "shard_size": 2},
        "compute": {"task_runner": "local", "devices": ["cpu"]},
    })  # fmt: skip


def test_a_job_keeps_its_identities_away_from_a_dataset(datasets, tiny_models, tmp_path) -> None:
    from arc2face_engine.job.direct import run_job_directly
    from arc2face_engine.job.preflight import preflight

    a, g = datasets
    leaking = _job(tiny_models, tmp_path / "leak", a.identity_embeddings[[0, 2]], g.uri, tmp_path)
    with pytest.raises(SpecError, match=r"identity id-000001 has cosine 1\.000 to row 1"):
        preflight(leaking)
    clean = _job(tiny_models, tmp_path / "clean", a.identity_embeddings[[0, 1]], g.uri, tmp_path)
    info = run_job_directly(clean)
    recorded = json.loads((Path(g.uri) / "dataset.json").read_text())["identities_sha256"]
    assert info.exclusion_report.gallery_sha256 == recorded
    assert info.exclusion_report.gallery_size == 3
