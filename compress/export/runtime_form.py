"""The decode in the form that costs least when the file runs, in either onnxruntime session mode.

Every stored index is first written in the layout the graph reads (`baked.py`). Then each decode
becomes one of three exact forms (the same values, the same stored bytes but for row padding):

- **Rows** (an embedding): a decoded table read only by Gathers of token ids is never decoded whole.
  The ids gather rows of the *indices*, and only those rows are decoded, so the table stays codebook
  + packed indices in memory in either session mode (a default session would fold a whole-table
  decode into a dense table at load). Gather cannot read sub-byte tensors, so 4- and 2-bit indices
  are stored as uint8 rows of the same packed bits (`[rows, ceil(cols * bits / 8)]`, the very same
  bytes when a row fills whole bytes) and the gathered rows are unpacked in-graph (BitShift,
  BitwiseAnd). Per-row codebooks add each gathered row's codebook offset, computed from the ids.
- **Elements**: `GatherElements` on a small table holding each line's codebook (`[k, cols]` for one
  codebook per tensor, `[rows, k]` for one per row or group of rows), expanded along the other axes.
  onnxruntime 1.32 CPU decodes 590k indices in 630 us that way against 1800 us with Gather (one
  element copied per index instead of one slice), which a session that keeps the weights compressed
  pays at every run. Used where that table is at most a quarter of the weight.
- **Gather** on the flat codebook (with each line's offset added), as `_decode` builds it: the rest.

A default session folds the last two forms at load; its peak and resident memory against the fp32
model's is what `bench/runtime.py` measures.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..packing import pack_bits
from . import graph as _graph
from ._decode import DECODE_NODE, Constants
from .baked import IndexValue, StoredIndex, index_nodes, index_values, line_rows, store_local

_ROW_BITS = {TensorProto.UINT2: 2, TensorProto.UINT4: 4, TensorProto.UINT8: 8}
_TABLE_SHARE = 4  # the elements form's expanded table may hold at most 1/4 of the weight's elements


class _Graph:
    """The graph being rewritten: lookups by name, and new nodes placed before the node that needs them."""

    def __init__(self, proto: onnx.ModelProto):
        self.proto, self.g = proto, proto.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.readers: dict[str, list] = defaultdict(list)
        for node in _graph.all_nodes(self.g):
            for name in node.input:
                self.readers[name].append(node)
        self.outputs = {o.name for o in self.g.output}
        self.consts = Constants(_graph.Namer(proto))
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        self._before: dict[int, list] = defaultdict(list)
        self._replaced: dict[int, list] = {}

    def before(self, anchor, nodes: list) -> None:
        self._before[id(anchor)] += nodes

    def replace(self, node, nodes: list) -> None:
        self._replaced[id(node)] = nodes

    def apply(self) -> None:
        out = []
        for node in self.g.node:
            out += self._before.get(id(node), [])
            out += self._replaced.get(id(node), [node])
        del self.g.node[:]
        self.g.node.extend(out)
        self.g.initializer.extend(self.consts.initializers)
        _graph.eliminate_dead(self.g)

    def decode_of(self, value: str):
        """The decode reading `value` as its index, when nothing else reads it."""
        users = self.readers[value]
        if len(users) == 1 and users[0].name.startswith(DECODE_NODE) and users[0].op_type == "Gather":
            return users[0] if list(users[0].input[1:]) == [value] else None
        return None

    def runtime_lookups(self, decode) -> list | None:
        """The Gathers that read rows of `decode`'s output at ids known only at run time, when they are
        all that reads it."""
        out = decode.output[0]
        users = self.readers[out]
        if out in self.outputs or not users:
            return None
        for node in users:
            if (node.op_type != "Gather" or node.input[0] != out or _axis(node) != 0
                    or self._constant(node.input[1], 0)):
                return None
        return users

    def _constant(self, value: str, depth: int) -> bool:
        """Whether `value` is computable from initializers alone (a default session folds it)."""
        if value in self.inits:
            return True
        node = self.producer.get(value)
        if node is None or depth > 64:
            return False
        return all(not name or self._constant(name, depth + 1) for name in node.input)


def runtime_form(proto: onnx.ModelProto, stored: dict[str, StoredIndex]) -> list[str]:
    """Rewrite `proto` in place (see the module docstring); returns a note per embedding decoded by rows.

    Rows need opset 18 (BitwiseAnd), elements opset 13 (GatherElements with these shapes)."""
    graph = _Graph(proto)
    notes = []
    for value in index_values(proto, stored):
        decode = graph.decode_of(value.frontier)
        lookups = graph.runtime_lookups(decode) if decode is not None else None
        if lookups and graph.opset >= 18 and _rows_fit(value):
            notes.append(_rows(graph, value, decode, lookups))
        elif decode is not None and graph.opset >= 13 and _element_axis(value) is not None:
            _elements(graph, value, decode)
        elif value.moved:
            _plain(graph, value)
    graph.apply()
    return notes


def _plain(graph: _Graph, value: IndexValue) -> None:
    """The stored index in the layout the graph reads, cast, with its offsets: what the chain computed."""
    store_local(graph.inits[value.name], value)
    nodes, out = index_nodes(value, graph.consts, offsets=True)
    users = graph.readers[value.frontier]
    for user in users:
        user.input[:] = [out if i == value.frontier else i for i in user.input]
    graph.before(min(users, key=list(graph.g.node).index), nodes)


# --- elements ---------------------------------------------------------------------------------------

def _element_axis(value: IndexValue) -> int | None:
    """The axis GatherElements reads along: the longest one the lines do not vary on, when the table
    expanded along the other axes stays small."""
    shape, k = value.local.shape, value.info.k
    axes = [a for a in range(len(shape)) if a != value.lines.axis]
    if not axes:
        return None
    axis = max(axes, key=lambda a: shape[a])
    return axis if shape[axis] >= _TABLE_SHARE * k else None


def _elements(graph: _Graph, value: IndexValue, decode) -> None:
    store_local(graph.inits[value.name], value)
    nodes, index = index_nodes(value, graph.consts, offsets=False)
    axis = _element_axis(value)
    table = _line_table(decode.input[0], value, axis, nodes, graph.consts)
    nodes.append(helper.make_node("GatherElements", [table, index], list(decode.output), axis=axis,
                                  name=decode.name))
    graph.replace(decode, nodes)


def _line_table(flat: str, value: IndexValue, axis: int, nodes: list, consts: Constants) -> str:
    """The codebook each element reads, at position `index` along `axis`: shape of the index with `axis`
    replaced by k; each line's codebook row placed along the lines' axis, repeated along the others."""
    lines, k, shape = value.lines, value.info.k, list(value.local.shape)
    namer = consts.namer
    rows, picked = namer("d"), namer("d")
    nodes += [helper.make_node("Reshape", [flat, consts(np.array([-1, k], np.int64), f"codebook_rows{k}")], [rows]),
              helper.make_node("Gather", [rows, line_rows(lines, nodes, consts)], [picked], axis=0)]  # [n, k]
    if lines.axis is not None and lines.axis > axis:
        flipped = namer("d")
        nodes.append(helper.make_node("Transpose", [picked], [flipped], perm=[1, 0]))
        picked = flipped
    column = [1] * len(shape)
    column[axis] = k
    if lines.axis is not None:
        column[lines.axis] = lines.n
    placed = _reshape_to(picked, column, nodes, consts)
    full = shape.copy()
    full[axis] = k
    if full == column:
        return placed
    out = namer("d")
    nodes.append(helper.make_node("Expand", [placed, consts(np.array(full, np.int64), "table.shape")], [out]))
    return out


def _reshape_to(value: str, shape: list[int], nodes: list, consts: Constants) -> str:
    out = consts.namer("d")
    nodes.append(helper.make_node("Reshape", [value, consts(np.array(shape, np.int64), "table.column")], [out]))
    return out


# --- rows -------------------------------------------------------------------------------------------

def _rows_fit(value: IndexValue) -> bool:
    """A 2-D index of 2, 4 or 8 bits whose lines (if any) are its rows."""
    return (value.local.ndim == 2 and value.lines.axis in (None, 0) and not value.info.layout.packed
            and value.info.layout.onnx_type in _ROW_BITS)


def _rows(graph: _Graph, value: IndexValue, decode, lookups: list) -> str:
    index = graph.inits[value.name]
    bits = _ROW_BITS[value.info.layout.onnx_type]
    before = _graph.data_size(index)
    packed = _row_bytes(value.local, bits)
    index.CopyFrom(onnx.numpy_helper.from_array(packed, index.name))  # same name: reports find it where it was
    for lookup in lookups:
        nodes = _row_lookup(graph, value, decode, lookup, bits, packed.shape[1])
        graph.replace(lookup, nodes)
    extra = packed.nbytes - before
    cost = f"; rows padded to whole bytes: +{extra:,} bytes" if extra > 0 else ""
    return (f"`{index.name}`: decoded only at the rows a Gather reads, never as a whole table; its {bits}-bit "
            f"indices stored as uint8 rows of {packed.shape[1]} bytes{cost}")


def _row_bytes(local: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [rows, ceil(cols * bits / 8)]: each row's indices packed lsb-first, padded to a whole byte."""
    if bits == 8:
        return local.astype(np.uint8)
    return np.stack([pack_bits(row.astype(np.int64), bits) for row in local]).astype(np.uint8)


