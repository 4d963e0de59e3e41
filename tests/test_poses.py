"""Normal-map renderer geometry, mesh IO, and pose banks (folder, mesh, procedural, cache)."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from insightface.utils.transform import matrix2angle

from arc2face_engine.controls import poses as poses_module
from arc2face_engine.controls.poses import Pose, PoseBank, load_pose_bank, pose_name
from arc2face_engine.controls.render import (
    BACKGROUND,
    Framing,
    Landmarks,
    estimate_landmarks,
    ffhq_framing,
    procedural_head,
    read_mesh,
    render_normals,
    rotation_matrix,
)
from schemas.errors import BankError

CENTRED = Framing(centre_x=0.0, centre_y=0.0, extent=3.0)


def write_obj(vertices: np.ndarray, faces: np.ndarray) -> bytes:
    """A triangle mesh as OBJ bytes (1-based indices): mesh files for the tests."""
    out = io.StringIO()
    np.savetxt(out, vertices, fmt="v %.6f %.6f %.6f")
    np.savetxt(out, np.asarray(faces) + 1, fmt="f %d %d %d")
    return out.getvalue().encode()


def procedural_landmarks() -> Landmarks:
    """The procedural head's eye-socket and mouth centres (neutral pose, on its surface)."""
    vertices, _ = procedural_head(64)
    return estimate_landmarks(vertices)



