"""Tiny ONNX stand-ins for insightface's antelopev2 pack plus Arc2Face's arcface.onnx.

Same file names, same input/output signatures as the published models, so insightface's
model zoo routes each one to the class it routes the real one to (SCRFD, Landmark,
Attribute, ArcFaceONNX) and every line of the analysis code runs unchanged. A few KB each.

The detector is designed rather than random, so tests mean something: it finds bright
blobs. At every anchor it compares the mean brightness of a window around the anchor with
the ring around that window (a centre-surround blob detector at three scales), and it
regresses the face box and the five keypoints from the brightness moments (centroid and
spread) of the blob near the anchor. Every anchor that sees the same blob therefore
predicts the same box and NMS keeps one face per blob: a bright disc on a dark background
is one face, two discs are two faces, a dark image has none. Anchors whose contrast is
well below the image's strongest anchor are damped, which on noise-like images (what tiny
random diffusion models produce) gives a mix of no face, one face and several faces.

The 3D 68-point landmark model outputs insightface's own mean shape (plus a small
input-dependent perturbation), so the head pose that insightface's Landmark computes from
it is near frontal. The recognition model is two random convolutions, pooling and a
linear map to 512 values: deterministic, and different crops give different embeddings.

Deterministic: the same call writes the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from arc2face_engine.faces.torch_analyzer import ARCFACE_TEMPLATE_112, insightface_mean_shape

DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
LANDMARK_2D_FILE = "2d106det.onnx"
LANDMARK_3D_FILE = "1k3d68.onnx"
GENDERAGE_FILE = "genderage.onnx"
RECOGNITION_FILE = "arcface.onnx"
TINY_ANTELOPEV2_FILES = (
    DETECTOR_FILE,
    LANDMARK_3D_FILE,
    LANDMARK_2D_FILE,
    GENDERAGE_FILE,
    RECOGNITION_FILE,
)

# onnxruntime 1.32 runs these; IR 8 keeps the files readable by older runtimes too.
OPSET = 18
IR_VERSION = 8

DETECTOR_STRIDES = (8, 16, 32)
ANCHORS_PER_LOCATION = 2  # SCRFD-10G's layout; both anchors of a location agree here
# The detector analyses a WORKING_GRID^2 copy of its input in cells of 4, 8 and 16 pixels
# (one scale per stride), comparing a centre window of INNER_CELLS^2 cells with the ring
# of the OUTER_CELLS^2 window around it: centre windows of 1/4, 1/2 and all of the image.
WORKING_GRID = 64
WORKING_CELLS = (4, 8, 16)
INNER_CELLS = 4
OUTER_CELLS = 8
# score logit = CONTRAST_GAIN * (contrast - CONTRAST_BIAS) - PEAK_GAIN * (max contrast - contrast)
CONTRAST_GAIN = 25.0
CONTRAST_BIAS = 0.11
PEAK_GAIN = 25.0
BRIGHT_LEVEL = 0.0  # pixels brighter than mid-grey carry the blob's moments

# Five keypoints (eyes, nose, mouth corners) relative to the blob centre, in units of the
# blob radius: insightface's ArcFace template, centred on the face and scaled to it.
KEYPOINT_OFFSETS = (ARCFACE_TEMPLATE_112.astype(np.float32) - np.array([56.0, 64.0], np.float32)) / 48.0


class _Graph:
    """A small builder over onnx.helper: constants, nodes with generated names, outputs."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, op: str) -> str:
        # Node names never start with "Sub"/"Mul": insightface reads those as an
        # mxnet-style in-graph normalisation and would then skip its own.
        self.count += 1
        return f"{self.prefix}_{op.lower()}_{self.count}"

    def const(self, value: np.ndarray | float | list, dtype: type = np.float32) -> str:
        name = self._name("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, output: str | None = None, **attrs: object) -> str:
        name = self._name(op_type)
        output = output or f"{name}_out"
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=name, **attrs))
        return output

    def model(
        self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.prefix, inputs, outputs, self.initializers)
        model = helper.make_model(
            graph,
            producer_name="arc2face_synth.face_analysis_tiny",
            opset_imports=[helper.make_opsetid("", OPSET)],
        )
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model


def _image_input(name: str, size: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 3, size, size])


