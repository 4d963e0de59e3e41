"""The generate flow end to end on tiny models: layout, determinism, resume, S3, Dask, CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.dataset.writer import DatasetWriter
from schemas.errors import SpecError
from schemas.job import JobSpec
from schemas.tables import IDENTITIES_SCHEMA, MANIFEST_SCHEMA, REJECT_REASONS

pytestmark = pytest.mark.usefixtures("prefect_harness")


def small_spec(models: Path, output: str, **overrides) -> JobSpec:
    raw = {
        "name": "flow test",
        "seed": 7,
        "models": {"dir": str(models), "device": "cpu", "precision": "fp32"},
        "identities": {"source": "random", "count": 3, "separation": 0.3},
        "variations": {
            "images_per_identity": 4,
            "poses": {"kind": "procedural", "yaw": [-20, 20], "pitch": [0], "roll": [0]},
            "expressions": {"kind": "random", "count": 2},
        },
        "generation": {"steps": 2, "guidance": 3.0, "batch_size": 8, "height": 64, "width": 64},
        "filter": {"min_similarity": 0.0, "max_attempts": 2},
        "output": {"uri": output, "shard_size": 4},
        "compute": {"task_runner": "local", "devices": ["cpu"]},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return JobSpec.model_validate(raw)


def manifest_rows(uri: str, storage_options: dict | None = None) -> list[dict]:
    table = DatasetReader(uri, storage_options or {}).manifest()
    return sorted(table.to_pylist(), key=lambda row: row["image_id"])


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted((root / "images").rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory) -> tuple[JobSpec, Path]:
    """One uninterrupted run that the other tests compare against."""
    from flows.generate import generate_dataset

    out = tmp_path_factory.mktemp("reference") / "ds"
    spec = small_spec(tiny_models, str(out))
    generate_dataset(spec)
    return spec, out


def test_dataset_matches_the_data_model(reference):
    _spec, out = reference
    info = json.loads((out / "dataset.json").read_text())
    assert info["status"] == "complete"
    assert pq.read_schema(out / "identities.parquet").equals(
        IDENTITIES_SCHEMA, check_metadata=False
    )
    parts = sorted((out / "manifest").glob("part-*.parquet"))
    assert len(parts) == info["counts"]["shards"] == 3  # 3 identities x 4 images, 4 per shard
    for part in parts:
        assert pq.read_schema(part).equals(MANIFEST_SCHEMA, check_metadata=False)
    rows = manifest_rows(str(out))
    assert info["counts"]["images"] == len(rows)
    accepted = [row for row in rows if row["accepted"]]
    rejected = [row for row in rows if not row["accepted"]]
    assert accepted and rejected, "tiny models should give both outcomes"
    assert {row["reject_reason"] for row in rejected} <= set(REJECT_REASONS)
    assert all(row["reject_reason"] is None for row in accepted)
    for row in rows:
        data = (out / row["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert len(data) == row["size_bytes"]
        assert row["pose_name"] is not None and row["expression_name"] is not None
    # Top-ups: every rejected first attempt has a second attempt (max_attempts=2).
    ids = {row["image_id"] for row in rows}
    for row in rejected:
        if row["attempt"] == 0:
            assert row["image_id"].replace("-a00", "-a01") in ids
    # Every identity asked for 4 variants.
    variants = {(row["identity_id"], row["variant"]) for row in rows}
    assert len(variants) == 3 * 4
    assert (out / "README.md").read_text().startswith("# flow test")


def test_two_runs_give_identical_manifests_and_images(reference, tiny_models, tmp_path):
    from flows.generate import generate_dataset

    _spec, out = reference
    again = tmp_path / "again"
    generate_dataset(small_spec(tiny_models, str(again)))
    assert manifest_rows(str(again)) == manifest_rows(str(out))
    assert file_hashes(again) == file_hashes(out)


class InjectedCrash(RuntimeError):
    pass


@pytest.mark.parametrize("crash_point", ["write_image", "commit_shard"])
def test_crash_then_rerun_equals_uninterrupted(
    reference, tiny_models, tmp_path, monkeypatch, crash_point
):
    from flows.generate import generate_dataset

    _spec, out = reference
    target = tmp_path / "crashy"
    original = getattr(DatasetWriter, crash_point)
    calls = {"n": 0}
    crash_after = 5 if crash_point == "write_image" else 1

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > crash_after:
            raise InjectedCrash(f"injected crash in {crash_point}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DatasetWriter, crash_point, crashing)
    with pytest.raises(Exception):  # noqa: B017 - Prefect may wrap the crash
        generate_dataset(small_spec(tiny_models, str(target)))
    monkeypatch.setattr(DatasetWriter, crash_point, original)
    assert json.loads((target / "dataset.json").read_text())["status"] == "in_progress"
    generate_dataset(small_spec(tiny_models, str(target)))
    assert manifest_rows(str(target)) == manifest_rows(str(out))
    assert file_hashes(target) == file_hashes(out)


def test_a_different_spec_on_the_same_output_is_refused(reference, tiny_models):
    from flows.generate import generate_dataset

    _spec, out = reference
    other = small_spec(tiny_models, str(out), generation__steps=3)
    with pytest.raises(SpecError, match="different spec"):
        generate_dataset(other)


def test_rerunning_a_finished_job_rewrites_nothing(reference):
    from flows.generate import generate_dataset

    def every_file() -> dict[str, str]:
        return {
            str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(out.rglob("*"))
            if path.is_file() and "audit" not in path.parts  # the audit test's report
        }

    spec, out = reference
    before = every_file()
    info = generate_dataset(spec)
    assert info.status == "complete"
    assert every_file() == before  # dataset.json (finished_at) and the card included


def test_s3_output_through_the_emulator(tiny_models, s3_uri):
    from flows.generate import generate_dataset

    uri, storage_options = s3_uri
    spec = small_spec(
        tiny_models, uri + "/ds", identities__count=2, output__storage_options=storage_options
    )
    info = generate_dataset(spec)
    assert info.status == "complete"
    rows = manifest_rows(uri + "/ds", storage_options)
    assert len(rows) == info.counts.images
    fs, root = fsspec.core.url_to_fs(uri + "/ds", **storage_options)
    first = next(row for row in rows if row["path"])
    with fs.open(f"{root}/{first['path']}", "rb") as handle:
        assert hashlib.sha256(handle.read()).hexdigest() == first["sha256"]


def test_dask_runner_with_two_workers(reference, tiny_models, tmp_path):
    from flows.generate import generate_dataset

    _spec, out = reference
    target = tmp_path / "dask"
    generate_dataset(
        small_spec(
            tiny_models,
            str(target),
            compute__task_runner="dask",
            compute__devices=["cpu", "cpu"],
        )
    )
    assert manifest_rows(str(target)) == manifest_rows(str(out))


def test_cli_plan_and_bad_spec(tiny_models, tmp_path):
    import yaml

    spec_path = tmp_path / "spec.yaml"
    spec = small_spec(tiny_models, str(tmp_path / "ds"))
    spec_path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    cli = [sys.executable, "-m", "flows.cli"]
    planned = subprocess.run([*cli, "plan", str(spec_path)], capture_output=True, text=True)
    assert planned.returncode == 0, planned.stderr
    assert "shards" in planned.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec_path.read_text().replace("steps: 2", "steps: -1"))
    failed = subprocess.run([*cli, "generate", str(bad)], capture_output=True, text=True)
    assert failed.returncode == 2
    assert "generation.steps" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_audit_and_export_flows_on_a_generated_dataset(reference, tiny_models, tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.audit import audit_dataset_flow, export_dataset_flow

    _, out = reference
    accepted = sum(row["accepted"] for row in manifest_rows(str(out)))
    report = audit_dataset_flow(str(out), models=str(tiny_models), reverify=3)
    assert report.passed, report.problems
    # Re-verification samples accepted images and measures as the job did: no mismatch.
    assert report.reverify.checked == min(3, accepted) > 0
    assert not report.reverify.mismatches
    assert (out / "audit" / "report.json").exists() and (out / "audit" / "report.html").exists()

    async def artifact_keys_and_task_names() -> tuple[set[str], set[str]]:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(
                        any_=["audit-summary", "audit-verdict", "dataset-summary"]
                    )
                )
            )
            task_runs = await client.read_task_runs()
        return {artifact.key for artifact in found}, {run.name for run in task_runs}

    keys, task_names = asyncio.run(artifact_keys_and_task_names())
    assert keys == {"audit-summary", "audit-verdict", "dataset-summary"}
    # The Prefect UI lists one task per shard, named after it.
    assert {"shard-00000", "shard-00001", "shard-00002"} <= task_names
    result = export_dataset_flow(str(out), str(tmp_path / "folder"), "imagefolder")
    assert len(list((tmp_path / "folder").rglob("*.jpg"))) == accepted, result


def test_demo_leaves_a_complete_audited_dataset(tmp_path):
    from flows.demo import run_demo

    report = run_demo(tmp_path, identities=2, show_progress=False)
    assert report.passed
    info = json.loads((tmp_path / "dataset" / "dataset.json").read_text())
    assert info["status"] == "complete" and info["counts"]["images"] >= 2 * 6
    assert (tmp_path / "dataset" / "audit" / "report.html").exists()
    assert (tmp_path / "export-recordio" / "train.rec").exists()
    assert_composition_reported(tmp_path / "dataset", report)


def assert_composition_reported(root: Path, report) -> None:
    """The composition section in report.json and the HTML, and the card's table, agree
    with the manifest's own columns."""
    accepted = [row for row in manifest_rows(str(root)) if row["accepted"]]
    saved = json.loads((root / "audit" / "report.json").read_text())["composition"]
    axes = {axis["axis"]: axis for axis in saved["axes"]}
    assert set(axes) == {"gender", "age", "skin_tone"}
    genders = Counter(row["predicted_gender"] for row in accepted if row["predicted_gender"])
    assert axes["gender"]["image_counts"] == {g: genders[g] for g in ("female", "male") if genders[g]}
    tones = Counter(row["skin_tone"] for row in accepted if row["skin_tone"])
    assert axes["skin_tone"]["image_counts"] == dict(tones)
    assert saved["difficulty"]["identities"] == report.composition.difficulty.identities
    html = (root / "audit" / "report.html").read_text()
    assert "Composition and fairness" in html and "skin tone (ITA)" in html
    card = (root / "README.md").read_text()
    assert "## Composition" in card and "No ethnicity or race is inferred" in card
    assert "| gender | female |" in card or "| gender | male |" in card
    assert "genderage.onnx" in card and "non-commercial" in card
    assert "## Intra-class difficulty and diversity" in card