def _row_lookup(graph: _Graph, value: IndexValue, decode, lookup, bits: int, row_bytes: int) -> list:
    """Gather(index rows, ids) -> unpack -> int32 (+ each row's codebook offset) -> Gather(codebook)."""
    consts, namer = graph.consts, graph.consts.namer
    ids, cols = lookup.input[1], value.local.shape[1]
    picked = namer(f"{value.name}.picked")
    nodes = [helper.make_node("Gather", [value.name, ids], [picked], axis=0)]
    unpacked = _unpack_rows(picked, ids, bits, row_bytes, cols, nodes, consts)
    idx = namer(f"{value.name}.picked_i32")
    nodes.append(helper.make_node("Cast", [unpacked], [idx], to=TensorProto.INT32))
    if not value.lines.trivial:
        idx = _row_offsets(idx, ids, value, nodes, consts)
    nodes.append(helper.make_node("Gather", [decode.input[0], idx], list(lookup.output), axis=0,
                                  name=f"{decode.name}|rows"))
    return nodes


def _row_offsets(idx: str, ids: str, value: IndexValue, nodes: list, consts: Constants) -> str:
    """idx + (ids // per + first) * k, one offset per gathered row."""
    lines, namer = value.lines, consts.namer
    if lines.axis is None:  # every row reads codebook row `first`
        row = consts(np.array(0, np.int32), "offsets.zero")
    else:
        row = namer("d")
        nodes.append(helper.make_node("Cast", [ids], [row], to=TensorProto.INT32))
    if lines.axis is not None and lines.per > 1:
        group = namer("d")
        nodes.append(helper.make_node("Div", [row, consts(np.array(lines.per, np.int32), "group_size")], [group]))
        row = group
    steps = [("Add", np.array(lines.first, np.int32), "first_row"), ("Mul", np.array(value.info.k, np.int32), "k")]
    for op, constant, name in steps:
        out = namer("d")
        nodes.append(helper.make_node(op, [row, consts(constant, name)], [out]))
        row = out
    column, out = namer("d"), namer("d")
    nodes += [helper.make_node("Unsqueeze", [row, consts(np.array([-1], np.int64), "rows.axis")], [column]),
              helper.make_node("Add", [idx, column], [out])]
    return out


