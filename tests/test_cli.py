"""The command line as a user runs it: exit codes, one-line errors, files written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.dataset_factory import make_dataset


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_audit_exit_codes_and_export(tmp_path: Path) -> None:
    made = make_dataset(str(tmp_path / "ds"))
    clean = cli("audit", made.uri)
    assert clean.returncode == 0, clean.stderr
    assert "PASSED" in clean.stdout
    assert (tmp_path / "ds" / "audit" / "report.html").exists()

    exported = cli("export", made.uri, "--format", "webdataset", "--out", str(tmp_path / "wds"))
    assert exported.returncode == 0, exported.stderr
    assert list((tmp_path / "wds").glob("*.tar"))

    (tmp_path / "ds" / made.image_paths[0]).unlink()  # a file the manifest points to
    broken = cli("audit", made.uri)
    assert broken.returncode == 1
    assert "FAILED" in broken.stdout

    missing = cli("audit", str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0, missing.stderr  # one line
    assert missing.stderr.startswith("error: ")


def test_models_tiny_then_verify(tmp_path: Path) -> None:
    models = tmp_path / "models"
    assert cli("models", "tiny", str(models)).returncode == 0
    verified = cli("models", "verify", str(models))
    assert verified.returncode == 0, verified.stdout
    (models / "encoder" / "pytorch_model.bin").write_bytes(b"corrupt")
    corrupted = cli("models", "verify", str(models))
    assert corrupted.returncode == 1
    assert "encoder/pytorch_model.bin" in corrupted.stdout
    unknown = cli("models", "verify", str(models), "--with", "wings")
    assert unknown.returncode == 2
    assert "unknown component" in unknown.stderr
