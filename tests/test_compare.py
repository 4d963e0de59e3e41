"""`arc2face-synth compare`: metrics side by side, plots overlaid, and the identities two
datasets share, found exactly (the planted pairs, nothing else)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from arc2face_engine.audit.compare import compare_datasets
from arc2face_engine.audit.compare_report import CompareReport
from arc2face_engine.identities.neighbours import max_cosine, mutual_max_cosine
from tests.dataset_factory import make_dataset, normalise


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    """A (6 identities), B sharing A's identities 1 and 4 (as its 3 and 5) and holding one
    at cosine 0.5 to A's identity 0 (outside the radius), C sharing nothing."""
    root = tmp_path_factory.mktemp("compare")
    rng = np.random.default_rng(5)
    a = make_dataset(str(root / "a"), n_identities=6, images_per_identity=4, seed=1)
    other = normalise(rng.standard_normal(512))
    other = normalise(other - (other @ a.identity_embeddings[0]) * a.identity_embeddings[0])
    near_miss = normalise(0.5 * a.identity_embeddings[0] + np.sqrt(0.75) * other)
    strangers = normalise(rng.standard_normal((3, 512)))
    b_rows = np.vstack([near_miss, strangers[:2], a.identity_embeddings[1], strangers[2:],
                        a.identity_embeddings[4]])  # fmt: skip
    b = make_dataset(str(root / "b"), identity_embeddings=b_rows, images_per_identity=3, seed=2)
    c = make_dataset(str(root / "c"), n_identities=5, images_per_identity=3, seed=3)
    return root, a, b, c


def test_compare_finds_exactly_the_planted_pairs(planted) -> None:
    root, a, b, c = planted
    report = compare_datasets([a.uri, b.uri, c.uri], str(root / "report"), progress=lambda *_: None)
    ab, ac, bc = report.overlaps
    assert (ab.first, ab.second) == (0, 1)
    assert {(pair.first_id, pair.second_id) for pair in ab.pairs} == {
        ("id-000001", "id-000003"), ("id-000004", "id-000005")
    }
    assert ab.pair_count == ab.first_within == ab.second_within == 2
    assert all(pair.cosine > 0.9 for pair in ab.pairs)
    assert ac.pair_count == bc.pair_count == 0 and ac.max_cosine < 0.7
    assert ab.first_identities == 6 and ab.second_identities == 6

    saved = CompareReport.model_validate(json.loads((root / "report" / "compare.json").read_text()))
    assert [entry.audit.passed for entry in saved.datasets] == [True, True, True]
    assert saved.datasets[0].images_per_identity.mean == 4.0
    assert saved.datasets[1].measured_yaw is not None
    page = (root / "report" / "compare.html").read_text()
    assert page.count("data:image/jpeg") == 2 * (4 + 3)  # 2 pairs: all of A's 4 and B's 3
    assert page.count("data:image/png") >= 5  # overlaid plots


def test_the_near_miss_is_measured_but_not_paired(planted) -> None:
    root, a, b, _ = planted
    report = compare_datasets([a.uri, b.uri], str(root / "two"), radius=0.6)  # cos >= 0.4
    pairs = {(pair.first_id, pair.second_id) for pair in report.overlaps[0].pairs}
    assert ("id-000000", "id-000000") in pairs and len(pairs) == 3


def test_mutual_search_matches_two_one_way_searches() -> None:
    rng = np.random.default_rng(0)
    first = torch.tensor(normalise(rng.standard_normal((23, 512))))
    second = torch.tensor(normalise(rng.standard_normal((17, 512))))
    second[5] = first[3]  # an exact tie candidate
    found = mutual_max_cosine(first, second, first_rows=4, second_rows=5)
    one_way = max_cosine(first, second, query_rows=4, key_rows=5)
    other_way = max_cosine(second, first, query_rows=4, key_rows=5)
    # the other way round multiplies in another order: the same cosines to rounding
    for got, want in zip(found[0::2], (one_way[0], other_way[0]), strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    for got, want in zip(found[1::2], (one_way[1], other_way[1]), strict=True):
        assert torch.equal(got, want)
    assert int(found[3][5]) == 3


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    from flows.cli import main

    monkeypatch.setattr(sys, "argv", ["arc2face-synth", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 0
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_command_and_its_one_line_errors(planted, monkeypatch, capsys) -> None:
    root, a, b, _ = planted
    code, out, err = run_cli(["compare", a.uri, b.uri, "--out", root / "cli", "--no-progress"],
                             monkeypatch, capsys)  # fmt: skip
    assert code == 0, err
    assert "2 identity pairs" in out and (root / "cli" / "compare.html").exists()
    (root / "file").write_text("x")
    for args, expected in (
        ([a.uri, "--out", root / "x"], "at least two datasets"),
        ([a.uri, a.uri, "--out", root / "x"], "given twice"),
        ([a.uri, b.uri, "--out", root / "file"], "is a file"),
        ([a.uri, root / "nowhere", "--out", root / "x"], "dataset.json missing"),
        ([a.uri, b.uri, "--out", root / "x", "--device", "tpu"], "unknown device"),
    ):
        code, _, err = run_cli(["compare", *args, "--no-progress"], monkeypatch, capsys)
        assert code == 2 and expected in err and err.count("\n") == 1, err


@pytest.mark.usefixtures("prefect_harness")
def test_compare_runs_as_a_flow(planted) -> None:
    from flows.audit import compare_datasets_flow

    root, a, b, _ = planted
    report = compare_datasets_flow([a.uri, b.uri], str(root / "flow"))
    assert report.overlaps[0].pair_count == 2
    assert (root / "flow" / "compare.json").exists()
