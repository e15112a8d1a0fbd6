"""The ONNX form of a vector codebook and of outliers, in standard ops.

A vector codebook ([groups, K, dim], one index per `dim` consecutive values of the last axis) is decoded
by the scalar decode of `_decode` applied to its indices, reading a [groups * K, dim] table instead of a
flat one: `Cast(indices) [+ row offsets] -> Gather(table, axis=0)` gives [..., last / dim, dim], and a
`Reshape` gives the weight's shape. The indices are stored exactly as scalar indices of the same bits
(UINT2/UINT4/UINT8 or densely packed).

Outliers (flat positions, int32, and exact values in the weight's dtype) are written over the decoded
weight: `Reshape(-1) -> ScatterElements(axis=0) -> Reshape(shape)`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from ..codebook import TensorCodebook


def decode_graph(cb: TensorCodebook, layout, out: str, namer, consts, stored_dtype: torch.dtype,
                 out_dtype: torch.dtype, *, scalar):
    """Nodes and initializers producing `out` (cb's dense value) for a vector codebook or one with outliers.

    `scalar` is the scalar decode (`_decode.decode_graph`), handed in so that this module does not
    import it back. Returns its `Decoded` with this tensor's nodes and initializers.
    """
    target = namer(f"{cb.name}.decoded") if cb.outlier_count else out
    plain = dataclasses.replace(cb, outlier_index=None, outlier_value=None)
    if cb.dim == 1:
        decoded = scalar(plain, layout, target, namer, consts, stored_dtype, out_dtype)
    else:
        decoded = _vector(plain, layout, target, namer, consts, stored_dtype, out_dtype, scalar)
    if cb.outlier_count:
        _add_outliers(cb, decoded, target, out, namer, consts, out_dtype)
    return decoded


def _vector(cb: TensorCodebook, layout, out: str, namer, consts, stored_dtype, out_dtype, scalar):
    groups, k = cb.codebook.shape[:2]
    view = TensorCodebook(cb.name, cb.index_shape, cb.granularity, torch.zeros(groups, k, dtype=cb.dtype),
                          cb.indices, cb.group_size)
    rows = namer(f"{cb.name}.vectors")
    decoded = scalar(view, layout, rows, namer, consts, stored_dtype, out_dtype)
    table = cb.codebook.detach().to(stored_dtype).reshape(groups * k, cb.dim)
    decoded.initializers = [_tensor(table, decoded.codebook_name) if t.name == decoded.codebook_name else t
                            for t in decoded.initializers]
    shape = consts(np.array(cb.shape, np.int64), f"{cb.name}.shape")
    decoded.nodes.append(helper.make_node("Reshape", [rows, shape], [out]))
    return decoded


def _add_outliers(cb: TensorCodebook, decoded, dense: str, out: str, namer, consts, out_dtype) -> None:
    where, values = namer(f"{cb.name}.outlier_index"), namer(f"{cb.name}.outlier_value")
    decoded.initializers += [numpy_helper.from_array(cb.outlier_index.to(torch.int32).numpy(), where),
                             _tensor(cb.outlier_value.detach().to(out_dtype), values)]
    flat, written = namer(f"{cb.name}.flat"), namer(f"{cb.name}.with_outliers")
    decoded.nodes += [
        helper.make_node("Reshape", [dense, consts(np.array([-1], np.int64), "outliers.flat_shape")], [flat]),
        helper.make_node("ScatterElements", [flat, where, values], [written], axis=0),
        helper.make_node("Reshape", [written, consts(np.array(cb.shape, np.int64), f"{cb.name}.shape")], [out]),
    ]


def _tensor(t: torch.Tensor, name: str) -> TensorProto:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        raw = t.view(torch.int16).numpy().tobytes()
        return helper.make_tensor(name, TensorProto.BFLOAT16, list(t.shape), raw, raw=True)
    return numpy_helper.from_array(t.numpy(), name)
