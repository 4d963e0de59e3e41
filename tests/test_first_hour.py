"""The first hour of a user, at the command line: relative paths that do not resolve, a
changed spec on an existing output, a re-run of a finished job, what the audit says on the
console and in its report, re-verification without --models, and `models download`
without a network. Each runs the console script in a subprocess, from the folder a user
would run it in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.dataset_factory import make_dataset
from tests.test_bad_inputs import spec_dict, tree_hashes

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *map(str, args)],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def error_line(done: subprocess.CompletedProcess) -> str:
    """The one line a failed command prints (exit status 2, no traceback)."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def write_spec(folder: Path, raw: dict, name: str = "spec.yaml") -> str:
    (folder / name).write_text(yaml.safe_dump(raw))
    return name


@pytest.fixture(scope="module")
def project(tiny_models, tmp_path_factory) -> Path:
    """A user's folder: models/ (the tiny ones), spec.yaml with relative paths, and ds/,
    the complete dataset that spec made (made without Prefect, from this folder)."""
    from arc2face_engine.job.direct import run_job_directly
    from schemas.job import load_spec

    folder = tmp_path_factory.mktemp("project")
    (folder / "models").symlink_to(tiny_models, target_is_directory=True)
    write_spec(folder, spec_dict(Path("models"), "ds"))
    before = Path.cwd()
    os.chdir(folder)
    try:
        info = run_job_directly(load_spec("spec.yaml"))
    finally:
        os.chdir(before)
    assert info.status == "complete"
    return folder


@pytest.fixture
def copy(project, tmp_path) -> Path:
    """A copy of the project to change (its models link kept as a link)."""
    target = tmp_path / "project"
    shutil.copytree(project, target, symlinks=True)
    return target


# --- relative paths that do not resolve ---------------------------------------------------------


def test_a_missing_models_folder_names_the_working_folder_and_models_tiny(tmp_path):
    write_spec(tmp_path, spec_dict(Path("no-models"), "ds"))
    line = error_line(cli("generate", "spec.yaml", "--no-progress", cwd=tmp_path))
    assert f"models.dir no-models does not exist (resolved against {tmp_path})" in line
    assert "`arc2face-synth models download no-models`" in line
    # 64x64 images: a tiny spec, so the stand-in models are offered too
    assert "`arc2face-synth models tiny no-models`" in line and "under 256 pixels" in line
    assert not (tmp_path / "ds").exists()

    real_size = spec_dict(Path("no-models"), "ds", generation__height=512, generation__width=512)
    write_spec(tmp_path, real_size)
    line = error_line(cli("generate", "spec.yaml", "--no-progress", cwd=tmp_path))
    assert "models download no-models" in line and "models tiny" not in line


def test_a_missing_relative_bank_and_spec_name_the_working_folder(tiny_models, tmp_path):
    poses = {"kind": "folder", "path": "poses"}
    write_spec(tmp_path, spec_dict(tiny_models, "ds", variations__poses=poses))
    line = error_line(cli("generate", "spec.yaml", "--no-progress", cwd=tmp_path))
    assert f"variations.poses.path poses does not exist (resolved against {tmp_path})" in line
    assert "banks poses" in line
    line = error_line(cli("generate", "jobs/spec.yaml", cwd=tmp_path))
    assert (
        f"job spec jobs/spec.yaml not found: check the path (resolved against {tmp_path})" in line
    )
    assert not (tmp_path / "ds").exists()


# --- a changed spec, a finished job -------------------------------------------------------------


def test_a_changed_spec_names_the_fields_that_differ(copy):
    before = tree_hashes(copy / "ds")
    write_spec(copy, spec_dict(Path("models"), "ds", seed=6), "seed.yaml")
    line = error_line(cli("generate", "seed.yaml", "--no-progress", cwd=copy))
    assert "made from a different spec; it differs in seed (5 -> 6):" in line
    assert "hash" not in line

    many = spec_dict(
        Path("models"), "ds", seed=6, filter__min_similarity=0.5, filter__max_attempts=2,
        generation__steps=3, generation__guidance=2.0, output__quality=90,
        variations__poses={"kind": "procedural", "yaw": list(range(-90, 91, 2))},
    )  # fmt: skip
    write_spec(copy, many, "many.yaml")
    line = error_line(cli("generate", "many.yaml", "--no-progress", cwd=copy))
    assert "filter.max_attempts (1 -> 2)" in line and "and 4 more" in line
    assert len(line) < 600  # bounded, whatever the spec holds
    assert tree_hashes(copy / "ds") == before


