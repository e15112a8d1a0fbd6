"""Each stored index as the graph reads it: the layout ops on it applied once, at export.

`layout.py` moves what the graph does to a decoded weight (the Transpose a MatMul reads, an LSTM's
gate reordering, a reshape) onto its int32 index. Left in the graph, those ops run on a full-size
int32 copy of the index: a default onnxruntime session folds them at load (each intermediate a
4-byte-per-weight buffer that the process keeps: MiniLM's default session grew to 2.4x the fp32
model's resident memory), and a session that keeps the weights compressed runs them at every
inference. Applied to the stored indices instead, they cost nothing: the indices are stored in the
layout the graph reads, in the same type and the same bytes.

`index_values` evaluates (onnx's reference evaluator), for every stored index, the chain of ops from it to the first value that
mixes it with anything else (its decode, or a Concat with another tensor's index), and splits the
result into each element's *local* index (< k, what is stored) and the codebook row each *line*
reads (`Lines`: per-row codebooks vary along one axis, which a Transpose may have moved). A chain
whose rows do not follow that pattern (offsets reordered by a Slice + Concat), an index read whole
elsewhere, or a layout that repeats elements is left as it is.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
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

# ops an index passes through between its storage and its lookup (layout, offsets, unpacking)
_INDEX_OPS = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Expand", "Tile", "Slice",
              "Split", "Gather", "Concat", "Cast", "Add", "Sub", "Mul", "Div", "Range", "BitShift", "BitwiseAnd",
              "BitwiseOr"}


@dataclass(frozen=True)
class StoredIndex:
    """What the export knows of one index initializer."""

    k: int  # values per codebook row: an index is < k, a row's offset a multiple of k
    numel: int  # indices stored
    layout: IndexLayout


@dataclass(frozen=True)
class Lines:
    """The codebook row each element reads: `arange(n) // per + first` along `axis` (None: row `first`)."""

    axis: int | None
    n: int
    per: int
    first: int

    @property
    def trivial(self) -> bool:
        """Every element reads codebook row 0: a per-tensor codebook."""
        return self.axis is None and self.first == 0


@dataclass
class IndexValue:
    """One stored index as the graph reads it at `frontier`."""

    name: str  # the index initializer
    info: StoredIndex
    frontier: str  # the value its chain computes
    local: np.ndarray  # each element's index into its codebook row, in the layout the graph reads
    lines: Lines
    moved: bool  # layout ops lay between the storage and `frontier`


def index_values(proto: onnx.ModelProto, stored: dict[str, StoredIndex]) -> Iterator[IndexValue]:
    """Every stored index (named in `stored`) whose chain can be written as local indices + `Lines`,
    one at a time (the caller may rewrite the graph in between: chains are private to their index)."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list] = defaultdict(list)
    for node in _graph.all_nodes(g):
        for name in node.input:
            readers[name].append(node)
    constant = _constants(g, set(inits) - set(stored))
    outputs = {o.name for o in g.output}
    order = list(g.node)
    for name, info in stored.items():
        frontier = _frontier(name, order, readers, constant, outputs) if name in inits else None
        if frontier is None:
            continue
        nodes, leaves = _chain(frontier, order, inits, producer)
        value = _evaluate(proto, nodes, [inits[leaf] for leaf in leaves], frontier)
        lines = _lines(value, info.k)
        if lines is None or value.size > info.numel:
            continue
        local = (value % info.k).astype(np.uint8 if info.k <= 256 else np.int32)
        moved = not all(n.name.startswith(INDEX_NODE) for n in nodes if n.output[0] not in constant)
        yield IndexValue(name, info, frontier, local, lines, moved)


def store_local(index: TensorProto, value: IndexValue) -> None:
    """Rewrite the index initializer (in place, same name, type and packing) to hold `value.local`."""
    flat = value.local.reshape(-1).astype(np.int64)
    layout = value.info.layout
    if layout.packed:
        index.CopyFrom(_packed_tensor(index.name, flat, layout.bits))
    else:
        index.CopyFrom(_index_tensor(index.name, flat, value.local.shape, layout))


def index_nodes(value: IndexValue, consts: Constants, *, offsets: bool) -> tuple[list, str]:
    """Nodes from the stored local indices to int32 indices in the layout the graph reads; with `offsets`,
    each line's codebook-row offset added (an index into the flat codebook)."""
    namer, nodes, layout = consts.namer, [], value.info.layout
    if layout.packed:
        unpacked = _unpack_nodes(value.name, layout.bits, value.local.size, nodes, consts, namer)
        cast = namer("d")
        nodes.append(helper.make_node("Cast", [unpacked], [cast], to=TensorProto.INT32))
        out = _reshape(cast, list(value.local.shape), nodes, consts, namer)
    else:
        out = namer("d")
        nodes.append(helper.make_node("Cast", [value.name], [out], to=TensorProto.INT32))
    if offsets and not value.lines.trivial:
        out = _add_offsets(out, value, nodes, consts)
    for node in nodes:
        node.name = f"{INDEX_NODE}:{node.output[0]}"
    return nodes, out


