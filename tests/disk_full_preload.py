"""Dask worker preload: this worker's disk fills up after a number of writes.

`dask worker --preload tests/disk_full_preload.py` with ARC2FACE_TEST_DISK_FULL_AFTER=N
in the worker's environment: its first N file writes through fsspec (S3 PUTs or local
writes) succeed, every later one raises OSError(ENOSPC), as a full disk does. The
other workers are unaffected.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading

import s3fs
from fsspec.implementations.local import LocalFileSystem

AFTER_ENV = "ARC2FACE_TEST_DISK_FULL_AFTER"
_writes = itertools.count(1)
_lock = threading.Lock()


def _full() -> bool:
    limit = int(os.environ.get(AFTER_ENV, "0"))
    with _lock:
        return next(_writes) > limit


def _disk_full(path: str) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device (injected)", path)


_s3_pipe_file = s3fs.S3FileSystem._pipe_file
_local_pipe_file = LocalFileSystem.pipe_file


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