def test_rerunning_a_finished_job_says_there_is_nothing_to_do(copy):
    before = tree_hashes(copy / "ds")
    done = cli("generate", "spec.yaml", "--no-progress", cwd=copy)
    assert done.returncode == 0, done.stderr
    assert "nothing to do: ds already holds the complete dataset of this spec" in done.stdout
    assert tree_hashes(copy / "ds") == before  # dataset.json and the card included


# --- the audit ----------------------------------------------------------------------------------


def test_audit_line_gives_warnings_and_unchecked_leakage(tmp_path):
    import json

    import numpy as np

    twins = np.random.default_rng(0).standard_normal((2, 512))[[0, 0, 1]]  # two alike
    made = make_dataset(str(tmp_path / "ds"), identity_embeddings=twins, shards=1)
    done = cli("audit", made.uri, "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    warnings = json.loads((tmp_path / "ds" / "audit" / "report.json").read_text())["warnings"]
    assert len(warnings) >= 2 and warnings[0].startswith("quality: uniqueness")
    line = done.stdout.splitlines()[0]
    assert "PASSED" in line
    assert f"; {len(warnings)} warnings (first: {warnings[0]})" in line
    assert line.endswith("; leakage: not checked (no gallery)")
    page = (tmp_path / "ds" / "audit" / "report.html").read_text()
    assert "<th>leaked_identities</th><td>not checked</td>" in page
    assert "<h2>Leakage</h2><p>not checked (no gallery)" in page
    assert "<td>None</td>" not in page


def test_reverify_takes_the_models_folder_from_dataset_json(project, copy, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # From another folder: models.dir 'models' resolves against the folder the dataset
    # was generated from (its recorded output.uri 'ds' is where it lies now).
    done = cli("audit", copy / "ds", "--reverify", "2", "--no-progress", cwd=elsewhere)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert (
        f"re-verified 2 images with the models in {copy / 'models'} "
        "(dataset.json models.dir models)" in done.stdout
    )
    (copy / "models").unlink()
    line = error_line(cli("audit", copy / "ds", "--reverify", "2", cwd=elsewhere))
    assert "dataset.json's models.dir models is not a folder here" in line
    assert f"tried {elsewhere / 'models'}, {copy / 'models'}" in line
    assert line.endswith("pass --models DIR")


def test_audit_plots_pitch_and_counts_on_integer_axes(tmp_path, monkeypatch):
    from arc2face_engine.audit import audit_dataset, html

    figures = []

    def keep(figure) -> str:  # the PNG encoder, seeing each figure the report draws
        figures.append(figure)
        return ""

    monkeypatch.setattr(html, "_png", keep)
    made = make_dataset(str(tmp_path / "ds"), n_identities=2, images_per_identity=2, shards=1)
    audit_dataset(made.uri)
    axes = {figure.axes[0].get_title(): figure.axes[0] for figure in figures}
    assert "pitch: requested vs measured" in axes and "yaw: requested vs measured" in axes
    counted = [ax for ax in axes.values() if ax.get_ylabel() in ("images", "pairs")]
    assert len(counted) >= 2
    for ax in counted:  # 4 images: matplotlib's default ticks would be 0, 0.5, 1, ...
        ticks = ax.get_yticks()
        assert all(float(tick).is_integer() for tick in ticks), (ax.get_title(), ticks)


# --- models download ----------------------------------------------------------------------------


@pytest.mark.parametrize("offline", [False, True], ids=["no-network", "hf-hub-offline"])
def test_models_download_without_a_network_says_so(tmp_path, offline: bool):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}  # refused
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    line = error_line(cli("models", "download", "models", cwd=tmp_path, **env))
    assert "cannot download the models from the Hugging Face Hub" in line
    expected = "HF_HUB_OFFLINE is set" if offline else "(http://127.0.0.1:9) cannot be reached"
    assert expected in line
    assert "check the path" not in line and "connect this machine to the internet" in line
    assert not (tmp_path / "models").exists()