def uv_sphere(rings: int = 24, segments: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Unit sphere; rings even, so (0, 0, 1) is a vertex; triangles wound outwards."""
    vertices = [[0.0, 1.0, 0.0]]
    for r in range(1, rings):
        theta = math.pi * r / rings
        for s in range(segments):
            phi = 2 * math.pi * s / segments
            vertices.append(
                [math.sin(theta) * math.sin(phi), math.cos(theta), math.sin(theta) * math.cos(phi)]
            )
    vertices.append([0.0, -1.0, 0.0])
    faces = []
    bottom = len(vertices) - 1
    for s in range(segments):
        t = (s + 1) % segments
        faces.append([0, 1 + s, 1 + t])
        last = 1 + (rings - 2) * segments
        faces.append([bottom, last + t, last + s])
        for r in range(rings - 2):
            up, down = 1 + r * segments, 1 + (r + 1) * segments
            faces += [[up + s, down + s, up + t], [up + t, down + s, down + t]]
    return np.array(vertices), np.array(faces)


def square(half: float = 1.0, z: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A flat square facing +z (counter-clockwise seen from the camera)."""
    vertices = np.array([[-half, -half, z], [half, -half, z], [half, half, z], [-half, half, z]])
    return vertices, np.array([[0, 1, 2], [0, 2, 3]])


def colour_of(normal: tuple[float, float, float]) -> np.ndarray:
    """EMOCA's / the Arc2Face demo's colour of a normal: floor((n * 0.5 + 0.5) * 255)."""
    return np.floor((np.asarray(normal) * 0.5 + 0.5) * 255)


def decode(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) / 255 * 2 - 1


def covered(image: np.ndarray) -> np.ndarray:
    """Pixels a surface covers: anything but the mid-grey background."""
    return (image != np.array(BACKGROUND, np.uint8)).any(axis=2)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------------------------------------
# Renderer geometry


def test_sphere_head_on_normals_silhouette_and_rim():
    size = 65  # odd: the centre pixel's sample point is exactly the sphere's centre
    image = render_normals(*uv_sphere(), size=size, framing=CENTRED)
    centre, radius = size / 2, size / 3.0  # extent 3 -> unit radius is a third of the width
    assert image[32, 32].tolist() == [127, 127, 255]  # camera-facing: floor(127.5), 255

    rows, cols = np.mgrid[0:size, 0:size] + 0.5
    distance = np.hypot(cols - centre, rows - centre)
    assert (image[distance > radius + 1] == 127).all()  # background: normal 0 -> 127
    assert covered(image)[distance < radius - 1].all()

    # The whole normal field matches the sphere's (x, y up, z) away from the rim.
    inner = distance < 0.9 * radius
    x, y = (cols - centre) / radius, (centre - rows) / radius
    expected = np.stack([x, y, np.sqrt(np.clip(1 - x**2 - y**2, 0, 1))], axis=-1)
    assert np.abs(decode(image)[inner] - expected[inner]).max() < 0.06

    middle = image[32]
    left, right = np.flatnonzero(covered(image)[32])[[0, -1]]
    assert middle[left, 0] < 40 and middle[right, 0] > 215  # +x is image-right: red high
    column = image[:, 32]
    top, bottom = np.flatnonzero(covered(image)[:, 32])[[0, -1]]
    assert column[top, 1] > 215 and column[bottom, 1] < 40  # +y is up: green high


def test_axis_colours_of_planes_facing_right_up_and_camera():
    """EMOCA's world frame: x right -> red, y up -> green, z to the camera -> blue."""
    plane = square(0.8)
    quarter = math.sqrt(0.5)
    right = render_normals(*plane, yaw=45, size=33, framing=CENTRED)[16, 16]
    assert right.tolist() == colour_of((quarter, 0, quarter)).tolist()
    assert right[0] > 127 and right[1] == 127
    up = render_normals(*plane, pitch=45, size=33, framing=CENTRED)[16, 16]
    assert up.tolist() == colour_of((0, quarter, quarter)).tolist()
    assert up[1] > 127 and up[0] == 127
    left_down = render_normals(*plane, yaw=-60, size=33, framing=CENTRED)[16, 16]
    assert left_down[0] < 127 and left_down[2] == colour_of((0, 0, 0.5))[2]


def test_interpolated_normals_are_not_renormalised():
    """EMOCA interpolates unit vertex normals and uses them as they are: inside the
    triangles of a coarse sphere they are shorter than 1."""
    image = render_normals(*uv_sphere(6, 12), size=65, framing=CENTRED)
    rows, cols = np.mgrid[0:65, 0:65] + 0.5
    inner = np.hypot(cols - 32.5, rows - 32.5) < 0.8 * 65 / 3
    lengths = np.linalg.norm(decode(image)[inner], axis=1)
    assert lengths.min() < 0.95  # renormalised normals would all be 1 +- quantisation
    assert lengths.max() < 1.0 + 2 / 255


def cube(open_front: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """[-1, 1]^3 with quads wound outwards, each with its own corners (flat normals);
    optionally without its +z (front) face."""
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
    quads = {
        "-x": [0, 1, 3, 2], "+x": [4, 6, 7, 5], "-y": [0, 4, 5, 1],
        "+y": [2, 3, 7, 6], "-z": [0, 2, 6, 4], "+z": [1, 5, 7, 3],
    }  # fmt: skip
    kept = [quad for side, quad in quads.items() if not (open_front and side == "+z")]
    vertices = np.concatenate([corners[quad] for quad in kept])
    faces = [[4 * q, 4 * q + i, 4 * q + i + 1] for q in range(len(kept)) for i in (1, 2)]
    return vertices, np.array(faces)


def test_back_facing_triangles_keep_their_normal():
    """No per-triangle flipping: looking into an open box, its back wall shows the normal
    its winding gives, pointing away (as FLAME's inner mouth walls do in EMOCA renders)."""
    closed = render_normals(*cube(), size=33, framing=CENTRED)
    assert closed[16, 16].tolist() == [127, 127, 255]
    opened = render_normals(*cube(open_front=True), size=33, framing=CENTRED)
    assert opened[16, 16].tolist() == [127, 127, 0]  # normal (0, 0, -1)


@pytest.mark.parametrize(
    ("yaw", "pitch", "roll", "normal"),
    [
        (30, 0, 0, (0.5, 0.0, math.sqrt(3) / 2)),  # yaw > 0 turns the face to image-right
        (-30, 0, 0, (-0.5, 0.0, math.sqrt(3) / 2)),
        (0, 30, 0, (0.0, 0.5, math.sqrt(3) / 2)),  # pitch > 0 lifts the face
        (30, 0, 90, (0.0, -0.5, math.sqrt(3) / 2)),  # roll turns the image plane clockwise
        (0, 0, 45, (0.0, 0.0, 1.0)),  # roll alone keeps a camera-facing plane facing it
    ],
)
def test_rotated_plane_has_the_rotated_normal(yaw, pitch, roll, normal):
    image = render_normals(*square(), yaw=yaw, pitch=pitch, roll=roll, size=33, framing=CENTRED)
    assert np.abs(image[16, 16] - colour_of(normal)).max() <= 1


def test_roll_rotates_the_silhouette_clockwise():
    # A bar on the right of the pivot; a speck on the left keeps the pivot at x = 0.
    bar = np.array([[0.3, -0.1, 0], [1.0, -0.1, 0], [1.0, 0.1, 0], [0.3, 0.1, 0]])
    speck = np.array([[-1.0, 0.0, 0], [-0.99, 0.0, 0], [-0.99, 0.01, 0]])
    vertices = np.concatenate([bar, speck])
    faces = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6]])
    size = 64

    def bar_centroid(roll: float) -> tuple[float, float]:
        image = render_normals(vertices, faces, roll=roll, size=size, framing=CENTRED)
        rows, cols = np.nonzero(covered(image))
        return rows.mean() - size / 2, cols.mean() - size / 2

    row, col = bar_centroid(0)
    assert col > 5 and abs(row) < 1  # to the right
    row, col = bar_centroid(90)
    assert row > 5 and abs(col) < 1  # clockwise on screen: right goes down
    row, col = bar_centroid(-90)
    assert row < -5 and abs(col) < 1


