"""The ONNX form of one merged tensor: a codebook, an index initializer in the narrowest type, and the
nodes that decode them: `Cast(indices -> INT32) [+ row offsets] -> Gather(flat codebook)`.

Index storage by bits per index (`bits_for(K)`):

| bits | stored as |
|---|---|
| 2 | UINT2 (opset 25) |
| 4 | UINT4 (opset 21) |
| 8 | UINT8 |
| 9-16 | UINT16 |
| 1, 3, 5, 6, 7 | densely packed uint8 + in-graph unpack (BitShift/BitwiseAnd) when that is smaller than the next type up (UINT2, UINT4, UINT8), otherwise that type |

The in-graph unpack reads the packing of `_pack.py` in blocks of 8 indices (= `bits` bytes): for
index `j` of a block, the two bytes it may straddle are gathered, joined into a uint16, shifted
right by `(j * bits) % 8` and masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..codebook import TensorCodebook
from ..packing import pack_bits, packed_size
from . import _vector

_NATIVE = ((2, TensorProto.UINT2, "UINT2"), (4, TensorProto.UINT4, "UINT4"), (8, TensorProto.UINT8, "UINT8"),
           (16, TensorProto.UINT16, "UINT16"), (32, TensorProto.INT32, "INT32"))
MIN_OPSET = {TensorProto.UINT2: 25, TensorProto.UINT4: 21}
_ONNX_FLOAT = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
               torch.float64: TensorProto.DOUBLE, torch.bfloat16: TensorProto.BFLOAT16}
CODEBOOK_DTYPES = {"float32": torch.float32, "float16": torch.float16}
DECODE_NODE = "compress.decode"  # the name (prefix) of every node that looks a codebook up
INDEX_NODE = "compress.index"  # ... and of every node that turns stored indices into a flat int32 index


@dataclass(frozen=True)
class IndexLayout:
    """How one tensor's indices are stored: a native ONNX type, or packed uint8 of `bits` bits."""

    onnx_type: int
    bits: int
    packed: bool
    label: str
    note: str = ""


def onnx_float_type(dtype: torch.dtype) -> int:
    if dtype not in _ONNX_FLOAT:
        raise ValueError(f"no ONNX float type for {dtype}")
    return _ONNX_FLOAT[dtype]


def native_layout(bits: int) -> IndexLayout:
    for width, onnx_type, label in _NATIVE:
        if bits <= width:
            return IndexLayout(onnx_type, width, False, label)
    raise ValueError(f"{bits}-bit indices are not supported")


def choose_layout(cb: TensorCodebook, packed_overhead: int) -> IndexLayout:
    """The smallest storage for `cb`'s indices; packing only where it beats the next native type."""
    native = native_layout(cb.bits)
    if native.bits == cb.bits:
        return native
    if cb.bits > 8:
        return IndexLayout(native.onnx_type, native.bits, False, native.label,
                           f"{cb.bits}-bit indices stored as {native.label} (packing is done up to 8 bits)")
    packed_total = math.ceil(cb.index_count / 8) * cb.bits + packed_overhead
    native_total = packed_size(cb.index_count, native.bits)
    if packed_total < native_total:
        return IndexLayout(TensorProto.UINT8, cb.bits, True, f"packed{cb.bits}")
    return IndexLayout(native.onnx_type, native.bits, False, native.label,
                       f"{cb.bits}-bit indices stored as {native.label}: packing would not be smaller here")


class Constants:
    """Small constants (shapes, shifts, masks) shared by every decode in one model, one initializer per value."""

    def __init__(self, namer):
        self.namer = namer
        self.initializers: list[TensorProto] = []
        self._by_value: dict[tuple, str] = {}

    def __call__(self, value: np.ndarray, base: str) -> str:
        value = np.asarray(value)
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self._by_value:
            name = self.namer(base)
            self.initializers.append(numpy_helper.from_array(value, name))
            self._by_value[key] = name
        return self._by_value[key]


