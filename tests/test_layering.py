"""The architecture as it is imported: the import contracts of pyproject.toml, and what the
cheap paths (a broken spec, `import arc2face_engine`, a deployment's first step) load."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL_LIBRARIES = ("torch", "diffusers", "transformers", "insightface")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_import_contracts_hold():
    """Layers (flows > tasks > job > consumers > dataset format > engine parts >
    foundations > schemas), no Prefect below tasks/, no circles: `lint-imports`."""
    linter = Path(sys.executable).with_name("lint-imports")
    command = [str(linter)] if linter.exists() else [shutil.which("lint-imports") or "lint-imports"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_schemas_import_nothing_of_the_engine():
    done = run_python(
        """
        import sys, schemas.job, schemas.tables, schemas.errors
        engine = sorted(m for m in sys.modules if m.startswith(('arc2face_engine', 'prefect')))
        assert not engine, engine
        """
    )
    assert done.returncode == 0, done.stderr


def test_gpu_path_loads_without_what_a_bare_gpu_image_lacks():
    """Generation and the torch face analysis import neither pydantic nor pyarrow, OpenCV,
    onnxruntime or the insightface package (bench/gpu_run.py's image has none of them)."""
    done = run_python(
        """
        import sys
        import arc2face_engine.generation.engine, arc2face_engine.faces.torch_analyzer
        absent = ("pydantic", "pyarrow", "cv2", "onnxruntime", "insightface", "prefect")
        loaded = [name for name in absent if name in sys.modules]
        assert not loaded, loaded
        """
    )
    assert done.returncode == 0, done.stderr


def test_public_api_resolves_lazily():
    done = run_python(
        f"""
        import sys
        import arc2face_engine
        heavy = [m for m in {MODEL_LIBRARIES!r} if m in sys.modules]
        assert not heavy, heavy
        for name in arc2face_engine.__all__:
            getattr(arc2face_engine, name)
        assert set(arc2face_engine.__all__) == set(arc2face_engine._PUBLIC)
        """
    )
    assert done.returncode == 0, done.stderr


BROKEN_SPECS = {
    "unknown key": {"name": "x", "identites": {"count": 3}},
    "bad value": {"name": "x", "identities": {"count": -3}},
    "missing models": {"name": "x", "models": {"dir": "no-such-models"}},
}


@pytest.mark.parametrize(
    ("command", "mistake"),
    [("generate", mistake) for mistake in BROKEN_SPECS]
    + [("plan", "unknown key"), ("plan", "bad value")],  # plan does not look for models
)
def test_a_broken_spec_is_refused_without_loading_model_libraries(tmp_path, command, mistake):
    """The CLI parses the spec and makes its cheap checks before anything heavy is
    imported: one line, exit 2, nothing written, no torch or diffusers loaded."""
    spec = tmp_path / "spec.yaml"
    raw = dict(BROKEN_SPECS[mistake], output={"uri": str(tmp_path / "out")})
    spec.write_text(yaml.safe_dump(raw))
    done = run_python(
        f"""
        import sys
        from flows.cli import main
        sys.argv = ["arc2face-synth", {command!r}, {str(spec)!r}]
        try:
            main()
        except SystemExit as stop:
            code = stop.code
        heavy = [m for m in {MODEL_LIBRARIES!r} + ("prefect",) if m in sys.modules]
        print("EXIT", code, "HEAVY", heavy)
        """
    )
    assert "EXIT 2 HEAVY []" in done.stdout, done.stdout + done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_a_deployment_run_checks_the_spec_before_loading_model_libraries():
    """Prefect imports the flow's module before its first step: that import loads no model
    library, so a broken spec fails a deployment run in its first second."""
    done = run_python(
        f"""
        import sys
        import flows.generate, flows.audit
        heavy = [m for m in {MODEL_LIBRARIES!r} if m in sys.modules]
        assert not heavy, heavy
        """
    )
    assert done.returncode == 0, done.stderr
