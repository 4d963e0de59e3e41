#!/usr/bin/env python3
"""Set up a virtual environment and run the tests or the demo; needs only Python 3.10+.

python3 dev.py test        # create .venv, install, ruff, pytest
python3 dev.py demo [OUT]  # create .venv, install, run the main job on tiny models
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
# Installed on its own first: a bare `torch` requirement would pull the CUDA build.
TORCH = shlex.split(os.environ.get("ARC2FACE_TORCH", "torch==2.13.0"))
STAMP = VENV / ".installed"


def run(*args: str | Path) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], cwd=ROOT, check=True)


def setup() -> None:
    """Create .venv and install the project (with dev extras) once per pyproject change."""
    if not VENV.exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    if STAMP.exists() and STAMP.read_bytes() == pyproject:
        return
    pip = (BIN / "python", "-m", "pip", "install", "--disable-pip-version-check", "-q")
    run(*pip, *TORCH)
    run(*pip, "-e", ".[dev]")
    STAMP.write_bytes(pyproject)


def main() -> int:
    command = sys.argv[1] if len(sys.argv) > 1 else "test"
    setup()
    if command == "test":
        run(BIN / "ruff", "check", ".")
        run(BIN / "python", "-m", "pytest", *sys.argv[2:])
    elif command == "demo":
        run(BIN / "arc2face-synth", "demo", *sys.argv[2:])
    else:
        print(f"unknown command {command!r}: use `test` or `demo`", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as error:
        sys.exit(error.returncode)