@pytest.mark.parametrize("angles", [(30, 0, 0), (0, 20, 0), (0, 0, 15), (-40, 15, -10)])
def test_angles_follow_insightface_pose_signs(angles):
    yaw, pitch, roll = angles
    flip_y = np.diag([1.0, -1.0, 1.0])  # insightface's landmark frame has y down
    measured_pitch, measured_yaw, measured_roll = matrix2angle(
        flip_y @ rotation_matrix(yaw, pitch, roll) @ flip_y
    )
    assert (measured_yaw, measured_pitch, measured_roll) == pytest.approx(angles, abs=1e-6)


def test_inward_wound_mesh_is_turned_around_as_a_whole():
    vertices, faces = uv_sphere(12, 24)
    outward = render_normals(vertices, faces, size=33, framing=CENTRED)
    inward = render_normals(vertices, faces[:, ::-1], size=33, framing=CENTRED)
    np.testing.assert_array_equal(outward, inward)


# ---------------------------------------------------------------------------------------------
# Procedural head


def test_procedural_head_is_closed_and_outward():
    vertices, faces = procedural_head(16)
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert (counts == 2).all()  # every edge shared by exactly two triangles
    corners = vertices[faces]
    volume = np.einsum("ij,ij->i", corners[:, 0], np.cross(corners[:, 1], corners[:, 2])).sum()
    assert volume > 0


# FFHQ alignment of a frontal face with eyes d apart and the mouth m below them, when
# 2.0 * d >= 1.8 * m: a crop of side 4d centred 0.1 m below the eye line, resized to 512.
# So the eyes land at x = 256 -+ 64 and y = 256 - 12.8 m/d, the mouth at y = 256 + 115.2 m/d.
# The FFHQ 512 five-point template (facexlib's mean over FFHQ) puts them at (193.0, 239.9),
# (318.9, 240.2) and (257.2, 371.3), which the head must match within a few pixels.
FFHQ_EYES_512 = np.array([[192.98, 239.95], [318.90, 240.19]])
FFHQ_MOUTH_512 = np.array([257.18, 371.28])


def projected(points: np.ndarray, framing: Framing, size: int) -> np.ndarray:
    scale = size / framing.extent
    return np.stack(
        [(points[:, 0] - framing.centre_x) * scale, (framing.centre_y - points[:, 1]) * scale],
        axis=1,
    ) + size / 2


