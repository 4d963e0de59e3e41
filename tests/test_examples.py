"""The shipped example specs load, and the committed JSON schema matches the code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arc2face_engine.dataset.plan import summarize
from schemas.job import json_schema, load_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_specs_load_and_plan(path: Path) -> None:
    spec = load_spec(str(path))
    summary = summarize(spec, throughput_images_per_s=10.0)
    assert summary.images == spec.identities.count * spec.variations.images_per_identity


def test_committed_json_schema_is_current() -> None:
    committed = json.loads((ROOT / "schemas" / "job.schema.json").read_text())
    assert committed == json_schema(), "run `arc2face-synth schema --out schemas/job.schema.json`"
