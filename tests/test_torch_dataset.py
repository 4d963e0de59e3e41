"""Arc2FaceDataset: accepted rows, identity-disjoint splits, contiguous labels, DataLoader workers."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from arc2face_engine.dataset.reader import DatasetNotFound
from arc2face_engine.loader import Arc2FaceDataset, DatasetSplitError, EmptySplit, identity_split
from tests.dataset_factory import make_dataset


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("torchds") / "ds"
    return make_dataset(str(root), n_identities=12, images_per_identity=3, shards=3, image_size=32)


def _manifest(root: str) -> list[dict]:
    rows = []
    for part in sorted((Path(root) / "manifest").glob("part-*.parquet")):
        rows += pq.read_table(
            part, columns=["image_id", "identity_id", "path", "accepted"]
        ).to_pylist()
    return rows


def test_all_accepted_rows_with_contiguous_labels(made) -> None:
    dataset = Arc2FaceDataset(made.uri)
    assert len(dataset) == made.accepted == 36
    assert dataset.num_classes == 12
    assert dataset.identity_ids == [f"id-{i:06d}" for i in range(12)]
    image, label = dataset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert label == 0
    rows = {row["path"]: row for row in _manifest(made.uri)}
    for index in range(len(dataset)):
        row = rows[dataset.paths[index].as_py()]
        assert row["accepted"] and dataset.identity_ids[dataset.labels[index]] == row["identity_id"]


def test_include_rejected(made) -> None:
    assert len(Arc2FaceDataset(made.uri, include_rejected=True)) == len(made.image_paths)


def test_split_is_by_identity_and_deterministic(made) -> None:
    train = Arc2FaceDataset(made.uri, split="train", val_fraction=0.4, split_seed=3)
    val = Arc2FaceDataset(made.uri, split="val", val_fraction=0.4, split_seed=3)
    assert train.num_classes > 0 and val.num_classes > 0
    assert not set(train.identity_ids) & set(val.identity_ids)
    assert sorted(train.identity_ids + val.identity_ids) == made.identity_ids
    assert len(train) + len(val) == made.accepted
    for part in (train, val):  # labels re-numbered within the split
        assert sorted(set(part.labels.tolist())) == list(range(part.num_classes))
    expected_val = [i for i in made.identity_ids if identity_split(i, 0.4, 3) == "val"]
    assert val.identity_ids == expected_val
    again = Arc2FaceDataset(made.uri, split="val", val_fraction=0.4, split_seed=3)
    assert again.identity_ids == val.identity_ids and np.array_equal(again.labels, val.labels)
    other_seed = Arc2FaceDataset(made.uri, split="val", val_fraction=0.4, split_seed=4)
    assert other_seed.identity_ids != val.identity_ids


def test_transform_gets_pil_image(made) -> None:
    dataset = Arc2FaceDataset(made.uri, transform=lambda image: image.size)
    assert dataset[1] == ((32, 32), 0)


def test_bad_split_is_a_user_error(made) -> None:
    with pytest.raises(DatasetSplitError, match="split 'test'"):
        Arc2FaceDataset(made.uri, split="test")
    with pytest.raises(DatasetSplitError, match="val_fraction"):
        Arc2FaceDataset(made.uri, val_fraction=1.5)


def test_missing_dataset_is_dataset_not_found(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match="no dataset at") as error:
        Arc2FaceDataset(str(tmp_path / "nope"))
    assert "\n" not in str(error.value)


def test_empty_split_is_a_user_error(made) -> None:
    with pytest.raises(EmptySplit, match=r"split 'val' of .* has no accepted images") as error:
        Arc2FaceDataset(made.uri, split="val", val_fraction=0.0)
    assert "val_fraction" in str(error.value) and "\n" not in str(error.value)


def test_pickles_without_an_open_filesystem(made) -> None:
    dataset = Arc2FaceDataset(made.uri)
    dataset[0]  # opens the reader in this process
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._reader is None
    assert torch.equal(clone[5][0], dataset[5][0])


def test_dataloader_with_two_workers(made) -> None:
    dataset = Arc2FaceDataset(made.uri, split="train", val_fraction=0.25)
    # spawn: the workers get a pickled dataset and no inherited threads (Prefect, Dask).
    loader = DataLoader(
        dataset, batch_size=8, num_workers=2, shuffle=False, multiprocessing_context="spawn"
    )
    labels = []
    for images, batch_labels in loader:
        assert images.shape[1:] == (3, 32, 32)
        labels.append(batch_labels)
    assert torch.cat(labels).tolist() == dataset.labels.tolist()


def test_align_returns_112_crops(made) -> None:
    pytest.importorskip("arc2face_engine.faces.align")
    dataset = Arc2FaceDataset(made.uri, align=True)
    image, _ = dataset[0]
    assert image.shape == (3, 112, 112)
