"""Exclusion gallery: no identity within the limit of a real person's embedding, every source."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from arc2face_engine.job import identities_step, lifecycle, preflight
from schemas.errors import EmbeddingFileError, SpecError
from schemas.job import JobSpec
from schemas.tables import vector_matrix
from tests.test_job_identities import _disc_photo, spec_for
from tests.test_packing import face_manifold


def save_npy(path: Path, rows: np.ndarray) -> str:
    np.save(path, rows.astype(np.float32))
    return str(path)


def build(spec: JobSpec):
    """identities.parquet's embeddings and the exclusion report recorded in dataset.json."""
    table = identities_step.build_identities(spec, lifecycle.prepare_dataset(spec))
    info = json.loads((Path(spec.output.uri) / "dataset.json").read_text())
    return table, vector_matrix(table.column("embedding"), 512), info["exclusion_report"]


def largest_cosine(rows: np.ndarray, gallery: np.ndarray) -> float:
    unit = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    return float((rows @ unit.T).max())


def check_report(report: dict, gallery_path: str, rows: np.ndarray, gallery: np.ndarray) -> None:
    assert report["gallery_sha256"] == hashlib.sha256(Path(gallery_path).read_bytes()).hexdigest()
    assert report["gallery_size"] == len(gallery)
    assert report["min_margin"] >= 0
    top = largest_cosine(rows, gallery)
    assert top <= report["max_cosine"]
    assert report["min_margin"] == pytest.approx(report["max_cosine"] - top, abs=1e-5)


def test_random_candidates_near_the_gallery_are_resampled(tiny_models, tmp_path):
    gallery = np.random.default_rng(0).standard_normal((2000, 512))
    path = save_npy(tmp_path / "people.npy", gallery)
    exclusion = {"gallery": path, "max_cosine": 0.14}
    spec = spec_for(
        tiny_models, tmp_path / "ds", {"source": "random", "count": 6, "exclusion": exclusion}
    )
    _, rows, report = build(spec)
    check_report(report, path, rows, gallery)
    assert report["excluded"] > 0  # uniform draws often come within 0.14 of 2000 people
    free = spec_for(tiny_models, tmp_path / "free", {"source": "random", "count": 6})
    assert largest_cosine(build(free)[1], gallery) > 0.14  # the same seed without exclusion


def test_packed_identities_are_moved_out_of_the_gallery(tiny_models, tmp_path):
    manifold = face_manifold(400)
    path = save_npy(tmp_path / "faces.npy", manifold)
    # The worst case: the people to avoid are the very faces packing starts from.
    identities = {
        "source": "packed",
        "count": 30,
        "packing": {"gallery": path, "steps": 10},
        "exclusion": {"gallery": path, "max_cosine": 0.5},
    }
    table, rows, report = build(spec_for(tiny_models, tmp_path / "ds", identities))
    assert set(table.column("source").to_pylist()) == {"packed"}
    check_report(report, path, rows, manifold)
    assert report["excluded"] > 0
    assert largest_cosine(rows, manifold) > 0.45  # moved to the limit, not far beyond


def test_packed_identities_from_arc2face_probes(tiny_models, tmp_path):
    identities = {"source": "packed", "count": 4, "packing": {"probes": 3, "steps": 3}}
    spec = spec_for(tiny_models, tmp_path / "ds", identities)
    table = identities_step.build_identities(spec, lifecycle.prepare_dataset(spec))
    assert table.num_rows == 4
    rows = {text.rsplit(" ", 1)[1] for text in table.column("provenance").to_pylist()}
    assert rows <= {"0", "1", "2"}  # started from the three probe re-embeddings


