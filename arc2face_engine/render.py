"""Normal-map rendering for the pose ControlNet: a numpy z-buffer rasteriser, mesh IO, a head.

Arc2Face's pose ControlNet is conditioned on a normal map of a FLAME head (EMOCA renders
in the reference demo): per-pixel camera-space surface normals coloured as ``n * 0.5 + 0.5``
on a black background, the face framed like an FFHQ crop. This module renders such maps
from any triangle mesh without a GPU or an OpenGL context.

Conventions (camera space, right-handed):

* x points right, y points up, z points out of the screen towards the viewer; the camera
  looks down -z with an orthographic projection. A normal facing the camera is (0, 0, 1),
  coloured (128, 128, 255); a surface facing image-right is red, one facing up is green.
* Meshes are given in the same frame, face looking towards +z, top of the head towards +y.
* Angles are degrees and follow insightface's head-pose signs (``Face.pose`` = pitch, yaw,
  roll, from ``1k3d68``), so a requested pose and the pose measured on the generated image
  are directly comparable:

  - yaw > 0: the nose turns towards image-right (the subject turns to their own left);
  - pitch > 0: the nose turns up (the subject looks up);
  - roll > 0: the head rotates clockwise in the image (the subject tilts towards their
    left shoulder).

  The rotation is ``R = Rz(-roll) @ Ry(yaw) @ Rx(-pitch)`` in the y-up frame; it is
  insightface's ``Rz(roll) Ry(yaw) Rx(pitch)`` (image frame, y down) with y flipped.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import fsspec
import numpy as np

from arc2face_engine.errors import BankError

BACKGROUND = (0, 0, 0)  # EMOCA's normal renders have a black background

# FFHQ framing (Karras et al. alignment): the crop is ~4 inter-ocular distances wide and
# centred just below the eye line. For an adult head (about 15 cm wide, eyes about 12 cm
# below the top of the skull, 6.3 cm apart) that is a head width of ~0.6 of the image, and
# a crop centre ~0.8 head widths below the top of the skull.
HEAD_WIDTH_FRACTION = 0.6
CENTRE_BELOW_TOP = 0.8

# Triangle-pixel candidates processed at once; bounds memory at any image size.
_CANDIDATES_PER_CHUNK = 2_000_000


@dataclass(frozen=True)
class Framing:
    """Where the camera looks (mesh units): image centre at (centre_x, centre_y), width ``extent``."""

    centre_x: float
    centre_y: float
    extent: float


def ffhq_framing(vertices: np.ndarray) -> Framing:
    """FFHQ-like framing from the neutral mesh's bounding box (independent of any neck below)."""
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    head_width = float(high[0] - low[0])
    if head_width <= 0:
        raise BankError("mesh has zero width; pass a head mesh with the face towards +z, y up")
    return Framing(
        centre_x=float(low[0] + high[0]) / 2,
        centre_y=float(high[1]) - CENTRE_BELOW_TOP * head_width,
        extent=head_width / HEAD_WIDTH_FRACTION,
    )


def rotation_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head rotation in the y-up camera frame for insightface-signed angles in degrees."""
    y, p, r = (math.radians(a) for a in (yaw, pitch, roll))
    rot_yaw = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    # Rx(-pitch): positive pitch lifts the nose (+z towards +y).
    rot_pitch = np.array([[1, 0, 0], [0, math.cos(p), math.sin(p)], [0, -math.sin(p), math.cos(p)]])
    # Rz(-roll): positive roll is clockwise on screen (+x towards -y).
    rot_roll = np.array([[math.cos(r), math.sin(r), 0], [-math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rot_roll @ rot_yaw @ rot_pitch


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals (unnormalised cross products weight by area)."""
    corners = vertices[faces]
    face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals = np.zeros_like(vertices)
    for corner in range(3):
        np.add.at(normals, faces[:, corner], face_normals)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return normals / np.maximum(length, 1e-12)