def _unpack_rows(picked: str, ids: str, bits: int, row_bytes: int, cols: int, nodes: list, consts) -> str:
    """uint8 [*ids, row_bytes] -> uint8 [*ids, cols] indices (lsb first within each byte)."""
    if bits == 8:
        return picked
    per = 8 // bits
    v = {k: consts.namer(f"{picked}.{k}") for k in ("col", "shifted", "masked", "ids_shape", "shape", "flat", "cut")}
    c = {"axis": consts(np.array([-1], np.int64), "rows.axis"),
         "shift": consts(np.arange(per, dtype=np.uint8) * bits, "rows.shift"),
         "mask": consts(np.array((1 << bits) - 1, np.uint8), "rows.mask"),
         "width": consts(np.array([row_bytes * per], np.int64), "rows.width")}
    nodes += [
        helper.make_node("Unsqueeze", [picked, c["axis"]], [v["col"]]),
        helper.make_node("BitShift", [v["col"], c["shift"]], [v["shifted"]], direction="RIGHT"),
        helper.make_node("BitwiseAnd", [v["shifted"], c["mask"]], [v["masked"]]),
        helper.make_node("Shape", [ids], [v["ids_shape"]]),
        helper.make_node("Concat", [v["ids_shape"], c["width"]], [v["shape"]], axis=0),
        helper.make_node("Reshape", [v["masked"], v["shape"]], [v["flat"]]),
    ]
    if row_bytes * per == cols:
        return v["flat"]
    ends = consts(np.array([cols], np.int64), "rows.end")
    nodes.append(helper.make_node("Slice", [v["flat"], consts(np.array([0], np.int64), "rows.start"), ends, c["axis"]],
                                  [v["cut"]]))
    return v["cut"]


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)

