"""Normal-map rendering for the pose ControlNet: a numpy z-buffer rasteriser, mesh IO, a head.

Arc2Face's pose ControlNet is conditioned on EMOCA renders of a FLAME head. Its demo
(``gradio_demo/app_controlnet.py``) turns EMOCA's ``normal_images`` into the conditioning
image as ``uint8(clamp(n * 0.5 + 0.5, 0, 1) * 255)``, and EMOCA's renderer (DECA's
``SRenderY`` over pytorch3d's rasteriser) makes ``normal_images`` as follows; this module
reproduces each step without a GPU or an OpenGL context:

* per-vertex normals of the posed mesh (area-weighted sums of face cross products, then
  normalised), interpolated with the barycentric weights of the nearest triangle and NOT
  normalised again, so values between vertices are slightly shorter than 1;
* no back-face culling and no flipping: a visible triangle keeps the normal its winding
  gives (seen through FLAME's mouth or eye openings, inner walls face away);
* multiplied by the coverage mask, so the background normal is 0: colour
  (127, 127, 127) after ``floor(127.5)``; a camera-facing normal is (127, 127, 255);
* cast to uint8 by truncation (floor: all values are >= 0);
* drawn into the FFHQ-aligned 512 crop that EMOCA reconstructed the reference face from
  (``image_align`` in the demo), see :func:`ffhq_framing`.

Conventions (camera space = FLAME's world frame, right-handed):

* x points right, y points up, z points out of the screen towards the viewer; the camera
  looks down -z with an orthographic projection (EMOCA's is orthographic too). A surface
  facing image-right is red (R > 127), one facing up is green (G > 127), one facing the
  camera is blue (B = 255).
* Meshes are given in the same frame, face looking towards +z, top of the head towards +y,
  triangles wound counter-clockwise seen from outside (FLAME's winding). A mesh whose
  triangles are all wound the other way (negative signed volume) is turned around once
  as a whole before rendering; single back-facing triangles are never flipped.
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

import math
from dataclasses import dataclass

import fsspec
import numpy as np

from schemas.errors import BankError

# EMOCA's background: normal 0 -> floor((0 * 0.5 + 0.5) * 255) = 127 in every channel.
BACKGROUND = (127, 127, 127)

# FFHQ alignment (Karras et al., the ffhq-dataset script Arc2Face's demo calls as image_align):
# with e2e = right eye - left eye and e2m = mouth - eye midpoint (eye = mean of its six
# landmarks, mouth = mean of the two corners), the crop is a square of side
# 2 * max(2.0 * |e2e|, 1.8 * |e2m|), centred at eye midpoint + 0.1 * e2m, resized to 512.
FFHQ_EYE_TO_EYE_FACTOR = 2.0
FFHQ_EYE_TO_MOUTH_FACTOR = 1.8
FFHQ_CENTRE_TOWARDS_MOUTH = 0.1

# Where a head's eyes and mouth are when its landmarks are not given (any mesh file):
# fractions of the head width W (x extent of the neutral mesh) measured from the top of
# the skull. For an adult head of W = 15 cm these put the eyes 11.3 cm below the vertex and
# 6.4 cm apart (mean interpupillary distance is about 6.3 cm) and the mouth 6.6 cm below
# the eye line, so mouth-drop / eye-distance = 1.03, as in the FFHQ 512 template (facexlib:
# eyes (193.0, 239.9) and (318.9, 240.2), mouth corners' mean (257.2, 371.3): 131.2 / 125.9
# = 1.04). The procedural head places its eye sockets and lips at exactly these points.
EYE_LINE_BELOW_TOP = 0.7533
HALF_EYE_DISTANCE = 0.2133
EYE_TO_MOUTH = 0.44

# Triangle-pixel candidates processed at once; bounds memory at any image size.
_CANDIDATES_PER_CHUNK = 2_000_000


@dataclass(frozen=True)
class Framing:
    """Where the camera looks (mesh units): image centre at (centre_x, centre_y), width ``extent``."""

    centre_x: float
    centre_y: float
    extent: float


@dataclass(frozen=True)
class Landmarks:
    """3D points (mesh units, neutral pose) that FFHQ alignment uses: the eye centres
    (``left_eye`` is on the image's left, the subject's right eye) and the mouth centre."""

    left_eye: np.ndarray
    right_eye: np.ndarray
    mouth: np.ndarray

    def as_array(self) -> np.ndarray:
        return np.stack([self.left_eye, self.right_eye, self.mouth]).astype(np.float64)


def estimate_landmarks(vertices: np.ndarray) -> Landmarks:
    """Eyes and mouth of a head mesh from its width and the top of its skull (see
    EYE_LINE_BELOW_TOP); each point sits on the frontmost surface near it, so turning the
    head moves it as the face's own features move. A neck or shoulders below do not matter."""
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    width = float(high[0] - low[0])
    if width <= 0:
        raise BankError("mesh has zero width; pass a head mesh with the face towards +z, y up")
    centre_x = float(low[0] + high[0]) / 2
    eye_y = float(high[1]) - EYE_LINE_BELOW_TOP * width
    points = [
        (centre_x - HALF_EYE_DISTANCE * width, eye_y),
        (centre_x + HALF_EYE_DISTANCE * width, eye_y),
        (centre_x, eye_y - EYE_TO_MOUTH * width),
    ]
    radius = 0.05 * width
    surface = [_front_surface(vertices, x, y, radius) for x, y in points]
    return Landmarks(*(np.array([x, y, z]) for (x, y), z in zip(points, surface, strict=True)))