@dataclass
class Decoder:
    """The decode of one merged tensor, in three parts that the rewrite places where it needs them.

    - `index(...)`: the flat int32 index into the flattened codebook, with the indices' shape (the
      stored indices unpacked and cast, plus each row's codebook-row offset); layout ops the graph
      applies to the weight may act on this value instead, when the decode is `elementwise`;
    - `table(...)`: the flattened codebook in the weight's dtype ([groups * K] values, or
      [groups * K, dim] vectors);
    - `lookup(...)`: the weight (or a layout of it) from a table and an index; for vector codebooks
      and outliers the nodes of `_vector` follow the Gather.

    Every decode node of the toolkit is built here.
    """

    cb: TensorCodebook
    layout: IndexLayout
    stored_dtype: torch.dtype  # the codebook's dtype in the file
    codebook_name: str = ""
    index_name: str = ""
    outlier_names: tuple[str, str] = ("", "")

    @property
    def elementwise(self) -> bool:
        """Each element of the weight is read through one index: layout ops commute with the decode."""
        return self.cb.dim == 1 and not self.cb.outlier_count

    @property
    def out_dtype(self) -> torch.dtype:
        return self.cb.codebook.dtype

    def named(self, namer) -> Decoder:
        """Name the initializers `<tensor>.codebook`, `<tensor>.index` (and the outliers'), made unique."""
        self.codebook_name, self.index_name = namer(f"{self.cb.name}.codebook"), namer(f"{self.cb.name}.index")
        if self.cb.outlier_count:
            self.outlier_names = (namer(f"{self.cb.name}.outlier_index"), namer(f"{self.cb.name}.outlier_value"))
        return self

    def initializers(self) -> list[TensorProto]:
        """The codebook, the stored indices and the outliers."""
        cb = self.cb
        codebook = cb.codebook.detach().to(self.stored_dtype)
        codebook = codebook.reshape(-1, cb.dim) if cb.dim > 1 else codebook.reshape(-1)
        indices = cb.indices.detach().reshape(-1).to(torch.int64).numpy()
        if self.layout.packed:
            index = _packed_tensor(self.index_name, indices, self.layout.bits)
        else:
            index = _index_tensor(self.index_name, indices, cb.index_shape, self.layout)
        inits = [_from_torch(codebook, self.codebook_name), index]
        if cb.outlier_count:  # flat positions (int32) and exact values in the weight's dtype
            where, values = self.outlier_names
            inits += [numpy_helper.from_array(cb.outlier_index.to(torch.int32).numpy(), where),
                      _from_torch(cb.outlier_value.detach().to(cb.codebook.dtype), values)]
        return inits

    def table(self, nodes: list, namer) -> str:
        """The flat codebook in the weight's dtype (a Cast when it is stored narrower)."""
        if self.stored_dtype == self.out_dtype:
            return self.codebook_name
        out = namer("d")
        nodes.append(helper.make_node("Cast", [self.codebook_name], [out], to=onnx_float_type(self.out_dtype)))
        return out

    def index(self, nodes: list, consts: Constants, namer, base: int = 0) -> str:
        """The flat int32 index (shape: the indices') into the flat codebook, `base` added to every entry."""
        start = len(nodes)
        idx = self._index(nodes, consts, namer, base)
        for node in nodes[start:]:  # named, so that later passes tell them from layout ops on the index
            node.name = f"{INDEX_NODE}:{node.output[0]}"
        return idx

    def _index(self, nodes: list, consts: Constants, namer, base: int) -> str:
        cb = self.cb
        if self.layout.packed:
            flat = _unpack_nodes(self.index_name, self.layout.bits, cb.index_count, nodes, consts, namer)
            cast = namer("d")
            nodes.append(helper.make_node("Cast", [flat], [cast], to=TensorProto.INT32))
            idx = _reshape(cast, list(cb.index_shape), nodes, consts, namer)
        else:
            idx = namer("d")
            nodes.append(helper.make_node("Cast", [self.index_name], [idx], to=TensorProto.INT32))
        if cb.granularity != "tensor" and cb.codebook.shape[0] > 1:
            idx = _add_row_offsets(idx, cb, nodes, consts, namer)
        if base:
            out = namer("d")
            nodes.append(helper.make_node("Add", [idx, consts(np.array(base, np.int32), f"base{base}")], [out]))
            idx = out
        return idx

    def lookup(self, table: str, index: str, out: str, nodes: list, consts: Constants, namer) -> None:
        """Append the nodes computing `out` from a table and an index: the Gather (named
        `DECODE_NODE:<out>`, so later passes know it for a decode), then for vector codebooks the
        Reshape to the weight's shape and for outliers their ScatterElements."""
        if self.elementwise:
            nodes.append(self.gather(table, index, out))
            return
        gathered = namer("d")
        nodes.append(self.gather(table, index, gathered))
        _vector.finish(self.cb, gathered, out, self.outlier_names, nodes, consts, namer)

    @staticmethod
    def gather(table: str, index: str, out: str) -> onnx.NodeProto:
        """The lookup, named `DECODE_NODE:<out>` so later passes (`runtime_form`) know it for a decode."""
        return helper.make_node("Gather", [table, index], [out], axis=0, name=f"{DECODE_NODE}:{out}")


def packed_overhead(cb: TensorCodebook) -> int:
    """Serialized bytes of the unpack nodes and constants a packed `cb` would need."""
    nodes: list[onnx.NodeProto] = []
    names = iter(range(1 << 30))

    def namer(base: str) -> str:
        return f"{cb.name}.{base}{next(names)}"

    consts = Constants(namer)
    flat = _unpack_nodes(f"{cb.name}.index", cb.bits, cb.index_count, nodes, consts, namer)
    nodes.append(helper.make_node("Cast", [flat], [namer("c")], to=TensorProto.INT32))
    _reshape(nodes[-1].output[0], list(cb.index_shape), nodes, consts, namer)
    return sum(n.ByteSize() for n in nodes) + sum(t.ByteSize() for t in consts.initializers)


# --- pieces ------------------------------------------------------------------------------------------

