"""Identity sources as the generate job runs them, on the tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.job import identities_step, lifecycle
from schemas.job import JobSpec
from schemas.tables import vector_matrix


def spec_for(models: Path, out: Path, identities: dict) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "identities",
            "seed": 3,
            "models": {"dir": str(models), "device": "cpu", "precision": "fp32"},
            "identities": identities,
            "variations": {"images_per_identity": 2},
            "generation": {"steps": 2, "batch_size": 4, "height": 64, "width": 64},
            "output": {"uri": str(out), "shard_size": 4},
            "compute": {"task_runner": "local", "devices": ["cpu"]},
        }
    )


def test_manifold_projection_keeps_the_probe_re_embedding(tiny_models, tmp_path):
    spec = spec_for(
        tiny_models,
        tmp_path / "ds",
        {"source": "random", "count": 2, "separation": 0.99, "project_to_manifold": True},
    )
    writer = lifecycle.prepare_dataset(spec)
    table = identities_step.build_identities(spec, writer)
    assert table.num_rows == 2
    assert all("projected" in text for text in table.column("provenance").to_pylist())
    embeddings = vector_matrix(table.column("embedding"), 512)
    # Kept vectors are the analyzer's (unit-norm) re-embeddings, not the raw draws.
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    stored = DatasetReader(str(tmp_path / "ds")).identities()
    assert stored.equals(table)
    unprojected = spec_for(
        tiny_models, tmp_path / "raw", {"source": "random", "count": 2, "separation": 0.99}
    )
    raw = identities_step.build_identities(unprojected, lifecycle.prepare_dataset(unprojected))
    assert not np.allclose(vector_matrix(raw.column("embedding"), 512), embeddings)


def _disc_photo(path: Path, centre: tuple[int, int] | None) -> None:
    image = Image.new("RGB", (128, 128), (10, 10, 10))
    if centre is not None:
        x, y = centre
        ImageDraw.Draw(image).ellipse((x - 28, y - 34, x + 28, y + 34), fill=(235, 225, 215))
    image.save(path)


def test_image_folder_source_embeds_faces_and_skips_the_rest(tiny_models, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    _disc_photo(photos / "a.png", (64, 64))
    _disc_photo(photos / "b.png", (50, 70))
    _disc_photo(photos / "empty.png", None)
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    spec = spec_for(tiny_models, tmp_path / "ds", {"source": "images", "path": str(photos)})
    table = identities_step.build_identities(spec, lifecycle.prepare_dataset(spec))
    assert table.num_rows == 2
    assert table.column("source").to_pylist() == ["images", "images"]
    printed = capsys.readouterr().out
    assert "empty.png" in printed and "broken.jpg" in printed
