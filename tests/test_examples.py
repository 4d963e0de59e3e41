"""The shipped example specs load, and the committed JSON schema matches the code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arc2face_engine.job.estimate import summarize
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


def test_generated_reference_pages_are_current() -> None:
    """docs/job-spec.md and docs/dataset-format.md are rendered from schemas/."""
    from schemas.reference import PAGES

    for name, render in PAGES.items():
        committed = (ROOT / "docs" / name).read_text(encoding="utf-8")
        assert committed == render(), f"docs/{name} is stale: run `python -m schemas.reference`"


def test_reference_pages_name_every_key_and_column() -> None:
    """Every spec key and every manifest column appears in its page (a renderer that
    skipped one would still be 'current')."""
    from dataclasses import fields

    from schemas.job import JobSpec
    from schemas.reference import dataset_format_page, job_spec_page
    from schemas.tables import AuditIdentityRow, IdentityRow, ManifestRow, ProbeRow

    spec_page, format_page = job_spec_page(), dataset_format_page()

    def keys(model, prefix=""):
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                yield from keys(annotation, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    assert all(f"| `{key}` |" in spec_page for key in keys(JobSpec))
    for row in (ManifestRow, IdentityRow, ProbeRow, AuditIdentityRow):
        assert all(f"| `{column.name}` |" in format_page for column in fields(row))