def line_rows(lines: Lines, nodes: list, consts: Constants) -> str:
    """int32 [n]: the codebook row of each line (`[first]` when every element reads one row)."""
    if lines.axis is None:
        return consts(np.array([lines.first], np.int32), "first_row")
    namer = consts.namer
    row = namer("d")
    nodes.append(helper.make_node("Range", [consts(np.array(0, np.int32), "offsets.zero"),
                                            consts(np.array(lines.n, np.int32), "rows"),
                                            consts(np.array(1, np.int32), "offsets.one")], [row]))
    if lines.per > 1:
        group = namer("d")
        nodes.append(helper.make_node("Div", [row, consts(np.array(lines.per, np.int32), "group_size")], [group]))
        row = group
    if lines.first:
        shifted = namer("d")
        nodes.append(helper.make_node("Add", [row, consts(np.array(lines.first, np.int32), "first_row")], [shifted]))
        row = shifted
    return row


def _add_offsets(idx: str, value: IndexValue, nodes: list, consts: Constants) -> str:
    """idx + (each line's codebook row) * k, broadcast along the lines' axis."""
    lines, namer = value.lines, consts.namer
    offset = namer("d")
    nodes.append(helper.make_node("Mul", [line_rows(lines, nodes, consts),
                                          consts(np.array(value.info.k, np.int32), "k")], [offset]))
    shape = [1] * value.local.ndim
    if lines.axis is not None:
        shape[lines.axis] = lines.n
    column = _reshape(offset, shape, nodes, consts, namer) if value.local.ndim else offset
    out = namer("d")
    nodes.append(helper.make_node("Add", [idx, column], [out]))
    return out


# --- finding and evaluating the chains ---------------------------------------------------------------

def _constants(g: onnx.GraphProto, inits: set[str]) -> set[str]:
    """Values computed from `inits` (every initializer but the stored indices) alone."""
    out = set(inits)
    for node in g.node:
        if not list(_graph.subgraphs(node)) and all(not i or i in out for i in node.input):
            out.update(node.output)
    return out


def _frontier(index: str, order: list, readers: dict, constant: set[str], outputs: set[str]) -> str | None:
    """The one value where what is computed from `index` alone (and constants) meets anything else; None
    when there are several, or when the index itself is read elsewhere."""
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


def _chain(value: str, order: list, inits: dict, producer: dict) -> tuple[list, list[str]]:
    """The nodes computing `value` (in graph order) and the initializers they read."""
    ids, leaves, seen, stack = set(), [], set(), [value]
    while stack:
        name = stack.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name in inits:
            leaves.append(name)
            continue
        node = producer[name]
        ids.add(id(node))
        stack.extend(node.input)
    return [n for n in order if id(n) in ids], leaves


def _evaluate(proto: onnx.ModelProto, nodes: list, initializers: list, value: str) -> np.ndarray:
    """Run the chain with onnx's reference evaluator (numpy: every standard op and index type, sub-byte
    ones included; no onnxruntime session, whose start-up may log)."""
    from onnx.reference import ReferenceEvaluator

    graph = helper.make_graph(nodes, "index", [], [helper.make_tensor_value_info(value, TensorProto.INT32, None)],
                              initializers)
    opsets = [o for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=proto.ir_version)
    return np.asarray(ReferenceEvaluator(model).run(None, {})[0])


def _lines(value: np.ndarray, k: int) -> Lines | None:
    """The codebook row of each element of `value` (row = value // k), when it follows `Lines`."""
    rows = value // k
    varying = [a for a in range(value.ndim) if value.shape[a] > 1 and (np.diff(rows, axis=a) != 0).any()]
    if len(varying) > 1:
        return None
    if not varying:
        return Lines(None, 1, 1, int(rows.flat[0]) if rows.size else 0)
    axis = varying[0]
    line = np.moveaxis(rows, axis, 0).reshape(value.shape[axis], -1)[:, 0]
    per = int(np.count_nonzero(line == line[0]))
    expected = np.arange(line.size) // per + int(line[0])
    return Lines(axis, line.size, per, int(line[0])) if np.array_equal(line, expected) else None
