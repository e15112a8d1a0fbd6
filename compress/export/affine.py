"""BatchNormalization after a convolution whose weight is decoded: a per-channel scale after the decode.

An exporter folds an inference-mode BatchNorm into the convolution before it (`W * s`, `(b - mean) *
s + beta`, with `s = gamma / sqrt(var + eps)`), which makes a decoded weight a dense constant. Here
the fold is kept out of the stored weight: the convolution reads `Mul(decode(W), s)` (`s` one value
per output channel) and the folded bias, and the BatchNorm node goes. What is stored is the codebook
and indices plus two vectors of the channel count, in place of BatchNorm's four. The alternative,
folding BatchNorm into the weights before clustering, would change the model that is clustered and
fine-tuned (its BatchNorm statistics could no longer update) and its state_dict; the fold here is
exact up to float rounding and touches only the file.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._decode import Constants

# op type -> axis of the weight that holds the output channels (ConvTranspose only with group 1)
_CHANNEL_AXIS = {"Conv": 0, "ConvTranspose": 1}


def fold_batchnorm(graph: onnx.GraphProto, decoded: set[str], consts: Constants, namer) -> list[str]:
    """Fold each BatchNormalization that follows a Conv/ConvTranspose reading a `decoded` weight (in place).

    Returns the decoded weights that are now scaled.
    """
    nodes = list(graph.node)
    inits = {t.name: t for t in graph.initializer}
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    readers: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    drop, before, scaled_weights = set(), {}, []
    for pos, bn in enumerate(nodes):
        conv = nodes[producer[bn.input[0]]] if bn.op_type == "BatchNormalization" and bn.input[0] in producer else None
        if conv is None or not _foldable(conv, decoded, readers, outputs):
            continue
        params, bias = _params(bn, inits), _bias(conv, inits)
        if params is None or bias is None:
            continue
        scale, shift = _affine(params, bias)
        rank = 2 + len(next(a.ints for a in conv.attribute if a.name == "kernel_shape"))
        shape = [1] * rank
        shape[_CHANNEL_AXIS[conv.op_type]] = -1
        scaled = namer("d")
        scaled_weights.append(conv.input[1])
        before[producer[bn.input[0]]] = helper.make_node(
            "Mul", [conv.input[1], consts(scale.reshape(shape), "bn.scale")], [scaled])
        del conv.input[1:]
        conv.input.extend([scaled, consts(shift, "bn.shift")])
        conv.output[0] = bn.output[0]
        drop.add(pos)
    if drop:
        out = []
        for pos, node in enumerate(nodes):
            if pos in before:
                out.append(before[pos])
            if pos not in drop:
                out.append(node)
        del graph.node[:]
        graph.node.extend(out)
    return scaled_weights


def _params(bn: onnx.NodeProto, inits: dict) -> dict | None:
    attrs = {a.name: helper.get_attribute_value(a) for a in bn.attribute}
    if attrs.get("training_mode", 0) or len([o for o in bn.output if o]) != 1:
        return None
    tensors = [inits.get(name) for name in bn.input[1:5]]
    if len(tensors) != 4 or any(t is None for t in tensors):
        return None
    gamma, beta, mean, var = (numpy_helper.to_array(t).astype(np.float64) for t in tensors)
    return {"gamma": gamma, "beta": beta, "mean": mean, "var": var, "eps": float(attrs.get("epsilon", 1e-5)),
            "dtype": numpy_helper.to_array(tensors[0]).dtype}


def _foldable(conv: onnx.NodeProto, decoded: set[str], readers: dict[str, int], outputs: set[str]) -> bool:
    if conv.op_type not in _CHANNEL_AXIS or len(conv.input) < 2 or conv.input[1] not in decoded:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    if "kernel_shape" not in attrs or (conv.op_type == "ConvTranspose" and attrs.get("group", 1) != 1):
        return False
    return readers.get(conv.output[0], 0) == 1 and conv.output[0] not in outputs


def _bias(conv: onnx.NodeProto, inits: dict) -> np.ndarray | None:
    if len(conv.input) < 3 or not conv.input[2]:
        return np.zeros(())
    t = inits.get(conv.input[2])
    return None if t is None else numpy_helper.to_array(t).astype(np.float64)


def _affine(p: dict, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = p["gamma"] / np.sqrt(p["var"] + p["eps"])
    shift = (bias - p["mean"]) * scale + p["beta"]
    return scale.astype(p["dtype"]), shift.astype(p["dtype"])
