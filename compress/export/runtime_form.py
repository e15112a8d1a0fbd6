"""The decode in the form that costs least when the file runs, in either onnxruntime session mode.

Two rewrites of the finished graph, both exact (the same values, the same stored bytes):

- **Row lookups** (`decode_rows`): an embedding's decoded table is read only by a Gather with the
  token ids. Decoding it whole costs a dense table in memory (a default session folds it at load) or
  a full-table decode at every run (constant folding off). Gathering the rows of the *indices* first
  and decoding only those rows gives the same value, and the table never exists: it stays codebook
  + packed indices in memory whatever the session. Gather cannot read sub-byte tensors, so a
  UINT4/UINT2 index is stored as uint8 rows holding the same packed bits (`[rows, ceil(cols * bits
  / 8)]`: the very same bytes when a row fills whole bytes) and the gathered rows are unpacked
  in-graph (BitShift, BitwiseAnd). Per-tensor codebooks only (no row offsets to gather).
- **Element lookups** (`lookup_elements`): every other decode reads the flat codebook with
  GatherElements on the flattened index instead of Gather: onnxruntime
  1.32 CPU decodes 590k indices in 630 us that way against 1800 us (it copies one element per index
  instead of one slice), which a session that keeps the weights compressed pays at every run.

A default session folds either form at load; the peak and resident memory of that load is what
`bench/runtime.py` measures against the fp32 model.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..packing import pack_bits, unpack_bits
from . import graph as _graph
from ._decode import DECODE_NODE, INDEX_NODE, Constants
from .baked import StoredIndex, bake_layouts

_ROW_BITS = {TensorProto.UINT2: 2, TensorProto.UINT4: 4, TensorProto.UINT8: 8}


def runtime_form(proto: onnx.ModelProto, stored: dict[str, StoredIndex]) -> list[str]:
    """Layouts baked into the stored indices (`baked.py`), then both rewrites, on `proto` (in place) where
    its opset has the ops they use (BitwiseAnd: 18, Unsqueeze with axes as an input: 13); returns a
    note per embedding decoded by rows."""
    bake_layouts(proto, stored)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    notes = decode_rows(proto) if opset >= 18 else []
    if opset >= 13:
        lookup_elements(proto)
    return notes


# --- row lookups ------------------------------------------------------------------------------------

def decode_rows(proto: onnx.ModelProto) -> list[str]:
    """Decode tables read only by row lookups at their rows (see the module docstring)."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list] = defaultdict(list)
    for node in _graph.all_nodes(g):
        for name in node.input:
            readers[name].append(node)
    outputs = {o.name for o in g.output}
    consts = Constants(_graph.Namer(proto))
    notes = []
    for node in list(g.node):
        match = _row_decode(node, inits, producer, readers, outputs)
        if match is not None:
            notes.append(_rewrite_rows(g, node, *match, consts))
    g.initializer.extend(consts.initializers)
    if notes:
        _graph.eliminate_dead(g)
    return notes


