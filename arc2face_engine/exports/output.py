"""Where an export writes: checked before anything is written, and made visible whole.

Refused up front: an output that is a file (or under a file), one inside the
dataset (or holding it), and a non-empty one unless `overwrite`. On local disks
the export is built in a hidden sibling folder and renamed into place at the
end, so a killed export leaves the old output (or nothing) and a hidden
`.NAME.export-tmp-*` folder, never a half-written output. Object stores have no
rename: there the writers write the files that consumers look for first
(labels.csv, property, label_map.csv, README.md) last.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass

import fsspec
from fsspec import AbstractFileSystem

from arc2face_engine.dataset import layout
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.exports.base import ExportError

STAGING_MARKER = ".export-tmp-"


@dataclass
class ExportOutput:
    """The filesystem, the final root and the root the writers write into (`staging`)."""

    fs: AbstractFileSystem
    root: str
    staging: str
    local: bool
    replace: bool  # an existing output is replaced at commit (local) / was emptied (remote)

    def commit(self) -> None:
        """Make the finished export visible under `root` (local: one rename)."""
        if not self.local:
            return
        old = None
        if os.path.lexists(self.root):
            old = _sibling(self.root, ".export-old-")
            os.rename(self.root, old)
        os.rename(self.staging, self.root)
        if old is None:
            return
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)  # a file or a link: never follow it

    def abort(self) -> None:
        """Remove a local staging folder after a failure (remote files stay incomplete)."""
        if self.local:
            shutil.rmtree(self.staging, ignore_errors=True)

    def final_path(self, path: str) -> str:
        """A path under `staging` as it is after `commit`."""
        if path.startswith(self.staging):
            return self.root + path[len(self.staging) :]
        return path


def _sibling(root: str, marker: str) -> str:
    parent, name = os.path.split(root.rstrip("/"))
    return os.path.join(parent, f".{name}{marker}{uuid.uuid4().hex[:12]}")


def _open(out_uri: str, storage_options: dict | None) -> tuple[AbstractFileSystem, str]:
    try:
        fs, root = fsspec.core.url_to_fs(str(out_uri), **(storage_options or {}))
    except (ValueError, ImportError, TypeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ExportError(
            f"--out {out_uri} cannot be opened ({first}): pass a local folder or a URI "
            "fsspec knows (s3://bucket/prefix)"
        ) from None
    root = root.rstrip("/") or "/"
    return fs, root


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def _check_not_the_dataset(reader: DatasetReader, out_uri: str, fs, root: str, local: bool) -> None:
    if local and reader.local:
        out_real, data_real = os.path.realpath(root), os.path.realpath(reader.root)
    elif type(fs) is type(reader.fs):
        out_real, data_real = root, reader.root.rstrip("/")
    else:
        return
    if _inside(out_real, data_real):
        raise ExportError(
            f"--out {out_uri} is inside the dataset {reader.uri}: choose a folder outside it"
        )
    if _inside(data_real, out_real):
        raise ExportError(
            f"--out {out_uri} holds the dataset {reader.uri}: choose a folder outside it"
        )


def _check_local_target(out_uri: str, root: str, overwrite: bool) -> None:
    if os.path.lexists(root) and not os.path.isdir(root):
        raise ExportError(f"--out {out_uri} is a file: pass a folder (new or empty)")
    parent = os.path.dirname(os.path.abspath(root))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ExportError(f"--out {out_uri} is under a file ({parent}): pass a folder path")
    if os.path.isdir(root) and os.listdir(root) and not overwrite:
        raise ExportError(
            f"--out {out_uri} is not empty: pass --overwrite to replace it, or an empty folder"
        )


def _check_remote_target(out_uri: str, fs, root: str, overwrite: bool) -> None:
    fs.invalidate_cache(root)
    if fs.isfile(root):
        raise ExportError(f"--out {out_uri} is a file: pass a folder (new or empty)")
    if fs.isdir(root) and fs.ls(root, detail=False) and not overwrite:
        raise ExportError(
            f"--out {out_uri} is not empty: pass --overwrite to replace it, or an empty prefix"
        )


def prepare_output(
    reader: DatasetReader, out_uri: str, storage_options: dict | None, overwrite: bool
) -> ExportOutput:
    """Check the output (nothing is written until every check passed), then open it."""
    fs, root = _open(out_uri, storage_options)
    local = layout.is_local(fs)
    _check_not_the_dataset(reader, out_uri, fs, root, local)
    if local:
        root = os.path.abspath(root)
        _check_local_target(out_uri, root, overwrite)
        staging = _sibling(root, STAGING_MARKER)
        os.makedirs(os.path.dirname(staging), exist_ok=True)
        os.makedirs(staging)
        return ExportOutput(fs, root, staging, True, os.path.lexists(root))
    _check_remote_target(out_uri, fs, root, overwrite)
    replace = bool(fs.exists(root))
    if replace:
        fs.rm(root, recursive=True)
    fs.makedirs(root, exist_ok=True)
    return ExportOutput(fs, root, root, False, replace)
