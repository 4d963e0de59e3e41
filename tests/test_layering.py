"""Import layering: `schemas` stands alone (the engine imports it, never the reverse)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_schemas_import_nothing_of_the_engine_and_errors_are_shared():
    code = (
        "import sys, schemas.job, schemas.tables, schemas.errors; "
        "engine = sorted(m for m in sys.modules if m.startswith(('arc2face_engine', 'prefect'))); "
        "assert not engine, engine; "
        "import arc2face_engine.errors as e; "
        "assert e.UserError is schemas.errors.UserError and e.SpecError is schemas.errors.SpecError"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