def test_frontal_head_lands_on_the_ffhq_crop_eyes_and_mouth():
    landmarks = procedural_landmarks()
    pixels = projected(landmarks.as_array(), ffhq_framing(landmarks.as_array()), 512)
    eyes, mouth = pixels[:2], pixels[2]
    np.testing.assert_allclose(eyes[:, 0], [192, 320], atol=1e-6)  # exactly 4 eye distances
    ratio = (landmarks.left_eye[1] - landmarks.mouth[1]) / (2 * landmarks.right_eye[0])
    np.testing.assert_allclose(eyes[:, 1], 256 - 12.8 * ratio, atol=1e-6)
    np.testing.assert_allclose(mouth, [256, 256 + 115.2 * ratio], atol=1e-6)
    assert np.abs(eyes - FFHQ_EYES_512).max() < 4
    assert np.abs(mouth - FFHQ_MOUTH_512).max() < 4


def test_rendered_head_has_its_features_at_the_ffhq_rows():
    """In the rendered image itself: at the template's eye columns the eye sockets, and at
    its mouth column the mouth line, are where the template puts them. Each is a dent whose
    upper wall faces down and lower wall faces up, so green rises fastest through it."""
    size = 256
    image = render_normals(*procedural_head(64), size=size).astype(int)

    def steepest_green_rise(x: float, y: float) -> int:
        row, col = round(y), round(x)
        rows = np.arange(row - 12, row + 13)
        return int(rows[np.argmax(image[rows + 3, col, 1] - image[rows - 3, col, 1])])

    for x, y in FFHQ_EYES_512 * size / 512:
        assert abs(steepest_green_rise(x, y) - y) <= 2
    x, y = FFHQ_MOUTH_512 * size / 512
    assert abs(steepest_green_rise(x, y) - y) <= 5  # lips span ~1 ring (5 px) of the mesh


def test_estimated_landmarks_follow_the_head_not_the_neck():
    vertices, _ = procedural_head(64)
    neck = np.array([[0.0, -0.3, 0.0], [0.04, -0.3, 0.0]])  # a neck below changes nothing
    with_neck = estimate_landmarks(np.concatenate([vertices, neck]))
    alone = estimate_landmarks(vertices)
    np.testing.assert_allclose(with_neck.as_array(), alone.as_array())
    scaled = estimate_landmarks(vertices * 10)  # a mesh in centimetres-like units
    np.testing.assert_allclose(scaled.as_array(), alone.as_array() * 10, rtol=1e-9)


def test_procedural_head_is_centred_on_its_eyes_and_symmetric():
    size = 96
    image = render_normals(*procedural_head(32), size=size)
    mask = covered(image)
    rows, cols = np.nonzero(mask)
    assert cols.mean() == pytest.approx(size / 2, abs=1.0)
    width = (cols.max() - cols.min() + 1) / size
    assert width == pytest.approx(0.15 / 0.256, abs=0.04)  # head width / (4 eye distances)
    assert rows.min() < 0.1 * size and rows.max() > 0.85 * size
    assert (image[0] == 127).all() and (image[-1] == 127).all()  # grey background

    mirrored = image[:, ::-1].astype(int)
    assert (mask == mask[:, ::-1]).mean() > 0.99
    both = mask & mask[:, ::-1]
    assert np.abs(254 - mirrored[both, 0] - image[both, 0]).mean() < 3  # red flips
    assert np.abs(mirrored[both, 1:] - image[both, 1:]).mean() < 3


def test_each_pose_is_framed_like_an_ffhq_crop_of_it():
    """A turned head is cropped as FFHQ alignment would crop a photo of it: around its
    eyes and mouth, not its skull, so the eyes' midpoint stays at the centre column."""
    vertices, faces = procedural_head(32)
    landmarks = procedural_landmarks()
    pivot = (vertices.min(axis=0) + vertices.max(axis=0)) / 2
    for yaw in (-60, -30, 30, 60):
        posed = (landmarks.as_array() - pivot) @ rotation_matrix(yaw, 10, 0).T + pivot
        pixels = projected(posed, ffhq_framing(posed), 512)
        eye_middle = pixels[:2].mean(axis=0)
        assert eye_middle[0] == pytest.approx(256 - 0.1 * (pixels[2, 0] - eye_middle[0]))
    fixed = Framing(0.0, 0.0, 0.4)
    left = render_normals(vertices, faces, yaw=-40, size=64, framing=fixed)
    right = render_normals(vertices, faces, yaw=40, size=64, framing=fixed)
    assert (covered(left) == covered(right)[:, ::-1]).mean() > 0.99  # fixed stays fixed


