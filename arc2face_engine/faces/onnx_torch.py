"""Run an ONNX graph as a torch module: batched, on any device, in fp32 or fp16.

The face-analysis graphs (SCRFD, 1k3d68, ArcFace) are plain convolutional networks, so a
small interpreter covers them: the initializers become module buffers (moved and cast with
`.to(device, dtype)`), and `forward` evaluates the nodes in graph order with torch ops.
Why not onnx2torch: importing it imports torchvision (its NMS and RoIAlign converters),
which has no working CPU wheel for this torch, and it lacks ops the tiny stand-ins use
(Resize with antialias, edge padding).

Shape arithmetic (Shape, Gather on shapes, Reshape targets, Resize sizes, Slice bounds)
stays on the host as int64 CPU tensors, so a forward pass never waits on the device.
An op outside OPS is refused when the module is built (UnsupportedOnnxGraph), so callers
can fall back to onnxruntime before any work starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from arc2face_engine.faces.onnx_prepare import AFFINE, fold_batch_norms, precise_nodes
from schemas.errors import UserError


class UnsupportedOnnxGraph(UserError, ValueError):
    """The ONNX graph uses an op or an attribute the torch runner does not implement."""


Attrs = dict[str, object]
Op = Callable[[list, Attrs], list]

# Input positions that carry shapes, indices or sizes: initializers feeding only these
# stay on the host (CPU int64/float) instead of becoming device buffers.
HOST_INPUTS = {
    "Reshape": {1}, "Resize": {1, 2, 3}, "Slice": {1, 2, 3, 4}, "Pad": {1, 3},
    "ReduceMean": {1}, "ReduceMax": {1}, "ReduceMin": {1}, "ReduceSum": {1},
    "Unsqueeze": {1}, "Squeeze": {1}, "Range": {0, 1, 2}, "Gather": {1}, "Expand": {1},
    "Tile": {1}, "ConstantOfShape": {0}, "Upsample": {1},
}  # fmt: skip

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.BOOL: torch.bool,
}


def _host_list(value: torch.Tensor | None) -> list:
    return [] if value is None else value.detach().cpu().reshape(-1).tolist()


def _aligned(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Bring host tensors to the device of the first device tensor (shape arithmetic mixed
    with activations, as in the tiny detector's anchor coordinates)."""
    devices = [t.device for t in tensors if t is not None and t.device.type != "cpu"]
    if not devices:
        return list(tensors)
    return [t.to(devices[0]) if t is not None and t.device != devices[0] else t for t in tensors]


def _binary(fn: Callable) -> Op:
    def run(inputs: list, attrs: Attrs) -> list:
        return [fn(*_aligned(inputs[0], inputs[1]))]

    return run


def _variadic(fn: Callable) -> Op:
    def run(inputs: list, attrs: Attrs) -> list:
        tensors = _aligned(*inputs)
        result = tensors[0]
        for tensor in tensors[1:]:
            result = fn(result, tensor)
        return [result]

    return run


def _unary(fn: Callable) -> Op:
    return lambda inputs, attrs: [fn(inputs[0])]


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates
    return a / b


def _pairs_2d(pads: Sequence[int]) -> tuple[int, int, int, int]:
    """ONNX (top, left, bottom, right) -> F.pad's (left, right, top, bottom)."""
    top, left, bottom, right = pads
    return left, right, top, bottom


def _conv(inputs: list, attrs: Attrs) -> list:
    x, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnsupportedOnnxGraph("Conv auto_pad is not supported: export with explicit pads")
    if weight.dim() != 4:
        raise UnsupportedOnnxGraph(f"Conv of rank {weight.dim()} is not supported: 2-D only")
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    stride = list(attrs.get("strides", [1, 1]))
    dilation = list(attrs.get("dilations", [1, 1]))
    groups = int(attrs.get("group", 1))
    if pads[:2] == pads[2:]:
        return [F.conv2d(x, weight, bias, stride, pads[:2], dilation, groups)]
    return [F.conv2d(F.pad(x, _pairs_2d(pads)), weight, bias, stride, 0, dilation, groups)]


def _batch_norm(inputs: list, attrs: Attrs) -> list:
    x, scale, bias, mean, var = inputs[:5]
    return [F.batch_norm(x, mean, var, scale, bias, False, 0.0, float(attrs.get("epsilon", 1e-5)))]


