"""Rewrites of an ONNX graph done once, when the torch runner loads it (faces.onnx_torch).

- Batch norm folded into the convolution before it: W' = W * s, b' = (b - mean) * s + beta
  with s = gamma / sqrt(var + eps), computed in float64. One kernel less per layer, and no
  batch-norm statistics ever cast to fp16 (a variance near fp16's limits, or eps below
  its resolution, would change the result).
- Any other batch norm (after an addition, on the network input) becomes a per-channel
  scale and shift, also computed in float64 (`Affine`, an op of this runner only).
- The tails of chosen outputs (the detector's scores) marked to run in float32: walking
  back from the output through reshapes, transposes and the sigmoid to the convolution
  that feeds them, so a score is compared with the threshold before any fp16 rounding.

Nodes are (op_type, inputs, outputs, attributes) tuples, initializers numpy arrays.
"""

from __future__ import annotations

import numpy as np

Node = tuple[str, list[str], list[str], dict]

AFFINE = "Affine"  # x * scale + shift per channel (NCHW axis 1): a batch norm, prepared
_SCORE_TAIL_OPS = {"Sigmoid", "Reshape", "Transpose", "Flatten", "Identity", "Squeeze", "Unsqueeze"}
_PRODUCERS = {"Conv", "Gemm", "MatMul"}


def _consumers(nodes: list[Node]) -> dict[str, int]:
    count: dict[str, int] = {}
    for _, inputs, _, _ in nodes:
        for name in inputs:
            count[name] = count.get(name, 0) + 1
    return count


def _batch_norm_factors(node: Node, initializers: dict) -> tuple[np.ndarray, ...] | None:
    """(scale, shift) in float64 of a batch norm whose statistics are constants:
    BN(x) = x * scale + shift."""
    _, inputs, outputs, attrs = node
    if len(outputs) != 1 or not all(name in initializers for name in inputs[1:5]):
        return None
    gamma, beta, mean, var = (initializers[name].astype(np.float64) for name in inputs[1:5])
    scale = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
    return scale, beta - mean * scale


def fold_batch_norms(
    nodes: list[Node], initializers: dict[str, np.ndarray], graph_outputs: set[str]
) -> list[Node]:
    """The nodes with every constant batch norm folded or turned into `AFFINE`;
    `initializers` gains the new weights (the old ones stay: other nodes may share them)."""
    producer = {out: index for index, (_, _, outputs, _) in enumerate(nodes) for out in outputs}
    consumers = _consumers(nodes)
    result: list[Node | None] = list(nodes)
    for index, node in enumerate(nodes):
        op_type, inputs, outputs, _ = node
        if op_type != "BatchNormalization":
            continue
        factors = _batch_norm_factors(node, initializers)
        if factors is None:
            continue
        scale, shift = factors
        source = producer.get(inputs[0])
        conv = nodes[source] if source is not None else None
        if (
            conv is not None
            and conv[0] == "Conv"
            and consumers.get(inputs[0], 0) == 1
            and inputs[0] not in graph_outputs
            and conv[1][1] in initializers
            and (len(conv[1]) < 3 or conv[1][2] in initializers)
        ):
            weight = initializers[conv[1][1]].astype(np.float64)
            bias = initializers[conv[1][2]].astype(np.float64) if len(conv[1]) > 2 else 0.0
            folded_w, folded_b = f"{outputs[0]}::folded_w", f"{outputs[0]}::folded_b"
            initializers[folded_w] = (weight * scale[:, None, None, None]).astype(np.float32)
            initializers[folded_b] = (bias * scale + shift).astype(np.float32)
            result[source] = ("Conv", [conv[1][0], folded_w, folded_b], list(outputs), conv[3])
            result[index] = None
            continue
        scale_name, shift_name = f"{outputs[0]}::scale", f"{outputs[0]}::shift"
        initializers[scale_name] = scale.astype(np.float32)
        initializers[shift_name] = shift.astype(np.float32)
        result[index] = (AFFINE, [inputs[0], scale_name, shift_name], list(outputs), {})
    return [node for node in result if node is not None]


def precise_nodes(nodes: list[Node], outputs: set[str]) -> set[int]:
    """Indices of the nodes that compute `outputs` from the last convolution (or matrix
    product) before them, through shape ops and the sigmoid only."""
    producer = {out: index for index, (_, _, outs, _) in enumerate(nodes) for out in outs}
    marked: set[int] = set()
    for name in outputs:
        index = producer.get(name)
        while index is not None:
            op_type, inputs, _, _ = nodes[index]
            if op_type not in _SCORE_TAIL_OPS | _PRODUCERS:
                break
            marked.add(index)
            if op_type in _PRODUCERS:
                break
            index = producer.get(inputs[0])
    return marked