def test_landmarks_may_be_given():
    vertices, faces = procedural_head(16)
    given = Landmarks(np.array([-0.02, 0.0, 0.09]), np.array([0.02, 0.0, 0.09]), np.zeros(3))
    image = render_normals(vertices, faces, size=64, landmarks=given)
    assert not np.array_equal(image, render_normals(vertices, faces, size=64))


def test_opposite_yaws_are_mirror_images():
    vertices, faces = procedural_head(32)
    right = render_normals(vertices, faces, yaw=35, roll=10, size=64).astype(int)
    left = render_normals(vertices, faces, yaw=-35, roll=-10, size=64)[:, ::-1].astype(int)
    both = covered(right) & covered(left)
    assert (covered(right) == covered(left)).mean() > 0.99
    assert np.abs(254 - left[both, 0] - right[both, 0]).mean() < 3
    assert np.abs(left[both, 1:] - right[both, 1:]).mean() < 3
    assert not np.array_equal(right, render_normals(vertices, faces, size=64))


def test_full_size_render_is_fast():
    vertices, faces = procedural_head()
    start = time.perf_counter()
    image = render_normals(vertices, faces, yaw=20, pitch=-10, size=512)
    assert time.perf_counter() - start < 3.0  # ~0.3 s on one core; slack for a shared CPU
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8


# ---------------------------------------------------------------------------------------------
# Mesh files


def test_obj_quads_are_split_and_indices_resolved(tmp_path: Path):
    cube = "\n".join(
        [
            "# unit cube, quads, mixed index styles",
            *(f"v {x} {y} {z}" for x in (0, 1) for y in (0, 1) for z in (0, 1)),
            "vn 0 0 1",
            "f 1/1/1 2/2/1 4/3/1 3/4/1",
            "f 5//1 7//1 8//1 6//1",
            "f 1 5 6 2",
            "f 3 4 8 7",
            "f -8 -6 -2 -4",
            "f 2 6 8 4",
        ]
    )
    (tmp_path / "cube.obj").write_text(cube)
    vertices, faces = read_mesh(str(tmp_path / "cube.obj"))
    assert vertices.shape == (8, 3) and faces.shape == (12, 3)
    assert faces.min() == 0 and faces.max() == 7
    assert [0, 1, 3] in faces.tolist()  # first quad fanned around its first corner


