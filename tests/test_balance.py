"""Balanced identity sampling (`identities.balance`): quotas, the spec's checks, every
source on the tiny models (quotas met exactly, reproducible, independent of the batch
size), the whole job through the CLI (probes written and audited, a resume that does not
probe again) and the one-line refusal of an unfillable quota with nothing written."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from arc2face_engine.identities.balance import CellFiller, attribute_values, largest_remainder
from arc2face_engine.job import balancing, preflight
from arc2face_engine.job.estimate import summarize
from schemas.errors import SpecError
from schemas.job import JobSpec, parse_spec
from schemas.tables import age_band_of, vector_matrix
from tests.test_bad_inputs import (
    assert_one_line_error,
    manifest_rows,
    run_cli,
    tree_hashes,
    write_spec,
)

pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")

GENDER_HALVES = {"female": 0.5, "male": 0.5}


def raw_spec(models: Path, out: Path, identities: dict, **extra) -> dict:
    raw = {
        "name": "balanced",
        "seed": 3,
        "models": {"dir": str(models), "device": "cpu", "precision": "fp32"},
        "identities": identities,
        "variations": {"images_per_identity": 2},
        "generation": {"steps": 2, "batch_size": 4, "height": 64, "width": 64},
        "filter": {"min_similarity": 0.0, "max_attempts": 1},
        "output": {"uri": str(out), "shard_size": 4},
        "compute": {"task_runner": "local", "devices": ["cpu"]},
    }
    raw.update(extra)
    return raw


def balanced(models: Path, out: Path, identities: dict, **extra) -> JobSpec:
    return JobSpec.model_validate(raw_spec(models, out, identities, **extra))


# --- quotas ---------------------------------------------------------------------------------------


def test_largest_remainder_sums_to_the_count_and_stays_within_one_seat():
    assert largest_remainder({"a": 0.5, "b": 0.3, "c": 0.2}, 7) == {"a": 4, "b": 2, "c": 1}
    assert largest_remainder({"a": 0.5, "b": 0.5}, 3) == {"a": 2, "b": 1}  # ties: listed first
    assert largest_remainder({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 10) == {"a": 4, "b": 3, "c": 3}
    rng = np.random.default_rng(0)
    for _ in range(200):
        shares = rng.dirichlet(np.ones(int(rng.integers(2, 7))))
        count = int(rng.integers(0, 500))
        quotas = largest_remainder(dict(enumerate(shares)), count)
        assert sum(quotas.values()) == count
        for key, share in enumerate(shares):
            assert abs(quotas[key] - share * count) < 1


def test_marginal_cells_need_room_on_every_axis_and_joint_cells_their_own():
    spec = parse_spec({"name": "q", "identities": {"count": 4, "balance": {
        "gender": GENDER_HALVES, "age_edges": [0, 40], "age": {"0-40": 0.25, "40+": 0.75}}}})  # fmt: skip
    filler = CellFiller.for_spec(spec.identities.balance, 4)
    young_man = filler.cell_of(attribute_values("male", 30.0, None, [0, 40]))
    old_man = filler.cell_of(attribute_values("male", 50.0, None, [0, 40]))
    assert young_man == (("gender", "male"), ("age", "0-40"))
    filler.take(young_man)
    assert not filler.has_room(young_man)  # 0-40 holds one identity
    filler.take(old_man)
    assert not filler.has_room(old_man)  # male holds two
    assert filler.cell_of(attribute_values(None, 30.0, None, [0, 40])) is None
    joint = parse_spec({"name": "q", "identities": {"count": 4, "balance": {"joint": [
        {"gender": "female", "share": 0.75}, {"gender": "male", "share": 0.25}]}}})  # fmt: skip
    filler = CellFiller.for_spec(joint.identities.balance, 4)
    assert filler.quotas == {(("gender", "female"),): 3, (("gender", "male"),): 1}


@pytest.mark.parametrize(
    ("balance", "expect"),
    [
        ({"gender": {"female": 0.6, "male": 0.6}}, "sum to 1.2, not 1"),
        ({"age": {"20-35": 1.0}}, "unknown age band '20-35'"),
        ({"gender": GENDER_HALVES, "joint": [{"gender": "male", "share": 1.0}]}, "use one of them"),
        ({}, "no targets"),
        ({"skin_tone": {"pale": 1.0}}, "identities.balance.skin_tone.pale"),
        ({"gender": GENDER_HALVES, "max_candidates": 2}, "balance.max_candidates 2 is below count 4"),
        ({"gender": GENDER_HALVES, "age_edges": [20, 10]}, "not ascending"),
    ],
)
def test_bad_targets_are_one_line_naming_the_key(balance, expect):
    with pytest.raises(SpecError) as error:
        parse_spec({"name": "q", "identities": {"count": 4, "balance": balance}})
    assert expect in str(error.value) and "identities" in str(error.value)
    assert "\n" not in str(error.value)


def test_file_and_images_need_a_count_to_balance():
    with pytest.raises(SpecError, match="balance needs count with source 'file'"):
        parse_spec({"name": "q", "identities": {"source": "file", "path": "x.npy",
                                                "balance": {"gender": GENDER_HALVES}}})  # fmt: skip


# --- every source, at preflight ----------------------------------------------------------------


def assert_quotas_met(spec: JobSpec, built) -> None:
    """The identities fill the quotas exactly, their attributes are their probes', and the
    probes manifest places each kept candidate in the cell its attributes give."""
    balance, count = spec.identities.balance, spec.identities.count
    table = built.table
    assert table.num_rows == count
    assert table.column("label").to_pylist() == list(range(count))
    assert set(table.column("attributes_from").to_pylist()) == {"probe"}
    filler = CellFiller.for_spec(balance, count)
    for row in table.to_pylist():
        values = attribute_values(row["gender"], row["age"], row["skin_ita"], balance.age_edges)
        cell = filler.cell_of(values)
        assert cell is not None and filler.has_room(cell)
        filler.take(cell)
    assert filler.complete and filler.taken == filler.quotas
    kept = [row for row in built.probes.rows if row.outcome == "kept"]
    assert [row.identity_id for row in kept] == table.column("identity_id").to_pylist()
    assert {row.outcome for row in built.probes.rows} <= set(balancing.OUTCOMES)
    assert [row.candidate for row in built.probes.rows] == sorted(r.candidate for r in built.probes.rows)


def test_random_source_meets_its_quotas_reproducibly_whatever_the_batch(tiny_models, tmp_path):
    # A separation that binds: random 512-d cosines spread by about 0.044, so a quarter
    # of the pairs are closer than 0.03.
    identities = {"source": "random", "count": 6, "separation": 0.03, "balance": {
        "gender": GENDER_HALVES, "age_edges": [0, 45], "age": {"0-45": 0.5, "45+": 0.5},
        "probe_scheduler": "dpmsolver++", "probe_steps": 2}}  # fmt: skip
    # Seed 4: two of its first four candidates (probed in one batch of 4) are too close.
    spec = balanced(tiny_models, tmp_path / "a", identities, seed=4)
    first = preflight.preflight(spec)
    assert_quotas_met(spec, first)
    again = preflight.preflight(spec)
    assert again.table.equals(first.table) and again.probes.rows == first.probes.rows
    one_by_one = balanced(tiny_models, tmp_path / "b", identities, seed=4,
                          generation={"steps": 2, "batch_size": 1, "height": 64, "width": 64})  # fmt: skip
    alone = preflight.preflight(one_by_one)
    assert alone.table.equals(first.table) and alone.probes.rows == first.probes.rows
    outcomes = Counter(row.outcome for row in first.probes.rows)
    assert outcomes["kept"] == 6 and outcomes["cell_full"] > 0  # cells did fill and refuse
    assert outcomes["too_close"] > 0  # the separation held too
    embeddings = vector_matrix(first.table.column("embedding"), 512)
    cosines = embeddings @ embeddings.T
    assert cosines[np.triu_indices(6, 1)].max() <= 0.03
    assert not (tmp_path / "a").exists()  # preflight writes nothing


def _photo(path: Path, centre: tuple[int, int], colour: tuple[int, int, int]) -> None:
    image = Image.new("RGB", (128, 128), (10, 10, 10))
    x, y = centre
    ImageDraw.Draw(image).ellipse((x - 28, y - 34, x + 28, y + 34), fill=colour)
    image.save(path)


@pytest.mark.parametrize("source", ["file", "images", "packed"])
def test_file_images_and_packed_sources_meet_their_quotas(source, tiny_models, tmp_path):
    rng = np.random.default_rng(1)
    identities: dict = {"source": source, "count": 4, "balance": {
        "gender": GENDER_HALVES, "probe_scheduler": "dpmsolver++", "probe_steps": 2}}  # fmt: skip
    if source == "file":
        np.save(tmp_path / "embeddings.npy", rng.standard_normal((30, 512)).astype(np.float32))
        identities["path"] = str(tmp_path / "embeddings.npy")
    elif source == "images":
        (tmp_path / "photos").mkdir()
        for index in range(14):
            colour = tuple(int(v) for v in rng.integers(150, 256, 3))
            centre = (int(rng.integers(50, 78)), int(rng.integers(50, 78)))
            _photo(tmp_path / "photos" / f"{index:02d}.png", centre, colour)
        identities["path"] = str(tmp_path / "photos")
    else:
        np.save(tmp_path / "gallery.npy", rng.standard_normal((64, 512)).astype(np.float32))
        identities["packing"] = {"gallery": str(tmp_path / "gallery.npy"), "steps": 5}
        identities["balance"]["oversample"] = 5.0
    spec = balanced(tiny_models, tmp_path / "ds", identities)
    built = preflight.preflight(spec)
    assert_quotas_met(spec, built)
    assert set(built.table.column("source").to_pylist()) == {source}
    if source == "file":  # a file's rows keep their ids and say which row they are
        for row in built.table.to_pylist():
            assert row["provenance"].endswith(f"row {int(row['identity_id'][3:])}")


def test_auto_probes_use_lcm_when_the_models_include_it(tiny_models, tmp_path):
    spec = balanced(tiny_models, tmp_path / "ds", {"count": 2, "balance": {"gender": GENDER_HALVES}})
    settings = balancing.probe_settings(spec)
    assert (settings.scheduler, settings.num_inference_steps, settings.guidance_scale) == ("lcm", 4, 1.0)
    without = tmp_path / "models"  # the same files but the LCM-LoRA
    without.mkdir()
    for child in tiny_models.iterdir():
        if child.name != "lcm-lora":
            (without / child.name).symlink_to(child)
    plain = balanced(without, tmp_path / "ds", {"count": 2, "balance": {"gender": GENDER_HALVES}})
    settings = balancing.probe_settings(plain)
    assert (settings.scheduler, settings.num_inference_steps, settings.guidance_scale) == (
        "dpmsolver++", 12, 3.0,
    )  # fmt: skip


def test_plan_estimates_the_probes(tiny_models, tmp_path):
    spec = balanced(tiny_models, tmp_path / "ds", {"count": 1000, "balance": {
        "gender": GENDER_HALVES, "max_candidates": 4000}},
        generation={"steps": 25, "guidance": 3.0})  # fmt: skip
    summary = summarize(spec, throughput_images_per_s=1.0)
    rows = dict(summary.rows())
    assert rows["balance probes (one per candidate)"] == "1,000 .. 4,000"
    assert rows["probe settings"] == "lcm, 4 steps, guidance 1"
    # A probe is 4 LCM passes against a job image's 25 steps x 2 (CFG), at 1 image/s.
    low, high = (float(v) for v in rows["estimated probe GPU hours"].split(" .. "))
    assert low == pytest.approx(1000 * 4 / 50 / 3600, rel=0.01)
    assert high == pytest.approx(4000 * 4 / 50 / 3600, rel=0.01)


# --- the whole job, through the CLI -------------------------------------------------------------


@pytest.mark.usefixtures("prefect_harness")
def test_balanced_job_writes_its_probes_audits_and_resumes_without_probing(
    tiny_models, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "ds"
    identities = {"source": "random", "count": 4, "separation": 0.9,
                  "balance": {"gender": GENDER_HALVES, "age_edges": [0, 45],
                              "age": {"0-45": 0.5, "45+": 0.5}}}  # fmt: skip
    spec_path = write_spec(tmp_path, raw_spec(tiny_models, out, identities))
    code, _, err = run_cli(["generate", spec_path, "--no-progress"], monkeypatch, capsys)
    assert code == 0, err
    info = json.loads((out / "dataset.json").read_text())
    probes_bytes = (out / "probes" / "manifest.parquet").read_bytes()
    assert hashlib.sha256(probes_bytes).hexdigest() == info["probes_sha256"]
    probes = pq.read_table(out / "probes" / "manifest.parquet").to_pylist()
    kept = [row for row in probes if row["outcome"] == "kept"]
    assert len(kept) == 4 and {row["scheduler"] for row in probes} == {"lcm"}
    for row in kept:  # every kept probe image is there, as recorded
        assert hashlib.sha256((out / row["path"]).read_bytes()).hexdigest() == row["sha256"]
    identities_table = pq.read_table(out / "identities.parquet")
    assert set(identities_table.column("attributes_from").to_pylist()) == {"probe"}
    genders = Counter(identities_table.column("gender").to_pylist())
    bands = Counter(age_band_of(age, [0, 45]) for age in identities_table.column("age").to_pylist())
    assert genders == {"female": 2, "male": 2} and bands == {"0-45": 2, "45+": 2}

    code, _, err = run_cli(["audit", out, "--no-progress"], monkeypatch, capsys)
    assert code == 0, err
    report = json.loads((out / "audit" / "report.json").read_text())
    placement = report["composition"]["placement"]
    assert placement["quotas_met"] and placement["problems"] == [] and placement["kept"] == 4
    gender = next(axis for axis in report["composition"]["axes"] if axis["axis"] == "gender")
    assert gender["targets"] == GENDER_HALVES and gender["max_abs_deviation"] == 0.0

    # A run stopped after its first shard: the re-run keeps the recorded identities and
    # probes (balancing would raise here) and redoes only the missing shard.
    before = manifest_rows(str(out))
    (out / "manifest" / "part-00001.parquet").unlink()
    monkeypatch.setattr(preflight, "balanced_identities", _no_probing)
    code, _, err = run_cli(["generate", spec_path, "--no-progress"], monkeypatch, capsys)
    assert code == 0, err
    assert manifest_rows(str(out)) == before
    assert (out / "probes" / "manifest.parquet").read_bytes() == probes_bytes


def _no_probing(spec):
    raise AssertionError("a resumed balanced job must not probe again")


@pytest.fixture
def quiet_weight_loading():
    """What the CLI's HF_HUB_DISABLE_PROGRESS_BARS does in a fresh process; here
    transformers was imported by earlier tests, before the CLI could set it."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    yield
    if enabled:
        transformers_logging.enable_progress_bar()


@pytest.mark.usefixtures("prefect_harness", "quiet_weight_loading")
def test_unfillable_quota_is_refused_in_one_line_with_nothing_written(
    tiny_models, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "fresh" / "ds"
    identities = {"source": "random", "count": 2, "balance": {
        "age_edges": [0, 95], "age": {"0-95": 0.5, "95+": 0.5}, "max_candidates": 6,
        "probe_scheduler": "dpmsolver++", "probe_steps": 2}}  # fmt: skip
    spec_path = write_spec(tmp_path, raw_spec(tiny_models, out, identities))
    before = tree_hashes(tmp_path / "fresh")
    code, _, err = run_cli(["generate", spec_path, "--no-progress"], monkeypatch, capsys)
    assert code == 2, err
    assert_one_line_error(err, "cell age=95+ has 0 of its 1 identities after 6 candidates")
    assert "identities.balance.max_candidates" in err
    assert tree_hashes(tmp_path / "fresh") == before is None