def render_normals(
    vertices: np.ndarray,
    faces: np.ndarray,
    yaw: float = 0.0,
    pitch: float = 0.0,
    roll: float = 0.0,
    size: int = 512,
    background: tuple[int, int, int] = BACKGROUND,
    framing: Framing | None = None,
) -> np.ndarray:
    """Render camera-space normals of a posed mesh as a uint8 (size, size, 3) RGB image.

    The mesh rotates about the centre of its neutral bounding box; the framing (default
    :func:`ffhq_framing` of the neutral mesh) stays fixed, so turning does not rescale the
    head. Normals are interpolated vertex normals, shown two-sided: a visible triangle whose
    winding faces away from the camera has its normal flipped, so inward-wound or open meshes
    (FLAME's neck and eye holes) still render as surfaces facing the viewer.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    framing = framing or ffhq_framing(vertices)
    rotation = rotation_matrix(yaw, pitch, roll)
    pivot = (vertices.min(axis=0) + vertices.max(axis=0)) / 2
    posed = (vertices - pivot) @ rotation.T + pivot
    normals = vertex_normals(vertices, faces) @ rotation.T

    scale = size / framing.extent
    screen = np.empty((len(posed), 3))
    screen[:, 0] = (posed[:, 0] - framing.centre_x) * scale + size / 2
    screen[:, 1] = (framing.centre_y - posed[:, 1]) * scale + size / 2  # rows grow downwards
    screen[:, 2] = posed[:, 2]

    face_id, bary = _rasterize(screen, faces, size)
    return _shade(face_id, bary, faces, normals, screen, size, background)


def _rasterize(screen: np.ndarray, faces: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Z-buffer: per pixel the nearest triangle (-1 for none) and its barycentric weights."""
    corners = screen[faces]  # (F, 3, 3): x, y in pixels, z depth (larger is nearer)
    # Pixel (row, col) is sampled at its centre (col + 0.5, row + 0.5).
    low = np.ceil(corners[:, :, :2].min(axis=1) - 0.5).astype(np.int64)
    high = np.floor(corners[:, :, :2].max(axis=1) - 0.5).astype(np.int64)
    low, high = np.clip(low, 0, size - 1), np.clip(high, 0, size - 1)
    area2 = _edge(corners[:, 0, :2], corners[:, 1, :2], corners[:, 2, :2])
    drawable = np.flatnonzero(np.all(high >= low, axis=1) & (np.abs(area2) > 1e-12))
    drawable = drawable[np.all(corners[drawable, :, :2].max(axis=1) >= 0, axis=1)]

    depth = np.full(size * size, -np.inf)
    face_id = np.full(size * size, -1, dtype=np.int64)
    bary = np.zeros((size * size, 3))
    counts = np.prod(high[drawable] - low[drawable] + 1, axis=1)
    for chunk in _chunks(drawable, counts):
        pixels, chunk_depth, chunk_face, chunk_bary = _candidates(
            chunk, corners, low, high, area2, size
        )
        nearer = chunk_depth > depth[pixels]
        pixels = pixels[nearer]
        depth[pixels] = chunk_depth[nearer]
        face_id[pixels] = chunk_face[nearer]
        bary[pixels] = chunk_bary[nearer]
    return face_id, bary


