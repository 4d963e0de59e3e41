"""Identity sources: random points on the ArcFace sphere, an embedding file, or photos.

Every source returns a pyarrow Table with `schemas.tables.IDENTITIES_SCHEMA`:
identity_id `id-000000`, label 0..N-1, an L2-normalised float32 embedding, the
source name and a provenance string that says where each row came from.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from PIL import Image, ImageOps

from schemas.errors import EmbeddingFileError, SpecError
from schemas.tables import (
    EMBEDDING_DIM,
    IDENTITIES_SCHEMA,
    IDENTITY_ATTRIBUTE_COLUMNS,
    SAFE_ID_RULE,
    is_safe_id,
    l2_normalize,
    vector_matrix,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Mixed into the job seed so identity draws never coincide with other uses of the same seed.
IDENTITY_STREAM = 0x1DE7
# Candidates drawn per block, and accepted rows compared per matmul: bounds the temporary
# similarity matrix to BLOCK x ACCEPTED_CHUNK float32 (32 MiB) however many identities exist.
BLOCK = 1024
ACCEPTED_CHUNK = 8192
# Gallery rows validated and normalised per block while a gallery file is read.
GALLERY_BLOCK = 65_536

Projector = Callable[[np.ndarray], "np.ndarray | None"]
# Exclusion filter: (n, 512) candidates -> (n,) bool mask of those allowed.
Allowed = Callable[[np.ndarray], np.ndarray]


def identity_id(index: int) -> str:
    return f"id-{index:06d}"


def identity_ids(count: int) -> list[str]:
    return [identity_id(index) for index in range(count)]


def build_identities_table(
    embeddings: np.ndarray,
    source: str,
    provenance: Sequence[str],
    ids: Sequence[str] | None = None,
) -> pa.Table:
    """An IDENTITIES_SCHEMA table from (N, 512) unit rows; labels are 0..N-1 in row order.
    The attribute columns stay null (filled from probes or at finalize)."""
    count = len(embeddings)
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).ravel(), pa.float32())
    columns = [
        pa.array(list(ids) if ids is not None else identity_ids(count), pa.string()),
        pa.array(np.arange(count, dtype=np.int32)),
        pa.FixedSizeListArray.from_arrays(flat, EMBEDDING_DIM),
        pa.array([source] * count, pa.string()),
        pa.array(list(provenance), pa.string()),
    ]
    columns += [
        pa.nulls(count, IDENTITIES_SCHEMA.field(name).type) for name in IDENTITY_ATTRIBUTE_COLUMNS
    ]
    return pa.Table.from_arrays(columns, schema=IDENTITIES_SCHEMA)


# --- random -----------------------------------------------------------------------------------


def _unit_rows(rng: np.random.Generator, count: int) -> np.ndarray:
    """Uniform on the unit sphere: normalised isotropic Gaussians."""
    return l2_normalize(rng.standard_normal((count, EMBEDDING_DIM)), axis=1).astype(np.float32)


def _max_cosine(candidates: np.ndarray, accepted: np.ndarray) -> np.ndarray:
    """For each candidate, its largest cosine to any accepted row (-inf if none), chunked."""
    best = np.full(len(candidates), -np.inf, dtype=np.float32)
    for start in range(0, len(accepted), ACCEPTED_CHUNK):
        similarities = candidates @ accepted[start : start + ACCEPTED_CHUNK].T
        np.maximum(best, similarities.max(axis=1), out=best)
    return best


def _greedy_within(block: np.ndarray, separation: float) -> np.ndarray:
    """Keep mask: candidate j survives unless it conflicts with an earlier survivor.

    Same result as accepting candidates one at a time; only the rare conflicting
    columns need the sequential pass.
    """
    conflicts = np.triu(block @ block.T > separation, k=1)
    keep = np.ones(len(block), dtype=bool)
    for column in np.flatnonzero(conflicts.any(axis=0)):
        if (conflicts[:column, column] & keep[:column]).any():
            keep[column] = False
    return keep


def _separation_error(count: int, accepted: int, drawn: int, separation: float) -> SpecError:
    return SpecError(
        f"identities.separation {separation:g} cannot be met: {accepted} of {count} identities "
        f"accepted after {drawn} candidates: lower identities.count or raise identities.separation"
    )


def sample_random(
    count: int,
    separation: float,
    seed: int,
    project: Projector | None = None,
    max_candidates: int | None = None,
    allowed: Allowed | None = None,
) -> pa.Table:
    """`count` unit vectors whose pairwise cosine is at most `separation`.

    Candidates are drawn in a fixed order from the seed; a candidate is kept when
    its cosine to every identity kept so far is <= separation (greedy, so the
    result does not depend on block sizes). With `project`, each candidate is
    replaced by `project(candidate)` (e.g. generate a probe image and re-embed
    it) before the check, and dropped when that returns None. With `allowed`
    (the exclusion filter), candidates it refuses are dropped before the check.
    Raises SpecError when `max_candidates` (default max(1000, 10 * count)) run out.
    """
    if count <= 0:
        raise ValueError(f"count must be > 0, got {count}")
    budget = max_candidates if max_candidates is not None else max(1000, 10 * count)
    rng = np.random.default_rng([seed, IDENTITY_STREAM])
    allowed = allowed or _allow_all
    if project is None:
        embeddings, kept = _sample_blocks(rng, count, separation, budget, allowed)
        label = "candidate"
    else:
        embeddings, kept = _sample_projected(rng, count, separation, budget, project, allowed)
        label = "projected candidate"
    provenance = [f"random seed={seed} {label}={index}" for index in kept]
    return build_identities_table(embeddings, "random", provenance)


def _allow_all(candidates: np.ndarray) -> np.ndarray:
    return np.ones(len(candidates), dtype=bool)


def _sample_blocks(
    rng: np.random.Generator, count: int, separation: float, budget: int, allowed: Allowed
) -> tuple[np.ndarray, list[int]]:
    accepted = np.empty((count, EMBEDDING_DIM), dtype=np.float32)
    kept: list[int] = []
    drawn = 0
    while len(kept) < count and drawn < budget:
        block = _unit_rows(rng, min(BLOCK, budget - drawn))
        survivors = np.flatnonzero(
            allowed(block) & (_max_cosine(block, accepted[: len(kept)]) <= separation)
        )
        survivors = survivors[_greedy_within(block[survivors], separation)]
        survivors = survivors[: count - len(kept)]
        accepted[len(kept) : len(kept) + len(survivors)] = block[survivors]
        kept.extend(int(drawn + index) for index in survivors)
        drawn += len(block)
    if len(kept) < count:
        raise _separation_error(count, len(kept), drawn, separation)
    return accepted, kept


def _sample_projected(
    rng: np.random.Generator,
    count: int,
    separation: float,
    budget: int,
    project: Projector,
    allowed: Allowed,
) -> tuple[np.ndarray, list[int]]:
    accepted = np.empty((count, EMBEDDING_DIM), dtype=np.float32)
    kept: list[int] = []
    for candidate_index in range(budget):
        if len(kept) == count:
            break
        # One candidate per draw: the same stream of candidates as the unprojected sampler.
        projected = project(_unit_rows(rng, 1)[0])
        if projected is None:
            continue
        vector = _unit_vector(projected)
        if not allowed(vector[None])[0]:
            continue
        if _max_cosine(vector[None], accepted[: len(kept)])[0] <= separation:
            accepted[len(kept)] = vector
            kept.append(candidate_index)
    if len(kept) < count:
        raise _separation_error(count, len(kept), budget, separation)
    return accepted, kept


def random_candidates(seed: int) -> Iterator[np.ndarray]:
    """The random source's candidates one at a time: the stream `sample_random` draws
    from (balanced sampling visits it candidate by candidate)."""
    rng = np.random.default_rng([seed, IDENTITY_STREAM])
    while True:
        yield _unit_rows(rng, 1)[0]


def _unit_vector(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    if vector.shape != (EMBEDDING_DIM,) or not np.isfinite(norm) or norm == 0:
        raise ValueError(
            f"projection returned a vector of shape {vector.shape} and norm {norm}; "
            f"expected a finite non-zero ({EMBEDDING_DIM},) embedding or None"
        )
    return vector / norm


# --- embedding files --------------------------------------------------------------------------


def _suffix(uri: str) -> str:
    name = str(uri).rsplit("/", 1)[-1].lower()
    return name[name.rfind(".") :] if "." in name else ""


def _open_embedding_file(
    uri: str, storage_options: dict[str, Any] | None, setting: str = "identities.path"
) -> BinaryIO:
    if _suffix(uri) not in (".parquet", ".npy"):
        raise EmbeddingFileError(
            f"embedding file {uri} ({setting}) has an unsupported extension: "
            "use a .parquet or .npy file"
        )
    fs, path = fsspec.core.url_to_fs(str(uri), **(storage_options or {}))
    try:
        return fs.open(path, "rb")
    except FileNotFoundError:
        raise EmbeddingFileError(f"embedding file {uri} not found: check {setting}") from None


def _npy_header(handle: BinaryIO, uri: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype); shape () for header versions we leave to np.load."""
    try:
        version = np.lib.format.read_magic(handle)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            return (), False, np.dtype("float32")
        shape, fortran_order, dtype = read_header(handle)
    except ValueError as error:
        raise EmbeddingFileError(
            f"embedding file {uri} is not a valid .npy file ({error}): save it with numpy.save"
        ) from None
    return shape, fortran_order, dtype


