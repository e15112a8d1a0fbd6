"""Layout ops on an index applied once, at export, to the stored index itself.

`layout.py` moves what the graph does to a decoded weight (the Transpose a MatMul reads, an LSTM's
gate reordering, a reshape) onto its int32 index. Left in the graph, those ops run on a full-size
int32 copy of the index: a default onnxruntime session folds them at load (each intermediate a
4-byte-per-weight buffer that the process keeps: MiniLM's default session grew to 2.4x the fp32
model's resident memory), and a session that keeps the weights compressed runs them at every
inference. Applying them to the stored indices instead costs nothing: the indices are stored in the
layout the graph reads, in the same type and the same bytes, and the graph only unpacks and casts them.

Per-row codebooks add each row's codebook offset (`row * k`) to the index before the layout ops. After
a Transpose the offsets vary along another axis; they are recomputed in-graph (Range, as the decode
does) along the axis they vary on. A chain whose result cannot be written that way (several stored
indices concatenated, offsets reordered by a Slice + Concat, an index read whole elsewhere, a layout
that repeats elements) is left as it is.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import graph as _graph
from ._decode import (
    DECODE_NODE,
    INDEX_NODE,
    Constants,
    IndexLayout,
    _index_tensor,
    _packed_tensor,
    _reshape,
    _unpack_nodes,
)


@dataclass(frozen=True)
class StoredIndex:
    """What the export knows of one index initializer."""

    k: int  # values per codebook row: an index is < k, a row's offset a multiple of k
    numel: int  # indices stored
    layout: IndexLayout


@dataclass(frozen=True)
class _Offsets:
    """Row offsets `((arange(n) // per) + first) * k` along `axis` of an index of rank `rank`."""

    axis: int
    n: int
    per: int
    first: int
    k: int
    rank: int


# ops an index passes through between its storage and its lookup (layout, offsets, unpacking)
_INDEX_OPS = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Expand", "Tile", "Slice",
              "Split", "Gather", "Concat", "Cast", "Add", "Sub", "Mul", "Div", "Range", "BitShift", "BitwiseAnd",
              "BitwiseOr"}


def bake_layouts(proto: onnx.ModelProto, stored: dict[str, StoredIndex]) -> int:
    """Apply the ops between each stored index (named in `stored`) and the first value that mixes it with
    anything else (its decode, or a Concat with another tensor's index) to the stored index, in place;
    returns how many indices were rewritten."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list] = defaultdict(list)
    for node in _graph.all_nodes(g):
        for name in node.input:
            readers[name].append(node)
    constant = _constants(g, set(inits) - set(stored))
    outputs = {o.name for o in g.output}
    consts = Constants(_graph.Namer(proto))
    order, baked = list(g.node), 0
    for name, info in stored.items():
        if name not in inits:
            continue
        frontier = _frontier(name, order, readers, constant, outputs)
        if frontier is None:
            continue
        nodes, leaves = _chain(frontier, order, inits, producer)
        if all(n.name.startswith(INDEX_NODE) for n in nodes if n.output[0] not in constant):
            continue  # nothing but the stored index's own unpacking and offsets
        value = _evaluate(proto, nodes, [inits[leaf] for leaf in leaves], frontier)
        offsets = _offsets(value, info.k)
        if offsets is None or value.size > info.numel:
            continue
        new = _rewrite(inits[name], value % info.k, info, offsets, consts)
        for reader in readers[frontier]:
            reader.input[:] = [new[-1].output[0] if i == frontier else i for i in reader.input]
        position = min(list(g.node).index(r) for r in readers[frontier])
        for i, node in enumerate(new):
            g.node.insert(position + i, node)
        baked += 1
    g.initializer.extend(consts.initializers)
    if baked:
        _graph.eliminate_dead(g)
    return baked


def _constants(g: onnx.GraphProto, inits: set[str]) -> set[str]:
    """Values computed from `inits` (every initializer but the stored indices) alone."""
    out = set(inits)
    for node in g.node:
        if not list(_graph.subgraphs(node)) and all(not i or i in out for i in node.input):
            out.update(node.output)
    return out


def _frontier(index: str, order: list, readers: dict, constant: set[str], outputs: set[str]) -> str | None:
    """The one value where what is computed from `index` alone (and constants) meets anything else; None
    when there are several, or when an intermediate value is also read elsewhere."""
    derived, region = {index}, set()
    for node in order:
        if (node.op_type in _INDEX_OPS and not node.name.startswith(DECODE_NODE) and not list(_graph.subgraphs(node))
                and any(i in derived for i in node.input)
                and all(not i or i in derived or i in constant for i in node.input)):
            region.add(id(node))
            derived.update(node.output)
    leaving = {v for v in derived if v in outputs or any(id(r) not in region for r in readers[v])}
    if len(leaving) != 1 or index in leaving:
        return None
    return leaving.pop()


def _chain(value: str, order: list, inits: dict, producer: dict) -> tuple[list, list[str]] | None:
    """(the nodes computing `value`, in graph order; the initializers they read) when it is computed from
    initializers alone."""
    ids, leaves, seen, stack = set(), [], set(), [value]
    while stack:
        name = stack.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name in inits:
            leaves.append(name)
            continue
        node = producer.get(name)
        if node is None or list(_graph.subgraphs(node)):
            return None
        ids.add(id(node))
        stack.extend(node.input)
    return [n for n in order if id(n) in ids], leaves


def _evaluate(proto: onnx.ModelProto, nodes: list, initializers: list, value: str) -> np.ndarray:
    """Run the chain in onnxruntime (every op and index type it may hold, sub-byte ones included)."""
    import onnxruntime as ort

    graph = helper.make_graph(nodes, "index", [], [helper.make_tensor_value_info(value, TensorProto.INT32, None)],
                              initializers)
    opsets = [o for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=proto.ir_version)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {})[0]


