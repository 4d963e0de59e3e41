"""Full-size random-weight stand-ins for the face models, for benchmarks and agreement tests.

Same file names, input/output names and output layouts as the published files, so
insightface's model zoo routes them as it routes the real ones, and the real layer shapes,
so they cost what the real ones cost:

- scrfd_10g_bnkps.onnx: an SCRFD-10G-shaped detector (ResNet basic-block backbone with
  blocks 3/4/2/3 and widths 56/88/88/224, a PAFPN neck, a 3-conv head per stride), input
  `input.1`, 9 outputs (scores, boxes, keypoints at strides 8/16/32, 2 anchors per
  location, rows of shape (N, 1), (N, 4), (N, 10)); about 26.7 GFLOP at 640x640.
- arcface.onnx: IResNet-100 (blocks 3/13/30/3, BN-PReLU basic blocks, BN-FC-BN embedding),
  input `input.1` (N, 3, 112, 112), output `fc1` (N, 512); about 24.2 GFLOP.
- 1k3d68.onnx: a ResNet-50 bottleneck network at 192x192 whose first node is `bn_data`
  (the mxnet-exported real one normalises in-graph, so insightface feeds raw pixels),
  output `fc1` (N, 3309); insightface publishes no FLOP count for it, so this one matches
  the file's input/output and its size class (~30M parameters; the real file is 137 MB).
- genderage.onnx: a MobileNet-0.25-shaped network at 96x96 (depthwise-separable
  convolutions, 8 to 256 channels), first node `bn_data` like the mxnet export, output
  `fc1` (N, 3): female and male logits, age / 100; about the real file's size (1.3 MB).
  Its head (tiny_faces.genderage_head, fed the crop and, a little, the backbone's
  features) spreads the outputs over both genders and the age bands, so balanced sampling
  has cells to fill.

FLOPs are 2 x multiply-accumulates of Conv/Gemm/MatMul (count_flops), the convention of
the SCRFD and ArcFace papers' 10 GF / 12 GMAC figures scaled to these input sizes.

Random weights would detect nothing useful, so the heads are set up to behave like a
detector: each stride's score logits are standardised per image and thresholded at about
4 standard deviations (a handful of anchors fire, varying from image to image: no face, one
face or several), box distances are positive (about 2 strides each way) and the five
keypoints sit on the ArcFace template inside the box, so alignment, recognition and the
pose fit all get well-formed input. The 3D landmarks are insightface's mean shape plus
a small input-dependent perturbation (a near-frontal pose). Deterministic: the same call
writes the same bytes. 2d106det.onnx is the tiny one (insightface's FaceAnalysis loads
it; the job does not use it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, shape_inference

from arc2face_engine.testing.tiny_faces import (
    DETECTOR_FILE,
    GENDERAGE_FILE,
    IR_VERSION,
    KEYPOINT_OFFSETS,
    LANDMARK_2D_FILE,
    LANDMARK_3D_FILE,
    OPSET,
    RECOGNITION_FILE,
    _Graph,
    _mean_shape_68,
    build_tiny_landmark_2d,
    genderage_head,
)

SCRFD_STRIDES = (8, 16, 32)
SCRFD_ANCHORS = 2
SCRFD_STEM = 28
SCRFD_BLOCKS = (3, 4, 2, 3)
SCRFD_WIDTHS = (56, 88, 88, 224)
SCRFD_NECK = 56
SCRFD_HEAD = 80
SCRFD_HEAD_CONVS = 3
SCORE_SIGMAS = 4.0  # an anchor fires when its logit is this many deviations above the mean
SCORE_GAIN = 2.0
BOX_EXTENT = 4.0  # box distances, in strides: a face box about 8 strides wide
IRESNET100_BLOCKS = (3, 13, 30, 3)
IRESNET_WIDTHS = (64, 128, 256, 512)
RESNET50_BLOCKS = (3, 4, 6, 3)
RESNET50_WIDTHS = (64, 128, 256, 512)
# MobileNet v1 at width 0.25: (output channels, stride) of each depthwise-separable block.
MOBILENET_STEM = 8
MOBILENET_BLOCKS = (
    (16, 1), (32, 2), (32, 1), (64, 2), (64, 1), (128, 2),
    (128, 1), (128, 1), (128, 1), (128, 1), (128, 1), (256, 2), (256, 1),
)  # fmt: skip
EMBEDDING_DIM = 512
LANDMARK_OUTPUTS = 3309

# Reference costs at the detector's and recognizer's input sizes (GFLOP = 2 x GMAC).
SCRFD_10G_GFLOP = 26.7  # 10 GFLOPs (MACs) at 640x480 in the SCRFD paper, at 640x640, x2
IRESNET100_GFLOP = 24.2  # 12.1 GMACs at 112x112


class _Builder(_Graph):
    """_Graph plus randomly initialised layers (He-normal convolutions)."""

    def __init__(self, prefix: str, seed: int) -> None:
        super().__init__(prefix)
        self.rng = np.random.default_rng(seed)

    def random(self, shape: tuple, std: float) -> str:
        """Uniform weights of standard deviation `std` (uniform: quicker to draw)."""
        values = self.rng.random(shape, dtype=np.float32)
        values -= np.float32(0.5)
        values *= np.float32(std * np.sqrt(12.0))
        return self.const(values)

    def model(self, inputs: list, outputs: list) -> onnx.ModelProto:
        """As _Graph.model without the checker, which would serialise 260 MB once more;
        insightface's model zoo and onnxruntime validate the files when they load them."""
        graph = helper.make_graph(self.nodes, self.prefix, inputs, outputs, self.initializers)
        model = helper.make_model(
            graph,
            producer_name="arc2face_synth.face_analysis_full",
            opset_imports=[helper.make_opsetid("", OPSET)],
        )
        model.ir_version = IR_VERSION
        return model

    def conv(
        self, x: str, cin: int, cout: int, kernel: int = 3, stride: int = 1,
        gain: float = 1.0, bias: float | np.ndarray | None = 0.0,
    ) -> str:  # fmt: skip
        std = gain * np.sqrt(2.0 / (cin * kernel * kernel))
        inputs = [x, self.random((cout, cin, kernel, kernel), std)]
        if bias is not None:
            inputs.append(self.const(np.broadcast_to(np.asarray(bias, np.float32), (cout,)).copy()))
        pad = kernel // 2
        return self.op("Conv", *inputs, kernel_shape=[kernel, kernel], strides=[stride, stride],
                       pads=[pad] * 4)  # fmt: skip

    def batch_norm(
        self, x: str, channels: int, gamma: float = 1.0, output: str | None = None
    ) -> str:
        # Node names must not start with Sub/Mul (insightface would read an in-graph
        # normalisation); _Graph's generated names never do.
        return self.op(
            "BatchNormalization", x, self.const(np.full(channels, gamma, np.float32)),
            self.const(np.zeros(channels, np.float32)), self.const(np.zeros(channels, np.float32)),
            self.const(np.ones(channels, np.float32)), epsilon=1e-5, output=output,
        )  # fmt: skip

    def prelu(self, x: str, channels: int) -> str:
        return self.op("PRelu", x, self.const(np.full((channels, 1, 1), 0.25, np.float32)))