def write_ply(vertices: np.ndarray, faces: np.ndarray, fmt: str) -> bytes:
    header = (
        f"ply\nformat {fmt} 1.0\ncomment test\nelement vertex {len(vertices)}\n"
        "property float x\nproperty float y\nproperty float z\nproperty uchar red\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    ).encode()
    if fmt == "ascii":
        lines = [f"{x} {y} {z} 7" for x, y, z in vertices]
        lines += ["3 " + " ".join(map(str, face)) for face in faces]
        return header + ("\n".join(lines) + "\n").encode()
    order = "<" if fmt == "binary_little_endian" else ">"
    vertex_dtype = np.dtype([("xyz", order + "f4", (3,)), ("red", "u1")])
    records = np.zeros(len(vertices), vertex_dtype)
    records["xyz"], records["red"] = vertices, 7
    face_dtype = np.dtype([("n", "u1"), ("i", order + "i4", (3,))])
    face_records = np.zeros(len(faces), face_dtype)
    face_records["n"], face_records["i"] = 3, faces
    return header + records.tobytes() + face_records.tobytes()


@pytest.mark.parametrize("fmt", ["ascii", "binary_little_endian", "binary_big_endian"])
def test_ply_round_trip(tmp_path: Path, fmt: str):
    vertices, faces = procedural_head(8)
    vertices = vertices.astype(np.float32).astype(np.float64)
    (tmp_path / "head.ply").write_bytes(write_ply(vertices, faces, fmt))
    read_vertices, read_faces = read_mesh(str(tmp_path / "head.ply"))
    np.testing.assert_allclose(read_vertices, vertices, atol=1e-6)
    np.testing.assert_array_equal(read_faces, faces)


def test_ply_with_a_quad_is_split(tmp_path: Path):
    ply = (
        b"ply\nformat binary_little_endian 1.0\nelement vertex 4\nproperty float x\n"
        b"property float y\nproperty float z\nelement face 1\n"
        b"property list uchar uint vertex_indices\nend_header\n"
    )
    ply += np.array(square()[0], "<f4").tobytes() + np.array([4], "u1").tobytes()
    ply += np.array([0, 1, 2, 3], "<u4").tobytes()
    (tmp_path / "quad.ply").write_bytes(ply)
    _, faces = read_mesh(str(tmp_path / "quad.ply"))
    assert faces.tolist() == [[0, 1, 2], [0, 2, 3]]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("bad_index.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 9\n"),
        ("no_faces.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\n"),
        ("bad_number.obj", "v 0 zero 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n"),
        (
            "truncated.ply",
            "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\n"
            "property float y\nproperty float z\nend_header\n0 0 0\n1 0\n",
        ),
        ("mesh.stl", "solid nothing\n"),
    ],
)
def test_malformed_mesh_is_a_one_line_bank_error(tmp_path: Path, name: str, content: str):
    (tmp_path / name).write_text(content)
    with pytest.raises(BankError) as error:
        read_mesh(str(tmp_path / name))
    assert name in one_line(error)


def test_missing_mesh_is_a_bank_error(tmp_path: Path):
    with pytest.raises(BankError) as error:
        read_mesh(str(tmp_path / "nope.obj"))
    assert "does not exist" in one_line(error)


# ---------------------------------------------------------------------------------------------
# Pose banks


