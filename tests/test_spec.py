"""Job spec: loading, field-level error messages, content hash, JSON schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from schemas.errors import SpecError, UserError
from schemas.job import JobSpec, json_schema, load_spec, parse_spec, spec_hash, write_json_schema

GOOD = """\
name: demo
seed: 3
models: {dir: ./models, device: cuda:0, precision: fp16}
identities:
  source: random
  count: 100
  separation: 0.3
variations:
  images_per_identity: 20
  poses: {kind: procedural, yaw: [-30, 0, 30], pitch: [0], roll: [0]}
  expressions: {kind: random, count: 8, spread: 1.0}
generation: {scheduler: dpmsolver++, steps: 25, guidance: 3.0, batch_size: 16,
             height: 512, width: 512, controlnet_scale: 1.0, expression_scale: 1.0}
filter: {min_similarity: 0.4, min_det_score: 0.5, require_single_face: true, max_attempts: 3}
output: {uri: s3://bucket/ds, storage_options: {anon: false}, image_format: jpeg, quality: 95,
         shard_size: 256, keep_rejected_images: true}
compute: {task_runner: dask, devices: [cuda:0, cuda:1], dask_address: "tcp://scheduler:8786"}
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return str(path)


def with_change(dotted: str, value) -> dict:
    raw = yaml.safe_load(GOOD)
    *parents, key = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[key] = value
    return raw


def test_good_spec_loads(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.variations.poses.yaw == [-30.0, 0.0, 30.0]
    assert spec.compute.devices == ["cuda:0", "cuda:1"]
    assert spec.filter.min_similarity == 0.4
    assert spec.output.storage_options == {"anon": False}


def test_defaults_fill_a_minimal_spec():
    spec = parse_spec({"name": "x"})
    assert spec.identities.count == 100
    assert (spec.generation.steps, spec.generation.guidance) == (25, 3.0)
    lcm = parse_spec({"name": "x", "generation": {"scheduler": "lcm"}})
    assert (lcm.generation.steps, lcm.generation.guidance) == (4, 1.0)
    assert (
        parse_spec(
            {"name": "x", "identities": {"source": "file", "path": "e.npy"}}
        ).identities.count
        is None
    )


@pytest.mark.parametrize(
    ("dotted", "value", "fix"),
    [
        ("generation.steps", -1, "greater than 0"),
        ("generation.height", 500, "use 496 or 504"),
        ("generation.width", 4, "use 8"),
        ("generation.scheduler", "euler", "'dpmsolver++' or 'lcm'"),
        ("identities.count", 0, "greater than 0"),
        ("identities.separation", 1.5, "less than or equal to 1"),
        ("identities.project_to_manifold", "maybe", "valid boolean"),
        ("variations.images_per_identity", 0, "greater than 0"),
        ("variations.poses.yaw", [120], "outside [-90, 90]"),
        ("variations.poses.yaw", [], "at least 1"),
        ("variations.expressions.spread", 0, "greater than 0"),
        ("filter.min_similarity", 2, "less than or equal to 1"),
        ("filter.max_attempts", 0, "greater than or equal to 1"),
        ("output.image_format", "gif", "'jpeg', 'png' or 'webp'"),
        ("output.quality", 101, "less than or equal to 100"),
        ("output.shard_size", 0, "greater than 0"),
        ("compute.task_runner", "ray", "'local' or 'dask'"),
        ("compute.devices", ["gpu0"], "use auto, cpu, mps, cuda or cuda:N"),
        ("models.precision", "int8", "'auto', 'fp32', 'fp16' or 'bf16'"),
        ("seed", -1, "greater than or equal to 0"),
    ],
)
def test_each_bad_field_is_named_by_its_dotted_path(dotted, value, fix):
    with pytest.raises(SpecError) as caught:
        parse_spec(with_change(dotted, value), "spec.yaml")
    message = str(caught.value)
    assert message.startswith(f"job spec spec.yaml: {dotted}: "), message
    assert fix in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("changes", "dotted", "fix"),
    [
        ({"identities.source": "file"}, "identities.path", "needs a path"),
        ({"identities.source": "images"}, "identities.path", "folder of photos"),
        ({"identities.path": "e.npy"}, "identities.path", "remove path"),
        (
            {
                "identities.source": "file",
                "identities.path": "e.npy",
                "identities.project_to_manifold": True,
            },
            "identities.project_to_manifold",
            "set it to false",
        ),
        ({"variations.poses.kind": "folder"}, "variations.poses.path", "needs a path"),
        ({"variations.poses.kind": "mesh"}, "variations.poses.path", ".obj/.ply"),
        ({"variations.expressions.kind": "file"}, "variations.expressions.path", "needs a path"),
        (
            {"generation.scheduler": "lcm", "generation.guidance": 3.0},
            "generation.guidance",
            "set guidance to 1.0",
        ),
        ({"compute.task_runner": "local"}, "compute.dask_address", "set task_runner to dask"),
    ],
)
def test_cross_field_checks_name_the_field_to_fix(changes, dotted, fix):
    raw = yaml.safe_load(GOOD)
    for key, value in changes.items():
        raw = _set(raw, key, value)
    with pytest.raises(SpecError) as caught:
        parse_spec(raw, "spec.yaml")
    assert str(caught.value).startswith(f"job spec spec.yaml: {dotted}: ")
    assert fix in str(caught.value)


