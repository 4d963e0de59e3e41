"""Identity packing: more separation than random sampling, near the manifold, reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from arc2face_engine.identities import sources
from arc2face_engine.identities.packing import PackingOptions, pack_identities, sample_packed
from schemas.tables import IDENTITIES_SCHEMA, vector_matrix

COUNT = 300


def face_manifold(rows: int, seed: int = 7) -> np.ndarray:
    """A stand-in face manifold: unit rows concentrated near a 128-d subspace of the sphere."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((512, 128)))[0]
    inside = rng.standard_normal((rows, 128)) @ basis.T / np.sqrt(128)
    points = inside + 0.5 * rng.standard_normal((rows, 512)) / np.sqrt(512)
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def max_pair_cosine(rows: np.ndarray) -> float:
    gram = rows @ rows.T
    np.fill_diagonal(gram, -1.0)
    return float(gram.max())


def manifold_closeness(rows: np.ndarray, gallery: np.ndarray) -> float:
    return float((rows @ gallery.T).max(axis=1).mean())


@pytest.fixture(scope="module")
def gallery() -> np.ndarray:
    return face_manifold(1000)


@pytest.fixture(scope="module")
def random_set() -> np.ndarray:
    return vector_matrix(sources.sample_random(COUNT, 0.3, seed=4).column("embedding"), 512)


@pytest.mark.parametrize(
    "options",
    [
        PackingOptions(steps=40, separation_target=0.1),
        # Search cells smaller than the set: the inverted-file neighbour search.
        PackingOptions(
            steps=40,
            separation_target=0.1,
            exact_rows=0,
            cell_rows=64,
            probes=2,
            batch_size=100,
            refresh_every=10,
        ),
    ],
    ids=["exact search", "cell search"],
)
def test_packing_beats_random_sampling_and_stays_near_the_manifold(gallery, random_set, options):
    packed, start_rows = pack_identities(COUNT, gallery, seed=4, options=options)
    assert packed.shape == (COUNT, 512) and packed.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(packed, axis=1), 1.0, atol=1e-5)
    assert len(set(start_rows.tolist())) == COUNT  # distinct gallery rows while they last
    # More separated than the project's random source at the same count and seed ...
    assert max_pair_cosine(packed) < max_pair_cosine(random_set) - 0.02
    # ... and far closer to the face manifold than uniform draws.
    assert manifold_closeness(packed, gallery) > 0.8
    assert manifold_closeness(random_set, gallery) < 0.4
    # The optimiser did the separating: its starting points were much closer together.
    start, _ = pack_identities(COUNT, gallery, seed=4, options=PackingOptions(steps=0))
    assert max_pair_cosine(packed) < max_pair_cosine(start) - 0.1


def test_manifold_weight_trades_separation_for_closeness(gallery):
    loose, _ = pack_identities(COUNT, gallery, 1, PackingOptions(steps=40, manifold_weight=0.05))
    tight, _ = pack_identities(COUNT, gallery, 1, PackingOptions(steps=40, manifold_weight=2.0))
    assert manifold_closeness(tight, gallery) > manifold_closeness(loose, gallery) + 0.05
    assert max_pair_cosine(loose) < max_pair_cosine(tight)


def test_packing_is_reproducible_per_seed(gallery):
    options = PackingOptions(steps=10, exact_rows=0, cell_rows=64, probes=2)
    first = sample_packed(COUNT, gallery, seed=9, options=options)
    again = sample_packed(COUNT, gallery, seed=9, options=options)
    other = sample_packed(COUNT, gallery, seed=10, options=options)
    assert first.schema.equals(IDENTITIES_SCHEMA)
    assert set(first.column("source").to_pylist()) == {"packed"}
    assert first.column("provenance")[0].as_py().startswith("packed seed=9 start=gallery row ")
    first_bytes = vector_matrix(first.column("embedding"), 512).tobytes()
    assert first_bytes == vector_matrix(again.column("embedding"), 512).tobytes()
    assert first_bytes != vector_matrix(other.column("embedding"), 512).tobytes()


def test_more_identities_than_gallery_rows_and_a_single_identity(gallery):
    packed, start_rows = pack_identities(1500, gallery[:200], 0, PackingOptions(steps=5))
    assert len(packed) == 1500 and np.isfinite(packed).all()
    assert np.bincount(start_rows, minlength=200).min() >= 7  # every row reused evenly
    single, _ = pack_identities(1, gallery, 0, PackingOptions(steps=3))
    assert single.shape == (1, 512) and np.isfinite(single).all()


def test_shared_gallery_rows_still_beat_random_sampling(gallery):
    """Ten identities per gallery row (the default 256-probe gallery is far smaller than most
    sets): siblings start apart, so packing still out-separates random sampling."""
    count, rows = 600, gallery[:60]
    random_rows = vector_matrix(
        sources.sample_random(count, 0.3, seed=4).column("embedding"), 512
    )
    options = PackingOptions(steps=30, separation_target=0.1, refresh_every=5)
    packed, start_rows = pack_identities(count, rows, seed=4, options=options)
    assert np.bincount(start_rows, minlength=60).min() == 10
    assert max_pair_cosine(packed) < max_pair_cosine(random_rows) - 0.02
    assert manifold_closeness(packed, rows) > manifold_closeness(random_rows, rows) + 0.2
    # Siblings (identities started from the same row) start about the target apart.
    start, start_rows = pack_identities(
        count, rows, seed=4, options=PackingOptions(steps=0, separation_target=0.2)
    )
    same_row = start_rows[:, None] == start_rows[None, :]
    np.fill_diagonal(same_row, False)
    assert abs(float((start @ start.T)[same_row].mean()) - 0.2) < 0.05