def _prelu(inputs: list, attrs: Attrs) -> list:
    x, slope = _aligned(inputs[0], inputs[1])
    return [torch.where(x >= 0, x, x * slope)]


def _gemm(inputs: list, attrs: Attrs) -> list:
    a, b = inputs[0], inputs[1]
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    out = (a @ b) * float(attrs.get("alpha", 1.0))
    if len(inputs) > 2 and inputs[2] is not None:
        out = out + inputs[2] * float(attrs.get("beta", 1.0))
    return [out]


def _flatten(inputs: list, attrs: Attrs) -> list:
    x = inputs[0]
    axis = int(attrs.get("axis", 1)) % max(x.dim(), 1)
    return [x.reshape(math.prod(x.shape[:axis]), -1)]


def _reshape(inputs: list, attrs: Attrs) -> list:
    x = inputs[0]
    shape = [int(v) for v in _host_list(inputs[1])]
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return [x.reshape(shape)]


def _shape(inputs: list, attrs: Attrs) -> list:
    dims = list(inputs[0].shape)
    start, end = int(attrs.get("start", 0)), attrs.get("end")
    dims = dims[start:] if end is None else dims[start : int(end)]
    return [torch.tensor(dims, dtype=torch.int64)]


def _gather(inputs: list, attrs: Attrs) -> list:
    data, indices = inputs[0], inputs[1]
    axis = int(attrs.get("axis", 0)) % data.dim()
    indices = indices.to(data.device).long()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    picked = data.index_select(axis, indices.reshape(-1))
    shape = list(data.shape[:axis]) + list(indices.shape) + list(data.shape[axis + 1 :])
    return [picked.reshape(shape)]


def _cast(inputs: list, attrs: Attrs) -> list:
    target = _ONNX_DTYPES.get(int(attrs["to"]))
    if target is None:
        raise UnsupportedOnnxGraph(f"Cast to ONNX type {attrs['to']} is not supported")
    x = inputs[0]
    if target.is_floating_point and x.is_floating_point():
        return [x]  # activations keep the module's compute precision
    return [x.to(target)]


def _range(inputs: list, attrs: Attrs) -> list:
    start, limit, delta = (inputs[i].reshape(()) for i in range(3))
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)]


def _pad(inputs: list, attrs: Attrs) -> list:
    x = inputs[0]
    pads = [int(v) for v in _host_list(inputs[1])] if len(inputs) > 1 else list(attrs["pads"])
    value = float(_host_list(inputs[2])[0]) if len(inputs) > 2 and inputs[2] is not None else 0.0
    if len(inputs) > 3 and inputs[3] is not None:
        raise UnsupportedOnnxGraph("Pad with an axes input is not supported")
    rank = x.dim()
    begins, ends = pads[:rank], pads[rank:]
    flat: list[int] = []
    for dim in reversed(range(rank)):
        flat += [begins[dim], ends[dim]]
    while len(flat) > 2 and flat[-1] == 0 and flat[-2] == 0:
        flat = flat[:-2]  # F.pad's non-constant modes pad only trailing dimensions
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    torch_mode = {"constant": "constant", "edge": "replicate", "reflect": "reflect"}.get(mode)
    if torch_mode is None:
        raise UnsupportedOnnxGraph(f"Pad mode {mode!r} is not supported")
    if torch_mode == "constant":
        return [F.pad(x, flat, mode="constant", value=value)]
    return [F.pad(x, flat, mode=torch_mode)]


def _pool_pads(x: torch.Tensor, attrs: Attrs, value: float) -> tuple[torch.Tensor, bool]:
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if any(pads):
        return F.pad(x, _pairs_2d(pads), value=value), True
    return x, False


def _average_pool(inputs: list, attrs: Attrs) -> list:
    x = inputs[0]
    kernel = list(attrs["kernel_shape"])
    stride = list(attrs.get("strides", [1, 1]))
    ceil = bool(attrs.get("ceil_mode", 0))
    padded, was_padded = _pool_pads(x, attrs, 0.0)
    pooled = F.avg_pool2d(padded, kernel, stride, 0, ceil, count_include_pad=True)
    if was_padded and not attrs.get("count_include_pad", 0):
        mask, _ = _pool_pads(torch.ones_like(x[:1, :1]), attrs, 0.0)
        pooled = pooled / F.avg_pool2d(mask, kernel, stride, 0, ceil, count_include_pad=True)
    return [pooled]