def _output(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


# --- detector (SCRFD layout) ---------------------------------------------------------------


def _coordinates(g: _Graph, cells: str, spacing: float) -> tuple[str, str]:
    """x (1,1,1,W) and y (1,1,H,1) of the cells of a map, `spacing` apart; cell (i, j) sits
    at (j * spacing, i * spacing), where SCRFD puts its anchors."""
    shape = g.op("Shape", cells)
    axes = []
    for axis, target in ((3, [1, 1, 1, -1]), (2, [1, 1, -1, 1])):
        length = g.op(
            "Cast", g.op("Gather", shape, g.const(axis, np.int64), axis=0), to=TensorProto.FLOAT
        )
        steps = g.op("Range", g.const(0.0), length, g.const(1.0))
        positions = g.op("Mul", steps, g.const(float(spacing)))
        axes.append(g.op("Reshape", positions, g.const(target, np.int64)))
    return axes[0], axes[1]


def _contrast(g: _Graph, brightness_cells: str) -> str:
    """Centre minus surround brightness around each cell. The map is edge-padded first so
    that a uniform image has zero contrast everywhere, borders included."""
    half_outer, half_inner = OUTER_CELLS // 2, INNER_CELLS // 2
    pads = g.const([0, 0, half_outer, half_outer, 0, 0, half_outer - 1, half_outer - 1], np.int64)
    padded = g.op("Pad", brightness_cells, pads, mode="edge")
    outer = g.op("AveragePool", padded, kernel_shape=[OUTER_CELLS] * 2, strides=[1, 1])
    inner_all = g.op("AveragePool", padded, kernel_shape=[INNER_CELLS] * 2, strides=[1, 1])
    shift = half_outer - half_inner
    starts, ends = g.const([shift, shift], np.int64), g.const([-shift, -shift], np.int64)
    inner = g.op("Slice", inner_all, starts, ends, g.const([2, 3], np.int64))
    outer_sum = g.op("Mul", outer, g.const(float(OUTER_CELLS**2)))
    ring_sum = g.op("Sub", outer_sum, g.op("Mul", inner, g.const(float(INNER_CELLS**2))))
    ring = g.op("Div", ring_sum, g.const(float(OUTER_CELLS**2 - INNER_CELLS**2)))
    return g.op("Sub", inner, ring)


def _blob_geometry(g: _Graph, weight_cells: str, cell: int) -> tuple[str, str, str]:
    """Centroid (cx, cy) and radius of the bright mass in the surround window of each
    cell, from its first and second moments (a uniform disc of radius r has variance
    r^2 / 4 per axis, so radius = 2 * std). Units: pixels of the working grid."""
    left, top = _coordinates(g, weight_cells, cell)
    half_cell = g.const(cell / 2.0)
    x, y = g.op("Add", left, half_cell), g.op("Add", top, half_cell)
    moments = g.op(
        "Concat",
        weight_cells,
        g.op("Mul", weight_cells, x),
        g.op("Mul", weight_cells, y),
        g.op("Mul", weight_cells, g.op("Mul", x, x)),
        g.op("Mul", weight_cells, g.op("Mul", y, y)),
        axis=1,
    )
    half = OUTER_CELLS // 2
    pooled = g.op(
        "AveragePool", moments, kernel_shape=[OUTER_CELLS] * 2, strides=[1, 1],
        pads=[half, half, half - 1, half - 1], count_include_pad=1,
    )  # fmt: skip
    mass, mx, my, mxx, myy = (_channel(g, pooled, k) for k in range(5))
    mass = g.op("Add", mass, g.const(1e-6))
    cx, cy = g.op("Div", mx, mass), g.op("Div", my, mass)
    var_x = g.op("Sub", g.op("Div", mxx, mass), g.op("Mul", cx, cx))
    var_y = g.op("Sub", g.op("Div", myy, mass), g.op("Mul", cy, cy))
    # Plus each cell's own spread (a uniform cell of side s has variance s^2 / 12).
    variance = g.op(
        "Add", g.op("Mul", g.op("Add", var_x, var_y), g.const(0.5)), g.const(cell**2 / 12.0)
    )
    radius = g.op("Mul", g.op("Sqrt", g.op("Relu", variance)), g.const(2.0))
    return cx, cy, g.op("Max", radius, g.const(float(cell)))


def _channel(g: _Graph, tensor: str, index: int) -> str:
    return g.op(
        "Slice",
        tensor,
        g.const([index], np.int64),
        g.const([index + 1], np.int64),
        g.const([1], np.int64),
    )


def _level_geometry(
    g: _Graph, brightness: str, weight: str, cell: int, scale_x: str, scale_y: str
) -> str:
    """(1, 4, h, w) contrast, centroid x, centroid y, radius of one scale, on the working
    grid's cells of side `cell`; positions converted to detector-input pixels."""
    pool = {"kernel_shape": [cell, cell], "strides": [cell, cell]}
    brightness_cells = g.op("AveragePool", brightness, **pool)
    weight_cells = g.op("AveragePool", weight, **pool)
    contrast = _contrast(g, brightness_cells)
    cx, cy, radius = _blob_geometry(g, weight_cells, cell)
    mean_scale = g.op("Mul", g.op("Add", scale_x, scale_y), g.const(0.5))
    return g.op(
        "Concat", contrast, g.op("Mul", cx, scale_x), g.op("Mul", cy, scale_y),
        g.op("Mul", radius, mean_scale), axis=1,
    )  # fmt: skip


def _anchor_rows(g: _Graph, per_location: str, width: int, output: str) -> str:
    """(1, C, H, W) per location -> (H * W * anchors, C) rows in SCRFD's anchor order."""
    repeated = g.op("Concat", *[per_location] * ANCHORS_PER_LOCATION, axis=1)
    channels_last = g.op("Transpose", repeated, perm=[0, 2, 3, 1])
    return g.op("Reshape", channels_last, g.const([-1, width], np.int64), output=output)


def _distances(g: _Graph, geometry: str, stride: int) -> tuple[str, str]:
    """SCRFD's regression targets at one stride: box (left, top, right, bottom) and five
    keypoint offsets from each anchor, in units of the stride."""
    cx, cy, radius = (_channel(g, geometry, k) for k in (1, 2, 3))
    ax, ay = _coordinates(g, geometry, stride)
    left = g.op("Sub", ax, g.op("Sub", cx, radius))
    top = g.op("Sub", ay, g.op("Sub", cy, radius))
    right = g.op("Sub", g.op("Add", cx, radius), ax)
    bottom = g.op("Sub", g.op("Add", cy, radius), ay)
    inv_stride = g.const(1.0 / stride)
    box = g.op("Mul", g.op("Concat", left, top, right, bottom, axis=1), inv_stride)
    keypoints = []
    for offset_x, offset_y in KEYPOINT_OFFSETS.tolist():
        keypoints.append(g.op("Sub", g.op("Add", cx, g.op("Mul", radius, g.const(offset_x))), ax))
        keypoints.append(g.op("Sub", g.op("Add", cy, g.op("Mul", radius, g.const(offset_y))), ay))
    return box, g.op("Mul", g.op("Concat", *keypoints, axis=1), inv_stride)


def _stride_sizes(g: _Graph, image_shape: str, stride: int) -> str:
    """[N, 4, H // stride, W // stride]: the Resize `sizes` of a level's geometry."""
    batch = g.op("Slice", image_shape, g.const([0], np.int64), g.const([1], np.int64))
    spatial = g.op("Slice", image_shape, g.const([2], np.int64), g.const([4], np.int64))
    reduced = g.op("Div", spatial, g.const([stride, stride], np.int64))
    return g.op("Concat", batch, g.const([4], np.int64), reduced, axis=0)


def build_tiny_detector() -> onnx.ModelProto:
    """SCRFD-10G-BNKPS's signature: input (1, 3, H, W) normalised RGB; outputs the scores
    (N, 1), box distances (N, 4) and keypoint distances (N, 10) of strides 8, 16, 32.

    The blob analysis runs on a fixed WORKING_GRID x WORKING_GRID copy of the input, so
    that a face found at one detection size is found at any other (as with a trained
    SCRFD, whose anchors span the scales); its maps are resized onto each stride's grid."""
    g = _Graph("scrfd")
    image_shape = g.op("Shape", "input.1")
    # Mean over RGB of the normalised input ((pixel - 127.5) / 128), area-resampled.
    grey = g.op("ReduceMean", "input.1", g.const([1], np.int64), keepdims=1)
    working_size = g.const([1, 1, WORKING_GRID, WORKING_GRID], np.int64)
    grey = g.op("Resize", grey, "", "", working_size, mode="linear", antialias=1)
    # Brightness in [0, 2]: zero padding of the pooling windows reads as black.
    brightness = g.op("Add", grey, g.const(1.0))
    weight = g.op("Relu", g.op("Sub", grey, g.const(BRIGHT_LEVEL)))
    image_size = g.op(
        "Cast",
        g.op("Slice", image_shape, g.const([2], np.int64), g.const([4], np.int64)),
        to=TensorProto.FLOAT,
    )
    to_pixels = g.op("Div", image_size, g.const(float(WORKING_GRID)))
    scale_y, scale_x = (
        g.op("Gather", to_pixels, g.const(axis, np.int64), axis=0) for axis in (0, 1)
    )

    geometries = []
    for stride, cell in zip(DETECTOR_STRIDES, WORKING_CELLS, strict=True):
        geometry = _level_geometry(g, brightness, weight, cell, scale_x, scale_y)
        sizes = _stride_sizes(g, image_shape, stride)
        geometries.append(g.op("Resize", geometry, "", "", sizes, mode="nearest", nearest_mode="floor",
                               coordinate_transformation_mode="asymmetric"))  # fmt: skip
    # The strongest anchor of the image, over all strides (after resizing, so that it is
    # an anchor the outputs contain).
    # Reduced per image (axes 1-3), so a batch of images gives each image its own peak.
    per_image = g.const([1, 2, 3], np.int64)
    peak = g.op(
        "Max",
        *[g.op("ReduceMax", _channel(g, geometry, 0), per_image, keepdims=1) for geometry in geometries],
    )

    scores, boxes, keypoints = [], [], []
    for stride, geometry in zip(DETECTOR_STRIDES, geometries, strict=True):
        contrast = _channel(g, geometry, 0)
        evidence = g.op(
            "Mul", g.op("Sub", contrast, g.const(CONTRAST_BIAS)), g.const(CONTRAST_GAIN)
        )
        damping = g.op("Mul", g.op("Sub", peak, contrast), g.const(PEAK_GAIN))
        score = g.op("Sigmoid", g.op("Sub", evidence, damping))
        box, keypoint = _distances(g, geometry, stride)
        scores.append(_anchor_rows(g, score, 1, f"score_{stride}"))
        boxes.append(_anchor_rows(g, box, 4, f"bbox_{stride}"))
        keypoints.append(_anchor_rows(g, keypoint, 10, f"kps_{stride}"))

    outputs = [
        _output(name, [f"anchors_{stride}", width])
        for names, width in ((scores, 1), (boxes, 4), (keypoints, 10))
        for name, stride in zip(names, DETECTOR_STRIDES, strict=True)
    ]
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])
    return g.model([image], outputs)


