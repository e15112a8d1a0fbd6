"""How any ONNX file stores its weights: each initializer dense, or decoded from a codebook (with its bits).

Read from the graph alone (no values are loaded), so it audits any file, written by `compress` or not:

- a **decode** is a `Gather` whose data comes from float initializers only (through Cast / Concat /
  Reshape / Identity: the *codebook*) and whose indices are computed from integer initializers only
  (through Cast, Add, Reshape, Transpose, Slice, bit unpacking, ...: no graph input reaches them);
- the narrow integer initializers feeding a decode (UINT2/UINT4/INT4, (U)INT8, (U)INT16, or larger
  ones) are its **indices**; the float ones its **codebook**; small int32/int64 ones are **constants**;
- every other float initializer is **dense**: it is stored value by value.

The bits of a decoded weight are its index bytes over its element count: 4.0 for a UINT4 index,
3.0 for 3-bit indices packed into bytes. The element count comes from the index's own shape, or
from shape inference when the index is stored packed (1-D bytes).

    >>> from onnx import TensorProto, helper
    >>> nodes = [helper.make_node("Cast", ["w.index"], ["i"], to=TensorProto.INT32),
    ...          helper.make_node("Gather", ["w.codebook", "i"], ["w"]),
    ...          helper.make_node("MatMul", ["x", "w"], ["y"])]
    >>> inits = [helper.make_tensor("w.codebook", TensorProto.FLOAT, [16], [0.0] * 16),
    ...          helper.make_tensor("w.index", TensorProto.UINT4, [8, 4], [1] * 32)]
    >>> g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
    ...                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    >>> storage = audit_onnx(helper.make_model(g))
    >>> [(i.name, i.storage, i.bits) for i in storage.initializers]
    [('w.codebook', 'codebook', None), ('w.index', 'index', 4.0)]
    >>> [(d.value, d.bits, d.k) for d in storage.decoded]
    [('w', 4.0, 16)]
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..records import Record

STORAGE_VERSION = 1
_FLOAT = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}
_TYPE_NAMES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16", 21: "uint4", 22: "int4",
               25: "uint2", 26: "int2"}
_BITS = {1: 32, 10: 16, 11: 64, 16: 16, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 12: 32, 13: 64, 21: 4, 22: 4, 25: 2, 26: 2}
_NARROW = {2, 3, 4, 5, 21, 22, 25, 26}  # integer types an index is stored in (int32/int64 only when large)
# ops a codebook may pass through on its way to a lookup -> the inputs that carry it (None: all)
_TABLE_OPS = {"Cast": (0,), "Concat": None, "Reshape": (0,), "Identity": (0,), "Flatten": (0,), "Squeeze": (0,),
              "Unsqueeze": (0,), "CastLike": (0,), "Expand": (0,), "Gather": (0,), "Transpose": (0,), "Slice": (0,)}
_LOOKUPS = ("Gather", "GatherElements")
_CONSTANT_MIN = 1024  # an int32/int64 initializer this large feeding a decode is an index, not a constant


@dataclass
class OnnxInitializer(Record):
    """One initializer: its storage (`dense`, `codebook`, `index`, `constant`), bytes and, for an index, bits."""

    name: str
    shape: list[int]
    dtype: str
    bytes: int
    storage: str
    bits: float | None = None  # index: stored bits per decoded element
    decodes: list[str] = field(default_factory=list)  # codebook / index: the values its decodes produce

    _omit_none = True


@dataclass
class DecodedWeight(Record):
    """A value computed by a decode: which codebook(s) and index(es) it reads, and what they weigh."""

    value: str
    elements: int | None
    codebooks: list[str]
    indices: list[str]
    k: int  # codebook entries (all rows of a per-channel codebook together)
    index_bytes: int
    codebook_bytes: int
    bits: float | None  # index bits per element

    _omit_none = True


@dataclass
class OnnxStorage(Record):
    """Every initializer of an ONNX file by storage, the decoded weights, and bytes per kind."""

    initializers: list[OnnxInitializer] = field(default_factory=list)
    decoded: list[DecodedWeight] = field(default_factory=list)
    version: int = STORAGE_VERSION

    _what = "onnx storage audit"
    _derived = ("dense_bytes", "codebook_bytes", "index_bytes")

    def _sum(self, storage: str) -> int:
        return sum(i.bytes for i in self.initializers if i.storage == storage)

    @property
    def dense_bytes(self) -> int:
        """Float data stored value by value."""
        return self._sum("dense")

    @property
    def codebook_bytes(self) -> int:
        return self._sum("codebook")

    @property
    def index_bytes(self) -> int:
        return self._sum("index")

    def of(self, name: str) -> OnnxInitializer:
        for i in self.initializers:
            if i.name == name:
                return i
        raise KeyError(name)


def audit_onnx(model) -> OnnxStorage:
    """Classify every initializer of `model` (an `onnx.ModelProto`; external data need not be loaded)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in _all_nodes(g) for o in n.output}
    out = OnnxStorage()
    roles: dict[str, str] = {}
    decodes: dict[str, list[str]] = {}
    gathers = [n for n in _all_nodes(g) if n.op_type in _LOOKUPS and len(n.input) >= 2]
    elements = _element_counts(model, [n.output[0] for n in gathers])
    for node in gathers:
        found = _decode(node, inits, producer)
        if found is None:
            continue
        tables, indices = found
        for name in tables:
            roles[name] = "codebook"
        for name in indices:
            roles[name] = "index"
        for name in tables + indices:
            decodes.setdefault(name, []).append(node.output[0])
        rows = _row_bits(node.input[1], inits, producer)
        out.decoded.append(_decoded(node.output[0], tables, indices, inits, {} if rows else elements, rows))
    bits = {name: d.bits for d in out.decoded for name in d.indices}
    for t in g.initializer:
        size = _data_size(t)
        storage = roles.get(t.name) or ("dense" if t.data_type in _FLOAT else "constant")
        out.initializers.append(OnnxInitializer(t.name, list(t.dims), _TYPE_NAMES.get(t.data_type, str(t.data_type)),
                                                size, storage, bits.get(t.name) if storage == "index" else None,
                                                decodes.get(t.name, [])))
    return out


