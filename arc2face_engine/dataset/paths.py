"""The one check that a path read from a dataset stays inside the dataset root.

Everything a dataset says is untrusted: a manifest `path` of `../../x`, an
`image_id` that is an absolute path, or a symlink that leads out of the root
would otherwise make the audit, the exports or the loader read (or write)
somewhere else. Two levels:

- `check_relative`: lexical, for any filesystem: a POSIX path relative to the
  root, no `..`, no empty or `.` segment, no backslash or NUL, not absolute.
- `check_name`: one path segment usable as a file or member name (ids).
- `resolve_inside`: on local disks, also resolve symlinks and require the real
  path to stay under the real root (object stores have no symlinks).
"""

from __future__ import annotations

import os
import re

from arc2face_engine.errors import UserError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_PATH = 4096


class UnsafePath(UserError, ValueError):
    """A path or name read from a dataset would leave the dataset root."""


def _why_unsafe(relative: object) -> str | None:
    if not isinstance(relative, str) or not relative:
        return "is empty or not a string"
    if len(relative) > MAX_PATH:
        return f"is longer than {MAX_PATH} characters"
    if "\\" in relative or "\0" in relative:
        return "holds a backslash or NUL"
    if relative.startswith("/") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", relative):
        return "is absolute"
    if any(part in ("", ".", "..") for part in relative.split("/")):
        return "has an empty, '.' or '..' segment"
    return None


def is_safe_relative(relative: object) -> bool:
    return _why_unsafe(relative) is None


def check_relative(relative: object, where: str) -> str:
    """`relative` if it is a relative path inside the root; UnsafePath naming `where` otherwise."""
    why = _why_unsafe(relative)
    if why is not None:
        raise UnsafePath(
            f"{where}: path {relative!r} {why}, so it would leave the dataset root: "
            "the dataset is damaged or hostile; do not use it"
        )
    return relative  # type: ignore[return-value]


def is_safe_name(name: object) -> bool:
    return isinstance(name, str) and len(name) <= 255 and bool(_SAFE_NAME.match(name))


def check_name(name: object, where: str) -> str:
    """`name` if it is one safe file-name segment (letters, digits, `._-`, no leading dot)."""
    if not is_safe_name(name):
        raise UnsafePath(
            f"{where}: {name!r} is not a safe file name (letters, digits, '.', '_', '-'; "
            "no '/' or '..'): the dataset is damaged or hostile; do not use it"
        )
    return name  # type: ignore[return-value]


def resolve_inside(root: str, relative: str, where: str, real_root: str | None = None) -> str:
    """Local disks: the joined path, after checking that symlinks do not lead out of `root`
    (`real_root`: `os.path.realpath(root)`, when the caller has it already)."""
    check_relative(relative, where)
    real_root = real_root or os.path.realpath(root)
    full = os.path.join(root, relative)
    real = os.path.realpath(full)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise UnsafePath(
            f"{where}: {relative!r} is a symlink leading out of the dataset root (to {real}): "
            "the dataset is damaged or hostile; do not use it"
        )
    return full