def _from_torch(t: torch.Tensor, name: str) -> TensorProto:
    if t.dtype == torch.bfloat16:
        raw = t.contiguous().view(torch.int16).numpy().tobytes()
        return helper.make_tensor(name, TensorProto.BFLOAT16, list(t.shape), raw, raw=True)
    return numpy_helper.from_array(t.contiguous().numpy(), name)


def _index_tensor(name: str, indices: np.ndarray, shape, layout: IndexLayout) -> TensorProto:
    if layout.onnx_type in (TensorProto.UINT2, TensorProto.UINT4):
        raw = pack_bits(indices, layout.bits).tobytes()
        return helper.make_tensor(name, layout.onnx_type, list(shape), raw, raw=True)
    np_type = {TensorProto.UINT8: np.uint8, TensorProto.UINT16: np.uint16, TensorProto.INT32: np.int32}
    return numpy_helper.from_array(indices.astype(np_type[layout.onnx_type]).reshape(shape), name)


def _packed_tensor(name: str, indices: np.ndarray, bits: int) -> TensorProto:
    # Whole blocks of 8 indices, so the unpack can reshape to [blocks, bits] bytes.
    blocks = math.ceil(indices.size / 8)
    padded = np.zeros(blocks * 8, dtype=np.int64)
    padded[: indices.size] = indices
    return numpy_helper.from_array(pack_bits(padded, bits), name)


def _unpack_nodes(packed: str, bits: int, n: int, nodes: list, const: Constants, namer) -> str:
    """Nodes turning packed uint8 [blocks * bits] into uint16 indices [n]; returns the output name."""
    j = np.arange(8)
    lo = (j * bits) // 8
    hi = np.minimum(lo + 1, bits - 1)
    c = {
        "block": const(np.array([-1, bits], np.int64), "unpack.block_shape"),
        "lo": const(lo.astype(np.int64), f"unpack{bits}.lo"),
        "hi": const(hi.astype(np.int64), f"unpack{bits}.hi"),
        "eight": const(np.array(8, np.uint16), "unpack.eight"),
        "shift": const(((j * bits) % 8).astype(np.uint16), f"unpack{bits}.shift"),
        "mask": const(np.array((1 << bits) - 1, np.uint16), f"unpack{bits}.mask"),
        "flat": const(np.array([-1], np.int64), "unpack.flat_shape"),
    }
    v = {k: namer("d") for k in ("blocks", "u16", "lo", "hi", "hi8", "word", "shifted", "bits", "flat")}
    nodes += [
        helper.make_node("Reshape", [packed, c["block"]], [v["blocks"]]),
        helper.make_node("Cast", [v["blocks"]], [v["u16"]], to=TensorProto.UINT16),
        helper.make_node("Gather", [v["u16"], c["lo"]], [v["lo"]], axis=1),
        helper.make_node("Gather", [v["u16"], c["hi"]], [v["hi"]], axis=1),
        helper.make_node("BitShift", [v["hi"], c["eight"]], [v["hi8"]], direction="LEFT"),
        helper.make_node("BitwiseOr", [v["lo"], v["hi8"]], [v["word"]]),
        helper.make_node("BitShift", [v["word"], c["shift"]], [v["shifted"]], direction="RIGHT"),
        helper.make_node("BitwiseAnd", [v["shifted"], c["mask"]], [v["bits"]]),
        helper.make_node("Reshape", [v["bits"], c["flat"]], [v["flat"]]),
    ]
    if n % 8 == 0:
        return v["flat"]
    out = namer("d")
    starts = const(np.array([0], np.int64), "unpack.start")
    ends = const(np.array([n], np.int64), "count")
    nodes.append(helper.make_node("Slice", [v["flat"], starts, ends], [out]))
    return out


def _reshape(value: str, shape: list[int], nodes: list, const: Constants, namer) -> str:
    target = const(np.array(shape, np.int64), "shape")
    out = namer("d")
    nodes.append(helper.make_node("Reshape", [value, target], [out]))
    return out


def _add_row_offsets(idx: str, cb: TensorCodebook, nodes: list, const: Constants, namer) -> str:
    """idx + (row // group_size) * K, computed in-graph from Range (no offsets tensor stored)."""
    rows = cb.shape[0]
    per_row = cb.k if cb.granularity == "channel" else None
    start = const(np.array(0, np.int32), "offsets.zero")
    limit = const(np.array(rows, np.int32), "rows")
    step = const(np.array(1, np.int32), "offsets.one")
    row = namer("d")
    nodes.append(helper.make_node("Range", [start, limit, step], [row]))
    if per_row is None:
        size = const(np.array(cb.group_size, np.int32), "group_size")
        group = namer("d")
        nodes.append(helper.make_node("Div", [row, size], [group]))
        row = group
    k = const(np.array(cb.k, np.int32), "k")
    offset = namer("d")
    nodes.append(helper.make_node("Mul", [row, k], [offset]))
    shape = const(np.array([rows] + [1] * (len(cb.shape) - 1), np.int64), "shape")
    column = namer("d")
    nodes.append(helper.make_node("Reshape", [offset, shape], [column]))
    out = namer("d")
    nodes.append(helper.make_node("Add", [idx, column], [out]))
    return out