def _front_surface(vertices: np.ndarray, x: float, y: float, radius: float) -> float:
    """z of the frontmost vertex within `radius` of (x, y) in the image plane (the nearest
    vertex's z when none is that close)."""
    distance = np.hypot(vertices[:, 0] - x, vertices[:, 1] - y)
    near = distance <= radius
    return float(vertices[near, 2].max() if near.any() else vertices[np.argmin(distance), 2])


def ffhq_framing(landmarks: np.ndarray) -> Framing:
    """The FFHQ-aligned crop of a face whose eyes and mouth project to these points.

    ``landmarks`` is (3, 2+) camera-space points (left eye, right eye, mouth; x right, y up).
    The crop's centre and size follow FFHQ alignment; its rotation does not: FFHQ would
    turn the crop to level the eyes, which would undo a requested roll.
    """
    # FFHQ works in image coordinates (y down).
    left_eye, right_eye, mouth = (np.array([p[0], -p[1]], dtype=np.float64) for p in landmarks)
    eye_avg = (left_eye + right_eye) / 2
    eye_to_eye = right_eye - left_eye
    eye_to_mouth = mouth - eye_avg
    half = max(
        FFHQ_EYE_TO_EYE_FACTOR * float(np.hypot(*eye_to_eye)),
        FFHQ_EYE_TO_MOUTH_FACTOR * float(np.hypot(*eye_to_mouth)),
    )
    if half <= 0:
        raise BankError("the head's eyes and mouth coincide; pass a head mesh, face towards +z")
    centre = eye_avg + FFHQ_CENTRE_TOWARDS_MOUTH * eye_to_mouth
    return Framing(centre_x=float(centre[0]), centre_y=float(-centre[1]), extent=2 * half)


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
    framing: Framing | None = None,
    landmarks: Landmarks | None = None,
) -> np.ndarray:
    """Render camera-space normals of a posed mesh as a uint8 (size, size, 3) RGB image,
    with EMOCA's conventions (module docstring).

    The mesh rotates about the centre of its neutral bounding box. By default each pose is
    framed as FFHQ alignment would crop a photo of it: :func:`ffhq_framing` of the posed
    ``landmarks`` (default :func:`estimate_landmarks`). An explicit ``framing`` is used as
    given for every pose.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = _outward(vertices, np.asarray(faces, dtype=np.int64))
    rotation = rotation_matrix(yaw, pitch, roll)
    pivot = (vertices.min(axis=0) + vertices.max(axis=0)) / 2
    posed = (vertices - pivot) @ rotation.T + pivot
    normals = vertex_normals(vertices, faces) @ rotation.T
    if framing is None:
        points = (landmarks or estimate_landmarks(vertices)).as_array()
        framing = ffhq_framing((points - pivot) @ rotation.T + pivot)

    scale = size / framing.extent
    screen = np.empty((len(posed), 3))
    screen[:, 0] = (posed[:, 0] - framing.centre_x) * scale + size / 2
    screen[:, 1] = (framing.centre_y - posed[:, 1]) * scale + size / 2  # rows grow downwards
    screen[:, 2] = posed[:, 2]

    face_id, bary = _rasterize(screen, faces, size)
    return _shade(face_id, bary, faces, normals, size)


def _outward(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """The triangles wound outwards: reversed, all of them, when the mesh's signed volume
    is negative (a file exported with the other winding). FLAME, which EMOCA renders, is
    wound outwards, so its vertex normals point out of the head; open meshes (FLAME's
    neck and eye openings) still have a clear sign. Flat or tiny volumes are left alone."""
    corners = vertices[faces] - vertices.mean(axis=0)
    volume = np.einsum("ij,ij->i", corners[:, 0], np.cross(corners[:, 1], corners[:, 2])).sum()
    extent = float(np.ptp(vertices, axis=0).max())
    return faces[:, ::-1] if volume < -1e-6 * extent**3 else faces


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
    size: int,
) -> np.ndarray:
    """EMOCA's normal image: the interpolated (not re-normalised) normal where a triangle
    covers the pixel, 0 elsewhere; then the demo's uint8(clamp(n * 0.5 + 0.5) * 255)."""
    normal = np.zeros((size * size, 3))
    covered = np.flatnonzero(face_id >= 0)
    normal[covered] = np.einsum("nk,nkd->nd", bary[covered], normals[faces[face_id[covered]]])
    # float32 as in the demo's torch tensors; astype truncates, i.e. floors these values.
    colour = np.clip(normal.astype(np.float32) * 0.5 + 0.5, 0.0, 1.0) * np.float32(255)
    return colour.astype(np.uint8).reshape(size, size, 3)


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
    width = 2 * semi_axes[0]
    # Features at the proportions estimate_landmarks assumes, so its estimate is exact here.
    eye_x = HALF_EYE_DISTANCE * width
    eye_y = semi_axes[1] - EYE_LINE_BELOW_TOP * width
    mouth_y = eye_y - EYE_TO_MOUTH * width
    points = unit * semi_axes
    x, y, z = points.T.copy()  # features are placed on the undeformed ellipsoid
    below_eyes = np.clip(-y / semi_axes[1], 0, 1)
    # Jaw: the lower face narrows and the chin comes forward of the skull's ellipse.
    points[:, 0] *= 1 - 0.3 * below_eyes**1.5
    points[:, 2] *= 1 - 0.15 * below_eyes**2 * (z < 0)
    front = np.clip(z / semi_axes[2], 0, 1) ** 2  # features only on the face side
    relief = (
        0.022 * _bump(x, y, 0.0, eye_y - 0.032, 0.010, 0.022)  # nose
        + 0.006 * _bump(x, y, 0.0, eye_y + 0.020, 0.045, 0.008)  # brow ridge
        - 0.007 * _bump(np.abs(x), y, eye_x, eye_y, 0.012, 0.009)  # eye sockets
        + 0.005 * _bump(np.abs(x), y, 0.045, eye_y - 0.032, 0.012, 0.012)  # cheekbones
        + 0.003 * _bump(x, y, 0.0, mouth_y + 0.007, 0.018, 0.004)  # upper lip
        - 0.004 * _bump(x, y, 0.0, mouth_y, 0.020, 0.003)  # mouth line
        + 0.003 * _bump(x, y, 0.0, mouth_y - 0.009, 0.016, 0.004)  # lower lip
        + 0.008 * _bump(x, y, 0.0, -0.100, 0.018, 0.012)  # chin
    )
    outward = unit / semi_axes  # ellipsoid normal direction
    outward /= np.linalg.norm(outward, axis=1, keepdims=True)
    return points + outward * (front * relief)[:, None]
