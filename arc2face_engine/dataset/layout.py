"""Where each file of a dataset lives, relative to the dataset root.

```
dataset.json
identities.parquet
manifest/part-00000.parquet   one per committed shard (its presence is the commit)
manifest/part-00000.parquet.sha256   its checksum, written just before it
images/00000/<image_id>.jpg
probes/manifest.parquet, probes/<identity_id>.jpg   balanced jobs: the placing probes
README.md
audit/report.json, audit/report.html
.writer-lease.json            who is writing the dataset now (see lease.py)
.attempts/00000               which attempt at a shard may write it (see attempt.py)
damaged/<UTC time>/manifest/..., images/...   shards set aside by `generate --redo-damaged`
```

Paths here are POSIX and relative; `join` anchors them under the root that
`open_dataset_fs` returns, for local folders and object stores alike.
"""

from __future__ import annotations

import errno
import re
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from schemas.errors import OutputError, UserError

DATASET_JSON = "dataset.json"
IDENTITIES = "identities.parquet"
README = "README.md"
MANIFEST_DIR = "manifest"
IMAGES_DIR = "images"
AUDIT_DIR = "audit"
AUDIT_REPORT_JSON = f"{AUDIT_DIR}/report.json"
AUDIT_REPORT_HTML = f"{AUDIT_DIR}/report.html"
LEASE_FILE = ".writer-lease.json"
ATTEMPTS_DIR = ".attempts"
PROBES_DIR = "probes"
PROBES_MANIFEST = f"{PROBES_DIR}/manifest.parquet"
CHECKSUM_SUFFIX = ".sha256"
DAMAGED_DIR = "damaged"

