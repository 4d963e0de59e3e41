"""The one check that a path read from a dataset stays inside the dataset root.

Everything a dataset says is untrusted: a manifest `path` of `../../x`, an
`image_id` that is an absolute path, or a symlink that leads out of the root
would otherwise make the audit, the exports or the loader read (or write)
somewhere else. Two levels:

- `check_relative`: lexical, for any filesystem: a POSIX path relative to the
  root, no `..`, no empty or `.` segment, no backslash or NUL, not absolute.
- `check_name`: one path segment usable as a file or member name (ids).
- `LocalRoot.resolve`: on local disks, also resolve symlinks and require the real
  path to stay under the real root (object stores have no symlinks).
"""

from __future__ import annotations

import os
import re
import stat

from schemas.errors import UserError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_PLAIN_PATH = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$")
MAX_CACHED_DIRS = 65_536
MAX_PATH = 4096


class UnsafePath(UserError, ValueError):
    """A path or name read from a dataset would leave the dataset root."""


def _why_unsafe(relative: object) -> str | None:
    if isinstance(relative, str) and len(relative) <= MAX_PATH and _PLAIN_PATH.match(relative):
        return None  # the common case, in one regex: no segment starts with a dot
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


def _outside(real: str, real_root: str) -> bool:
    return real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep)


def _escape(relative: str, real: str, where: str) -> UnsafePath:
    return UnsafePath(
        f"{where}: {relative!r} is a symlink leading out of the dataset root (to {real}): "
        "the dataset is damaged or hostile; do not use it"
    )


class LocalRoot:
    """Paths under one local root, symlinks resolved: each folder is resolved once (cached),
    each file costs one lstat (and a full resolve only when it is a symlink). The path
    returned goes through the resolved folder, so a folder swapped for a link later is
    not followed."""

    def __init__(self, root: str):
        self.root = root
        self.real_root = os.path.realpath(root)
        self._folders: dict[str, str] = {"": self.real_root}

    def _folder(self, folder: str, relative: str, where: str) -> str:
        real = self._folders.get(folder)
        if real is None:
            real = os.path.realpath(os.path.join(self.real_root, folder))
            if _outside(real, self.real_root):
                raise _escape(relative, real, where)
            if len(self._folders) < MAX_CACHED_DIRS:
                self._folders[folder] = real
        return real

    def resolve(self, relative: str, where: str) -> str:
        check_relative(relative, where)
        folder, _, name = relative.rpartition("/")
        full = os.path.join(self._folder(folder, relative, where), name)
        try:
            is_link = stat.S_ISLNK(os.lstat(full).st_mode)
        except OSError:
            return full  # missing: reading it raises FileNotFoundError, as it should
        if is_link:
            real = os.path.realpath(full)
            if _outside(real, self.real_root):
                raise _escape(relative, real, where)
        return full