def test_a_file_too_close_to_the_gallery_is_refused_and_a_clean_one_recorded(
    tiny_models, tmp_path
):
    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((50, 512))
    gallery_path = save_npy(tmp_path / "people.npy", gallery)
    clean = rng.standard_normal((3, 512))
    leaky = clean.copy()
    leaky[1] = gallery[7] + 0.01 * rng.standard_normal(512)
    exclusion = {"gallery": gallery_path, "max_cosine": 0.5}
    bad = spec_for(
        tiny_models,
        tmp_path / "bad",
        {"source": "file", "path": save_npy(tmp_path / "leaky.npy", leaky), "exclusion": exclusion},
    )
    with pytest.raises(SpecError, match=r"identity id-000001 has cosine 1\.000 to row 7"):
        preflight.preflight(bad)
    assert not (tmp_path / "bad").exists()
    good = spec_for(
        tiny_models,
        tmp_path / "good",
        {"source": "file", "path": save_npy(tmp_path / "ok.npy", clean), "exclusion": exclusion},
    )
    preflight.preflight(good)
    _, rows, report = build(good)
    check_report(report, gallery_path, rows, gallery)
    assert report["excluded"] == 0


def test_photos_too_close_to_the_gallery_are_dropped_and_listed(tiny_models, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    _disc_photo(photos / "a.png", (64, 64))
    _disc_photo(photos / "b.png", (40, 80))
    plain = spec_for(tiny_models, tmp_path / "plain", {"source": "images", "path": str(photos)})
    faces = vector_matrix(
        identities_step.build_identities(plain, lifecycle.prepare_dataset(plain)).column(
            "embedding"
        ),
        512,
    )
    assert len(faces) == 2
    between = float(faces[0] @ faces[1])
    assert between < 0.999  # the tiny models tell the two photos apart
    gallery_path = save_npy(tmp_path / "people.npy", faces[:1])  # photo a is a "real person"
    exclusion = {"gallery": gallery_path, "max_cosine": (between + 1) / 2}
    spec = spec_for(
        tiny_models,
        tmp_path / "ds",
        {"source": "images", "path": str(photos), "exclusion": exclusion},
    )
    capsys.readouterr()
    table, rows, report = build(spec)
    assert table.column("provenance").to_pylist() == ["image b.png"]
    assert table.column("label").to_pylist() == [0]
    assert "dropped image a.png: within cosine" in capsys.readouterr().out
    check_report(report, gallery_path, rows, faces[:1])
    assert report["excluded"] == 1


def test_bad_gallery_is_one_line_exit_2_before_anything_is_written(tiny_models, tmp_path):
    gallery = tmp_path / "people.npy"
    spec = spec_for(
        tiny_models,
        tmp_path / "ds",
        {"source": "random", "count": 2, "exclusion": {"gallery": str(gallery)}},
    )
    with pytest.raises(EmbeddingFileError, match=r"identities\.exclusion\.gallery .*people\.npy does not exist"):
        preflight.preflight(spec)
    np.save(gallery, np.ones((4, 3)))
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    failed = subprocess.run(
        [sys.executable, "-m", "flows.cli", "generate", str(spec_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert failed.returncode == 2, failed.stderr
    assert failed.stderr.startswith("error: ") and failed.stderr.strip().count("\n") == 0
    assert "has shape (4, 3), expected (N, 512)" in failed.stderr, failed.stderr
    assert not (tmp_path / "ds").exists()


def test_spec_sections_for_packing_and_exclusion():
    from schemas.job import parse_spec

    spec = parse_spec({"name": "x", "identities": {"source": "packed"}})
    assert spec.identities.count == 100
    assert spec.identities.exclusion.gallery is None and spec.identities.exclusion.max_cosine == 0.5
    assert spec.identities.packing.gallery is None and spec.identities.packing.probes == 256
    with pytest.raises(SpecError, match="source 'packed' reads no file"):
        parse_spec({"name": "x", "identities": {"source": "packed", "path": "a.npy"}})
    with pytest.raises(SpecError, match=r"identities\.exclusion\.max_cosine"):
        parse_spec({"name": "x", "identities": {"exclusion": {"max_cosine": 1.5}}})