# --- SCRFD-10G ------------------------------------------------------------------------------


def _basic_block(g: _Builder, x: str, cin: int, cout: int, stride: int) -> str:
    """ResNet basic block (BN folded into the convolutions' biases)."""
    branch = g.op("Relu", g.conv(x, cin, cout, 3, stride))
    branch = g.conv(branch, cout, cout, 3, 1, gain=0.3)
    shortcut = x if stride == 1 and cin == cout else g.conv(x, cin, cout, 1, stride)
    return g.op("Relu", g.op("Add", branch, shortcut))


def _upsample(g: _Builder, x: str) -> str:
    scales = g.const([1.0, 1.0, 2.0, 2.0])
    return g.op("Resize", x, "", scales, mode="nearest", coordinate_transformation_mode="asymmetric",
                nearest_mode="floor")  # fmt: skip


def _scrfd_backbone(g: _Builder) -> list[str]:
    x = g.op("Relu", g.conv("input.1", 3, SCRFD_STEM, 3, 2))
    x = g.op("Relu", g.conv(x, SCRFD_STEM, SCRFD_STEM))
    x = g.op("Relu", g.conv(x, SCRFD_STEM, SCRFD_WIDTHS[0]))
    x = g.op("MaxPool", x, kernel_shape=[2, 2], strides=[2, 2])
    features, cin = [], SCRFD_WIDTHS[0]
    for stage, (blocks, width) in enumerate(zip(SCRFD_BLOCKS, SCRFD_WIDTHS, strict=True)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(g, x, cin, width, stride)
            cin = width
        features.append(x)
    return features[1:]  # strides 8, 16, 32


def _scrfd_neck(g: _Builder, features: list[str]) -> list[str]:
    """PAFPN: lateral 1x1, top-down sum, 3x3 smoothing, bottom-up path."""
    laterals = [
        g.conv(f, width, SCRFD_NECK, 1) for f, width in zip(features, SCRFD_WIDTHS[1:], strict=True)
    ]
    for level in (1, 0):
        laterals[level] = g.op("Add", laterals[level], _upsample(g, laterals[level + 1]))
    outs = [g.conv(x, SCRFD_NECK, SCRFD_NECK) for x in laterals]
    for level in (1, 2):
        down = g.conv(outs[level - 1], SCRFD_NECK, SCRFD_NECK, 3, 2)
        outs[level] = g.conv(g.op("Add", outs[level], down), SCRFD_NECK, SCRFD_NECK)
    return outs


def _rows(g: _Builder, x: str, width: int, output: str) -> str:
    """(B, anchors * width, H, W) -> (B * H * W * anchors, width): SCRFD's row order."""
    channels_last = g.op("Transpose", x, perm=[0, 2, 3, 1])
    return g.op("Reshape", channels_last, g.const([-1, width], np.int64), output=output)


def _standardised_scores(g: _Builder, logits: str, output: str) -> str:
    """sigmoid(GAIN * (z - SIGMAS)) with z the logits standardised over the image."""
    axes = g.const([1, 2, 3], np.int64)
    centred = g.op("Sub", logits, g.op("ReduceMean", logits, axes, keepdims=1))
    variance = g.op("ReduceMean", g.op("Mul", centred, centred), axes, keepdims=1)
    z = g.op("Div", centred, g.op("Sqrt", g.op("Add", variance, g.const(1e-6))))
    score = g.op("Sigmoid", g.op("Mul", g.op("Sub", z, g.const(SCORE_SIGMAS)), g.const(SCORE_GAIN)))
    return _rows(g, score, 1, output)


def build_scrfd_10g(seed: int = 10) -> onnx.ModelProto:
    g = _Builder("scrfd", seed)
    levels = _scrfd_neck(g, _scrfd_backbone(g))
    keypoint_bias = np.tile((KEYPOINT_OFFSETS * BOX_EXTENT).reshape(-1), SCRFD_ANCHORS)
    scores, boxes, keypoints = [], [], []
    for stride, x in zip(SCRFD_STRIDES, levels, strict=True):
        cin = SCRFD_NECK
        for _ in range(SCRFD_HEAD_CONVS):
            x = g.op("Relu", g.conv(x, cin, SCRFD_HEAD))
            cin = SCRFD_HEAD
        logits = g.conv(x, SCRFD_HEAD, SCRFD_ANCHORS)
        scores.append(_standardised_scores(g, logits, f"score_{stride}"))
        box = g.conv(x, SCRFD_HEAD, 4 * SCRFD_ANCHORS, gain=0.02, bias=BOX_EXTENT)
        boxes.append(_rows(g, g.op("Relu", box), 4, f"bbox_{stride}"))
        kps = g.conv(x, SCRFD_HEAD, 10 * SCRFD_ANCHORS, gain=0.01, bias=keypoint_bias)
        keypoints.append(_rows(g, kps, 10, f"kps_{stride}"))
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"anchors_{stride}", width])
        for names, width in ((scores, 1), (boxes, 4), (keypoints, 10))
        for name, stride in zip(names, SCRFD_STRIDES, strict=True)
    ]
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])
    return g.model([image], outputs)