def _row_decode(node, inits, producer, readers, outputs):
    """(index initializer, the reading Gathers) when `node` decodes a whole per-tensor table that only
    run-time row lookups read; else None."""
    if not node.name.startswith(DECODE_NODE) or node.output[0] in outputs:
        return None
    cast = producer.get(node.input[1])
    if cast is None or cast.op_type != "Cast" or len(readers[node.input[1]]) != 1:
        return None
    index = inits.get(cast.input[0])
    if index is None or index.data_type not in _ROW_BITS or len(index.dims) != 2:
        return None
    users = readers[node.output[0]]
    if not users or not all(_runtime_lookup(u, node.output[0], inits, producer) for u in users):
        return None
    return index, users


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
    """Whether `node`'s output is computable from initializers alone (a default session folds it)."""
    if depth > 64:
        return False
    return all(not name or name in inits or (name in producer and _constant(producer[name], inits, producer,
                                                                             depth + 1))
               for name in node.input)


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _rewrite_rows(g, decode, index, lookups: list, consts) -> str:
    bits = _ROW_BITS[index.data_type]
    rows, cols = (int(d) for d in index.dims)
    packed, row_bytes = _row_bytes(index, bits, rows, cols)
    before = _graph.data_size(index)
    index.CopyFrom(numpy_helper.from_array(packed, index.name))  # same name: reports find it where it was
    table = decode.input[0]
    new = []
    for lookup in lookups:
        ids, out = lookup.input[1], lookup.output[0]
        picked = consts.namer(f"{index.name}.picked")
        new.append(helper.make_node("Gather", [index.name, ids], [picked], axis=0))
        unpacked = _unpack_rows(picked, ids, bits, row_bytes, cols, new, consts)
        idx = consts.namer(f"{index.name}.picked_i32")
        new += [helper.make_node("Cast", [unpacked], [idx], to=TensorProto.INT32),
                helper.make_node("Gather", [table, idx], [out], axis=0, name=f"{decode.name}|rows")]
        g.node.remove(lookup)
    position = list(g.node).index(decode)
    for i, node in enumerate(new):
        g.node.insert(position + i, node)
    extra = packed.nbytes - before
    cost = f"; rows padded to whole bytes: +{extra:,} bytes" if extra > 0 else ""
    return (f"`{index.name}`: decoded only at the rows a Gather reads, never as a whole table; its {bits}-bit "
            f"indices stored as uint8 rows of {row_bytes} bytes{cost}")


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


# --- element lookups --------------------------------------------------------------------------------

def lookup_elements(proto: onnx.ModelProto) -> int:
    """Every decode `Gather(table, index)` of a small flat codebook whose index has a shape known in the
    file becomes GatherElements on the codebook expanded to `[K, d1, ..., dn]` (`[K]` for a 1-D index);
    returns how many. Row lookups keep their Gather; so does a per-row codebook (K = rows x k: its
    expanded table would be as large as the weight)."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consts = Constants(_graph.Namer(proto))
    out, count = [], 0
    for node in g.node:
        shape = _index_shape(node, inits, producer)
        if shape is None:
            out.append(node)
            continue
        table, index = node.input
        k = math.prod(inits[table].dims) if table in inits else math.prod(inits[producer[table].input[0]].dims)
        if k * math.prod(shape[1:]) * 4 > math.prod(shape):
            out.append(node)
            continue
        data = table
        if len(shape) > 1:
            column, data = consts.namer(f"{node.output[0]}.column"), consts.namer(f"{node.output[0]}.table")
            out += [helper.make_node("Reshape", [table, consts(np.array([k] + [1] * (len(shape) - 1), np.int64),
                                                                "table.column")], [column]),
                    helper.make_node("Expand", [column, consts(np.array([k, *shape[1:]], np.int64), "table.shape")],
                                     [data])]
        out.append(helper.make_node("GatherElements", [data, index], list(node.output), axis=0, name=node.name))
        count += 1
    del g.node[:]
    g.node.extend(out)
    g.initializer.extend(consts.initializers)
    return count


def _index_shape(node, inits: dict, producer: dict) -> list[int] | None:
    """The static shape of a whole-weight decode's index (a cast stored index, or a reshape of one to a
    constant shape), None for anything else (row lookups, layout ops left on the index)."""
    if not node.name.startswith(DECODE_NODE) or node.op_type != "Gather" or node.name.endswith("|rows"):
        return None
    table = node.input[0]
    if table not in inits and (table not in producer or producer[table].input[0] not in inits):
        return None  # a concatenation of codebooks
    source = producer.get(node.input[1])
    if source is not None and source.op_type == "Add" and source.input[1] in inits:
        source = producer.get(source.input[0])  # a constant base
    if source is None or not source.name.startswith(INDEX_NODE):
        return None
    if source.op_type == "Cast" and source.input[0] in inits and inits[source.input[0]].dims:
        return [int(d) for d in inits[source.input[0]].dims]
    if source.op_type == "Reshape" and source.input[1] in inits:
        shape = numpy_helper.to_array(inits[source.input[1]]).tolist()
        return shape if all(d > 0 for d in shape) else None
    return None
