"""identities.parquet as arrays, shared by the integrity, quality and leakage checks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from arc2face_engine.dataset.reader import DatasetReader
from schemas.tables import EMBEDDING_DIM, l2_normalize, vector_matrix


@dataclass
class Identities:
    """identities.parquet as arrays: ids (arrow, for index_in), labels, embeddings."""

    ids: pa.Array
    labels: np.ndarray
    embeddings: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def index_of(self, identity_ids: pa.Array) -> np.ndarray:
        """Row index in identities.parquet of each id; -1 for unknown ids."""
        index = pc.index_in(identity_ids, value_set=self.ids)
        return index.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    return l2_normalize(matrix, axis=1)


def load_identities(reader: DatasetReader) -> Identities:
    table = reader.identities()
    return Identities(
        ids=table.column("identity_id").combine_chunks(),
        labels=table.column("label").to_numpy(),
        embeddings=normalise_rows(vector_matrix(table.column("embedding"), EMBEDDING_DIM)),
    )