def _decode(node, inits: dict, producer: dict) -> tuple[list[str], list[str]] | None:
    """(codebook initializers, index initializers) when `node` gathers from codebooks by stored indices."""
    tables = _sources(node.input[0], inits, producer, _TABLE_OPS)
    if not tables or any(inits[t].data_type not in _FLOAT for t in tables):
        return None
    sources = _sources(node.input[1], inits, producer, None)
    if sources is None:
        return None
    indices = [s for s in sources if inits[s].data_type not in _FLOAT and _is_index(inits[s])]
    return (tables, indices) if indices else None


def _is_index(t) -> bool:
    return t.data_type in _NARROW or math.prod(t.dims) >= _CONSTANT_MIN


def _sources(value: str, inits: dict, producer: dict, ops: dict | None) -> list[str] | None:
    """The initializers `value` is computed from, when nothing else (no graph input) reaches it and every
    op on the way is in `ops` (op -> the inputs that carry the data; None: any op without a subgraph);
    else None. The shape a value has (Shape, Size) carries no stored data; rows gathered at run time
    (a row lookup of an embedding's indices: Gather(indices, token ids)) carry their table's."""
    found, seen, stack, runtime, rows = [], set(), [value], False, False
    while stack:
        name = stack.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name in inits:
            found.append(name)
            continue
        node = producer.get(name)
        if node is None:
            runtime = True  # a graph input, or a value from an outer scope
            continue
        if node.op_type in ("Constant", "Shape", "Size"):
            continue
        if (ops is not None and node.op_type not in ops) or any(a.type in (5, 10) for a in node.attribute):
            return None  # 5, 10: GRAPH, GRAPHS attributes (If/Loop/Scan)
        rows = rows or (ops is None and node.op_type == "Gather")
        slots = ops.get(node.op_type) if ops is not None else ((0,) if node.op_type == "Gather" else None)
        stack.extend(n for i, n in enumerate(node.input) if slots is None or i in slots)
    # run-time values may only choose rows (token ids: the rows gathered and their codebook offsets)
    return sorted(found) if found and (rows or not runtime) else None


def _row_bits(index: str, inits: dict, producer: dict) -> int | None:
    """Bits per index when `index` is a row lookup: rows of stored indices gathered at run-time ids (an
    embedding decoded only where it is read), unpacked with a BitwiseAnd mask (its width: the bits) or
    read as whole bytes (8); None when it is not one. Its decoded value's size is the ids', not the table's."""
    from onnx import numpy_helper

    mask, rows, stack, seen = None, False, [index], set()
    while stack:
        name = stack.pop()
        if name in seen or name in inits or name not in producer:
            continue
        seen.add(name)
        node = producer[name]
        if node.op_type in ("Shape", "Size", "Constant"):
            continue
        if node.op_type == "Gather":
            rows = rows or _sources(node.input[1], inits, producer, None) is None
            stack.append(node.input[0])
            continue
        if node.op_type == "BitwiseAnd":
            masks = [inits[i] for i in node.input if i in inits and math.prod(inits[i].dims) == 1]
            mask = int(numpy_helper.to_array(masks[0])) if masks else mask
        stack.extend(node.input)
    return (mask.bit_length() if mask else 8) if rows else None


def _decoded(value: str, tables: list[str], indices: list[str], inits: dict, elements: dict,
             row_bits: int | None = None) -> DecodedWeight:
    index_bytes = sum(_data_size(inits[i]) for i in indices)
    n = elements.get(value) if row_bits is None else index_bytes * 8 // row_bits
    if n is None and len(indices) == 1 and inits[indices[0]].data_type in _NARROW and len(inits[indices[0]].dims) > 1:
        n = math.prod(inits[indices[0]].dims)
    k = sum(math.prod(inits[t].dims) for t in tables)
    return DecodedWeight(value, n, tables, indices, k, index_bytes, sum(_data_size(inits[t]) for t in tables),
                         round(8 * index_bytes / n, 3) if n else None)


def _element_counts(model, values: list[str]) -> dict[str, int]:
    """Element counts of `values` from shape inference (constant shapes propagated); missing where unknown."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(_without_data(model), data_prop=True)
    except Exception:  # noqa: BLE001 - a graph shape inference cannot follow only loses the element counts
        return {}
    wanted, out = set(values), {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output):
        if v.name in wanted and v.type.tensor_type.HasField("shape"):
            dims = v.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                out[v.name] = math.prod(d.dim_value for d in dims)
    return out


def _without_data(model):
    """A copy without initializer data (shape inference needs the dims, not the values)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for t in copy.graph.initializer:
        if math.prod(t.dims) > 64:  # small ones (shapes) may feed constant propagation
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
            for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(name)
    return copy


def _data_size(t) -> int:
    """Bytes a tensor stores (inline, typed fields or external)."""
    if t.data_location == 1:
        return int({e.key: e.value for e in t.external_data}.get("length", 0))
    if t.HasField("raw_data") or t.raw_data:
        return len(t.raw_data)
    return math.ceil(math.prod(t.dims) * _BITS.get(t.data_type, 8) / 8)


def _all_nodes(graph) -> Iterator:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == 5:
                yield from _all_nodes(attr.g)
            elif attr.type == 10:
                for sub in attr.graphs:
                    yield from _all_nodes(sub)