def _check_shape(shape: tuple[int, ...], uri: str) -> None:
    if len(shape) != 2 or shape[1] != EMBEDDING_DIM:
        raise EmbeddingFileError(
            f"embedding file {uri} has shape {tuple(shape)}, expected (N, {EMBEDDING_DIM}): "
            f"save one {EMBEDDING_DIM}-d ArcFace embedding per row"
        )
    if shape[0] == 0:
        raise EmbeddingFileError(f"embedding file {uri} holds no rows: add embeddings")


def _check_float(dtype: np.dtype, uri: str) -> None:
    if dtype.kind != "f":
        raise EmbeddingFileError(
            f"embedding file {uri} holds {dtype} values, not floats: save float32 embeddings"
        )


def _read_npy(handle: BinaryIO, uri: str, limit: int | None) -> np.ndarray:
    shape, fortran_order, dtype = _npy_header(handle, uri)
    if shape and limit is not None and not fortran_order:
        # Read only the rows asked for: a 200k x 512 file need not be loaded to take 100.
        _check_float(dtype, uri)
        _check_shape(shape, uri)
        rows = min(limit, shape[0])
        data = handle.read(rows * EMBEDDING_DIM * dtype.itemsize)
        if len(data) < rows * EMBEDDING_DIM * dtype.itemsize:
            raise EmbeddingFileError(f"embedding file {uri} is truncated: write it again")
        return np.frombuffer(data, dtype=dtype).reshape(rows, EMBEDDING_DIM)
    handle.seek(0)
    try:
        array = np.load(handle, allow_pickle=False)
    except ValueError as error:
        raise EmbeddingFileError(
            f"embedding file {uri} cannot be read as a numeric array ({error}): "
            "save a float32 N x 512 array with numpy.save"
        ) from None
    _check_float(array.dtype, uri)
    _check_shape(array.shape, uri)
    return array[:limit] if limit is not None else array


