"""A dataset as a gallery of identity embeddings, accepted wherever an embeddings file is
(`identities.exclusion.gallery`, `identities.packing.gallery`, `audit --gallery`): "keep my
synthetic identities away from CASIA-WebFace" is an import and a generate.

The gallery is identities.parquet (one unit embedding per identity: an imported
identity's is the normalised mean of its accepted images), trusted only when its sha256
matches the one dataset.json recorded.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from arc2face_engine.dataset import layout
from arc2face_engine.dataset.reader import DatasetNotFound, DatasetReader
from schemas.errors import DatasetCorrupt, first_line
from schemas.tables import EMBEDDING_DIM, l2_normalize, vector_matrix

EMBEDDING_FILE_SUFFIXES = (".parquet", ".npy")


def is_dataset(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether `uri` is a dataset folder (it holds dataset.json), not an embeddings file."""
    if str(uri).lower().endswith(EMBEDDING_FILE_SUFFIXES):
        return False
    try:
        fs, root = layout.open_dataset_fs(str(uri), storage_options)
        return bool(fs.isfile(layout.join(root, layout.DATASET_JSON)))
    except (OSError, ValueError):
        return False


def read_identity_embeddings(
    uri: str, storage_options: dict[str, Any] | None = None, setting: str = "gallery"
) -> tuple[np.ndarray, list[str], str]:
    """(N x 512 unit float32 rows, identity ids, sha256 of identities.parquet) of the
    dataset at `uri`; DatasetCorrupt when the file does not match dataset.json."""
    reader = DatasetReader(uri, storage_options)
    info = reader.info()
    if not reader.has_identities() or info.identities_sha256 is None:
        raise DatasetNotFound(
            f"dataset {uri} ({setting}) has no finished identities.parquet: finish its "
            "generate or import first"
        )
    digest = hashlib.sha256()
    with reader.open(layout.IDENTITIES) as handle:
        for chunk in iter(lambda: handle.read(1 << 23), b""):
            digest.update(chunk)
    if digest.hexdigest() != info.identities_sha256:
        raise DatasetCorrupt(
            f"identities.parquet of {uri} ({setting}) does not match the sha256 in its "
            f"dataset.json: run `arc2face-synth audit {uri}`; the dataset is damaged"
        )
    try:
        with reader.open(layout.IDENTITIES) as handle:
            table = pq.read_table(handle, columns=["identity_id", "embedding"])
        matrix = vector_matrix(table.column("embedding"), EMBEDDING_DIM)
    except (pa.ArrowException, OSError, ValueError, KeyError) as error:
        raise DatasetCorrupt(
            f"identities.parquet of {uri} ({setting}) does not read ({first_line(error)}): "
            f"run `arc2face-synth audit {uri}`"
        ) from None
    if not len(matrix):
        raise DatasetCorrupt(f"dataset {uri} ({setting}) holds no identities: use another gallery")
    if not np.isfinite(matrix).all() or (np.linalg.norm(matrix, axis=1) == 0).any():
        raise DatasetCorrupt(
            f"identities.parquet of {uri} ({setting}) holds a NaN or zero embedding: "
            f"run `arc2face-synth audit {uri}`"
        )
    return l2_normalize(matrix).astype(np.float32), table.column("identity_id").to_pylist(), digest.hexdigest()