_PART_NAME = re.compile(r"^part-(\d{5,})\.parquet$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
def shard_name(shard: int) -> str:
    if shard < 0:
        raise ValueError(f"shard must be >= 0, got {shard}")
    return f"{shard:05d}"


def manifest_part(shard: int) -> str:
    return f"{MANIFEST_DIR}/part-{shard_name(shard)}.parquet"


def part_checksum_path(shard: int) -> str:
    """The sidecar holding the hex sha256 of the committed part's bytes."""
    return manifest_part(shard) + CHECKSUM_SUFFIX


def checksum_path_of(part: str) -> str:
    """The sidecar of a part given by its relative path."""
    return part + CHECKSUM_SUFFIX


def damaged_dir(stamp: str) -> str:
    """Where `generate --redo-damaged` moves damaged shards aside (`stamp`: UTC time)."""
    if not _SAFE_NAME.match(stamp):
        raise ValueError(f"unsafe folder name {stamp!r}")
    return f"{DAMAGED_DIR}/{stamp}"


def identities_per_shard(images_per_identity: int, shard_size: int) -> int:
    """Whole identities per shard: `shard_size // images_per_identity`, at least one."""
    return max(1, shard_size // images_per_identity)


def shard_count(n_identities: int, images_per_identity: int, shard_size: int) -> int:
    """How many shards a dataset of `n_identities` has (the last may hold fewer)."""
    return -(-n_identities // identities_per_shard(images_per_identity, shard_size))


def shard_of_part(name: str) -> int | None:
    """The shard of a committed part's file name (or path); None for anything else."""
    match = _PART_NAME.match(name.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def attempt_claim(shard: int) -> str:
    """The claim of the attempt that may write `shard` now (dataset/attempt.py)."""
    return f"{ATTEMPTS_DIR}/{shard_name(shard)}"


def image_dir(shard: int) -> str:
    return f"{IMAGES_DIR}/{shard_name(shard)}"


def image_path(shard: int, image_id: str, ext: str) -> str:
    ext = ext.lstrip(".")
    if not _SAFE_NAME.match(image_id) or not _SAFE_NAME.match(ext):
        raise ValueError(f"unsafe image file name {image_id!r}.{ext!r}")
    return f"{image_dir(shard)}/{image_id}.{ext}"


def join(root: str, relative: str) -> str:
    """`root/relative`, refusing paths that would escape the dataset root."""
    parts = relative.split("/")
    if relative.startswith("/") or ".." in parts or "" in parts:
        raise ValueError(f"not a relative dataset path: {relative!r}")
    return f"{root.rstrip('/')}/{relative}" if root else relative


def open_dataset_fs(
    uri: str, storage_options: dict[str, Any] | None = None
) -> tuple[AbstractFileSystem, str]:
    """(filesystem, root path without protocol) for a local folder or fsspec URI."""
    try:
        fs, root = fsspec.core.url_to_fs(str(uri), **(storage_options or {}))
    except ImportError as error:  # a known protocol whose package is not installed
        raise UserError(
            f"cannot open {uri}: {str(error).splitlines()[0]}: install that package"
        ) from None
    except ValueError as error:  # "Protocol not known: foo"
        raise UserError(
            f"cannot open {uri} ({str(error).splitlines()[0]}): use a local path or a URI "
            f"whose protocol fsspec knows (s3://, gs://, az://, ...)"
        ) from None
    return fs, root.rstrip("/")


def is_local(fs: AbstractFileSystem) -> bool:
    """Local disks need temp-file + rename for atomic writes; object-store PUTs are atomic."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


# errno -> (what happened, what to do): write failures a user fixes, not bugs.
_WRITE_FAILURES = {
    errno.ENOSPC: ("no space left on the device", "free space or choose another output.uri"),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose another output.uri"),
    errno.EROFS: ("the filesystem is read-only", "choose a writable output.uri"),
    errno.EACCES: ("permission denied", "choose an output.uri you may write to"),
    errno.EPERM: ("operation not permitted", "choose an output.uri you may write to"),
    errno.ENOTDIR: ("a parent of it is a file", "choose an output.uri under a folder"),
    errno.EEXIST: ("a file is in the way", "choose an output.uri under a folder"),
    errno.EISDIR: ("a folder is in the way", "choose another output.uri"),
    errno.EFBIG: ("the file is too large for the filesystem", "choose another output.uri"),
}


def write_failure(uri: str, path: str, error: OSError) -> UserError | None:
    """A one-line UserError for a write to `path` (under dataset `uri`) that failed for a
    reason the user fixes (full, read-only, not permitted, path through a file); None for
    anything else. Nothing committed is touched by a failed write: commits are atomic."""
    known = _WRITE_FAILURES.get(error.errno) if error.errno is not None else None
    if known is None and isinstance(error, PermissionError):
        known = _WRITE_FAILURES[errno.EACCES]
    if known is None:
        return None
    problem, fix = known
    return OutputError(
        f"cannot write {path} in output {uri}: {problem}: {fix}, then re-run "
        "(committed shards are kept)"
    )


# The store did not answer (after its client's own retries), which says nothing about
# the request: s3fs raises OSError(EBUSY) for 503 SlowDown / ServiceUnavailable and
# EREMOTEIO for 500; dropped or timed-out connections come as botocore's or aiohttp's
# exceptions (or OSError ECONNRESET / ETIMEDOUT) as they are.
_UNAVAILABLE_ERRNOS = {
    errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
    errno.EAGAIN, getattr(errno, "EREMOTEIO", errno.EIO),
}  # fmt: skip
_UNAVAILABLE_TYPES = {
    "HTTPClientError", "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
    "ConnectTimeoutError", "ClientConnectionError", "ServerDisconnectedError", "TimeoutError",
}  # fmt: skip


def store_unavailable(error: BaseException | None) -> bool:
    """Whether `error` (or what caused it) is the storage not answering: an outage a
    re-run outlives, not a problem with the output or the data."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _UNAVAILABLE_ERRNOS:
            return True
        if any(cls.__name__ in _UNAVAILABLE_TYPES for cls in type(error).__mro__):
            return True
        error = error.__cause__ or error.__context__
    return False