def _parquet_embeddings(column: pa.ChunkedArray, uri: str, first_row: int = 0) -> np.ndarray:
    array = column.combine_chunks()
    kind = array.type
    if not (
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    ) or not pa.types.is_floating(kind.value_type):
        raise EmbeddingFileError(
            f"embedding file {uri} column 'embedding' has type {kind}: store list<float32> "
            f"of {EMBEDDING_DIM} values"
        )
    if array.null_count:
        row = first_row + pc.index(array.is_null(), True).as_py()
        raise EmbeddingFileError(
            f"embedding file {uri} row {row} has no embedding: remove or fill that row"
        )
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    wrong = np.flatnonzero(lengths != EMBEDDING_DIM)
    if len(wrong) and (lengths == lengths[0]).all():
        _check_shape((len(array), int(lengths[0])), uri)
    if len(wrong):
        row = int(wrong[0])
        raise EmbeddingFileError(
            f"embedding file {uri} row {first_row + row} has {lengths[row]} values, expected "
            f"{EMBEDDING_DIM}: save one {EMBEDDING_DIM}-d ArcFace embedding per row"
        )
    return vector_matrix(array, EMBEDDING_DIM)


def _parquet_ids(column: pa.ChunkedArray, uri: str) -> list[str]:
    ids = pc.cast(column, pa.string()).to_pylist()
    if None in ids:
        raise EmbeddingFileError(
            f"embedding file {uri} row {ids.index(None)} has no identity_id: fill it or drop the column"
        )
    seen: set[str] = set()
    for row, value in enumerate(ids):
        if not is_safe_id(value):
            shown = value if len(value) <= 40 else value[:37] + "..."
            raise EmbeddingFileError(
                f"embedding file {uri} row {row} has identity_id {shown!r}, which cannot name "
                f"image files: use {SAFE_ID_RULE}"
            )
        if value in seen:
            raise EmbeddingFileError(
                f"embedding file {uri} repeats identity_id {value!r} at row {row}: make ids unique"
            )
        seen.add(value)
    return ids