def _set(raw: dict, dotted: str, value) -> dict:
    *parents, key = dotted.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[key] = value
    return raw


def test_several_errors_first_line_summarises_all(tmp_path):
    text = GOOD.replace("steps: 25", "steps: 0").replace("quality: 95", "quality: high")
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, text))
    first, *details = str(caught.value).splitlines()
    assert "2 invalid fields" in first
    assert "generation.steps" in first and "output.quality" in first
    assert any(line.strip().startswith("output.quality: ") and "'high'" in line for line in details)


def test_unknown_key_suggests_the_close_name():
    raw = with_change("generation.stepz", 30)
    with pytest.raises(
        SpecError, match=r"generation\.stepz: unknown key: remove it \(did you mean 'steps'\?\)"
    ):
        parse_spec(raw, "spec.yaml")


def test_unknown_top_level_key_lists_allowed():
    raw = yaml.safe_load(GOOD) | {"poses": {}}
    with pytest.raises(SpecError, match=r"poses: unknown key.*allowed: compute, filter"):
        parse_spec(raw, "spec.yaml")


def test_missing_name():
    raw = yaml.safe_load(GOOD)
    del raw["name"]
    with pytest.raises(SpecError, match="name: required field is missing: add it"):
        parse_spec(raw, "spec.yaml")


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "name: demo\ngeneration: {steps: 25\nseed: 1\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert "is not valid YAML (line" in message and "fix the syntax" in message
    assert "\n" not in message


def test_missing_empty_and_non_mapping_files(tmp_path):
    with pytest.raises(SpecError, match="not found: check the path"):
        load_spec(str(tmp_path / "nope.yaml"))
    with pytest.raises(SpecError, match="is empty, not a mapping"):
        load_spec(write(tmp_path, ""))
    with pytest.raises(SpecError, match="is a list, not a mapping"):
        load_spec(write(tmp_path, "- a\n- b\n"))


def test_spec_errors_are_user_errors():
    assert issubclass(SpecError, UserError)


def test_spec_hash_ignores_where_and_how_but_not_what():
    base = parse_spec(yaml.safe_load(GOOD))
    same_content = base.model_copy(
        update={
            "name": "renamed",
            "compute": base.compute.model_copy(
                update={"devices": ["cpu"], "task_runner": "local", "dask_address": None}
            ),
            "output": base.output.model_copy(update={"uri": "/elsewhere", "storage_options": {}}),
            "generation": base.generation.model_copy(update={"batch_size": 4}),
            "models": base.models.model_copy(update={"dir": "/other/models", "device": "cpu"}),
        }
    )
    assert spec_hash(same_content) == spec_hash(base)
    for dotted, value in [
        ("generation.steps", 30),
        ("seed", 4),
        ("filter.min_similarity", 0.5),
        ("output.shard_size", 128),
        ("models.precision", "fp32"),
        ("variations.poses.yaw", [0]),
    ]:
        changed = parse_spec(with_change(dotted, value))
        assert spec_hash(changed) != spec_hash(base), dotted


def test_spec_hash_is_stable_across_loads(tmp_path):
    first = load_spec(write(tmp_path, GOOD))
    reloaded = parse_spec(json.loads(first.model_dump_json()))
    assert spec_hash(first) == spec_hash(reloaded)
    assert len(spec_hash(first)) == 64


def test_json_schema_documents_fields(tmp_path):
    schema = json_schema()
    assert schema["title"] == "arc2face-synth job spec"
    defs = schema["$defs"]
    similarity = defs["FilterSpec"]["properties"]["min_similarity"]
    assert similarity["default"] == 0.4
    assert "approximate literature values" in similarity["description"]
    assert defs["GenerationSpec"]["additionalProperties"] is False
    assert set(defs["GenerationSpec"]["properties"]["scheduler"]["enum"]) == {"dpmsolver++", "lcm"}
    out = tmp_path / "schemas" / "job.schema.json"
    write_json_schema(str(out))
    assert json.loads(out.read_text()) == schema


def test_jobspec_round_trips_through_yaml(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    again = load_spec(write(tmp_path, yaml.safe_dump(spec.model_dump(mode="json"))))
    assert again == spec
    assert isinstance(again, JobSpec)


def test_recorded_spec_redacts_storage_options():
    from schemas.job import recorded_spec

    spec = parse_spec(with_change("output.storage_options", {"key": "AKIA...", "secret": "s3cr3t"}))
    recorded = recorded_spec(spec)
    assert recorded["output"]["storage_options"] == {"key": "<redacted>", "secret": "<redacted>"}
    assert "s3cr3t" not in json.dumps(recorded)
    assert spec.output.storage_options["secret"] == "s3cr3t"  # the live spec is untouched