@pytest.fixture
def render_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Count real renders made by the pose bank; starts with an empty in-process cache."""
    calls: list[tuple] = []
    real = poses_module.render_normals

    def counting(*args, **kwargs):
        calls.append(args[2:5])
        return real(*args, **kwargs)

    monkeypatch.setattr(poses_module, "render_normals", counting)
    poses_module._render_cache.clear()
    yield calls
    poses_module._render_cache.clear()


def test_procedural_bank_renders_the_grid_once(render_calls: list, tmp_path: Path):
    bank = PoseBank.procedural([-30, 0, 30], [0, 10], [0], size=32, resolution=12)
    assert len(bank) == 6 and len(render_calls) == 6
    assert bank.names[0] == "y-30_p+00_r+00" and bank[5].name == "y+30_p+10_r+00"
    assert (bank[5].yaw, bank[5].pitch, bank[5].roll) == (30.0, 10.0, 0.0)
    assert bank[0].image.shape == (32, 32, 3) and bank[0].image.dtype == np.uint8
    np.testing.assert_array_equal(
        bank[5].image, render_normals(*procedural_head(12), yaw=30, pitch=10, size=32)
    )

    again = PoseBank.procedural([-30, 0, 30], [0, 10], [0], size=32, resolution=12)
    assert len(render_calls) == 6  # every pose came from the in-process cache
    assert all(a.image is b.image for a, b in zip(bank, again, strict=True))

    PoseBank.procedural([0], [0], [0], size=48, resolution=12)
    assert len(render_calls) == 7  # a different size is a different map


def test_disk_cache_survives_a_new_process(render_calls: list, tmp_path: Path):
    cache = str(tmp_path / "cache")
    first = PoseBank.procedural([0, 20], [0], [5], size=32, resolution=12, cache_dir=cache)
    assert len(render_calls) == 2 and len(list((tmp_path / "cache").glob("*.png"))) == 2
    poses_module._render_cache.clear()  # as in a fresh worker process
    second = PoseBank.procedural([0, 20], [0], [5], size=32, resolution=12, cache_dir=cache)
    assert len(render_calls) == 2
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.image, b.image)


def test_mesh_bank_matches_a_direct_render(render_calls: list, tmp_path: Path):
    vertices, faces = procedural_head(10)
    (tmp_path / "head.obj").write_bytes(write_obj(vertices, faces))
    bank = PoseBank.from_mesh(str(tmp_path / "head.obj"), [15], [-5], [0], size=32)
    read_vertices, read_faces = read_mesh(str(tmp_path / "head.obj"))
    np.testing.assert_array_equal(
        bank[0].image, render_normals(read_vertices, read_faces, 15, -5, 0, size=32)
    )


def test_grid_outside_the_frontal_hemisphere_is_rejected():
    with pytest.raises(BankError) as error:
        PoseBank.procedural([0, 120], [0], [0], size=16, resolution=6)
    assert "frontal hemisphere" in one_line(error)


def test_pose_names():
    assert pose_name(30, 0, 0) == "y+30_p+00_r+00"
    assert pose_name(-5, 10, -90) == "y-05_p+10_r-90"
    assert pose_name(7.5, 0, 0) == "y+7.5_p+00_r+00"


def test_folder_bank_round_trip(tmp_path: Path):
    bank = PoseBank.procedural([-30, 0, 30], [0, 10], [0], size=32, resolution=12)
    bank.save(str(tmp_path / "bank"))
    loaded = PoseBank.from_folder(str(tmp_path / "bank"))
    assert loaded.names == bank.names
    for a, b in zip(bank, loaded, strict=True):
        assert (a.yaw, a.pitch, a.roll) == (b.yaw, b.pitch, b.roll)
        np.testing.assert_array_equal(a.image, b.image)


@pytest.mark.parametrize("name", ["bank.parquet", "poses.csv", "bank.npy"])
def test_save_to_a_file_path_is_refused(tmp_path: Path, name: str):
    bank = PoseBank.procedural([0], [0], [0], size=16, resolution=6)
    with pytest.raises(BankError, match="a pose bank is a folder") as error:
        bank.save(str(tmp_path / name))
    assert "pass a folder path" in one_line(error)
    assert not (tmp_path / name).exists()


def test_save_over_an_existing_file_is_refused(tmp_path: Path):
    (tmp_path / "bank").write_text("not a folder")
    bank = PoseBank.procedural([0], [0], [0], size=16, resolution=6)
    with pytest.raises(BankError, match="a pose bank is a folder"):
        bank.save(str(tmp_path / "bank"))


def test_folder_bank_round_trip_on_s3(s3_uri):
    uri, storage_options = s3_uri
    bank = PoseBank.procedural([0, 25], [0], [0], size=24, resolution=8)
    bank.save(f"{uri}/poses", storage_options=storage_options)
    loaded = PoseBank.from_folder(f"{uri}/poses", storage_options=storage_options)
    assert loaded.names == bank.names
    np.testing.assert_array_equal(loaded[1].image, bank[1].image)


def write_folder(folder: Path, rows: list[dict], images: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for file, image in images.items():
        cv2.imwrite(str(folder / file), image)
    header = list(rows[0])
    lines = [",".join(header)] + [",".join(str(row[c]) for c in header) for row in rows]
    (folder / "poses.csv").write_text("\n".join(lines) + "\n")


def test_csv_folder_bank_names_from_files_and_resizes(tmp_path: Path):
    rgb = np.full((40, 40, 3), (255, 128, 128), np.uint8)  # BGR on disk
    write_folder(
        tmp_path,
        [{"file": "a.png", "yaw": 10, "pitch": -5, "roll": 0}],
        {"a.png": rgb},
    )
    bank = PoseBank.from_folder(str(tmp_path), size=20)
    assert bank.names == ["a"] and (bank[0].yaw, bank[0].pitch) == (10.0, -5.0)
    assert bank[0].image.shape == (20, 20, 3)
    assert bank[0].image[0, 0].tolist() == [128, 128, 255]  # read as RGB


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"file": "b.png", "yaw": 120, "pitch": 0, "roll": 0}, "frontal hemisphere"),
        ({"file": "b.png", "yaw": "nan", "pitch": 0, "roll": 0}, "yaw is empty or NaN"),
        ({"file": "b.png", "yaw": 0, "pitch": "inf", "roll": 0}, "finite"),
        ({"file": "b.png", "yaw": 0, "pitch": 0, "roll": "left"}, "not a number"),
        ({"file": "missing.png", "yaw": 0, "pitch": 0, "roll": 0}, "does not exist"),
        ({"file": "gray.png", "yaw": 0, "pitch": 0, "roll": 0}, "not RGB"),
        ({"file": "junk.png", "yaw": 0, "pitch": 0, "roll": 0}, "does not decode"),
    ],
)
def test_bad_table_row_is_a_one_line_bank_error(tmp_path: Path, row: dict, expected: str):
    good = np.zeros((16, 16, 3), np.uint8)
    write_folder(
        tmp_path,
        [{"file": "a.png", "yaw": 0, "pitch": 0, "roll": 0}, row],
        {"a.png": good, "b.png": good, "gray.png": good[..., 0]},
    )
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(BankError) as error:
        PoseBank.from_folder(str(tmp_path))
    message = one_line(error)
    assert "row 1" in message and row["file"] in message and expected in message


def test_table_without_angle_columns_is_rejected(tmp_path: Path):
    pq.write_table(pa.table({"file": ["a.png"], "yaw": [0.0]}), tmp_path / "poses.parquet")
    with pytest.raises(BankError) as error:
        PoseBank.from_folder(str(tmp_path))
    assert "pitch, roll" in one_line(error)


def test_folder_without_table_is_rejected(tmp_path: Path):
    with pytest.raises(BankError) as error:
        PoseBank.from_folder(str(tmp_path))
    assert "poses.csv" in one_line(error)


class Section:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def test_load_pose_bank_dispatches_on_kind(tmp_path: Path):
    assert load_pose_bank({"kind": "none"}) is None
    procedural = load_pose_bank(
        Section(kind="procedural", path=None, yaw=[0, 30], pitch=[0], roll=[0]), size=24
    )
    assert procedural.names == ["y+00_p+00_r+00", "y+30_p+00_r+00"]
    procedural.save(str(tmp_path / "bank"))
    folder = load_pose_bank({"kind": "folder", "path": str(tmp_path / "bank")}, size=24)
    assert folder.names == procedural.names
    (tmp_path / "head.obj").write_bytes(write_obj(*procedural_head(8)))
    mesh = load_pose_bank(
        {
            "kind": "mesh",
            "path": str(tmp_path / "head.obj"),
            "yaw": [10],
            "pitch": [0],
            "roll": [0],
        },
        size=24,
    )
    assert len(mesh) == 1 and mesh[0].image.shape == (24, 24, 3)
    with pytest.raises(BankError) as error:
        load_pose_bank({"kind": "mesh", "path": None})
    assert "needs a path" in one_line(error)
    with pytest.raises(BankError):
        load_pose_bank({"kind": "sculpture"})


def test_pose_is_frozen():
    pose = Pose("p", 0.0, 0.0, 0.0, np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(AttributeError):
        pose.yaw = 1.0  # type: ignore[misc]


def test_banks_poses_cli_writes_grey_background_maps(tmp_path: Path):
    """`banks poses` as a user runs it: EMOCA's mid-grey background and camera-facing blue."""
    out = tmp_path / "bank"
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "banks", "poses", str(out), "--yaw=-30,0",
         "--size", "128"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    bank = PoseBank.from_folder(str(out))
    assert bank.names == ["y-30_p+00_r+00", "y+00_p+00_r+00"]
    for pose in bank:
        assert pose.image[0, 0].tolist() == [127, 127, 127]
        assert (pose.image[:, 0] == 127).all() and (pose.image[-1] == 127).all()
    frontal = bank[1].image.reshape(-1, 3).astype(int)
    most_facing = frontal[np.argmax(frontal[:, 2])]  # the surface point facing the camera
    assert most_facing[2] >= 253 and np.abs(most_facing[:2] - 127).max() <= 16
