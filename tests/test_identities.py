"""Identity sources: separated random sampling (plain and projected), embedding files, photos."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from arc2face_engine.identities import sources
from schemas.errors import EmbeddingFileError, SpecError, UserError
from schemas.tables import IDENTITIES_SCHEMA

pytest_plugins = ["tests.s3_fixture"]


def embeddings_of(table: pa.Table) -> np.ndarray:
    values = table.column("embedding").combine_chunks().flatten().to_numpy()
    return values.reshape(table.num_rows, 512)


def max_pairwise_cosine(rows: np.ndarray) -> float:
    gram = rows @ rows.T
    np.fill_diagonal(gram, -1.0)
    return float(gram.max())


# --- random -----------------------------------------------------------------------------------


def test_random_identities_are_unit_separated_and_labelled():
    table = sources.sample_random(300, 0.2, seed=5)
    assert table.schema.equals(IDENTITIES_SCHEMA)
    assert table.column("identity_id").to_pylist()[:2] == ["id-000000", "id-000001"]
    assert table.column("label").to_pylist() == list(range(300))
    assert set(table.column("source").to_pylist()) == {"random"}
    rows = embeddings_of(table)
    assert rows.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert max_pairwise_cosine(rows) <= 0.2
    assert table.column("provenance")[0].as_py().startswith("random seed=5 candidate=")


def test_random_identities_are_reproducible_per_seed():
    first = sources.sample_random(50, 0.3, seed=1)
    assert first.equals(sources.sample_random(50, 0.3, seed=1))
    assert not first.equals(sources.sample_random(50, 0.3, seed=2))
    # a different candidate budget does not change the draw order
    assert first.equals(sources.sample_random(50, 0.3, seed=1, max_candidates=51))


def sequential_reference(count: int, separation: float, seed: int, budget: int) -> list[int]:
    """Accept candidates one by one: the definition the blocked sampler must match."""
    rng = np.random.default_rng([seed, sources.IDENTITY_STREAM])
    kept_rows, kept = [], []
    for index in range(budget):
        row = rng.standard_normal(512)
        row = (row / np.linalg.norm(row)).astype(np.float32)
        if all(float(row @ other) <= separation for other in kept_rows):
            kept_rows.append(row)
            kept.append(index)
            if len(kept) == count:
                break
    return kept


def test_blocked_sampler_matches_one_at_a_time_with_many_conflicts(monkeypatch):
    monkeypatch.setattr(sources, "BLOCK", 64)  # several blocks, conflicts inside blocks
    table = sources.sample_random(150, 0.1, seed=3, max_candidates=5000)
    candidates = [int(p.rsplit("=", 1)[1]) for p in table.column("provenance").to_pylist()]
    assert candidates == sequential_reference(150, 0.1, 3, 5000)
    assert candidates[-1] > 300  # the separation really rejected candidates
    assert max_pairwise_cosine(embeddings_of(table)) <= 0.1


def test_unreachable_separation_is_a_user_error():
    with pytest.raises(SpecError) as caught:
        sources.sample_random(500, 0.01, seed=0, max_candidates=600)
    message = str(caught.value)
    assert (
        "cannot be met" in message and "of 500 identities accepted after 600 candidates" in message
    )
    assert "lower identities.count or raise identities.separation" in message


@dataclass
class FakeProjector:
    """Pulls every candidate towards one direction (like a face manifold) and finds no face
    in every third probe."""

    calls: int = 0

    def __call__(self, candidate: np.ndarray) -> np.ndarray | None:
        self.calls += 1
        if self.calls % 3 == 0:
            return None
        pulled = candidate.astype(np.float64).copy()
        pulled[0] += 0.3
        return 2.0 * pulled  # not normalised: the sampler must normalise


def test_projection_keeps_reembedded_vectors_and_checks_them():
    projector = FakeProjector()
    table = sources.sample_random(20, 0.15, seed=0, project=projector, max_candidates=2000)
    rows = embeddings_of(table)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert max_pairwise_cosine(rows) <= 0.15
    assert rows[:, 0].mean() > 0.2  # the projected vectors, not the raw candidates
    kept = [int(p.rsplit("=", 1)[1]) for p in table.column("provenance").to_pylist()]
    assert all((k + 1) % 3 != 0 for k in kept)  # no-face probes were dropped
    assert table.column("provenance")[0].as_py().startswith("random seed=0 projected candidate=")
    # the projected sampler draws the same candidates as the plain one
    rng = np.random.default_rng([0, sources.IDENTITY_STREAM])
    first = rng.standard_normal(512)
    expected = first / np.linalg.norm(first)
    expected[0] += 0.3
    np.testing.assert_allclose(rows[0], expected / np.linalg.norm(expected), atol=1e-5)


def test_projection_returning_garbage_is_refused():
    with pytest.raises(ValueError, match="projection returned a vector of shape"):
        sources.sample_random(2, 0.3, seed=0, project=lambda c: np.zeros(3))


# --- embedding files --------------------------------------------------------------------------


def unit_rows(count: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, 512))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_npy_file_is_normalised_and_capped(tmp_path):
    rows = unit_rows(6) * 3.0  # not unit length on disk
    np.save(tmp_path / "e.npy", rows)  # float64
    table = sources.load_embedding_file(str(tmp_path / "e.npy"))
    assert table.schema.equals(IDENTITIES_SCHEMA)
    np.testing.assert_allclose(embeddings_of(table), rows / 3.0, atol=1e-6)
    assert table.column("provenance")[5].as_py() == f"file {tmp_path / 'e.npy'} row 5"
    assert set(table.column("source").to_pylist()) == {"file"}
    capped = sources.load_embedding_file(str(tmp_path / "e.npy"), limit=4)
    np.testing.assert_allclose(embeddings_of(capped), rows[:4] / 3.0, atol=1e-6)
    assert sources.embedding_file_rows(str(tmp_path / "e.npy")) == 6


@pytest.mark.parametrize("fixed", [True, False])
def test_parquet_file_with_ids(tmp_path, fixed):
    rows = unit_rows(5).astype(np.float32)
    kind = pa.list_(pa.float32(), 512) if fixed else pa.list_(pa.float32())
    table = pa.table(
        {
            "person": ["a", "b", "c", "d", "e"],
            "embedding": pa.array(list(rows), kind),
            "identity_id": ["p0", "p1", "p2", "p3", "p4"],
        }
    )
    pq.write_table(table, tmp_path / "e.parquet", row_group_size=2)
    loaded = sources.load_embedding_file(str(tmp_path / "e.parquet"), limit=3)
    assert loaded.column("identity_id").to_pylist() == ["p0", "p1", "p2"]
    assert loaded.column("label").to_pylist() == [0, 1, 2]
    np.testing.assert_allclose(embeddings_of(loaded), rows[:3], atol=1e-6)


def test_embedding_file_on_s3(s3_uri):
    uri, options = s3_uri
    fs, root = fsspec.core.url_to_fs(uri, **options)
    rows = unit_rows(3)
    table = pa.table({"embedding": pa.array(list(rows.astype(np.float32)), pa.list_(pa.float32()))})
    with fs.open(f"{root}/ids/e.parquet", "wb") as handle:
        pq.write_table(table, handle)
    loaded = sources.load_embedding_file(f"{uri}/ids/e.parquet", options)
    np.testing.assert_allclose(embeddings_of(loaded), rows, atol=1e-6)


def npy(tmp_path: Path, array: np.ndarray) -> str:
    path = tmp_path / "bad.npy"
    np.save(path, array)
    return str(path)


def nan_row(count: int, row: int) -> np.ndarray:
    rows = unit_rows(count)
    rows[row, 7] = np.nan
    return rows


def zero_row(count: int, row: int) -> np.ndarray:
    rows = unit_rows(count)
    rows[row] = 0.0
    return rows


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.ones((4, 128), np.float32), r"has shape \(4, 128\), expected \(N, 512\)"),
        (np.ones(512, np.float32), r"has shape \(512,\), expected \(N, 512\)"),
        (np.ones((0, 512), np.float32), "holds no rows"),
        (np.ones((3, 512), np.int64), "holds int64 values, not floats"),
        (nan_row(4, 2), "row 2 holds NaN or inf"),
        (zero_row(4, 1), "row 1 is all zeros"),
    ],
)
def test_bad_npy_files(tmp_path, array, message):
    with pytest.raises(EmbeddingFileError, match=message) as caught:
        sources.load_embedding_file(npy(tmp_path, array))
    assert "\n" not in str(caught.value)
    assert str(tmp_path) in str(caught.value)


def test_bad_npy_shape_is_found_with_limit_too(tmp_path):
    with pytest.raises(EmbeddingFileError, match=r"has shape \(4, 128\)"):
        sources.load_embedding_file(npy(tmp_path, np.ones((4, 128), np.float32)), limit=2)


def parquet(tmp_path: Path, **columns) -> str:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(columns), path)
    return str(path)


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"vector": [[1.0] * 512]}, r"has no 'embedding' column \(found \['vector'\]\)"),
        ({"embedding": [[1.0] * 512, [1.0] * 500]}, "row 1 has 500 values, expected 512"),
        ({"embedding": [[1.0] * 128, [1.0] * 128]}, r"has shape \(2, 128\), expected \(N, 512\)"),
        ({"embedding": [[1.0] * 512, None]}, "row 1 has no embedding"),
        ({"embedding": [[1.0] * 512, [1.0] * 511 + [None]]}, "row 1 holds NaN or inf"),
        ({"embedding": ["x"]}, "column 'embedding' has type string"),
        (
            {"embedding": [[1.0] * 512] * 2, "identity_id": ["a", "a"]},
            "repeats identity_id 'a' at row 1",
        ),
    ],
)
def test_bad_parquet_files(tmp_path, columns, message):
    with pytest.raises(EmbeddingFileError, match=message):
        sources.load_embedding_file(parquet(tmp_path, **columns))


def test_missing_or_unsupported_files(tmp_path):
    with pytest.raises(EmbeddingFileError, match=r"not found: check identities\.path"):
        sources.load_embedding_file(str(tmp_path / "nope.npy"))
    (tmp_path / "e.csv").write_text("1,2,3")
    with pytest.raises(
        EmbeddingFileError, match=r"unsupported extension: use a \.parquet or \.npy"
    ):
        sources.load_embedding_file(str(tmp_path / "e.csv"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(EmbeddingFileError, match="not a valid Parquet file"):
        sources.load_embedding_file(str(tmp_path / "junk.parquet"))
    assert issubclass(EmbeddingFileError, UserError)


# --- photos -----------------------------------------------------------------------------------


@dataclass
class FakeRecord:
    embedding: np.ndarray | None


class FakeAnalyzer:
    """Embeds a photo by its colour; a black photo has no face."""

    def __init__(self):
        self.seen: list[tuple[int, ...]] = []

    def embed_largest_face(self, image: np.ndarray) -> FakeRecord:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        colour = tuple(int(c) for c in image[0, 0])
        self.seen.append(colour)
        if colour == (0, 0, 0):
            return FakeRecord(None)
        embedding = np.zeros(512, np.float32)
        embedding[:3] = colour
        return FakeRecord(embedding)


def photo_folder(root: Path) -> Path:
    (root / "b").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "b" / "red.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(root / "a_blue.jpg", quality=100)
    Image.new("RGB", (8, 8), (0, 0, 0)).save(root / "c_black.webp", lossless=True)
    (root / "d_broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_image_folder_embeds_largest_faces_in_sorted_order(tmp_path):
    folder = photo_folder(tmp_path / "photos")
    table, skipped = sources.embed_image_folder(str(folder), FakeAnalyzer())
    assert table.schema.equals(IDENTITIES_SCHEMA)
    assert table.column("provenance").to_pylist() == ["image a_blue.jpg", "image b/red.png"]
    assert set(table.column("source").to_pylist()) == {"images"}
    rows = embeddings_of(table)
    assert rows[0, 2] == pytest.approx(1.0, abs=0.01) and rows[1, 0] == pytest.approx(1.0)
    assert skipped[0] == ("c_black.webp", "no face detected")
    assert skipped[1][0] == "d_broken.jpg" and skipped[1][1].startswith("cannot decode: ")
    assert len(skipped) == 2


def test_image_folder_limit_stops_early(tmp_path):
    folder = photo_folder(tmp_path / "photos")
    analyzer = FakeAnalyzer()
    table, skipped = sources.embed_image_folder(str(folder), analyzer, limit=1)
    assert table.num_rows == 1 and skipped == []
    assert len(analyzer.seen) == 1


def test_image_folder_errors(tmp_path):
    with pytest.raises(SpecError, match=r"image folder .* not found"):
        sources.embed_image_folder(str(tmp_path / "missing"), FakeAnalyzer())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SpecError, match=r"no \.jpg/\.jpeg/\.png/\.webp files"):
        sources.embed_image_folder(str(empty), FakeAnalyzer())
    Image.new("RGB", (8, 8), (0, 0, 0)).save(empty / "black.png")
    with pytest.raises(SpecError, match="no face found in any of the 1 photos"):
        sources.embed_image_folder(str(empty), FakeAnalyzer())
