"""Leakage: how close each identity centre comes to a gallery of real-person embeddings."""

from __future__ import annotations

import io
from collections.abc import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from arc2face_engine.audit.identities import Identities, normalise_rows
from arc2face_engine.audit.report import AuditError, LeakageSection, LeakFlag
from arc2face_engine.dataset.gallery import is_dataset, read_identity_embeddings
from schemas.errors import UserError
from schemas.tables import EMBEDDING_DIM

Block = tuple[np.ndarray, "list[str] | None"]


def _open_gallery(gallery: str, storage_options: dict | None) -> pq.ParquetFile:
    fs, path = fsspec.core.url_to_fs(str(gallery), **(storage_options or {}))
    try:
        parquet = pq.ParquetFile(fs.open(path, "rb"))
    except FileNotFoundError:
        raise AuditError(
            f"gallery {gallery} not found: pass a Parquet file of embeddings"
        ) from None
    except (pa.ArrowException, OSError) as error:
        raise AuditError(
            f"gallery {gallery} is not a readable Parquet file ({error}): fix the path"
        ) from None
    if "embedding" not in parquet.schema_arrow.names:
        raise AuditError(
            f"gallery {gallery} has no 'embedding' column: write one list<float32> column of 512 values"
        )
    return parquet


def gallery_readable(gallery: str, storage_options: dict | None = None) -> bool:
    """Whether `gallery` can be opened here (the spec's gallery may live on another machine)."""
    if is_dataset(gallery, storage_options):
        return True
    try:
        fs, path = fsspec.core.url_to_fs(str(gallery), **(storage_options or {}))
        return bool(fs.isfile(path))
    except (OSError, ValueError, ImportError):
        return False


def _npy_blocks(gallery: str, storage_options: dict | None, rows: int) -> Iterator[Block]:
    """An N x 512 .npy, memory-mapped when local (never unpickled)."""
    fs, path = fsspec.core.url_to_fs(str(gallery), **(storage_options or {}))
    try:
        if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            matrix = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            matrix = np.load(io.BytesIO(fs.cat_file(path)), allow_pickle=False)
    except FileNotFoundError:
        raise AuditError(f"gallery {gallery} not found: pass a .parquet or .npy of embeddings") from None
    except (OSError, ValueError) as error:
        raise AuditError(f"gallery {gallery} is not a readable .npy ({error}): fix the path") from None
    if matrix.ndim != 2 or matrix.shape[1] != EMBEDDING_DIM or matrix.dtype.kind != "f":
        raise AuditError(
            f"gallery {gallery} is {matrix.dtype} {matrix.shape}, not N x {EMBEDDING_DIM} floats: "
            "use ArcFace embeddings"
        )
    for start in range(0, len(matrix), rows):
        yield np.asarray(matrix[start : start + rows], np.float32), None


def _parquet_blocks(gallery: str, storage_options: dict | None, rows: int) -> Iterator[Block]:
    parquet = _open_gallery(gallery, storage_options)
    columns = ["embedding"] + (["id"] if "id" in parquet.schema_arrow.names else [])
    for batch in parquet.iter_batches(batch_size=rows, columns=columns):
        column = batch.column("embedding")
        if column.null_count:
            raise AuditError(f"gallery {gallery} has null embeddings: drop those rows")
        flat = column.flatten().to_numpy(zero_copy_only=False)
        if len(flat) != batch.num_rows * EMBEDDING_DIM:
            raise AuditError(
                f"gallery {gallery} embeddings are not {EMBEDDING_DIM}-d: use ArcFace embeddings"
            )
        names = batch.column("id").cast(pa.string()).to_pylist() if "id" in columns else None
        yield np.asarray(flat, np.float32).reshape(-1, EMBEDDING_DIM), names


def _dataset_blocks(gallery: str, storage_options: dict | None, rows: int) -> Iterator[Block]:
    """A dataset folder's identities (checked against its dataset.json), ids included."""
    try:
        matrix, ids, _ = read_identity_embeddings(gallery, storage_options, "--gallery")
    except UserError as error:
        raise AuditError(str(error)) from None
    for start in range(0, len(matrix), rows):
        yield matrix[start : start + rows], ids[start : start + rows]


def _gallery_blocks(gallery: str, storage_options: dict | None, rows: int) -> Iterator[Block]:
    """(embeddings, ids or None) blocks of a .parquet (`embedding`, optional `id`), a .npy,
    or a dataset folder (its identities)."""
    if is_dataset(gallery, storage_options):
        return _dataset_blocks(gallery, storage_options, rows)
    if str(gallery).lower().endswith(".npy"):
        return _npy_blocks(gallery, storage_options, rows)
    return _parquet_blocks(gallery, storage_options, rows)


def check_leakage(
    centres: np.ndarray,
    has_centre: np.ndarray,
    identities: Identities,
    gallery: str,
    threshold: float,
    storage_options: dict | None = None,
    gallery_rows: int = 4096,
    centre_rows: int = 8192,
) -> LeakageSection:
    """Max cosine of each identity centre to a gallery of real-person embeddings (chunked)."""
    best = np.full(len(centres), -np.inf, np.float32)
    best_id = np.full(len(centres), "", dtype=object)
    seen = 0
    for embeddings, names in _gallery_blocks(gallery, storage_options, gallery_rows):
        embeddings = normalise_rows(embeddings)
        for start in range(0, len(centres), centre_rows):
            sims = centres[start : start + centre_rows] @ embeddings.T
            arg = sims.argmax(axis=1)
            top = sims[np.arange(len(arg)), arg]
            better = top > best[start : start + len(arg)]
            rows = np.flatnonzero(better) + start
            best[rows] = top[better]
            best_id[rows] = [names[i] if names else str(seen + i) for i in arg[better].tolist()]
        seen += len(embeddings)
    section = LeakageSection(gallery=str(gallery), threshold=threshold, gallery_size=seen)
    scored = has_centre & np.isfinite(best)
    if scored.any():
        section.max_cosine = float(best[scored].max())
    for row in np.flatnonzero(scored & (best > threshold)):
        section.flagged.append(
            LeakFlag(
                identity_id=identities.ids[int(row)].as_py(),
                cosine=float(best[row]),
                gallery_id=str(best_id[row]),
            )
        )
    section.flagged.sort(key=lambda flag: -flag.cosine)
    return section