def _offsets(value: np.ndarray, k: int) -> _Offsets | None:
    """The row offsets in `value` (each a multiple of k) when they vary along one axis as the decode makes them."""
    rows = value // k
    varying = [a for a in range(value.ndim) if value.shape[a] > 1 and (np.diff(rows, axis=a) != 0).any()]
    if len(varying) > 1:
        return None
    if not varying:
        return _Offsets(0, 1, 1, int(rows.flat[0]) if rows.size else 0, k, value.ndim)
    axis = varying[0]
    line = rows.reshape(-1) if value.ndim == 1 else np.moveaxis(rows, axis, 0).reshape(value.shape[axis], -1)[:, 0]
    per = int(np.count_nonzero(line == line[0]))
    expected = np.arange(line.size) // per + int(line[0])
    return _Offsets(axis, line.size, per, int(line[0]), k, value.ndim) if np.array_equal(line, expected) else None


def _rewrite(index: TensorProto, values: np.ndarray, info: StoredIndex, offsets: _Offsets, consts: Constants
             ) -> list:
    """Store `values` (< k) in `index`'s place and type; the nodes from it to the flat int32 index."""
    flat = values.reshape(-1).astype(np.int64)
    name, namer, nodes = index.name, consts.namer, []
    if info.layout.packed:
        index.CopyFrom(_packed_tensor(name, flat, info.layout.bits))
        unpacked = _unpack_nodes(name, info.layout.bits, flat.size, nodes, consts, namer)
        cast = namer("d")
        nodes.append(helper.make_node("Cast", [unpacked], [cast], to=TensorProto.INT32))
        out = _reshape(cast, list(values.shape), nodes, consts, namer)
    else:
        index.CopyFrom(_index_tensor(name, flat, values.shape, info.layout))
        out = namer("d")
        nodes.append(helper.make_node("Cast", [name], [out], to=TensorProto.INT32))
    out = _add_offsets(out, offsets, nodes, consts, namer)
    for node in nodes:
        node.name = f"{INDEX_NODE}:{node.output[0]}"
    return nodes


def _add_offsets(idx: str, o: _Offsets, nodes: list, consts: Constants, namer) -> str:
    """idx + ((arange(n) // per) + first) * k, broadcast along `axis` (nothing when every offset is 0)."""
    if o.n == 1 and o.first == 0:
        return idx
    out = namer("d")
    if o.n == 1:
        nodes.append(helper.make_node("Add", [idx, consts(np.array(o.first * o.k, np.int32), "base")], [out]))
        return out
    row = namer("d")
    nodes.append(helper.make_node("Range", [consts(np.array(0, np.int32), "offsets.zero"),
                                            consts(np.array(o.n, np.int32), "rows"),
                                            consts(np.array(1, np.int32), "offsets.one")], [row]))
    if o.per > 1:
        group = namer("d")
        nodes.append(helper.make_node("Div", [row, consts(np.array(o.per, np.int32), "group_size")], [group]))
        row = group
    if o.first:
        shifted = namer("d")
        nodes.append(helper.make_node("Add", [row, consts(np.array(o.first, np.int32), "first_row")], [shifted]))
        row = shifted
    offset = namer("d")
    nodes.append(helper.make_node("Mul", [row, consts(np.array(o.k, np.int32), "k")], [offset]))
    shape = [1] * o.rank
    shape[o.axis] = o.n
    column = _reshape(offset, shape, nodes, consts, namer)
    nodes.append(helper.make_node("Add", [idx, column], [out]))
    return out
