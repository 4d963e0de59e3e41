"""Streaming plan: variants over the pose/expression grid, shards, summary and estimate."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest

from arc2face_engine.job.estimate import load_throughput_table, summarize
from arc2face_engine.job.shards import ShardRange, Variant, iter_shards, shard_count, variant_for
from schemas.job import parse_spec


def spec(**sections):
    return parse_spec({"name": "plan", **sections})


# (poses, expressions), coprime and not
GRIDS = [(4, 8), (15, 8), (3, 2), (1, 5), (5, 1), (8, 4), (15, 16), (5, 8), (6, 9), (7, 3)]
# coprime grids: the expression is exactly `item mod E`, so every run of consecutive
# variants sees the expressions evenly
EVEN_EXPRESSION_GRIDS = [(15, 8), (3, 2), (1, 5), (5, 1), (7, 3), (5, 8), (15, 16), (9, 8), (4, 3)]
# grids sharing a factor: each lcm-block shifts the expressions by one
SHIFTED_EXPRESSION_GRIDS = [(4, 8), (8, 4), (6, 9), (6, 4), (2, 2)]
PER_IDENTITY = [1, 2, 3, 4, 5, 7, 8, 15, 16, 40, 50]


def variants_of(identity, per_identity, poses, expressions):
    return [variant_for(identity, v, poses, expressions, per_identity) for v in range(per_identity)]


def spread(counter: Counter, size: int) -> int:
    """max - min count over all `size` values (an absent value counts 0)."""
    counts = [counter.get(value, 0) for value in range(size)]
    return max(counts) - min(counts)


def test_variant_cell():
    # P=3, E=2, N=4: c = (4i + v) mod 6, pose = c mod 3, expression = c mod 2 (coprime)
    assert variant_for(0, 0, 3, 2, 4) == Variant(0, 0, 0)
    assert variant_for(0, 1, 3, 2, 4) == Variant(1, 1, 1)
    assert variant_for(0, 2, 3, 2, 4) == Variant(2, 2, 0)
    assert variant_for(0, 3, 3, 2, 4) == Variant(3, 0, 1)  # c = 3
    assert variant_for(1, 1, 3, 2, 4) == Variant(1, 2, 1)  # c = 5
    assert variant_for(2, 3, 3, 2, 4) == Variant(3, 2, 1)  # item 11 -> c = 5
    # absent banks: the other axis cycles over c = (i*N + v) mod E (or mod P)
    assert variant_for(5, 7, 0, 0, 10) == Variant(7, None, None)
    assert variant_for(1, 1, 4, 0, 3) == Variant(1, 0, None)  # item 4 -> pose 4 % 4
    assert variant_for(1, 1, 0, 4, 3) == Variant(1, None, 0)  # item 4 -> expression 4 % 4
    assert variant_for(2, 1, 0, 5, 3) == Variant(1, None, 2)  # item 7 -> 7 % 5
    assert variant_for(2, 1, 5, 0, 3) == Variant(1, 2, None)
    with pytest.raises(ValueError, match="images_per_identity"):
        variant_for(0, 0, 3, 2, 0)


@pytest.mark.parametrize(("poses", "expressions"), GRIDS)
def test_variant_cells_are_a_bijection(poses, expressions):
    grid = poses * expressions
    # identity 0 with N = P*E walks c = 0 .. P*E-1
    cells = [(v.pose_index, v.expression_index) for v in variants_of(0, grid, poses, expressions)]
    assert sorted(cells) == list(itertools.product(range(poses), range(expressions)))


@pytest.mark.parametrize(("poses", "expressions"), GRIDS)
@pytest.mark.parametrize("per_identity", PER_IDENTITY)
def test_identity_gets_every_pose(poses, expressions, per_identity):
    for identity in range(poses * expressions + 1):
        counts = Counter(
            v.pose_index for v in variants_of(identity, per_identity, poses, expressions)
        )
        # N >= P: every pose, counts within 1; N < P: N different poses
        assert spread(counts, poses) <= 1
        assert len(counts) == min(per_identity, poses)


@pytest.mark.parametrize(("poses", "expressions"), EVEN_EXPRESSION_GRIDS)
@pytest.mark.parametrize("per_identity", PER_IDENTITY)
def test_identity_gets_every_expression(poses, expressions, per_identity):
    for identity in range(poses * expressions + 1):
        variants = variants_of(identity, per_identity, poses, expressions)
        counts = Counter(v.expression_index for v in variants)
        # N >= E: every expression, counts within 1; N < E: N different expressions
        assert spread(counts, expressions) <= 1
        assert len(counts) == min(per_identity, expressions)


@pytest.mark.parametrize(("poses", "expressions"), SHIFTED_EXPRESSION_GRIDS)
@pytest.mark.parametrize("per_identity", PER_IDENTITY)
def test_expressions_stay_near_even_on_grids_sharing_a_factor(poses, expressions, per_identity):
    for identity in range(poses * expressions + 1):
        variants = variants_of(identity, per_identity, poses, expressions)
        counts = Counter(v.expression_index for v in variants)
        if per_identity >= expressions:
            assert spread(counts, expressions) <= 2
        assert max(counts.values()) <= -(-per_identity // expressions) + 1


@pytest.mark.parametrize(("poses", "expressions"), GRIDS)
@pytest.mark.parametrize("per_identity", [1, 3, 4, 7, 8, 40])
def test_consecutive_items_cover_the_grid_once(poses, expressions, per_identity):
    grid = poses * expressions
    identities = 2 * grid // per_identity + 3
    items = [
        (v.pose_index, v.expression_index)
        for i in range(identities)
        for v in variants_of(i, per_identity, poses, expressions)
    ]
    for start in range(len(items) - grid + 1):
        assert len(set(items[start : start + grid])) == grid
    # a whole job whose item count is a multiple of P*E covers the grid uniformly
    counts = Counter(items[: len(items) - len(items) % grid])
    assert len(counts) == grid
    assert max(counts.values()) == min(counts.values())


def test_absent_banks_cycle_the_other_axis():
    for per_identity in (1, 3, 8):
        for identity in range(5):
            for v in range(per_identity):
                item = identity * per_identity + v
                assert variant_for(identity, v, 0, 8, per_identity) == Variant(v, None, item % 8)
                assert variant_for(identity, v, 15, 0, per_identity) == Variant(v, item % 15, None)


def test_small_identities_see_many_poses():
    # the old rule gave identity 0 of a 15 poses x 8 expressions, N = 40 job only poses
    # 0-4, and every image of an identity the same pose for 15 x 16 with N = 4
    for identity in range(20):
        variants = variants_of(identity, 40, 15, 8)
        poses = Counter(v.pose_index for v in variants)
        assert sorted(poses.values()) == [2] * 5 + [3] * 10
        assert len({v.expression_index for v in variants}) == 8
        assert len({v.pose_index for v in variants_of(identity, 4, 15, 16)}) == 4
        assert len({v.expression_index for v in variants_of(identity, 4, 15, 16)}) == 4


def test_variant_is_deterministic():
    first = [variant_for(i, v, 15, 8, 40) for i in range(20) for v in range(40)]
    again = [variant_for(i, v, 15, 8, 40) for i in range(20) for v in range(40)]
    assert first == again
    assert variant_for(3, 7, 15, 8, 40) == Variant(7, 7, 7)  # item 127 -> c = 7


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
    assert next(shards) == ShardRange(0, 0, 5)
    assert list(itertools.islice(shards, 2)) == [ShardRange(1, 5, 10), ShardRange(2, 10, 15)]
    assert shard_count(10**15, 50, 256) == 2 * 10**14


def test_shard_items():
    items = list(ShardRange(3, 10, 12).items(2))
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