# --- landmarks, attributes, recognition --------------------------------------------------------

FEATURES = 8  # image features that perturb the landmark / attribute templates


def _pooled_features(g: _Graph, image: str, rng: np.random.Generator, kernel: int = 8) -> str:
    """(N, FEATURES): one random strided convolution, ReLU, global average pooling."""
    weights = rng.normal(0.0, 0.2, size=(FEATURES, 3, kernel, kernel)).astype(np.float32)
    conv = g.op(
        "Conv", image, g.const(weights), kernel_shape=[kernel, kernel], strides=[kernel, kernel]
    )
    pooled = g.op("GlobalAveragePool", g.op("Relu", conv))
    return g.op("Flatten", pooled, axis=1)


def _template_plus_perturbation(
    g: _Graph,
    features: str,
    rng: np.random.Generator,
    template: np.ndarray,
    scale: float,
    output: str,
    moving: int | None = None,
) -> str:
    """template + scale * tanh(features @ W): a fixed shape that moves a little with the
    input. Only the last `moving` values move (all when None), which keeps W small."""
    template = template.reshape(-1)
    moving = template.size if moving is None else moving
    weights = rng.normal(0.0, 1.0, size=(FEATURES, moving)).astype(np.float32)
    perturbation = g.op(
        "Mul", g.op("Tanh", g.op("Gemm", features, g.const(weights))), g.const(scale)
    )
    if moving < template.size:
        leading = g.const([0, template.size - moving, 0, 0], np.int64)
        perturbation = g.op("Pad", perturbation, leading)
    return g.op("Add", perturbation, g.const(template), output=output)


