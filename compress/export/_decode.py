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
    packed_total = math.ceil(cb.numel / 8) * cb.bits + packed_overhead
    native_total = packed_size(cb.numel, native.bits)
    if packed_total < native_total:
        return IndexLayout(TensorProto.UINT8, cb.bits, True, f"packed{cb.bits}")
    return IndexLayout(native.onnx_type, native.bits, False, native.label,
                       f"{cb.bits}-bit indices stored as {native.label}: packing would not be smaller here")


@dataclass
class Decoded:
    """Nodes and initializers that compute one merged tensor, and what they weigh."""

    nodes: list[onnx.NodeProto]
    initializers: list[TensorProto]
    index_name: str
    codebook_name: str


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


def decode_graph(cb: TensorCodebook, layout: IndexLayout, out: str, namer, consts: Constants,
                 stored_dtype: torch.dtype, out_dtype: torch.dtype) -> Decoded:
    """Build the initializers and nodes that produce `out` (cb's dense value) from cb's codebook + indices.

    Small constants go to `consts`; `Decoded.initializers` holds only the codebook and the indices.
    Vector codebooks and outliers are built by `_vector` (on top of this scalar decode).
    """
    if cb.dim > 1 or cb.outlier_count:
        return _vector.decode_graph(cb, layout, out, namer, consts, stored_dtype, out_dtype, scalar=decode_graph)
    base = cb.name
    cb_name, idx_name = namer(f"{base}.codebook"), namer(f"{base}.index")
    codebook = cb.codebook.detach().to(stored_dtype).reshape(-1)
    inits = [_from_torch(codebook, cb_name)]
    nodes: list[onnx.NodeProto] = []
    table = cb_name
    if stored_dtype != out_dtype:
        table = namer(f"{base}.codebook_cast")
        nodes.append(helper.make_node("Cast", [cb_name], [table], to=onnx_float_type(out_dtype)))
    indices = cb.indices.detach().reshape(-1).to(torch.int64).numpy()
    if layout.packed:
        inits.append(_packed_tensor(idx_name, indices, layout.bits))
        flat = _unpack_nodes(idx_name, layout.bits, cb.numel, nodes, consts, namer)
        cast = namer(f"{base}.index_i32")
        nodes.append(helper.make_node("Cast", [flat], [cast], to=TensorProto.INT32))
        idx = _reshape(cast, list(cb.shape), nodes, consts, namer, base)
    else:
        inits.append(_index_tensor(idx_name, indices, cb.shape, layout))
        idx = namer(f"{base}.index_i32")
        nodes.append(helper.make_node("Cast", [idx_name], [idx], to=TensorProto.INT32))
    if cb.granularity != "tensor" and cb.codebook.shape[0] > 1:
        idx = _add_row_offsets(idx, cb, nodes, consts, namer)
    nodes.append(helper.make_node("Gather", [table, idx], [out], axis=0))
    return Decoded(nodes, inits, idx_name, cb_name)


def packed_overhead(cb: TensorCodebook) -> int:
    """Serialized bytes of the unpack nodes and constants a packed `cb` would need."""
    nodes: list[onnx.NodeProto] = []
    names = iter(range(1 << 30))

    def namer(base: str) -> str:
        return f"{cb.name}.{base}{next(names)}"

    consts = Constants(namer)
    flat = _unpack_nodes(f"{cb.name}.index", cb.bits, cb.numel, nodes, consts, namer)
    nodes.append(helper.make_node("Cast", [flat], [namer("c")], to=TensorProto.INT32))
    _reshape(nodes[-1].output[0], list(cb.shape), nodes, consts, namer, cb.name)
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
    v = {k: namer(f"{packed}.{k}") for k in ("blocks", "u16", "lo", "hi", "hi8", "word", "shifted", "bits", "flat")}
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
    out = namer(f"{packed}.unpacked")
    starts = const(np.array([0], np.int64), "unpack.start")
    ends = const(np.array([n], np.int64), f"{packed}.count")
    nodes.append(helper.make_node("Slice", [v["flat"], starts, ends], [out]))
    return out


def _reshape(value: str, shape: list[int], nodes: list, const: Constants, namer, base: str) -> str:
    target = const(np.array(shape, np.int64), f"{base}.shape")
    out = namer(f"{base}.index_shaped")
    nodes.append(helper.make_node("Reshape", [value, target], [out]))
    return out


def _add_row_offsets(idx: str, cb: TensorCodebook, nodes: list, const: Constants, namer) -> str:
    """idx + (row // group_size) * K, computed in-graph from Range (no offsets tensor stored)."""
    rows = cb.shape[0]
    per_row = cb.k if cb.granularity == "channel" else None
    start = const(np.array(0, np.int32), "offsets.zero")
    limit = const(np.array(rows, np.int32), f"{cb.name}.rows")
    step = const(np.array(1, np.int32), "offsets.one")
    row = namer(f"{cb.name}.row")
    nodes.append(helper.make_node("Range", [start, limit, step], [row]))
    if per_row is None:
        size = const(np.array(cb.group_size, np.int32), f"{cb.name}.group_size")
        group = namer(f"{cb.name}.group")
        nodes.append(helper.make_node("Div", [row, size], [group]))
        row = group
    k = const(np.array(cb.k, np.int32), f"{cb.name}.k")
    offset = namer(f"{cb.name}.offset")
    nodes.append(helper.make_node("Mul", [row, k], [offset]))
    shape = const(np.array([rows] + [1] * (len(cb.shape) - 1), np.int64), f"{cb.name}.offset_shape")
    column = namer(f"{cb.name}.offset_col")
    nodes.append(helper.make_node("Reshape", [offset, shape], [column]))
    out = namer(f"{cb.name}.index_flat")
    nodes.append(helper.make_node("Add", [idx, column], [out]))
    return out