def _max_pool(inputs: list, attrs: Attrs) -> list:
    x = inputs[0]
    padded, _ = _pool_pads(x, attrs, -math.inf)
    dilation = list(attrs.get("dilations", [1, 1]))
    kernel, stride = list(attrs["kernel_shape"]), list(attrs.get("strides", [1, 1]))
    ceil = bool(attrs.get("ceil_mode", 0))
    return [F.max_pool2d(padded, kernel, stride, 0, dilation, ceil)]


def _reduce(fn: Callable) -> Op:
    def run(inputs: list, attrs: Attrs) -> list:
        x = inputs[0]
        axes = attrs.get("axes")
        if len(inputs) > 1 and inputs[1] is not None:
            axes = _host_list(inputs[1])
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        dims = tuple(int(a) % x.dim() for a in axes)
        return [fn(x, dims, keep)]

    return run


def _resize(inputs: list, attrs: Attrs) -> list:
    """Resize along H and W only: each image of a batch is resized on its own (a graph
    exported for batch 1 that lists the batch size in `sizes` still batches)."""
    x = inputs[0]
    scales = _host_list(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else []
    sizes = _host_list(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else []
    if sizes:
        out = [int(sizes[-2]), int(sizes[-1])]
        if len(sizes) == 4 and int(sizes[1]) != x.shape[1]:
            raise UnsupportedOnnxGraph("Resize along channels is not supported")
    else:
        out = [math.floor(x.shape[2] * scales[-2]), math.floor(x.shape[3] * scales[-1])]
    mode = _text(attrs.get("mode", b"nearest"))
    transform = _text(attrs.get("coordinate_transformation_mode", b"half_pixel"))
    antialias = bool(attrs.get("antialias", 0))
    if mode == "nearest":
        nearest = _text(attrs.get("nearest_mode", b"round_prefer_floor"))
        if (transform, nearest) != ("asymmetric", "floor") and (
            out[0] % x.shape[2] or out[1] % x.shape[3]
        ):
            raise UnsupportedOnnxGraph(
                f"Resize nearest with {transform}/{nearest} is supported for integer factors only"
            )
        return [F.interpolate(x, size=out, mode="nearest")]
    if mode == "linear":
        if transform not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
            raise UnsupportedOnnxGraph(f"Resize linear with {transform} is not supported")
        align = transform == "align_corners"
        if antialias and transform != "align_corners":
            exclude = bool(attrs.get("exclude_outside", 0))
            rows = _antialias_weights(x.shape[2], out[0], exclude).to(x.device, x.dtype)
            cols = _antialias_weights(x.shape[3], out[1], exclude).to(x.device, x.dtype)
            return [torch.matmul(torch.matmul(rows, x), cols.t())]
        return [
            F.interpolate(x, size=out, mode="bilinear", align_corners=align, antialias=antialias)
        ]
    raise UnsupportedOnnxGraph(f"Resize mode {mode!r} is not supported")


def _antialias_weights(size_in: int, size_out: int, exclude_outside: bool) -> torch.Tensor:
    """(out, in) interpolation matrix of ONNX's antialiased linear Resize (half_pixel), as
    onnxruntime computes it: a triangle filter widened by the downscale factor, normalised
    over all its taps; taps past an edge fold onto the edge pixel unless exclude_outside."""
    rscale = np.float32(size_out) / np.float32(size_in)
    scale = np.float32(1.0) / rscale
    support = scale if scale >= 1 else np.float32(1.0)
    inv_scale = np.float32(1.0) / scale if scale >= 1 else np.float32(1.0)
    matrix = np.zeros((size_out, size_in), np.float64)
    for i in range(size_out):
        center = np.float32(0.5) + (
            np.float32(i) if scale == 1 else (np.float32(i) + 0.5) / rscale - np.float32(0.5)
        )
        first = int(np.floor(center - support + 0.5))
        last = int(np.floor(center + support + 0.5))
        if exclude_outside:
            first, last = max(first, 0), min(last, size_in)
        taps = np.arange(first, last)
        weights = np.maximum(0.0, 1.0 - np.abs((taps - center + 0.5) * inv_scale))
        total = weights.sum()
        np.add.at(matrix[i], np.clip(taps, 0, size_in - 1), weights / (total or 1.0))
    return torch.from_numpy(matrix.astype(np.float32))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _slice(inputs: list, attrs: Attrs) -> list:
    x = inputs[0]
    starts, ends = _host_list(inputs[1]), _host_list(inputs[2])
    axes = _host_list(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else []
    steps = _host_list(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else []
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index: list = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step <= 0:
            raise UnsupportedOnnxGraph("Slice with a non-positive step is not supported")
        length = x.shape[int(axis)]
        start = max(0, min(length, start + length if start < 0 else start))
        end = max(0, min(length, end + length if end < 0 else end))
        index[int(axis) % x.dim()] = slice(int(start), int(end), int(step))
    return [x[tuple(index)]]


def _axes(inputs: list, attrs: Attrs) -> list[int]:
    if len(inputs) > 1 and inputs[1] is not None:
        return [int(a) for a in _host_list(inputs[1])]
    return [int(a) for a in attrs.get("axes", [])]


def _unsqueeze(inputs: list, attrs: Attrs) -> list:
    x = inputs[0]
    rank = x.dim() + len(_axes(inputs, attrs))
    for axis in sorted(a % rank for a in _axes(inputs, attrs)):
        x = x.unsqueeze(axis)
    return [x]


def _squeeze(inputs: list, attrs: Attrs) -> list:
    x = inputs[0]
    axes = _axes(inputs, attrs)
    if not axes:
        return [x.squeeze()]
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return [x]


def _concat(inputs: list, attrs: Attrs) -> list:
    tensors = _aligned(*inputs)
    dtype = torch.result_type(tensors[0], tensors[1]) if len(tensors) > 1 else tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return [torch.cat([t.to(dtype) for t in tensors], dim=int(attrs["axis"]))]


def _clip(inputs: list, attrs: Attrs) -> list:
    bounds = [inputs[i] if len(inputs) > i else None for i in (1, 2)]
    low, high = (None if b is None else float(_host_list(b)[0]) for b in bounds)
    low = attrs.get("min", low)
    high = attrs.get("max", high)
    return [torch.clamp(inputs[0], low, high)]


def _constant(inputs: list, attrs: Attrs) -> list:
    return [torch.from_numpy(np.array(numpy_helper.to_array(attrs["value"])))]


OPS: dict[str, Op] = {
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "PRelu": _prelu,
    "Relu": _unary(torch.relu),
    "LeakyRelu": lambda i, a: [F.leaky_relu(i[0], float(a.get("alpha", 0.01)))],
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Sqrt": _unary(torch.sqrt),
    "Exp": _unary(torch.exp),
    "Neg": _unary(torch.neg),
    "Identity": _unary(lambda x: x),
    "Dropout": lambda i, a: [i[0]],
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_div),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda i, a: [i[0].permute(*a["perm"])],
    "Concat": _concat,
    "Shape": _shape,
    "Gather": _gather,
    "Cast": _cast,
    "Range": _range,
    "Pad": _pad,
    "AveragePool": _average_pool,
    "MaxPool": _max_pool,
    "GlobalAveragePool": _unary(lambda x: x.mean(dim=(2, 3), keepdim=True)),
    "ReduceMean": _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k)),
    "ReduceMax": _reduce(lambda x, d, k: x.amax(dim=d, keepdim=k)),
    "ReduceMin": _reduce(lambda x, d, k: x.amin(dim=d, keepdim=k)),
    "ReduceSum": _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k)),
    "Resize": _resize,
    "Slice": _slice,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Softmax": lambda i, a: [torch.softmax(i[0], dim=int(a.get("axis", -1)))],
    "Clip": _clip,
    "Constant": _constant,
}  # fmt: skip


