"""`arc2face-synth import`: a dataset exported to each format and imported back is the same
dataset (identities, accepted counts, bytes; aligned crops embed as the original faces);
RecordIO's two layouts; labels that are no safe id; resume; the CLI and the flow."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from arc2face_engine.audit import audit_dataset
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.exports import export_dataset
from arc2face_engine.ingest.direct import run_import_directly
from schemas.imports import parse_import_spec
from schemas.job import JobSpec
from schemas.tables import IMPORTED, LEFT_OUT_LABEL, is_safe_id
from tests.dataset_factory import face_like_image, jpeg_bytes

FORMATS = ("imagefolder", "recordio", "webdataset", "hf")


@pytest.fixture(scope="module")
def generated(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset made by the real job on the tiny models: 3 identities, 4 accepted images
    (identity 1 has two), the rest rejected."""
    from arc2face_engine.job.direct import run_job_directly

    out = tmp_path_factory.mktemp("generated") / "ds"
    spec = {
        "name": "round trip", "seed": 3,
        "models": {"dir": str(tiny_models), "device": "cpu", "precision": "fp32"},
        "identities": {"source": "random", "count": 3},
        "variations": {"images_per_identity": 3},
        "generation": {"steps": 2, "batch_size": 4, "height": 64, "width": 64},
        "filter": {"min_similarity": 0.0, "max_attempts": 2},
        "output": {"uri": str(out), "shard_size": 3},
        "compute": {"task_runner": "local", "devices": ["cpu"]},
    }  # fmt: skip
    info = run_job_directly(JobSpec.model_validate(spec))
    assert info.status == "complete" and info.counts.accepted == 4
    return out


def import_into(source: Path, fmt: str, out: Path, models: Path, **options) -> dict:
    spec = parse_import_spec(
        dict(source=str(source), format=fmt, out=str(out), models_dir=str(models), **options)
    )
    info = run_import_directly(spec)
    assert info.status == "complete"
    return info.model_dump()


def accepted_by_identity(uri: Path) -> dict[str, list[dict]]:
    """Accepted rows per identity in manifest order (the order every export writes)."""
    grouped: dict[str, list[dict]] = defaultdict(list)
    for row in DatasetReader(str(uri)).manifest().to_pylist():
        if row["accepted"]:
            grouped[row["identity_id"]].append(row)
    return dict(grouped)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_keeps_identities_counts_and_bytes(generated, tiny_models, tmp_path, fmt):
    exported = tmp_path / "exported"
    export_dataset(str(generated), str(exported), fmt, align=False)
    out = tmp_path / "imported"
    info = import_into(exported, fmt, out, tiny_models, aligned=False)

    original, imported = accepted_by_identity(generated), accepted_by_identity(out)
    assert set(imported) == set(original)  # named from the export's label map
    assert {k: len(v) for k, v in imported.items()} == {k: len(v) for k, v in original.items()}
    for identity, rows in imported.items():  # --no-align exports copy the JPEG bytes
        assert [row["sha256"] for row in rows] == [row["sha256"] for row in original[identity]]
        assert all(row["source"] == IMPORTED and row["seed"] is None for row in rows)
    table = DatasetReader(str(out)).identities().to_pylist()
    assert [row["identity_id"] for row in table] == sorted(original)
    assert info["imported"]["format"] == fmt and info["counts"]["rejected"] == 0
    assert audit_dataset(str(out)).passed


@pytest.mark.parametrize("fmt", FORMATS)
def test_aligned_exports_embed_as_the_original_faces(generated, tiny_models, tmp_path, fmt):
    exported = tmp_path / "exported"
    export_dataset(str(generated), str(exported), fmt)  # aligned 112x112 crops, JPEG
    out = tmp_path / "imported"
    import_into(exported, fmt, out, tiny_models, aligned=True)

    original, imported = accepted_by_identity(generated), accepted_by_identity(out)
    assert {k: len(v) for k, v in imported.items()} == {k: len(v) for k, v in original.items()}
    for identity, rows in imported.items():
        for mine, theirs in zip(rows, original[identity], strict=True):
            cosine = float(np.dot(mine["face_embedding"], theirs["face_embedding"]))
            assert 1.0 - cosine < 1e-3, (identity, cosine)
            assert (mine["width"], mine["height"], mine["face_count"]) == (112, 112, 1)
            assert mine["det_score"] is None  # embedded without detection