def test_setup_mistakes_fail_before_anything_is_written(tiny_models, tmp_path):
    from flows.generate import generate_dataset
    from schemas.errors import BankError, ModelFileMissing

    out = tmp_path / "never"
    with pytest.raises(ModelFileMissing, match=r"models\.dir \S*no-models does not exist"):
        generate_dataset(small_spec(tmp_path / "no-models", str(out)))
    folder_poses = {"kind": "folder", "path": str(tmp_path / "no-poses")}
    with pytest.raises(BankError, match="no-poses"):
        generate_dataset(small_spec(tiny_models, str(out), variations__poses=folder_poses))
    assert not out.exists()


def test_shard_user_errors_are_not_retried_and_surface_as_themselves(
    tiny_models, tmp_path, monkeypatch
):
    from arc2face_engine.job import workers
    from flows.generate import generate_dataset
    from schemas.errors import BankError

    calls = []

    def failing(spec, work, device="auto", on_batch=None, **_):
        calls.append(work.range.shard)
        raise BankError("pose bank changed under the job: rebuild it")

    monkeypatch.setattr(workers, "generate_shard", failing)
    with pytest.raises(BankError, match="rebuild it"):
        generate_dataset(small_spec(tiny_models, str(tmp_path / "ds")))
    assert sorted(calls) == [0, 1, 2]  # each shard tried once: no retry of a user error
