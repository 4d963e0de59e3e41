"""Dask worker preload: this worker's disk can fill up, and be freed, while it runs.

`dask worker --preload tests/disk_full_preload.py` with ARC2FACE_TEST_DISK_FILE=PATH in
the worker's environment. While PATH does not exist, writes go through. Once a harness
writes a number N into it, this worker's next N file writes through fsspec (S3 PUTs or
local writes) succeed and every later one raises OSError(ENOSPC), as a full disk does;
removing the file frees the disk again. The other workers are unaffected.
"""

from __future__ import annotations

import errno
import os
import threading

import s3fs
from fsspec.implementations.local import LocalFileSystem

CONTROL_ENV = "ARC2FACE_TEST_DISK_FILE"
_lock = threading.Lock()
_state = {"key": None, "writes": 0}


def _full() -> bool:
    """Whether this write finds the disk full (counting writes since the file changed)."""
    path = os.environ.get(CONTROL_ENV, "")
    try:
        with open(path) as handle:
            allowed = int(handle.read().strip() or 0)
        key = (os.stat(path).st_mtime_ns, allowed)
    except (FileNotFoundError, ValueError):
        return False
    with _lock:
        if _state["key"] != key:
            _state["key"], _state["writes"] = key, 0
        _state["writes"] += 1
        return _state["writes"] > allowed


def _disk_full(path: str) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device (injected)", path)


# The originals, kept on the classes: Dask may run a preload module more than once in a
# process, and wrapping the wrapper again would make it call itself.
if not hasattr(s3fs.S3FileSystem, "_unpatched_pipe_file"):
    s3fs.S3FileSystem._unpatched_pipe_file = s3fs.S3FileSystem._pipe_file
    LocalFileSystem._unpatched_pipe_file = LocalFileSystem.pipe_file
_s3_pipe_file = s3fs.S3FileSystem._unpatched_pipe_file
_local_pipe_file = LocalFileSystem._unpatched_pipe_file


async def _s3_pipe_file_or_full(self, path, data, *args, **kwargs):
    if _full():
        raise _disk_full(path)
    return await _s3_pipe_file(self, path, data, *args, **kwargs)


def _local_pipe_file_or_full(self, path, value, *args, **kwargs):
    if _full():
        raise _disk_full(path)
    return _local_pipe_file(self, path, value, *args, **kwargs)


s3fs.S3FileSystem._pipe_file = _s3_pipe_file_or_full
LocalFileSystem.pipe_file = _local_pipe_file_or_full