def _parquet_file(handle: BinaryIO, uri: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(handle)
    except pa.ArrowInvalid as error:
        raise EmbeddingFileError(
            f"embedding file {uri} is not a valid Parquet file ({error}): rewrite it"
        ) from None


def _embedding_parquet(handle: BinaryIO, uri: str) -> pq.ParquetFile:
    """The open Parquet file, refused in one line unless it has an 'embedding' column."""
    parquet = _parquet_file(handle, uri)
    names = parquet.schema_arrow.names
    if "embedding" not in names:
        raise EmbeddingFileError(
            f"embedding file {uri} has no 'embedding' column (found {names}): "
            f"name the {EMBEDDING_DIM}-value list column 'embedding'"
        )
    return parquet


def _read_parquet(
    handle: BinaryIO, uri: str, limit: int | None
) -> tuple[np.ndarray, list[str] | None]:
    parquet = _embedding_parquet(handle, uri)
    names = parquet.schema_arrow.names
    columns = ["embedding"] + (["identity_id"] if "identity_id" in names else [])
    batches, rows = [], 0
    for batch in parquet.iter_batches(columns=columns, batch_size=65_536):
        batches.append(batch)
        rows += batch.num_rows
        if limit is not None and rows >= limit:
            break
    table = pa.Table.from_batches(
        batches, schema=pa.schema([parquet.schema_arrow.field(name) for name in columns])
    ).slice(0, limit)
    if table.num_rows == 0:
        raise EmbeddingFileError(f"embedding file {uri} holds no rows: add embeddings")
    embeddings = _parquet_embeddings(table.column("embedding"), uri)
    ids = _parquet_ids(table.column("identity_id"), uri) if "identity_id" in columns else None
    return embeddings, ids


def _normalised_rows(embeddings: np.ndarray, uri: str, first_row: int = 0) -> np.ndarray:
    """Unit rows, refusing NaN/inf and all-zero rows with the first bad row's index."""
    rows = np.asarray(embeddings, dtype=np.float32)
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        row = first_row + int(np.argmin(finite))
        raise EmbeddingFileError(
            f"embedding file {uri} row {row} holds NaN or inf: fix or remove that row"
        )
    norms = np.linalg.norm(rows, axis=1)
    if (norms == 0).any():
        row = first_row + int(np.argmax(norms == 0))
        raise EmbeddingFileError(
            f"embedding file {uri} row {row} is all zeros: fix or remove that row"
        )
    return rows / norms[:, None]


def embedding_file_rows(uri: str, storage_options: dict[str, Any] | None = None) -> int:
    """How many embeddings a file holds, from its header only (for planning)."""
    with _open_embedding_file(uri, storage_options) as handle:
        if _suffix(uri) == ".npy":
            shape = _npy_header(handle, uri)[0]
            if not shape:  # a header version we do not parse: read the file
                handle.seek(0)
                shape = np.load(handle, allow_pickle=False).shape
            _check_shape(shape, uri)
            return int(shape[0])
        return _parquet_file(handle, uri).metadata.num_rows


def load_embedding_file(
    uri: str, storage_options: dict[str, Any] | None = None, limit: int | None = None
) -> pa.Table:
    """Identities from a .npy (N x 512) or .parquet (column 'embedding', optional 'identity_id')."""
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be > 0, got {limit}")
    with _open_embedding_file(uri, storage_options) as handle:
        if _suffix(uri) == ".npy":
            embeddings, ids = _read_npy(handle, uri, limit), None
        else:
            embeddings, ids = _read_parquet(handle, uri, limit)
    embeddings = _normalised_rows(embeddings, uri)
    provenance = [f"file {uri} row {row}" for row in range(len(embeddings))]
    return build_identities_table(embeddings, "file", provenance, ids)


def read_embedding_matrix(
    uri: str, storage_options: dict[str, Any] | None = None, setting: str = "identities.path"
) -> tuple[np.ndarray, str]:
    """(N x 512 unit float32 rows, sha256 of the file's bytes) of a gallery file.

    Streamed: rows are read in blocks into one preallocated matrix, so a million-row
    gallery needs its 2 GB once, not a table and a copy on top. `setting` names the spec
    field in error messages.
    """
    with _open_embedding_file(uri, storage_options, setting) as handle:
        digest = _sha256(handle)
        handle.seek(0)
        if _suffix(uri) == ".npy":
            return _read_npy_matrix(handle, uri), digest
        return _read_parquet_matrix(handle, uri), digest


def _sha256(handle: BinaryIO) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(1 << 23), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _read_npy_matrix(handle: BinaryIO, uri: str) -> np.ndarray:
    shape, fortran_order, dtype = _npy_header(handle, uri)
    if not shape or fortran_order:  # rare layouts: let numpy read the whole array
        handle.seek(0)
        return _normalised_rows(_read_npy(handle, uri, None), uri)
    _check_float(dtype, uri)
    _check_shape(shape, uri)
    matrix = np.empty(shape, dtype=np.float32)
    for start in range(0, shape[0], GALLERY_BLOCK):
        rows = min(GALLERY_BLOCK, shape[0] - start)
        data = handle.read(rows * EMBEDDING_DIM * dtype.itemsize)
        if len(data) < rows * EMBEDDING_DIM * dtype.itemsize:
            raise EmbeddingFileError(f"embedding file {uri} is truncated: write it again")
        block = np.frombuffer(data, dtype=dtype).reshape(rows, EMBEDDING_DIM)
        matrix[start : start + rows] = _normalised_rows(block, uri, start)
    return matrix


def _read_parquet_matrix(handle: BinaryIO, uri: str) -> np.ndarray:
    parquet = _embedding_parquet(handle, uri)
    total = parquet.metadata.num_rows
    if total == 0:
        raise EmbeddingFileError(f"embedding file {uri} holds no rows: add embeddings")
    matrix = np.empty((total, EMBEDDING_DIM), dtype=np.float32)
    start = 0
    for batch in parquet.iter_batches(columns=["embedding"], batch_size=GALLERY_BLOCK):
        block = _parquet_embeddings(pa.chunked_array([batch.column(0)]), uri, start)
        matrix[start : start + len(block)] = _normalised_rows(block, uri, start)
        start += len(block)
    return matrix


# --- photos -----------------------------------------------------------------------------------


def list_image_files(
    uri: str, storage_options: dict[str, Any] | None = None
) -> tuple[AbstractFileSystem, str, list[str]]:
    """(fs, root, sorted image paths under root) for a folder or object-store prefix."""
    fs, root = fsspec.core.url_to_fs(str(uri), **(storage_options or {}))
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise SpecError(f"image folder {uri} not found: set identities.path to a folder of photos")
    files = sorted(path for path in fs.find(root) if path.lower().endswith(IMAGE_SUFFIXES))
    return fs, root, files


def _decode_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        upright = ImageOps.exif_transpose(image)  # phone photos store rotation in EXIF
        return np.asarray(upright.convert("RGB"))


def embed_image_folder(
    uri: str,
    analyzer: Any,
    storage_options: dict[str, Any] | None = None,
    limit: int | None = None,
) -> tuple[pa.Table, list[tuple[str, str]]]:
    """One identity per photo (its largest face), in sorted path order.

    `analyzer.embed_largest_face(rgb)` returns a record whose `.embedding` is None
    when there is no face. Returns the table and (relative path, reason) of every
    skipped file. Stops once `limit` identities were kept.
    """
    fs, root, files = list_image_files(uri, storage_options)
    if not files:
        raise SpecError(
            f"no .jpg/.jpeg/.png/.webp files under {uri}: set identities.path to a folder of photos"
        )
    embeddings: list[np.ndarray] = []
    provenance: list[str] = []
    skipped: list[tuple[str, str]] = []
    for path in files:
        if limit is not None and len(embeddings) >= limit:
            break
        relative = path[len(root) :].lstrip("/")
        try:
            image = _decode_rgb(fs.cat_file(path))
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            skipped.append((relative, f"cannot decode: {error}"))
            continue
        record = analyzer.embed_largest_face(image)
        embedding = None if record is None else record.embedding
        if embedding is None:
            skipped.append((relative, "no face detected"))
            continue
        embeddings.append(np.asarray(embedding, dtype=np.float32).reshape(-1))
        provenance.append(f"image {relative}")
    if not embeddings:
        raise SpecError(
            f"no face found in any of the {len(skipped)} photos under {uri}: "
            "check identities.path holds face photos"
        )
    table = build_identities_table(
        _normalised_rows(np.stack(embeddings), uri), "images", provenance
    )
    return table, skipped