# --- IResNet-100 ----------------------------------------------------------------------------


def _ibasic_block(g: _Builder, x: str, cin: int, cout: int, stride: int) -> str:
    """arcface_torch's IBasicBlock: BN, conv, BN, PReLU, conv (stride), BN; the last BN's
    small gamma keeps 49 random residual blocks from blowing the activations up."""
    branch = g.batch_norm(x, cin)
    branch = g.conv(branch, cin, cout, 3, 1, bias=None)
    branch = g.prelu(g.batch_norm(branch, cout), cout)
    branch = g.batch_norm(g.conv(branch, cout, cout, 3, stride, bias=None), cout, gamma=0.1)
    shortcut = x
    if stride != 1 or cin != cout:
        shortcut = g.batch_norm(g.conv(x, cin, cout, 1, stride, bias=None), cout)
    return g.op("Add", branch, shortcut)


def build_iresnet100(seed: int = 100) -> onnx.ModelProto:
    g = _Builder("iresnet", seed)
    x = g.conv("input.1", 3, IRESNET_WIDTHS[0], 3, 1, bias=None)
    x = g.prelu(g.batch_norm(x, IRESNET_WIDTHS[0]), IRESNET_WIDTHS[0])
    cin = IRESNET_WIDTHS[0]
    for blocks, width in zip(IRESNET100_BLOCKS, IRESNET_WIDTHS, strict=True):
        for block in range(blocks):
            x = _ibasic_block(g, x, cin, width, 2 if block == 0 else 1)
            cin = width
    x = g.op("Flatten", g.batch_norm(x, cin), axis=1)
    fc = g.op("Gemm", x, g.random((cin * 7 * 7, EMBEDDING_DIM), np.sqrt(1.0 / (cin * 49))))
    g.batch_norm(fc, EMBEDDING_DIM, output="fc1")
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["batch", 3, 112, 112])
    out = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["batch", EMBEDDING_DIM])
    return g.model([image], [out])


