"""Embedding tables decoded row by row: `Gather(decode(table), ids)` becomes `decode(Gather(indices, ids))`.

An embedding's decoded table is read only by a Gather with the token ids: decoding it whole costs a
dense table in memory (onnxruntime folds it at load) or a full-table decode at every run (with
constant folding off). Gathering the rows of the *indices* first and decoding only those rows is the
same value, and neither ever exists: the table stays codebook + packed indices in memory whatever
the session options.

Gather cannot read sub-byte tensors, so a UINT4/UINT2 index table is stored as uint8 rows holding
the same packed bits (`[rows, ceil(cols * bits / 8)]`: the same bytes when a row fills whole bytes),
and the gathered rows are unpacked in-graph (BitShift, BitwiseAnd). Only per-tensor codebooks (one
flat codebook, no row offsets) are rewritten; others keep their whole-table decode.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..packing import pack_bits, unpack_bits
from . import graph as _graph

_BITS = {TensorProto.UINT2: 2, TensorProto.UINT4: 4, TensorProto.UINT8: 8}


def decode_rows_in_place(proto: onnx.ModelProto) -> list[str]:
    """Rewrite every embedding-style decode of `proto` (see the module docstring); returns one note each."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list] = defaultdict(list)
    for node in _graph.all_nodes(g):
        for name in node.input:
            readers[name].append(node)
    outputs = {o.name for o in g.output}
    namer = _graph.Namer(proto)
    notes = []
    for node in list(g.node):
        match = _match(node, inits, producer, readers, outputs)
        if match is not None:
            notes.append(_rewrite(proto, node, *match, namer))
    if notes:
        _graph.eliminate_dead(g)
    return notes


def _match(node, inits, producer, readers, outputs):
    """(cast node, index initializer, table name, the reading Gathers) when `node` decodes a whole table
    that only row lookups read; else None."""
    if node.op_type != "Gather" or len(node.input) != 2 or _axis(node) != 0 or node.output[0] in outputs:
        return None
    table, idx = node.input
    cast = producer.get(idx)
    if table not in inits or len(inits[table].dims) != 1 or cast is None or cast.op_type != "Cast":
        return None
    index = inits.get(cast.input[0])
    if index is None or index.data_type not in _BITS or len(index.dims) != 2 or len(readers[idx]) != 1:
        return None
    users = readers[node.output[0]]
    if not users or not all(_runtime_lookup(u, node.output[0], inits, producer) for u in users):
        return None
    return cast, index, table, users


def _runtime_lookup(node, table: str, inits, producer) -> bool:
    """A Gather of rows of `table` at indices known only at run time (token ids)."""
    if node.op_type != "Gather" or node.input[0] != table or _axis(node) != 0:
        return False
    ids = node.input[1]
    if ids in inits:
        return False
    parent = producer.get(ids)
    return parent is None or not _constant(parent, inits, producer)


def _constant(node, inits, producer, depth: int = 0) -> bool:
    """Whether `node`'s output is computable from initializers alone (then it is folded anyway)."""
    if depth > 32:
        return False
    for name in node.input:
        if not name or name in inits:
            continue
        parent = producer.get(name)
        if parent is None or not _constant(parent, inits, producer, depth + 1):
            return False
    return True


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _rewrite(proto, decode, cast, index, table: str, lookups: list, namer) -> str:
    g = proto.graph
    bits = _BITS[index.data_type]
    rows, cols = (int(d) for d in index.dims)
    packed, row_bytes = _row_bytes(index, bits, rows, cols)
    rows_name = namer(f"{index.name}.rows")
    g.initializer.append(numpy_helper.from_array(packed, rows_name))
    consts = _Consts(g, namer)
    nodes = []
    for lookup in lookups:
        ids, out = lookup.input[1], lookup.output[0]
        picked = namer(f"{index.name}.picked")
        nodes.append(helper.make_node("Gather", [rows_name, ids], [picked], axis=0))
        unpacked = _unpack_rows(picked, ids, bits, row_bytes, cols, nodes, consts, namer)
        idx = namer(f"{index.name}.picked_i32")
        nodes += [helper.make_node("Cast", [unpacked], [idx], to=TensorProto.INT32),
                  helper.make_node("Gather", [table, idx], [out], axis=0)]
        g.node.remove(lookup)
    position = list(g.node).index(decode)
    for i, node in enumerate(nodes):
        g.node.insert(position + i, node)
    extra = packed.nbytes - _graph.data_size(index)
    cost = f"; rows padded to whole bytes: +{extra:,} bytes" if extra > 0 else ""
    return (f"`{index.name}`: the table is decoded only at the rows a Gather reads (never whole, in any session "
            f"mode); its {bits}-bit indices stored as uint8 rows of {row_bytes} bytes{cost}")


def _row_bytes(index, bits: int, rows: int, cols: int) -> tuple[np.ndarray, int]:
    """The indices as uint8 [rows, row_bytes]: each row's indices packed lsb-first, padded to a whole byte."""
    if bits == 8:
        return numpy_helper.to_array(index).astype(np.uint8).reshape(rows, cols), cols
    row_bytes = math.ceil(cols * bits / 8)
    raw = np.frombuffer(_graph.tensor_bytes(index), dtype=np.uint8)
    if cols * bits % 8 == 0:
        return raw[: rows * row_bytes].reshape(rows, row_bytes).copy(), row_bytes
    values = unpack_bits(raw, bits, rows * cols).reshape(rows, cols)
    return np.stack([pack_bits(row, bits) for row in values]).astype(np.uint8), row_bytes


def _unpack_rows(picked: str, ids: str, bits: int, row_bytes: int, cols: int, nodes: list, consts, namer) -> str:
    """uint8 [*ids, row_bytes] -> uint8 [*ids, cols] indices (lsb first within each byte)."""
    if bits == 8:
        return picked
    per = 8 // bits
    v = {k: namer(f"{picked}.{k}") for k in ("col", "shifted", "masked", "ids_shape", "shape", "flat", "cut")}
    nodes += [
        helper.make_node("Unsqueeze", [picked, consts(np.array([-1], np.int64))], [v["col"]]),
        helper.make_node("BitShift", [v["col"], consts(np.arange(per, dtype=np.uint8) * bits)], [v["shifted"]],
                         direction="RIGHT"),
        helper.make_node("BitwiseAnd", [v["shifted"], consts(np.array((1 << bits) - 1, np.uint8))], [v["masked"]]),
        helper.make_node("Shape", [ids], [v["ids_shape"]]),
        helper.make_node("Concat", [v["ids_shape"], consts(np.array([row_bytes * per], np.int64))], [v["shape"]],
                         axis=0),
        helper.make_node("Reshape", [v["masked"], v["shape"]], [v["flat"]]),
    ]
    if row_bytes * per == cols:
        return v["flat"]
    nodes.append(helper.make_node("Slice", [v["flat"], consts(np.array([0], np.int64)),
                                            consts(np.array([cols], np.int64)), consts(np.array([-1], np.int64))],
                                  [v["cut"]]))
    return v["cut"]


class _Consts:
    """Small constants added to the graph once per value."""

    def __init__(self, graph, namer):
        self.graph, self.namer, self.seen = graph, namer, {}

    def __call__(self, value: np.ndarray) -> str:
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self.seen:
            self.seen[key] = self.namer("rows.const")
            self.graph.initializer.append(numpy_helper.from_array(value, self.seen[key]))
        return self.seen[key]
