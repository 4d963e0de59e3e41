"""A PyTorch Dataset over an arc2face-synth dataset (local folder or object store).

The index (paths, labels, keypoints) is read once, streaming the manifest with
only the columns it needs; images are read on demand. The filesystem is opened
lazily per process, so the dataset pickles into DataLoader workers and each
worker gets its own fsspec client (s3fs clients must not cross a fork).

Splits are by identity: an identity goes to "val" when a hash of
(split_seed, identity_id) falls below val_fraction, so no person appears in
both splits and the split does not depend on the order of rows or shards.
Labels are re-numbered 0..K-1 within the split, in identity-label order.

Nothing is trusted unchecked: every manifest part is verified against its checksum
sidecar while the index is built (a damaged one raises `DamagedPart`, naming it), and a
dataset still being generated is refused unless `allow_incomplete=True`
(`DatasetIncomplete`, saying how many shards are missing).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import Dataset

from arc2face_engine.dataset.reader import DatasetReader
from schemas.errors import UserError
from schemas.tables import KEYPOINT_VALUES, vector_matrix

INDEX_COLUMNS = ["image_id", "identity_id", "label", "path", "keypoints", "accepted"]
SPLITS = (None, "train", "val")
ALIGNED_SIZE = 112


class DatasetSplitError(UserError, ValueError):
    """A split option is invalid."""


class EmptySplit(UserError, ValueError):
    """The dataset (or the selected split of it) has no images to serve."""


def identity_split(identity_id: str, val_fraction: float, split_seed: int = 0) -> str:
    """The split ("train" or "val") of one identity: a hash of (seed, id), stable across runs."""
    digest = hashlib.sha256(f"{split_seed}:{identity_id}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if position < val_fraction else "train"


class Arc2FaceDataset(Dataset):
    """Items are (CHW float tensor in [0, 1], label) or (transform(PIL image), label)."""

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        split: str | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        align: bool = False,
        transform: Callable[[Image.Image], Any] | None = None,
        include_rejected: bool = False,
        allow_incomplete: bool = False,
    ):
        if split not in SPLITS:
            raise DatasetSplitError(f"split {split!r} is not one of None, 'train', 'val': pick one")
        if not 0.0 <= val_fraction < 1.0:
            raise DatasetSplitError(f"val_fraction {val_fraction} is not in [0, 1): pass e.g. 0.1")
        self.uri = str(uri)
        self.storage_options = dict(storage_options or {})
        self.split, self.val_fraction, self.split_seed = split, val_fraction, split_seed
        self.align, self.transform, self.include_rejected = align, transform, include_rejected
        self._reader: DatasetReader | None = None
        self._reader_pid: int | None = None
        reader = DatasetReader(self.uri, self.storage_options)
        reader.info()  # DatasetNotFound (naming the URI) when there is no dataset.json
        reader.require_complete(allow_incomplete, "allow_incomplete=True")
        self._build_index(reader)  # DamagedPart (naming the part) for a damaged part
        if not len(self.labels):
            raise EmptySplit(self._empty_message())

    def _empty_message(self) -> str:
        kind = "images" if self.include_rejected else "accepted images"
        if self.split is None:
            return (
                f"{self.uri} has no {kind}: check that shards committed "
                f"(`arc2face-synth audit {self.uri}`) or generate more identities"
            )
        fix = "lower val_fraction" if self.split == "train" else "raise val_fraction"
        return (
            f"split {self.split!r} of {self.uri} has no {kind}: {fix} or generate more identities"
        )

    # --- index --------------------------------------------------------------------------------

    def _keep_identity(self, identity_id: str) -> bool:
        if self.split is None:
            return True
        return identity_split(identity_id, self.val_fraction, self.split_seed) == self.split

    def _build_index(self, reader: DatasetReader) -> None:
        paths, labels, keypoints, identity_of = [], [], [], {}
        split_of: dict[str, bool] = {}
        for batch in reader.iter_manifest(INDEX_COLUMNS):
            keep = batch.column("path").is_valid().to_numpy(zero_copy_only=False)
            if not self.include_rejected:
                keep &= batch.column("accepted").to_numpy(zero_copy_only=False)
            ids = batch.column("identity_id").to_pylist()
            for row in np.flatnonzero(keep):
                identity = ids[row]
                if identity not in split_of:
                    split_of[identity] = self._keep_identity(identity)
                keep[row] = split_of[identity]
            rows = pa.array(np.flatnonzero(keep))
            if not len(rows):
                continue
            batch = batch.take(rows)
            self._check_paths(reader, batch)
            paths.append(batch.column("path"))
            source = batch.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
            labels.append(source)
            identity_of.update(
                zip(source.tolist(), batch.column("identity_id").to_pylist(), strict=True)
            )
            if self.align:
                keypoints.append(self._keypoints(batch.column("keypoints")))
        sources = np.concatenate(labels) if labels else np.empty(0, np.int64)
        unique_sources, self.labels = np.unique(sources, return_inverse=True)
        self.identity_ids = [identity_of[int(label)] for label in unique_sources]
        self.paths = pa.concat_arrays(paths) if paths else pa.array([], pa.string())
        self.keypoints = np.concatenate(keypoints) if keypoints else None

    @staticmethod
    def _check_paths(reader: DatasetReader, batch: pa.RecordBatch) -> None:
        """Refuse (naming the row) a path that leaves the dataset root, lexically or through
        a symlink on local disks: items must never read outside the dataset."""
        image_ids = batch.column("image_id").to_pylist()
        for image_id, path in zip(image_ids, batch.column("path").to_pylist(), strict=True):
            reader.path(path, f"manifest row {image_id!r}")

    @staticmethod
    def _keypoints(column: pa.Array) -> np.ndarray:
        """(n, 5, 2) float32; NaN where a row has no keypoints (then it cannot be aligned)."""
        values = np.full((len(column), KEYPOINT_VALUES), np.nan, np.float32)
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        values[valid] = vector_matrix(column.filter(column.is_valid()), KEYPOINT_VALUES)
        return values.reshape(-1, 5, 2)

    @property
    def num_classes(self) -> int:
        return len(self.identity_ids)

    def __len__(self) -> int:
        return len(self.labels)

    # --- items --------------------------------------------------------------------------------

    def _get_reader(self) -> DatasetReader:
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader = DatasetReader(self.uri, self.storage_options)
            self._reader_pid = os.getpid()
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = state["_reader_pid"] = None  # each worker opens its own
        return state

    def load_image(self, index: int) -> Image.Image:
        data = self._get_reader().read_image_bytes(self.paths[index].as_py(), f"item {index}")
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
        if not self.align:
            return image
        keypoints = self.keypoints[index]
        if np.isnan(keypoints).any():
            raise ValueError(
                f"{self.paths[index]} has no keypoints: use align=False or accepted rows"
            )
        from arc2face_engine.faces.align import align_face

        return Image.fromarray(align_face(np.asarray(image), keypoints, size=ALIGNED_SIZE))

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load_image(index)
        label = int(self.labels[index])
        if self.transform is not None:
            return self.transform(image), label
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        return pixels.float().div_(255.0), label
