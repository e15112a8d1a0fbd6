"""The ONNX form of a vector codebook and of outliers, in standard ops (the nodes after the decode's Gather).

A vector codebook ([groups, K, dim], one index per `dim` consecutive values of the last axis) is looked
up like a scalar one, in a [groups * K, dim] table: `Cast(indices) [+ row offsets] -> Gather(table,
axis=0)` gives [..., last / dim, dim], and a `Reshape` gives the weight's shape. The indices are stored
exactly as scalar indices of the same bits (UINT2/UINT4/UINT8 or densely packed).

Outliers (flat positions, int32, and exact values in the weight's dtype) are written over the decoded
weight: `Reshape(-1) -> ScatterElements(axis=0) -> Reshape(shape)`.

Neither is elementwise (one index reads `dim` values; outliers replace some), so layout ops the graph
applies to such a weight stay on the decoded weight.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from ..codebook import TensorCodebook


def finish(cb: TensorCodebook, gathered: str, out: str, outlier_names: tuple[str, str], nodes: list, consts,
           namer) -> None:
    """Append the nodes from the Gather's output `gathered` to the weight `out`."""
    shape = consts(np.array(cb.shape, np.int64), f"{cb.name}.shape")
    if not cb.outlier_count:
        nodes.append(helper.make_node("Reshape", [gathered, shape], [out]))
        return
    flat, written = namer("d"), namer("d")
    nodes += [
        helper.make_node("Reshape", [gathered, consts(np.array([-1], np.int64), "outliers.flat_shape")], [flat]),
        helper.make_node("ScatterElements", [flat, *outlier_names], [written], axis=0),
        helper.make_node("Reshape", [written, shape], [out]),
    ]