def _mean_shape_68() -> np.ndarray:
    """insightface's 3D mean shape (x right, y down, z toward the camera), as crop
    coordinates in [-1, 1]: Landmark crops 1.5x the face box, so a face spans +-0.67."""
    mean_shape = insightface_mean_shape().astype(np.float32)
    mean_shape = mean_shape - mean_shape.mean(axis=0, keepdims=True)
    return mean_shape * 0.9


def build_tiny_landmark_3d() -> onnx.ModelProto:
    """1k3d68's signature: input (N, 3, 192, 192); output (N, 3309) = 1103 points x (x, y, z),
    of which insightface keeps the last 68 and estimates the head pose from them."""
    rng = np.random.default_rng(68)
    g = _Graph("landmark3d")
    template = np.zeros((3309 // 3, 3), np.float32)
    template[-68:] = _mean_shape_68()
    features = _pooled_features(g, "data", rng)
    _template_plus_perturbation(g, features, rng, template, 0.01, "fc1", moving=68 * 3)
    return g.model([_image_input("data", 192)], [_output("fc1", ["batch", 3309])])


def _face_outline_106() -> np.ndarray:
    """106 plausible 2D points: a jaw arc, two eyes, two brows, a nose line and a mouth."""
    angles = np.linspace(np.pi * 0.05, np.pi * 0.95, 33)
    jaw = np.stack([-0.6 * np.cos(angles), 0.1 + 0.5 * np.sin(angles)], axis=1)
    ring = np.linspace(0.0, 2.0 * np.pi, 12, endpoint=False)
    eyes = [np.stack([x + 0.12 * np.cos(ring), -0.2 + 0.05 * np.sin(ring)], 1) for x in (-0.3, 0.3)]
    brows = [
        np.stack([np.linspace(x - 0.15, x + 0.15, 9), np.full(9, -0.35)], 1) for x in (-0.3, 0.3)
    ]
    nose = np.stack([np.zeros(15), np.linspace(-0.15, 0.15, 15)], axis=1)
    mouth_ring = np.linspace(0.0, 2.0 * np.pi, 16, endpoint=False)
    mouth = np.stack([0.22 * np.cos(mouth_ring), 0.33 + 0.07 * np.sin(mouth_ring)], axis=1)
    return np.concatenate([jaw, *eyes, *brows, nose, mouth]).astype(np.float32)


def build_tiny_landmark_2d() -> onnx.ModelProto:
    """2d106det's signature: input (N, 3, 192, 192); output (N, 212) = 106 points x (x, y)."""
    rng = np.random.default_rng(106)
    g = _Graph("landmark2d")
    features = _pooled_features(g, "data", rng)
    _template_plus_perturbation(g, features, rng, _face_outline_106(), 0.01, "fc1")
    return g.model([_image_input("data", 192)], [_output("fc1", ["batch", 212])])


# The genderage stand-ins read a face off the crop's left-right asymmetry: the crop is
# pooled to GENDERAGE_GRID x GENDERAGE_GRID cells per channel, standardised per image, and
# projected on two random patterns that are antisymmetric under the left-right mirror (a
# centred, symmetric face gives 0 on both: no bias towards either gender or an age).
GENDERAGE_GRID = 4
GENDER_GAIN, GENDER_LOGIT = 2.0, 2.0  # logits +-GENDER_LOGIT * tanh(GENDER_GAIN * t)
AGE_CENTRE, AGE_SPREAD, AGE_GAIN = 0.45, 0.35, 0.8  # age / 100 = centre + spread * tanh(...)
EXTRA_WEIGHT = 0.1  # how much a backbone's features move the outputs (full-size stand-in)


def _standardised(g: _Graph, rows: str) -> str:
    """(N, W) -> each row minus its mean, over its standard deviation."""
    axis = g.const([1], np.int64)
    centred = g.op("Sub", rows, g.op("ReduceMean", rows, axis, keepdims=1))
    spread = g.op("ReduceMean", g.op("Mul", centred, centred), axis, keepdims=1)
    return g.op("Div", centred, g.op("Sqrt", g.op("Add", spread, g.const(1e-6))))


def genderage_head(
    g: _Graph, image: str, size: int, rng: np.random.Generator,
    extra: str | None = None, extra_width: int = 0, output: str = "fc1",
) -> str:  # fmt: skip
    """(N, 3, size, size) normalised crop (and optional (N, extra_width) features) ->
    (N, 3) = (female logit, male logit, age / 100) that vary from face to face and spread
    over both genders and the age bands, so that balanced sampling has cells to fill.
    The stand-ins' outputs mean nothing."""
    cell = size // GENDERAGE_GRID
    pooled = g.op("AveragePool", image, kernel_shape=[cell, cell], strides=[cell, cell])
    width = 3 * GENDERAGE_GRID * GENDERAGE_GRID
    grid = _standardised(g, g.op("Flatten", pooled, axis=1))
    patterns = rng.normal(0.0, 1.0, size=(3, GENDERAGE_GRID, GENDERAGE_GRID, 2))
    patterns = (patterns - patterns[:, :, ::-1, :]).reshape(width, 2)
    patterns /= np.linalg.norm(patterns, axis=0, keepdims=True)
    mixed = g.op("Gemm", grid, g.const(patterns.astype(np.float32)))
    if extra is not None:
        weights = rng.normal(0.0, EXTRA_WEIGHT / np.sqrt(extra_width), size=(extra_width, 2))
        mixed = g.op("Add", mixed, g.op("Gemm", _standardised(g, extra), g.const(weights.astype(np.float32))))
    gender = g.op("Tanh", g.op("Mul", _column(g, mixed, 0), g.const(GENDER_GAIN)))
    male = g.op("Mul", gender, g.const(GENDER_LOGIT))
    female = g.op("Mul", gender, g.const(-GENDER_LOGIT))
    spread = g.op("Tanh", g.op("Mul", _column(g, mixed, 1), g.const(AGE_GAIN)))
    age = g.op("Add", g.op("Mul", spread, g.const(AGE_SPREAD)), g.const(AGE_CENTRE))
    return g.op("Concat", female, male, age, axis=1, output=output)


def _column(g: _Graph, matrix: str, index: int) -> str:
    return g.op(
        "Slice", matrix, g.const([index], np.int64), g.const([index + 1], np.int64),
        g.const([1], np.int64),
    )  # fmt: skip


def build_tiny_genderage() -> onnx.ModelProto:
    """genderage's signature: input (N, 3, 96, 96); output (N, 3) = female and male
    logits, age / 100 (see genderage_head)."""
    rng = np.random.default_rng(96)
    g = _Graph("genderage")
    genderage_head(g, "data", 96, rng)
    return g.model([_image_input("data", 96)], [_output("fc1", ["batch", 3])])


def build_tiny_recognition() -> onnx.ModelProto:
    """Arc2Face's arcface.onnx signature: input (N, 3, 112, 112) normalised RGB, output
    (N, 512). Two random convolutions keep a 2 x 2 spatial layout, so crops that differ in
    where they are bright or textured get different embeddings."""
    rng = np.random.default_rng(112)
    g = _Graph("arcface")
    conv1 = rng.normal(0.0, 0.2, size=(8, 3, 5, 5)).astype(np.float32)
    conv2 = rng.normal(0.0, 0.2, size=(8, 8, 3, 3)).astype(np.float32)
    hidden = g.op(
        "Relu",
        g.op("Conv", "input.1", g.const(conv1), kernel_shape=[5, 5], strides=[4, 4], pads=[2] * 4),
    )
    hidden = g.op("Conv", hidden, g.const(conv2), kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    pooled = g.op("AveragePool", hidden, kernel_shape=[7, 7], strides=[7, 7])  # (N, 8, 2, 2)
    features = g.op("Flatten", pooled, axis=1)
    # Centre each feature vector so that embeddings do not share one common direction.
    features = g.op(
        "Sub", features, g.op("ReduceMean", features, g.const([1], np.int64), keepdims=1)
    )
    projection = rng.normal(0.0, 1.0, size=(32, 512)).astype(np.float32)
    g.op("Gemm", features, g.const(projection), output="fc1")
    return g.model([_image_input("input.1", 112)], [_output("fc1", ["batch", 512])])


BUILDERS = {
    DETECTOR_FILE: build_tiny_detector,
    LANDMARK_3D_FILE: build_tiny_landmark_3d,
    LANDMARK_2D_FILE: build_tiny_landmark_2d,
    GENDERAGE_FILE: build_tiny_genderage,
    RECOGNITION_FILE: build_tiny_recognition,
}


def write_tiny_antelopev2(directory: str | os.PathLike) -> Path:
    """Write the five tiny ONNX models into `directory` (models_dir/antelopev2 in our
    layout, root/models/antelopev2 for insightface's FaceAnalysis). Returns `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for file_name, build in BUILDERS.items():
        (directory / file_name).write_bytes(build().SerializeToString())
    return directory