def _affine(inputs: list, attrs: Attrs) -> list:
    """A prepared batch norm (onnx_prepare.AFFINE): per-channel scale and shift."""
    x, scale, shift = inputs
    shape = (-1,) + (1,) * (x.dim() - 2)
    return [x * scale.reshape(shape) + shift.reshape(shape)]


_PREPARED_OPS: dict[str, Op] = {AFFINE: _affine}


class OnnxModule(torch.nn.Module):
    """An ONNX graph with one image input, evaluated node by node with torch ops.

    Built in its compute `dtype` (move it with `.to(device)` only): batch norms are folded
    at load (onnx_prepare), 4-D weights are channels-last (convolutions run NHWC on tensor
    cores and cuDNN), and the nodes that compute `fp32_outputs` from their last
    convolution keep float32 weights and run in float32 whatever the dtype."""

    def __init__(
        self,
        model: onnx.ModelProto,
        name: str = "model",
        dtype: torch.dtype = torch.float32,
        fp32_outputs: Sequence[str] = (),
    ) -> None:
        super().__init__()
        graph = model.graph
        unsupported = sorted({node.op_type for node in graph.node} - set(OPS))
        if unsupported:
            raise UnsupportedOnnxGraph(
                f"{name} uses ONNX ops {', '.join(unsupported)} that the torch face runner "
                f"lacks: run face analysis with onnxruntime (device cpu)"
            )
        self.dtype = dtype
        self.input_names = [
            i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}
        ]
        self.output_names = [o.name for o in graph.output]
        arrays = {t.name: np.array(numpy_helper.to_array(t)) for t in graph.initializer}
        nodes = [
            (
                node.op_type,
                list(node.input),
                list(node.output),
                {a.name: helper.get_attribute_value(a) for a in node.attribute},
            )
            for node in graph.node
        ]
        self.nodes = fold_batch_norms(nodes, arrays, set(self.output_names))
        precise = precise_nodes(self.nodes, set(fp32_outputs))
        self._precise = precise
        used = {name for _, inputs, _, _ in self.nodes for name in inputs}
        initializers = {name: value for name, value in arrays.items() if name in used}
        precise_inputs = {name for index in precise for name in self.nodes[index][1]}
        host_only = _host_only_initializers(self.nodes, set(initializers))
        self.host: dict[str, torch.Tensor] = {}
        self._buffers_by_onnx_name: dict[str, str] = {}
        for index, (tensor_name, array) in enumerate(initializers.items()):
            value = torch.from_numpy(array)
            if tensor_name in host_only or not value.is_floating_point():
                self.host[tensor_name] = value
                continue
            buffer = f"w{index}"
            value = value.to(torch.float32 if tensor_name in precise_inputs else dtype)
            if value.dim() == 4:
                value = value.contiguous(memory_format=torch.channels_last)
            self.register_buffer(buffer, value)
            self._buffers_by_onnx_name[tensor_name] = buffer
        self._last_use = _last_uses(self.nodes, set(self.output_names))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        values: dict[str, torch.Tensor | None] = {self.input_names[0]: image, "": None}
        for step, (op_type, inputs, outputs, attrs) in enumerate(self.nodes):
            args = [self._value(name, values) for name in inputs]
            if step in self._precise:
                args = [_float32(arg) for arg in args]
            op = OPS.get(op_type) or _PREPARED_OPS[op_type]
            for name, value in zip(outputs, op(args, attrs), strict=False):
                values[name] = value
            for name in self._last_use.get(step, ()):
                values.pop(name, None)  # free activations as soon as no node needs them
        return [values[name] for name in self.output_names]

    def _value(self, name: str, values: dict) -> torch.Tensor | None:
        if name in values:
            return values[name]
        if name in self._buffers_by_onnx_name:
            return getattr(self, self._buffers_by_onnx_name[name])
        return self.host[name]


def _float32(value: torch.Tensor | None) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    return value


def _host_only_initializers(nodes: list, initializers: set[str]) -> set[str]:
    """Initializers that feed only shape/index/size inputs (HOST_INPUTS)."""
    device_uses: set[str] = set()
    host_uses: set[str] = set()
    for op_type, inputs, _, _ in nodes:
        host_positions = HOST_INPUTS.get(op_type, set())
        for position, name in enumerate(inputs):
            if name in initializers:
                (host_uses if position in host_positions else device_uses).add(name)
    return host_uses - device_uses


def _last_uses(nodes: list, keep: set[str]) -> dict[int, list[str]]:
    last: dict[str, int] = {}
    for step, (_, inputs, _, _) in enumerate(nodes):
        for name in inputs:
            last[name] = step
    by_step: dict[int, list[str]] = {}
    for name, step in last.items():
        if name not in keep:
            by_step.setdefault(step, []).append(name)
    return by_step
