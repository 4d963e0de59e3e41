"""Pose banks: the normal-map conditioning images for Arc2Face's pose ControlNet.

A bank is a list of :class:`Pose` (a name, the requested yaw/pitch/roll in degrees with
insightface's signs, see :mod:`arc2face_engine.controls.render`, and a uint8 RGB image). Banks come
from a folder of maps rendered by any FLAME tool (EMOCA, SMIRK, DECA) plus an angle table,
or are rendered here from a mesh file or the built-in procedural head. Rendered maps are
cached by content, so a job renders each pose once, not once per image.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import posixpath
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from arc2face_engine.controls.render import procedural_head, read_mesh, render_normals
from schemas.errors import BankError
from schemas.tables import POSE_TABLE_SCHEMA

POSE_KINDS = ("none", "folder", "mesh", "procedural")
MAX_ABS_YAW = 90.0  # frontal hemisphere: Arc2Face's ControlNet never saw the back of a head
MAX_ABS_PITCH = 90.0
TABLE_NAMES = ("poses.parquet", "poses.csv")
# Suffixes of single files: a pose bank is a folder, so `save` refuses a path ending in one.
FILE_SUFFIXES = (
    ".parquet", ".csv", ".json", ".npy", ".npz", ".yaml", ".yml", ".txt",
    ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".obj", ".ply", ".zip", ".tar",
)  # fmt: skip

# Bump when render.py's output changes, so on-disk caches are not reused across versions.
RENDER_VERSION = "normals-v2-emoca"
_CACHE_ENTRIES = 128  # ~100 MB of 512x512 maps
_render_cache: OrderedDict[str, np.ndarray] = OrderedDict()


@dataclass(frozen=True)
class Pose:
    name: str
    yaw: float
    pitch: float
    roll: float
    image: np.ndarray  # uint8 (H, W, 3) RGB normal map


@dataclass
class PoseBank:
    poses: list[Pose] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.poses)

    def __getitem__(self, index: int) -> Pose:
        return self.poses[index]

    def __iter__(self) -> Iterator[Pose]:
        return iter(self.poses)

    @property
    def names(self) -> list[str]:
        return [pose.name for pose in self.poses]

    @classmethod
    def from_folder(
        cls,
        uri: str,
        table: str | None = None,
        storage_options: dict | None = None,
        size: int | None = None,
    ) -> PoseBank:
        """Conditioning images in ``uri`` plus an angle table (file, yaw, pitch, roll[, name]).

        ``table`` defaults to poses.parquet or poses.csv inside the folder; a relative name
        is looked up in the folder. With ``size``, images are resized to size x size.
        """
        fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        if not fs.isdir(root):
            raise BankError(f"pose folder {uri} does not exist; pass a folder of normal maps")
        table_path = _find_table(fs, root, uri, table)
        rows = _read_table(fs, table_path)
        poses = [_folder_pose(fs, root, table_path, index, row, size) for index, row in rows]
        if not poses:
            raise BankError(f"pose table {table_path} has no rows; add one row per image")
        _check_same_size(poses, table_path)
        return cls(poses)

    @classmethod
    def from_mesh(
        cls,
        uri: str,
        yaws: Sequence[float],
        pitches: Sequence[float],
        rolls: Sequence[float],
        size: int = 512,
        storage_options: dict | None = None,
        cache_dir: str | None = None,
    ) -> PoseBank:
        """Render the yaw x pitch x roll grid of a mesh file (.obj/.ply; y up, face to +z)."""
        vertices, faces = read_mesh(uri, storage_options)
        return cls._render_grid(vertices, faces, yaws, pitches, rolls, size, cache_dir)

    @classmethod
    def procedural(
        cls,
        yaws: Sequence[float],
        pitches: Sequence[float],
        rolls: Sequence[float],
        size: int = 512,
        resolution: int = 64,
        cache_dir: str | None = None,
    ) -> PoseBank:
        """Render the yaw x pitch x roll grid of the built-in procedural head."""
        vertices, faces = procedural_head(resolution)
        return cls._render_grid(vertices, faces, yaws, pitches, rolls, size, cache_dir)

    @classmethod
    def _render_grid(
        cls,
        vertices: np.ndarray,
        faces: np.ndarray,
        yaws: Sequence[float],
        pitches: Sequence[float],
        rolls: Sequence[float],
        size: int,
        cache_dir: str | None,
    ) -> PoseBank:
        if size < 8:
            raise BankError(f"pose render size {size} is too small; use e.g. 512")
        mesh_digest = _mesh_digest(vertices, faces)
        poses = []
        for yaw, pitch, roll in itertools.product(yaws, pitches, rolls):
            yaw, pitch, roll = float(yaw), float(pitch), float(roll)
            _check_angles(yaw, pitch, roll, where="pose grid")
            image = _cached_render(
                vertices, faces, mesh_digest, (yaw, pitch, roll), size, cache_dir
            )
            poses.append(Pose(pose_name(yaw, pitch, roll), yaw, pitch, roll, image))
        if not poses:
            raise BankError("pose grid is empty; give at least one yaw, pitch and roll")
        return cls(poses)

    def save(self, uri: str, storage_options: dict | None = None) -> None:
        """Write PNG images and poses.parquet, so the bank loads back with from_folder."""
        fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        suffix = posixpath.splitext(root.rstrip("/"))[1].lower()
        if suffix in FILE_SUFFIXES or fs.isfile(root):
            folder = uri.rstrip("/")[: -len(suffix)] if suffix else f"{uri.rstrip('/')}_poses"
            raise BankError(
                f"cannot save pose bank to {uri}: a pose bank is a folder (PNG maps + "
                f"poses.parquet), not a file; pass a folder path such as {folder}"
            )
        fs.makedirs(root, exist_ok=True)
        files = []
        for index, pose in enumerate(self.poses):
            file = f"{index:04d}_{_safe_file_part(pose.name)}.png"
            ok, encoded = cv2.imencode(".png", cv2.cvtColor(pose.image, cv2.COLOR_RGB2BGR))
            if not ok:
                raise BankError(f"pose {pose.name} could not be encoded as PNG")
            with fs.open(posixpath.join(root, file), "wb") as handle:
                handle.write(encoded.tobytes())
            files.append(file)
        table = pa.table(
            {
                "file": files,
                "name": [pose.name for pose in self.poses],
                "yaw": [pose.yaw for pose in self.poses],
                "pitch": [pose.pitch for pose in self.poses],
                "roll": [pose.roll for pose in self.poses],
            },
            schema=POSE_TABLE_SCHEMA,
        )
        with fs.open(posixpath.join(root, "poses.parquet"), "wb") as handle:
            pq.write_table(table, handle)


def load_pose_bank(
    section: Any,
    size: int = 512,
    storage_options: dict | None = None,
    cache_dir: str | None = None,
) -> PoseBank | None:
    """Build the pose bank a job spec's ``variations.poses`` section asks for (None for kind none).

    ``section`` is a dict or any object with ``kind``, ``path``, ``yaw``, ``pitch``, ``roll``.
    """
    kind = _field(section, "kind", "none")
    path = _field(section, "path", None)
    grid = [list(_field(section, axis, None) or [0.0]) for axis in ("yaw", "pitch", "roll")]
    if kind == "none":
        return None
    if kind in ("folder", "mesh") and not path:
        raise BankError(f"poses kind {kind!r} needs a path; set variations.poses.path")
    if kind == "folder":
        return PoseBank.from_folder(path, storage_options=storage_options, size=size)
    if kind == "mesh":
        return PoseBank.from_mesh(
            path, *grid, size=size, storage_options=storage_options, cache_dir=cache_dir
        )
    if kind == "procedural":
        return PoseBank.procedural(*grid, size=size, cache_dir=cache_dir)
    raise BankError(f"unknown poses kind {kind!r}; use one of {', '.join(POSE_KINDS)}")


def pose_name(yaw: float, pitch: float, roll: float) -> str:
    """'y+30_p+00_r-05'; non-integer angles keep their decimals ('y+7.5_...')."""
    return "_".join(
        f"{axis}{_angle_text(angle)}" for axis, angle in zip("ypr", (yaw, pitch, roll), strict=True)
    )


# ---------------------------------------------------------------------------------------------
# Rendering cache


def _angle_text(angle: float) -> str:
    return f"{angle:+03.0f}" if float(angle).is_integer() else f"{angle:+g}"


def _safe_file_part(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "+-._" else "_" for ch in name)


def _mesh_digest(vertices: np.ndarray, faces: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(vertices, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(faces, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _cache_key(mesh_digest: str, angles: tuple[float, float, float], size: int) -> str:
    text = f"{RENDER_VERSION}|{mesh_digest}|{angles[0]!r}|{angles[1]!r}|{angles[2]!r}|{size}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _cached_render(
    vertices: np.ndarray,
    faces: np.ndarray,
    mesh_digest: str,
    angles: tuple[float, float, float],
    size: int,
    cache_dir: str | None,
) -> np.ndarray:
    """Render once per (mesh, angles, size): memory first, then cache_dir, then render."""
    key = _cache_key(mesh_digest, angles, size)
    if key in _render_cache:
        _render_cache.move_to_end(key)
        return _render_cache[key]
    image = _read_cached_png(cache_dir, key) if cache_dir else None
    if image is None:
        image = render_normals(vertices, faces, *angles, size=size)
        if cache_dir:
            _write_cached_png(cache_dir, key, image)
    image.flags.writeable = False  # shared between poses and calls
    _render_cache[key] = image
    if len(_render_cache) > _CACHE_ENTRIES:
        _render_cache.popitem(last=False)
    return image


def _read_cached_png(cache_dir: str, key: str) -> np.ndarray | None:
    fs, root = fsspec.core.url_to_fs(cache_dir)
    path = posixpath.join(root, f"{key}.png")
    if not fs.exists(path):
        return None
    decoded = cv2.imdecode(np.frombuffer(fs.cat_file(path), np.uint8), cv2.IMREAD_COLOR)
    return None if decoded is None else cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def _write_cached_png(cache_dir: str, key: str, image: np.ndarray) -> None:
    fs, root = fsspec.core.url_to_fs(cache_dir)
    fs.makedirs(root, exist_ok=True)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if ok:
        fs.pipe_file(posixpath.join(root, f"{key}.png"), encoded.tobytes())


# ---------------------------------------------------------------------------------------------
# Folder banks


def _find_table(fs: fsspec.AbstractFileSystem, root: str, uri: str, table: str | None) -> str:
    if table is not None:
        # A bare or relative name is inside the folder; a URI or absolute path is used as is.
        is_own_path = "://" in table or table.startswith("/")
        candidate = fs._strip_protocol(table) if is_own_path else posixpath.join(root, table)
        if not fs.exists(candidate):
            raise BankError(f"pose table {table} does not exist; pass poses.csv/poses.parquet")
        return candidate
    for name in TABLE_NAMES:
        candidate = posixpath.join(root, name)
        if fs.exists(candidate):
            return candidate
    raise BankError(
        f"pose folder {uri} has no poses.parquet or poses.csv; "
        "add a table with columns file, yaw, pitch, roll"
    )


def _read_table(fs: fsspec.AbstractFileSystem, path: str) -> list[tuple[int, dict]]:
    try:
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle) if path.endswith(".parquet") else pa_csv.read_csv(handle)
    except (pa.ArrowException, OSError) as error:
        detail = str(error).splitlines()[0]
        raise BankError(
            f"pose table {path} cannot be read ({detail}); fix or re-export it"
        ) from None
    missing = [c for c in ("file", "yaw", "pitch", "roll") if c not in table.column_names]
    if missing:
        raise BankError(
            f"pose table {path} lacks column(s) {', '.join(missing)}; "
            "columns must be file, yaw, pitch, roll (optional name)"
        )
    return list(enumerate(table.to_pylist()))


def _folder_pose(
    fs: fsspec.AbstractFileSystem,
    root: str,
    table_path: str,
    index: int,
    row: dict,
    size: int | None,
) -> Pose:
    where = f"pose table {table_path} row {index}"
    file = row["file"]
    if not file:
        raise BankError(f"{where} has an empty file name; name the image file in column file")
    angles = []
    for axis in ("yaw", "pitch", "roll"):
        if row[axis] is None:  # CSV readers turn empty cells and "nan" into null
            raise BankError(f"{where} ({file}): {axis} is empty or NaN; write angles in degrees")
        try:
            angles.append(float(row[axis]))
        except (TypeError, ValueError):
            raise BankError(
                f"{where} ({file}): {axis} {row[axis]!r} is not a number; write angles in degrees"
            ) from None
    _check_angles(*angles, where=f"{where} ({file})")
    image = _read_rgb(fs, posixpath.join(root, str(file)), f"{where} ({file})")
    if size is not None:
        image = _resize_square(image, size, f"{where} ({file})")
    name = row.get("name") or posixpath.splitext(posixpath.basename(str(file)))[0]
    return Pose(str(name), *angles, image)


def _read_rgb(fs: fsspec.AbstractFileSystem, path: str, where: str) -> np.ndarray:
    if not fs.exists(path):
        raise BankError(f"{where}: image file does not exist; fix the file column or add the file")
    decoded = cv2.imdecode(np.frombuffer(fs.cat_file(path), np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise BankError(f"{where}: image does not decode; save it as PNG or JPEG")
    if decoded.dtype != np.uint8 or decoded.ndim != 3 or decoded.shape[2] != 3:
        channels = 1 if decoded.ndim == 2 else decoded.shape[2]
        raise BankError(
            f"{where}: image is {channels}-channel {decoded.dtype}, not RGB; "
            "save normal maps as 8-bit 3-channel RGB"
        )
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def _resize_square(image: np.ndarray, size: int, where: str) -> np.ndarray:
    height, width = image.shape[:2]
    if height != width:
        raise BankError(f"{where}: image is {width}x{height}; normal maps must be square crops")
    if height == size:
        return image
    interpolation = cv2.INTER_AREA if height > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def _check_same_size(poses: list[Pose], table_path: str) -> None:
    sizes = {pose.image.shape[:2] for pose in poses}
    if len(sizes) > 1:
        raise BankError(
            f"pose table {table_path}: images have different sizes {sorted(sizes)}; "
            "render all maps at one size"
        )


def _check_angles(yaw: float, pitch: float, roll: float, where: str) -> None:
    for axis, angle in (("yaw", yaw), ("pitch", pitch), ("roll", roll)):
        if not math.isfinite(angle):
            raise BankError(f"{where}: {axis} is {angle}; give a finite angle in degrees")
    if abs(yaw) > MAX_ABS_YAW or abs(pitch) > MAX_ABS_PITCH:
        raise BankError(
            f"{where}: yaw {yaw:g}, pitch {pitch:g} is outside the frontal hemisphere; "
            f"keep |yaw| <= {MAX_ABS_YAW:g} and |pitch| <= {MAX_ABS_PITCH:g}"
        )


def _field(section: Any, name: str, default: Any) -> Any:
    if isinstance(section, dict):
        return section.get(name, default)
    return getattr(section, name, default)
