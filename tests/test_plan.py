"""Streaming plan: variants over the pose/expression grid, shards, summary and estimate."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest

from arc2face_engine.dataset.plan import (
    ShardPlan,
    Variant,
    iter_shards,
    load_throughput_table,
    shard_count,
    summarize,
    variant_for,
)
from schemas.job import parse_spec


def spec(**sections):
    return parse_spec({"name": "plan", **sections})


def test_variant_grid_cell_poses_outer():
    # P=3 poses, E=2 expressions: cell = (v + i) mod 6, pose = cell // 2, expression = cell % 2
    assert variant_for(0, 0, 3, 2) == Variant(0, 0, 0)
    assert variant_for(0, 1, 3, 2) == Variant(1, 0, 1)
    assert variant_for(0, 2, 3, 2) == Variant(2, 1, 0)
    assert variant_for(4, 3, 3, 2) == Variant(3, 0, 1)  # (3 + 4) % 6 = 1
    assert variant_for(5, 7, 0, 0) == Variant(7, None, None)
    assert variant_for(1, 1, 4, 0) == Variant(1, 2, None)
    assert variant_for(1, 1, 0, 4) == Variant(1, None, 2)


def test_every_identity_covers_the_grid_evenly():
    poses, expressions, per_identity = 3, 4, 24
    for identity in range(7):
        cells = Counter(
            (v.pose_index, v.expression_index)
            for v in (variant_for(identity, k, poses, expressions) for k in range(per_identity))
        )
        assert len(cells) == poses * expressions
        assert set(cells.values()) == {per_identity // (poses * expressions)}
    # neighbouring identities start at different cells
    firsts = {variant_for(i, 0, poses, expressions) for i in range(poses * expressions)}
    assert len({(v.pose_index, v.expression_index) for v in firsts}) == poses * expressions


@pytest.mark.parametrize(
    ("identities", "per_identity", "shard_size", "per_shard"),
    [
        (10, 4, 8, 2),
        (11, 4, 8, 2),
        (5, 20, 8, 1),
        (1000, 50, 256, 5),
        (3, 1, 256, 256),
        (0, 4, 8, 2),
    ],
)
def test_shards_cover_identities_once_in_order(identities, per_identity, shard_size, per_shard):
    shards = list(iter_shards(identities, per_identity, shard_size))
    assert len(shards) == shard_count(identities, per_identity, shard_size)
    assert [s.shard for s in shards] == list(range(len(shards)))
    covered = [i for s in shards for i in range(s.identity_start, s.identity_stop)]
    assert covered == list(range(identities))
    assert all(s.identity_count == per_shard for s in shards[:-1])
    assert all(0 < s.identity_count <= per_shard for s in shards)
    assert shards == list(iter_shards(identities, per_identity, shard_size))  # deterministic


def test_shards_are_lazy_for_huge_jobs():
    shards = iter_shards(10**15, 50, 256)
    assert next(shards) == ShardPlan(0, 0, 5)
    assert list(itertools.islice(shards, 2)) == [ShardPlan(1, 5, 10), ShardPlan(2, 10, 15)]
    assert shard_count(10**15, 50, 256) == 2 * 10**14


def test_shard_items():
    items = list(ShardPlan(3, 10, 12).items(2))
    assert items == [(10, 0), (10, 1), (11, 0), (11, 1)]


def test_bad_arguments():
    for args in [(10, 0, 8), (10, 4, 0), (-1, 4, 8)]:
        with pytest.raises(ValueError):
            next(iter_shards(*args))


def test_summary_counts_and_unknown_throughput():
    summary = summarize(
        spec(
            identities={"count": 1000},
            variations={"images_per_identity": 50},
            output={"shard_size": 256},
            filter={"max_attempts": 3},
        )
    )
    assert (summary.identities, summary.images, summary.shards) == (1000, 50_000, 200)
    assert (summary.identities_per_shard, summary.images_per_shard) == (5, 250)
    assert summary.max_images_with_topups == 150_000
    assert summary.estimated_gpu_seconds is None
    assert "no measurement for dpmsolver++, 25 steps, 512x512" in summary.throughput_source
    rows = dict(summary.rows())
    assert rows["shards"] == "200"
    assert rows["throughput (images/s per GPU)"].startswith("unknown")
    assert not any("hours" in key for key in rows)


def test_summary_estimates_from_given_or_measured_throughput(tmp_path):
    job = spec(
        identities={"count": 100},
        variations={"images_per_identity": 36},
        generation={"scheduler": "lcm"},
        filter={"max_attempts": 2},
        compute={"devices": ["cuda:0", "cuda:1"]},
    )
    given = summarize(job, throughput_images_per_s=2.0)
    assert given.estimated_gpu_seconds == pytest.approx(3600 / 2.0)
    assert given.estimated_gpu_seconds_max == pytest.approx(7200 / 2.0)
    rows = dict(given.rows())
    assert rows["estimated GPU hours (no top-ups .. all top-ups)"] == "0.5 .. 1.0"
    assert rows["estimated wall hours on 2 device(s)"] == "0.2 .. 0.5"

    table_path = tmp_path / "throughput.json"
    record = {
        "scheduler": "lcm",
        "steps": 4,
        "height": 512,
        "width": 512,
        "images_per_s": 12.0,
        "device": "test GPU",
    }
    table_path.write_text(json.dumps([record]))
    measured = summarize(job, throughput_table=load_throughput_table(str(table_path)))
    assert measured.throughput_images_per_s == 12.0
    assert measured.throughput_source == "measured on test GPU"
    assert measured.estimated_gpu_seconds == pytest.approx(300.0)
    with pytest.raises(ValueError):
        summarize(job, throughput_images_per_s=0)


def test_summary_reads_file_header_and_counts_photos(tmp_path):
    embeddings = np.ones((30, 512), np.float32)
    np.save(tmp_path / "e.npy", embeddings)
    from_file = summarize(spec(identities={"source": "file", "path": str(tmp_path / "e.npy")}))
    assert (from_file.identities, from_file.identities_exact) == (30, True)
    capped = summarize(
        spec(identities={"source": "file", "path": str(tmp_path / "e.npy"), "count": 7})
    )
    assert capped.identities == 7
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for name in ("a.jpg", "b.PNG", "sub/c.webp", "notes.txt"):
        (photos / name).write_bytes(b"x")
    from_photos = summarize(spec(identities={"source": "images", "path": str(photos)}))
    assert (from_photos.identities, from_photos.identities_exact) == (3, False)
    assert dict(from_photos.rows())["identities"] == "3 (at most)"