@pytest.mark.parametrize("fmt", ["imagefolder", "recordio"])  # listing, and reads by offset
def test_import_from_and_to_an_object_store(generated, tiny_models, tmp_path, s3_uri, fmt):
    import s3fs

    uri, options = s3_uri
    exported = tmp_path / "exported"
    export_dataset(str(generated), str(exported), fmt, align=False)
    fs = s3fs.S3FileSystem(**options)
    bucket = uri.removeprefix("s3://")
    for path in exported.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{bucket}/src/{path.relative_to(exported).as_posix()}", path.read_bytes())
    out = f"{uri}/imported"
    spec = parse_import_spec(dict(source=f"{uri}/src", format=fmt, out=out, aligned=False,
                                  models_dir=str(tiny_models), storage_options=options,
                                  out_storage_options=options))  # fmt: skip
    info = run_import_directly(spec)
    reader = DatasetReader(out, options)
    rows = [row for row in reader.manifest().to_pylist() if row["accepted"]]
    original = accepted_by_identity(generated)
    assert info.counts.accepted == len(rows) == sum(len(v) for v in original.values())
    assert {row["identity_id"] for row in rows} == set(original)
    assert audit_dataset(out, options).passed


def test_recordio_defaults_to_aligned_and_reads_the_shuffled_layout(generated, tiny_models, tmp_path):
    insightface = tmp_path / "rec"
    export_dataset(str(generated), str(insightface), "recordio")
    info = import_into(insightface, "rec", tmp_path / "a", tiny_models)
    assert info["imported"]["layout"] == "insightface" and info["imported"]["aligned"]

    shuffled = tmp_path / "dali"
    export_dataset(str(generated), str(shuffled), "recordio", dali=True, shuffle_seed=7)
    info = import_into(shuffled, "recordio", tmp_path / "b", tiny_models)
    assert info["imported"]["layout"] == "shuffled"
    counts = {k: len(v) for k, v in accepted_by_identity(tmp_path / "b").items()}
    assert counts == {k: len(v) for k, v in accepted_by_identity(generated).items()}

    (shuffled / "label_map.csv").unlink()  # a peer's RecordIO: integer labels only
    import_into(shuffled, "recordio", tmp_path / "c", tiny_models)
    rows = DatasetReader(str(tmp_path / "c")).manifest().to_pylist()
    assert {row["identity_id"] for row in rows} == {"0", "1", "2"}
    assert all(row["source_label"] == row["identity_id"] for row in rows)


def _write_jpeg(path: Path, index: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(face_like_image(64, index, np.random.default_rng(seed))))


def test_labels_that_are_no_safe_id_are_kept_beside_one(tiny_models, tmp_path):
    source = tmp_path / "src"
    names = ["José Núñez", "a b", "ok_name", "unlabelled"]
    for index, name in enumerate(names):
        _write_jpeg(source / name / "1.jpg", index)
    import_into(source, "imagefolder", tmp_path / "out", tiny_models)
    rows = DatasetReader(str(tmp_path / "out")).manifest().to_pylist()
    by_label = {row["source_label"]: row["identity_id"] for row in rows}
    assert set(by_label) == set(names)
    assert by_label["ok_name"] == "ok_name"
    for name in ("José Núñez", "a b", "unlabelled"):  # unlabelled is reserved
        assert by_label[name].startswith("id-") and is_safe_id(by_label[name])
    assert len(set(by_label.values())) == len(names)


def test_identities_without_an_accepted_image_are_counted_and_left_out(tiny_models, tmp_path):
    source = tmp_path / "src"
    _write_jpeg(source / "kept" / "1.jpg", 1)
    (source / "notes").mkdir()
    (source / "notes" / "readme.txt").write_text("not an image")
    (source / "stray.jpg").write_bytes(jpeg_bytes(face_like_image(64, 2, np.random.default_rng(0))))
    info = import_into(source, "imagefolder", tmp_path / "out", tiny_models)
    rows = {row["source_name"]: row for row in DatasetReader(str(tmp_path / "out")).manifest().to_pylist()}
    assert rows["notes/readme.txt"]["reject_reason"] == "unreadable"
    assert rows["notes/readme.txt"]["label"] == LEFT_OUT_LABEL
    assert rows["stray.jpg"]["reject_reason"] == "no_label"
    identities = DatasetReader(str(tmp_path / "out")).identities().column("identity_id").to_pylist()
    kept = rows["kept/1.jpg"]
    if kept["accepted"]:  # the tiny detector decides; either way the counts say so
        assert identities == ["kept"] and kept["label"] == 0
    provenance = info["imported"]
    assert provenance["identities_left_out"] == 2 - len(identities)
    assert provenance["unlabelled"] == 1 and provenance["source_items"] == 3
    assert provenance["refused"]["unreadable"] == 1
    assert audit_dataset(str(tmp_path / "out")).passed