def _chunks(drawable: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Split triangles so each chunk expands to at most ~_CANDIDATES_PER_CHUNK pixels."""
    bins = np.cumsum(counts) // _CANDIDATES_PER_CHUNK
    splits = np.flatnonzero(np.diff(bins)) + 1
    return [chunk for chunk in np.split(drawable, splits) if len(chunk)]


def _candidates(
    chunk: np.ndarray,
    corners: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    area2: np.ndarray,
    size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Covered pixels of a chunk of triangles, reduced to the nearest triangle per pixel."""
    width = high[chunk, 0] - low[chunk, 0] + 1
    counts = width * (high[chunk, 1] - low[chunk, 1] + 1)
    tri = np.repeat(chunk, counts)
    local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    tri_width = np.repeat(width, counts)
    col = low[tri, 0] + local % tri_width
    row = low[tri, 1] + local // tri_width
    point = np.stack([col + 0.5, row + 0.5], axis=1)

    a, b, c = corners[tri, 0, :2], corners[tri, 1, :2], corners[tri, 2, :2]
    weights = np.stack([_edge(b, c, point), _edge(c, a, point), _edge(a, b, point)], axis=1)
    weights /= area2[tri, None]
    inside = np.all(weights >= -1e-7, axis=1)  # small slack: no cracks on shared edges
    tri, weights = tri[inside], weights[inside]
    pixels = row[inside] * size + col[inside]
    depth = np.einsum("nk,nk->n", weights, corners[tri, :, 2])

    # Nearest first within each pixel, then keep each pixel's first entry.
    order = np.lexsort((-depth, pixels))
    pixels, depth, tri, weights = pixels[order], depth[order], tri[order], weights[order]
    first = np.ones(len(pixels), dtype=bool)
    first[1:] = pixels[1:] != pixels[:-1]
    return pixels[first], depth[first], tri[first], weights[first]


def _edge(a: np.ndarray, b: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Twice the signed area of (a, b, p): the edge function of edge a->b at p."""
    return (b[..., 0] - a[..., 0]) * (p[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (
        p[..., 0] - a[..., 0]
    )


def _shade(
    face_id: np.ndarray,
    bary: np.ndarray,
    faces: np.ndarray,
    normals: np.ndarray,
    screen: np.ndarray,
    size: int,
    background: tuple[int, int, int],
) -> np.ndarray:
    """Colour covered pixels with their interpolated normal, n * 0.5 + 0.5, the rest background."""
    image = np.empty((size * size, 3), dtype=np.uint8)
    image[:] = np.asarray(background, dtype=np.uint8)
    covered = np.flatnonzero(face_id >= 0)
    tri = faces[face_id[covered]]
    normal = np.einsum("nk,nkd->nd", bary[covered], normals[tri])
    # Screen rows grow downwards, so a triangle facing the camera has negative signed area.
    facing = _edge(screen[tri[:, 0], :2], screen[tri[:, 1], :2], screen[tri[:, 2], :2]) < 0
    normal[~facing] *= -1
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    image[covered] = np.floor((normal * 0.5 + 0.5) * 255 + 0.5).clip(0, 255).astype(np.uint8)
    return image.reshape(size, size, 3)


# ---------------------------------------------------------------------------------------------
# Mesh files


def read_mesh(uri: str, storage_options: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a triangle mesh (OBJ or ASCII/binary PLY; polygons fan-split) -> (vertices, faces)."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if not fs.exists(path):
        raise BankError(f"mesh file {uri} does not exist; pass an existing .obj or .ply path")
    with fs.open(path, "rb") as handle:
        data = handle.read()
    try:
        if data.startswith(b"ply"):
            vertices, faces = _parse_ply(data)
        elif path.lower().endswith(".obj"):
            vertices, faces = _parse_obj(data.decode("utf-8", errors="replace"))
        else:
            raise ValueError("not an OBJ (.obj) or PLY (starts with 'ply') file")
    except BankError:
        raise
    except (ValueError, IndexError, KeyError, StopIteration) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BankError(
            f"mesh file {uri} is malformed ({detail}); export it as a triangle OBJ or PLY"
        ) from None
    return _validate_mesh(uri, vertices, faces)


def _validate_mesh(
    uri: str, vertices: np.ndarray, faces: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    if len(vertices) < 3 or len(faces) == 0:
        raise BankError(f"mesh file {uri} has no triangles; export the mesh with its faces")
    if not np.isfinite(vertices).all():
        raise BankError(f"mesh file {uri} has non-finite vertex coordinates; re-export the mesh")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise BankError(
            f"mesh file {uri} has face indices outside 0..{len(vertices) - 1}; re-export the mesh"
        )
    return vertices.astype(np.float64), faces.astype(np.int64)


def _fan(polygon: list[int]) -> list[list[int]]:
    """Split a convex polygon (quads included) into triangles around its first corner."""
    if len(polygon) < 3:
        raise ValueError(f"a face has {len(polygon)} corners")
    return [[polygon[0], polygon[i], polygon[i + 1]] for i in range(1, len(polygon) - 1)]


def _parse_obj(text: str) -> tuple[np.ndarray, np.ndarray]:
    vertices: list[list[float]] = []
    faces: list[list[int]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "v":
            if len(parts) < 4:
                raise ValueError(f"line {number}: a vertex needs x y z")
            vertices.append([float(value) for value in parts[1:4]])
        elif parts[0] == "f":
            # "f 1/2/3 4//6 -1": the vertex index is before the first slash; negative is relative.
            corners = [int(token.split("/")[0]) for token in parts[1:]]
            corners = [c - 1 if c > 0 else len(vertices) + c for c in corners]
            faces.extend(_fan(corners))
    return np.array(vertices, dtype=np.float64).reshape(-1, 3), np.array(
        faces, dtype=np.int64
    ).reshape(-1, 3)


_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip


@dataclass
class _PlyElement:
    name: str
    count: int
    properties: list[tuple[str, str, str | None]]  # (name, value type, list count type or None)


def _parse_ply(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    end = data.find(b"end_header")
    if end < 0:
        raise ValueError("no end_header")
    body_start = data.index(b"\n", end) + 1
    header = data[:end].decode("ascii", errors="replace").splitlines()
    fmt, elements = _parse_ply_header(header)
    body = data[body_start:]
    if fmt == "ascii":
        tables = _read_ply_ascii(body.decode("ascii", errors="replace"), elements)
    else:
        tables = _read_ply_binary(body, elements, "<" if fmt == "binary_little_endian" else ">")
    vertex = tables["vertex"]
    vertices = np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1).astype(np.float64)
    polygons = tables.get("face", {}).get("vertex_indices") or tables.get("face", {}).get(
        "vertex_index", []
    )
    faces = [tri for polygon in polygons for tri in _fan(list(polygon))]
    return vertices, np.array(faces, dtype=np.int64).reshape(-1, 3)


def _parse_ply_header(lines: list[str]) -> tuple[str, list[_PlyElement]]:
    fmt = ""
    elements: list[_PlyElement] = []
    for line in lines[1:]:
        parts = line.split()
        if not parts or parts[0] in ("comment", "obj_info"):
            continue
        if parts[0] == "format":
            fmt = parts[1]
        elif parts[0] == "element":
            elements.append(_PlyElement(parts[1], int(parts[2]), []))
        elif parts[0] == "property" and parts[1] == "list":
            elements[-1].properties.append((parts[4], _PLY_TYPES[parts[3]], _PLY_TYPES[parts[2]]))
        elif parts[0] == "property":
            elements[-1].properties.append((parts[2], _PLY_TYPES[parts[1]], None))
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise ValueError(f"unknown PLY format {fmt!r}")
    if not any(e.name == "vertex" for e in elements):
        raise ValueError("no vertex element")
    return fmt, elements


def _read_ply_ascii(text: str, elements: list[_PlyElement]) -> dict[str, dict]:
    tokens = iter(text.split())
    tables: dict[str, dict] = {}
    for element in elements:
        columns: dict[str, list] = {name: [] for name, _, _ in element.properties}
        for _ in range(element.count):
            for name, _, count_type in element.properties:
                if count_type is None:
                    columns[name].append(float(next(tokens)))
                else:
                    count = int(next(tokens))
                    columns[name].append([int(float(next(tokens))) for _ in range(count)])
        tables[element.name] = columns
    return tables


def _read_ply_binary(body: bytes, elements: list[_PlyElement], order: str) -> dict[str, dict]:
    tables: dict[str, dict] = {}
    offset = 0
    for element in elements:
        if all(count_type is None for _, _, count_type in element.properties):
            # Fixed-size records (vertices): one structured read.
            dtype = np.dtype([(name, order + kind) for name, kind, _ in element.properties])
            records = np.frombuffer(body, dtype=dtype, count=element.count, offset=offset)
            tables[element.name] = {name: records[name] for name in dtype.names}
            offset += dtype.itemsize * element.count
        else:
            tables[element.name], offset = _read_ply_binary_lists(body, element, order, offset)
    return tables


def _read_ply_binary_lists(
    body: bytes, element: _PlyElement, order: str, offset: int
) -> tuple[dict[str, list], int]:
    """Variable-size records (faces). Fast path when every face is a triangle, else a loop."""
    props = element.properties
    if len(props) == 1 and props[0][2] is not None and element.count:
        name, kind, count_type = props[0]
        tri = np.dtype([("n", order + count_type), ("i", order + kind, (3,))])
        if offset + tri.itemsize * element.count <= len(body):
            records = np.frombuffer(body, dtype=tri, count=element.count, offset=offset)
            if (records["n"] == 3).all():
                return {name: records["i"].tolist()}, offset + tri.itemsize * element.count
    columns: dict[str, list] = {name: [] for name, _, _ in props}
    for _ in range(element.count):
        for name, kind, count_type in props:
            if count_type is None:
                value = np.frombuffer(body, order + kind, count=1, offset=offset)[0]
                offset += np.dtype(kind).itemsize
                columns[name].append(value)
            else:
                count = int(np.frombuffer(body, order + count_type, count=1, offset=offset)[0])
                offset += np.dtype(count_type).itemsize
                values = np.frombuffer(body, order + kind, count=count, offset=offset)
                offset += np.dtype(kind).itemsize * count
                columns[name].append(values.tolist())
    return columns, offset


def write_obj(vertices: np.ndarray, faces: np.ndarray) -> bytes:
    """Serialise a triangle mesh as OBJ bytes (1-based indices)."""
    out = io.StringIO()
    np.savetxt(out, vertices, fmt="v %.6f %.6f %.6f")
    np.savetxt(out, np.asarray(faces) + 1, fmt="f %d %d %d")
    return out.getvalue().encode()


# ---------------------------------------------------------------------------------------------
# Procedural head


def procedural_head(resolution: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A closed, left-right symmetric head-like mesh (metres; y up, face towards +z).

    An ellipsoid skull (15 x 23 x 19 cm) with a narrowed jaw and chin, a nose, brow
    ridge, eye sockets, cheekbones and a chin bump, all displaced along the surface normal
    of the ellipsoid. ``resolution`` latitude rings x ``2 * resolution`` longitudes.
    Enough shape for a ControlNet to read pose from, not a likeness of anyone.
    """
    if resolution < 4:
        raise BankError(f"procedural head resolution {resolution} is too small; use 4 or more")
    rings, segments = resolution, 2 * resolution
    polar = np.linspace(0, np.pi, rings + 1)[1:-1]  # poles added separately
    azimuth = np.arange(segments) * 2 * np.pi / segments  # from +z towards +x: mirror-symmetric
    polar_grid, azimuth_grid = np.meshgrid(polar, azimuth, indexing="ij")
    unit = np.stack(
        [
            np.sin(polar_grid) * np.sin(azimuth_grid),
            np.cos(polar_grid),
            np.sin(polar_grid) * np.cos(azimuth_grid),
        ],
        axis=-1,
    ).reshape(-1, 3)
    unit = np.concatenate([[[0.0, 1.0, 0.0]], unit, [[0.0, -1.0, 0.0]]])
    return _shape_head(unit), _sphere_faces(rings, segments)


def _sphere_faces(rings: int, segments: int) -> np.ndarray:
    """Outward-wound triangles of a UV sphere: vertex 0 top pole, then rings, last bottom pole."""
    bottom = 1 + (rings - 1) * segments
    ring = np.arange(segments)
    following = (ring + 1) % segments
    faces = [np.stack([np.zeros(segments, int), 1 + ring, 1 + following], axis=1)]
    for r in range(rings - 2):
        upper, lower = 1 + r * segments, 1 + (r + 1) * segments
        faces.append(np.stack([upper + ring, lower + ring, upper + following], axis=1))
        faces.append(np.stack([upper + following, lower + ring, lower + following], axis=1))
    last = 1 + (rings - 2) * segments
    faces.append(np.stack([np.full(segments, bottom), last + following, last + ring], axis=1))
    return np.concatenate(faces).astype(np.int64)


def _bump(x: np.ndarray, y: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    return np.exp(-(((x - cx) / sx) ** 2) / 2 - ((y - cy) / sy) ** 2 / 2)


def _shape_head(unit: np.ndarray) -> np.ndarray:
    semi_axes = np.array([0.075, 0.115, 0.095])
    points = unit * semi_axes
    x, y, z = points.T.copy()  # features are placed on the undeformed ellipsoid
    below_eyes = np.clip(-y / semi_axes[1], 0, 1)
    # Jaw: the lower face narrows and the chin comes forward of the skull's ellipse.
    points[:, 0] *= 1 - 0.3 * below_eyes**1.5
    points[:, 2] *= 1 - 0.15 * below_eyes**2 * (z < 0)
    front = np.clip(z / semi_axes[2], 0, 1) ** 2  # features only on the face side
    relief = (
        0.022 * _bump(x, y, 0.0, -0.030, 0.010, 0.022)  # nose
        + 0.006 * _bump(x, y, 0.0, 0.022, 0.045, 0.008)  # brow ridge
        - 0.007 * _bump(np.abs(x), y, 0.032, 0.002, 0.012, 0.009)  # eye sockets
        + 0.005 * _bump(np.abs(x), y, 0.045, -0.030, 0.012, 0.012)  # cheekbones
        + 0.008 * _bump(x, y, 0.0, -0.100, 0.018, 0.012)  # chin
    )
    outward = unit / semi_axes  # ellipsoid normal direction
    outward /= np.linalg.norm(outward, axis=1, keepdims=True)
    return points + outward * (front * relief)[:, None]