def _bn_data(g: _Builder, image: str) -> str:
    """The mxnet export's first node, named bn_data: insightface then feeds raw pixels
    (mean 0, std 1), and this BN does the (x - 127.5) / 128 itself."""
    bn = helper.make_node(
        "BatchNormalization", [image, g.const(np.ones(3, np.float32)), g.const(np.zeros(3, np.float32)),
                               g.const(np.full(3, 127.5, np.float32)), g.const(np.full(3, 128.0**2, np.float32))],
        ["bn_data_out"], name="bn_data", epsilon=0.0,
    )  # fmt: skip
    g.nodes.append(bn)
    return "bn_data_out"


# --- 1k3d68 -----------------------------------------------------------------------------------


def _bottleneck(g: _Builder, x: str, cin: int, width: int, stride: int) -> str:
    cout = width * 4
    branch = g.op("Relu", g.conv(x, cin, width, 1))
    branch = g.op("Relu", g.conv(branch, width, width, 3, stride))
    branch = g.conv(branch, width, cout, 1, gain=0.3)
    shortcut = x if stride == 1 and cin == cout else g.conv(x, cin, cout, 1, stride)
    return g.op("Relu", g.op("Add", branch, shortcut))


def build_landmark_3d68(seed: int = 68) -> onnx.ModelProto:
    g = _Builder("landmark3d", seed)
    x = g.op("Relu", g.conv(_bn_data(g, "data"), 3, 64, 7, 2))
    x = g.op("MaxPool", x, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, (blocks, width) in enumerate(zip(RESNET50_BLOCKS, RESNET50_WIDTHS, strict=True)):
        for block in range(blocks):
            x = _bottleneck(g, x, cin, width, 2 if stage > 0 and block == 0 else 1)
            cin = width * 4
    pooled = g.op("Flatten", g.op("GlobalAveragePool", x), axis=1)
    template = np.zeros((LANDMARK_OUTPUTS // 3, 3), np.float32)
    template[-68:] = _mean_shape_68()
    weights = g.random((cin, LANDMARK_OUTPUTS), 0.002 / np.sqrt(cin))
    g.op("Gemm", pooled, weights, g.const(template.reshape(-1)), output="fc1")
    image = helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch", 3, 192, 192])
    out = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["batch", LANDMARK_OUTPUTS])
    return g.model([image], [out])


# --- genderage ---------------------------------------------------------------------------------


def _depthwise(g: _Builder, x: str, channels: int, stride: int) -> str:
    weight = g.random((channels, 1, 3, 3), np.sqrt(2.0 / 9.0))
    bias = g.const(np.zeros(channels, np.float32))
    return g.op("Conv", x, weight, bias, kernel_shape=[3, 3], strides=[stride, stride],
                pads=[1, 1, 1, 1], group=channels)  # fmt: skip


def build_genderage(seed: int = 96) -> onnx.ModelProto:
    g = _Builder("genderage", seed)
    normalised = _bn_data(g, "data")
    x = g.op("Relu", g.conv(normalised, 3, MOBILENET_STEM, 3, 2))
    cin = MOBILENET_STEM
    for cout, stride in MOBILENET_BLOCKS:
        x = g.op("Relu", _depthwise(g, x, cin, stride))
        x = g.op("Relu", g.conv(x, cin, cout, 1))
        cin = cout
    pooled = g.op("Flatten", g.op("GlobalAveragePool", x), axis=1)
    genderage_head(g, normalised, 96, g.rng, extra=pooled, extra_width=cin)
    image = helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch", 3, 96, 96])
    out = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["batch", 3])
    return g.model([image], [out])


# --- FLOPs and files --------------------------------------------------------------------------


def count_flops(model: onnx.ModelProto, input_shape: tuple[int, ...]) -> int:
    """2 x multiply-accumulates of every Conv, Gemm and MatMul for one input of
    `input_shape` (shapes from ONNX shape inference)."""
    source = model.graph
    image = helper.make_tensor_value_info(
        source.input[0].name, TensorProto.FLOAT, list(input_shape)
    )
    # Large initializers enter as shape-only inputs: inference needs their dims, not data.
    small = [t for t in source.initializer if np.prod(t.dims) <= 1024]
    large = [
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in source.initializer
        if np.prod(t.dims) > 1024
    ]
    skeleton = helper.make_model(
        helper.make_graph(list(source.node), "flops", [image, *large], list(source.output), small),
        opset_imports=list(model.opset_import),
    )
    skeleton.ir_version = model.ir_version
    inferred = shape_inference.infer_shapes(skeleton, data_prop=True).graph
    shapes = {
        info.name: [d.dim_value for d in info.type.tensor_type.shape.dim]
        for info in list(inferred.value_info) + list(inferred.input) + list(inferred.output)
    }
    shapes.update({t.name: list(t.dims) for t in inferred.initializer})
    shapes.update(
        {info.name: [d.dim_value for d in info.type.tensor_type.shape.dim] for info in large}
    )
    macs = 0
    for node in inferred.node:
        if node.op_type == "Conv":
            weight = shapes[node.input[1]]
            macs += int(np.prod(shapes[node.output[0]])) * int(np.prod(weight[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a, b = shapes[node.input[0]], shapes[node.input[1]]
            trans_b = any(attr.name == "transB" and attr.i for attr in node.attribute)
            out_features = b[0] if trans_b else b[-1]
            macs += int(np.prod(a)) * int(out_features)
    return 2 * macs


FULL_SIZE_BUILDERS = {
    DETECTOR_FILE: build_scrfd_10g,
    LANDMARK_3D_FILE: build_landmark_3d68,
    RECOGNITION_FILE: build_iresnet100,
    GENDERAGE_FILE: build_genderage,
    LANDMARK_2D_FILE: build_tiny_landmark_2d,
}


def write_full_size_antelopev2(directory: str | os.PathLike) -> Path:
    """Write the full-size stand-ins (and the tiny 2d106det) into `directory`
    (models_dir/antelopev2 in our layout). About 400 MB; a few seconds. Returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for file_name, build in FULL_SIZE_BUILDERS.items():
        (directory / file_name).write_bytes(build().SerializeToString())
    return directory