def test_resume_skips_committed_shards_and_refuses_a_changed_source(tiny_models, tmp_path):
    source = tmp_path / "src"
    for index in range(4):
        _write_jpeg(source / f"p{index}" / "1.jpg", index)
    options = dict(source=str(source), format="imagefolder", out=str(tmp_path / "out"),
                   models_dir=str(tiny_models), shard_size=1)  # fmt: skip
    first = run_import_directly(parse_import_spec(options))
    part = tmp_path / "out" / "manifest" / "part-00001.parquet"
    before = part.read_bytes()
    (part.parent / "part-00003.parquet").unlink()  # as if killed before the last commit
    again = run_import_directly(parse_import_spec(options))
    assert again.counts == first.counts and part.read_bytes() == before
    assert again.counts.identities >= 2  # labels continue across the resumed shard
    assert audit_dataset(str(tmp_path / "out")).passed
    _write_jpeg(source / "p9" / "1.jpg", 9)
    from schemas.errors import ResumeMismatch

    with pytest.raises(ResumeMismatch, match="changed since this import started"):
        run_import_directly(parse_import_spec(options))


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    from flows.cli import main

    monkeypatch.setattr(sys, "argv", ["arc2face-synth", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 0
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_import_options_are_one_line_before_anything_is_written(
    tiny_models, tmp_path, monkeypatch, capsys
):
    source = tmp_path / "src"
    for index in range(3):
        _write_jpeg(source / "p" / f"{index}.jpg", index)
    out = tmp_path / "out"
    cases = [
        (["--format", "lmdb"], "unknown format 'lmdb'"),
        (["--format", "imagefolder", "--label-field", "x"], "--label-field is for webdataset"),
        (["--format", "recordio"], "no train.rec"),
        (["--format", "webdataset"], "no .tar files"),
        (["--format", "imagefolder", "--device", "tpu"], "unknown device"),
    ]
    for extra, expected in cases:
        code, _, err = run_cli(["import", source, "--out", out, "--models", tiny_models, *extra,
                                "--no-progress"], monkeypatch, capsys)  # fmt: skip
        assert code == 2 and err.count("\n") == 1 and expected in err, err
        assert not out.exists()
    code, _, err = run_cli(["import", source, "--format", "imagefolder", "--out", source / "p",
                            "--models", tiny_models], monkeypatch, capsys)  # fmt: skip
    assert code == 2 and "overlap" in err
    from arc2face_engine.imports import SourceError

    too_many = parse_import_spec(dict(source=str(source), format="imagefolder", out=str(out),
                                      models_dir=str(tiny_models), max_images=2))  # fmt: skip
    with pytest.raises(SourceError, match="holds 3 items, more than --max-images 2"):
        run_import_directly(too_many)
    assert not out.exists()


@pytest.mark.usefixtures("prefect_harness")
def test_cli_imports_through_the_flow_and_resumes(tiny_models, tmp_path, monkeypatch, capsys):
    source = tmp_path / "src"
    for index in range(3):
        _write_jpeg(source / f"person{index}" / "a.jpg", index)
    out = tmp_path / "out"
    args = ["import", source, "--format", "imagefolder", "--out", out, "--models", tiny_models,
            "--shard-size", "1", "--workers", "2", "--no-progress"]  # fmt: skip
    code, stdout, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    info = json.loads((out / "dataset.json").read_text())
    assert info["status"] == "complete" and info["counts"]["committed_shards"] == 3
    assert info["imported"]["source_items"] == 3 and "3 source items" in stdout
    assert info["spec"]["format"] == "imagefolder"
    parts = sorted((out / "manifest").glob("part-*.parquet"))
    written = [part.stat().st_mtime_ns for part in parts]
    code, stdout, err = run_cli(args, monkeypatch, capsys)  # a re-run resumes: nothing to redo
    assert code == 0, err
    assert [part.stat().st_mtime_ns for part in parts] == written
