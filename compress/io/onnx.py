"""ONNX: parse the protobuf without external data, validate every external reference, read lazily.

`onnx.load(..., load_external_data=False)` reads only the `.onnx` file. Tensors stored outside it
name a `location` that a hostile file can aim anywhere, so each reference (initializers, tensors in
node attributes, subgraphs, functions) is checked before anything is read: only the keys
location/offset/length/checksum; a relative location that stays inside the model's folder after
normalization and after resolving symlinks; a regular file with a single hard link; integer
offset/length within the file; a byte count that matches dtype x dims. Each tensor is then read on
its own when asked for, re-checking that the file is the one validated.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInputError, UnsupportedModelError
from ._errors import library_call

_KNOWN_KEYS = {"location", "offset", "length", "checksum"}
_INT = re.compile(r"\d{1,19}\Z")
_MAX_DIM = 1 << 62
_MAX_EMPTY = 1 << 40
_ORT_MEMORY = "_ORT_MEM_ADDR_"  # onnxruntime reads such a location from a raw memory address (the offset)
_MAX_RANK = 64

# ONNX TensorProto.DataType -> (torch dtype, bits per element)
_TYPES: dict[int, tuple[torch.dtype, int]] = {
    1: (torch.float32, 32), 2: (torch.uint8, 8), 3: (torch.int8, 8), 4: (torch.uint16, 16),
    5: (torch.int16, 16), 6: (torch.int32, 32), 7: (torch.int64, 64), 9: (torch.bool, 8),
    10: (torch.float16, 16), 11: (torch.float64, 64), 12: (torch.uint32, 32), 13: (torch.uint64, 64),
    14: (torch.complex64, 64), 15: (torch.complex128, 128), 16: (torch.bfloat16, 16),
    17: (torch.float8_e4m3fn, 8), 18: (torch.float8_e4m3fnuz, 8), 19: (torch.float8_e5m2, 8),
    20: (torch.float8_e5m2fnuz, 8), 24: (torch.float8_e8m0fnu, 8),
    # packed sub-byte integers, unpacked to one (u)int8 per element
    21: (torch.uint8, 4), 22: (torch.int8, 4), 25: (torch.uint8, 2), 26: (torch.int8, 2),
}
_SIGNED_SUBBYTE = {22, 26}


@dataclass(frozen=True)
class ExternalRef:
    """A validated slice of an external data file."""

    file: Path
    offset: int
    length: int
    identity: tuple[int, int]  # (st_dev, st_ino) at validation


def load_proto(path: Path):
    """`onnx.load` without external data; protobuf errors become BadInputError."""
    import onnx

    with library_call(path, "reading the ONNX protobuf"):
        model = onnx.load(str(path), load_external_data=False)
    if not model.HasField("graph"):
        raise BadInputError(f"{path}: ONNX model has no graph; not an ONNX model file")
    return model


def check_model(model, path: Path) -> dict[str, ExternalRef]:
    """Validate every tensor of the model; return tensor name -> external reference for external ones.

    Initializers in the main graph are checked for dtype and dims; every external reference
    anywhere in the model is validated (others may be read later by onnxruntime).
    """
    folder = path.parent
    refs: dict[str, ExternalRef] = {}
    for init in model.graph.initializer:
        _check_dims(init, path)
    for tensor in all_tensors(model):
        if tensor.data_location == 1:  # EXTERNAL
            ref = external_ref(tensor, folder, path)
            _check_size(tensor, ref.length, "external data", path)
            refs.setdefault(tensor.name, ref)
        elif tensor.external_data:
            raise BadInputError(f"{path}: tensor {tensor.name!r} has external_data entries but is not marked "
                                "EXTERNAL; refused")
    for inp in model.graph.input:
        _check_value_dims(inp, path)
    return refs


def all_tensors(model) -> Iterator:
    """Every TensorProto of the model: initializers (sparse ones too), node attributes (`t`, `tensors`,
    `sparse_tensor`, `sparse_tensors`), subgraphs, functions and `training_info` graphs."""
    yield from _graph_tensors(model.graph)
    for fn in model.functions:
        for node in fn.node:
            yield from _node_tensors(node)
    for info in model.training_info:
        for graph in (info.initialization, info.algorithm):
            yield from _graph_tensors(graph)


def _graph_tensors(graph) -> Iterator:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node) -> Iterator:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for g in attr.graphs:
            yield from _graph_tensors(g)


def _check_dims(tensor, path: Path) -> None:
    dims = list(tensor.dims)
    if len(dims) > _MAX_RANK or any(d < 0 or d > _MAX_DIM for d in dims):
        raise BadInputError(f"{path}: initializer {tensor.name!r} has invalid dims {dims[:8]}")
    # a non-empty tensor's dims are checked against its bytes; an empty one has no bytes to check them against,
    # so its other dims must still make a size that numpy and torch can hold
    if math.prod(dims) == 0 and math.prod(max(d, 1) for d in dims) > _MAX_EMPTY:
        raise BadInputError(f"{path}: initializer {tensor.name!r} is empty but has dims {dims[:8]}; the file is "
                            "corrupt")
    if tensor.data_type not in _TYPES:
        raise UnsupportedModelError(f"{path}: initializer {tensor.name!r} has ONNX data type "
                                    f"{tensor.data_type}, which compress cannot read (supported: numeric "
                                    "and 2/4-bit integer types)")
    if tensor.data_location != 1:
        _check_inline(tensor, path)


def _check_value_dims(value, path: Path) -> None:
    shape = value.type.tensor_type.shape if value.type.HasField("tensor_type") else None
    for dim in (shape.dim if shape is not None else []):
        if dim.HasField("dim_value") and not 0 <= dim.dim_value <= _MAX_DIM:
            raise BadInputError(f"{path}: graph input {value.name!r} has an invalid dimension "
                                f"{dim.dim_value}")


def nbytes(tensor) -> int:
    """Bytes of raw data a tensor of this dtype and dims needs."""
    bits = _TYPES[tensor.data_type][1]
    return math.ceil(math.prod(tensor.dims) * bits / 8)


def _check_size(tensor, have: int, what: str, path: Path) -> None:
    if tensor.data_type in _TYPES and have != nbytes(tensor):
        raise BadInputError(f"{path}: tensor {tensor.name!r} with dims {list(tensor.dims)[:8]} needs "
                            f"{nbytes(tensor)} bytes but its {what} has {have}")


_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
# where onnx keeps each type's values when they are not in raw_data
_FIELD_OF = {1: "float_data", 14: "float_data", 7: "int64_data", 11: "double_data", 15: "double_data",
             12: "uint64_data", 13: "uint64_data"}


def _check_inline(tensor, path: Path) -> None:
    if tensor.HasField("raw_data"):
        _check_size(tensor, len(tensor.raw_data), "raw_data", path)
        return
    field = _FIELD_OF.get(tensor.data_type, "int32_data")
    count = math.prod(tensor.dims)
    bits = _TYPES[tensor.data_type][1]
    want = math.ceil(count * bits / 8) if bits < 8 else count * (2 if tensor.data_type in (14, 15) else 1)
    have = len(getattr(tensor, field))
    stray = [f for f in _FIELDS if f != field and len(getattr(tensor, f))]
    if have != want or stray:
        held = f"{have} in {field}" + (f" and values in {', '.join(stray)}" if stray else "")
        raise BadInputError(f"{path}: initializer {tensor.name!r} with dims {list(tensor.dims)[:8]} needs "
                            f"{want} values in {field} but holds {held}")


def external_ref(tensor, folder: Path, path: Path) -> ExternalRef:
    """Validate one tensor's external_data entries; see the module docstring for the rules."""
    entries: dict[str, str] = {}
    for kv in tensor.external_data:
        if kv.key not in _KNOWN_KEYS:
            raise BadInputError(f"{path}: tensor {tensor.name!r} has unknown external_data key "
                                f"{kv.key[:40]!r}; known: {', '.join(sorted(_KNOWN_KEYS))}")
        if kv.key in entries:
            raise BadInputError(f"{path}: tensor {tensor.name!r} repeats external_data key {kv.key!r}")
        entries[kv.key] = kv.value
    if "location" not in entries:
        raise BadInputError(f"{path}: tensor {tensor.name!r} is EXTERNAL but has no location")
    if tensor.HasField("raw_data"):
        raise BadInputError(f"{path}: tensor {tensor.name!r} has both raw_data and external data")
    file, st = _resolve(entries["location"], folder, path, tensor.name)
    offset = _int_field(entries, "offset", 0, path, tensor.name)
    length = _int_field(entries, "length", st.st_size - offset, path, tensor.name)
    if offset > st.st_size or length < 0 or offset + length > st.st_size:
        raise BadInputError(f"{path}: tensor {tensor.name!r} reads bytes [{offset}, {offset + length}) of "
                            f"{entries['location']!r}, which has {st.st_size} bytes")
    return ExternalRef(file, offset, length, (st.st_dev, st.st_ino))


def _int_field(entries: dict[str, str], key: str, default: int, path: Path, name: str) -> int:
    if key not in entries:
        return default
    if not _INT.match(entries[key]):
        raise BadInputError(f"{path}: tensor {name!r} external_data {key} {entries[key][:40]!r} is not a "
                            "non-negative integer")
    return int(entries[key])


def _resolve(location: str, folder: Path, path: Path, name: str) -> tuple[Path, os.stat_result]:
    label = f"{path}: tensor {name!r} external data {location[:120]!r}"
    norm = os.path.normpath(location) if location else ""
    if _ORT_MEMORY in location:
        raise BadInputError(f"{label} is onnxruntime's in-memory marker (it would read this process's memory at the "
                            "offset); refused")
    if (not location or "\x00" in location or "\\" in location or os.path.isabs(location)
            or re.match(r"[A-Za-z]:", location) or norm == ".." or norm.startswith("../") or norm == "."):
        raise BadInputError(f"{label} is absolute or escapes the model's folder; refused")
    file = folder / norm
    try:
        real_folder = folder.resolve(strict=True)
        real = file.resolve(strict=True)
        st = os.stat(real)
    except FileNotFoundError:
        raise BadInputError(f"{label} not found: the data file is missing (expected {file})") from None
    except (OSError, RuntimeError) as e:
        raise BadInputError(f"{label} cannot be opened ({type(e).__name__}: {e})") from None
    if real_folder not in real.parents:
        raise BadInputError(f"{label} resolves outside the model's folder (symlink); refused")
    if not stat.S_ISREG(st.st_mode):
        raise BadInputError(f"{label} is not a regular file; refused")
    if st.st_nlink > 1:
        raise BadInputError(f"{label} has {st.st_nlink} hard links; refused (copy the file instead)")
    return file, st


def read_external(ref: ExternalRef, tensor, path: Path) -> bytes:
    """Read a validated slice, re-checking that the file is still the one validated."""
    file, st = _resolve(_location(tensor), path.parent, path, tensor.name)
    if (st.st_dev, st.st_ino) != ref.identity:
        raise BadInputError(f"{path}: external data file {file} changed since the model was loaded")
    with library_call(file, f"reading external data of {tensor.name!r}"):
        fd = os.open(file.resolve(), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) != ref.identity:
                raise BadInputError(f"{path}: external data file {file} changed since the model was loaded")
            data = os.pread(fd, ref.length, ref.offset)
        finally:
            os.close(fd)
    if len(data) != ref.length:
        raise BadInputError(f"{path}: external data file {file} is shorter than recorded (truncated?)")
    return data


def _location(tensor) -> str:
    return next(kv.value for kv in tensor.external_data if kv.key == "location")


def to_torch(tensor, data: bytes | None) -> torch.Tensor:
    """Build the torch tensor for an initializer from raw bytes (raw_data or external), else typed fields."""
    dtype, bits = _TYPES[tensor.data_type]
    dims = tuple(int(d) for d in tensor.dims)
    if data is None and not tensor.HasField("raw_data"):
        return _from_fields(tensor, dtype, dims)
    buf = tensor.raw_data if data is None else data
    if bits < 8:
        return _unpack(buf, math.prod(dims), bits, tensor.data_type in _SIGNED_SUBBYTE).reshape(dims)
    if not buf:
        return torch.empty(dims, dtype=dtype)
    return torch.frombuffer(bytearray(buf), dtype=dtype).reshape(dims)


def _from_fields(tensor, dtype: torch.dtype, dims: tuple[int, ...]) -> torch.Tensor:
    from onnx import numpy_helper

    arr = numpy_helper.to_array(tensor)
    if _TYPES[tensor.data_type][1] < 8:
        unpacked = arr.astype(np.int8 if tensor.data_type in _SIGNED_SUBBYTE else np.uint8)
        return torch.from_numpy(unpacked).reshape(dims)
    if arr.dtype.kind in "biufc" and arr.dtype.type.__module__ == "numpy":
        return torch.from_numpy(np.ascontiguousarray(arr).copy()).to(dtype).reshape(dims)
    return torch.frombuffer(bytearray(arr.tobytes()), dtype=dtype).reshape(dims)  # ml_dtypes: same bytes


def _unpack(buf: bytes, count: int, bits: int, signed: bool) -> torch.Tensor:
    raw = np.frombuffer(buf, dtype=np.uint8)
    per = 8 // bits
    mask = (1 << bits) - 1
    vals = np.stack([(raw >> (bits * i)) & mask for i in range(per)], axis=1).reshape(-1)[:count]
    if signed:
        vals = ((vals.astype(np.int16) ^ (1 << (bits - 1))) - (1 << (bits - 1))).astype(np.int8)
    return torch.from_numpy(np.ascontiguousarray(vals))


class OnnxTensors(Mapping):
    """The main graph's initializers as torch tensors, built one at a time on `__getitem__`."""

    def __init__(self, model, refs: dict[str, ExternalRef], path: Path):
        self._inits = {t.name: t for t in model.graph.initializer}
        self._refs = refs
        self._path = path

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._inits[name]
        ref = self._refs.get(name) if tensor.data_location == 1 else None
        data = read_external(ref, tensor, self._path) if ref is not None else None
        return to_torch(tensor, data)

    def __iter__(self) -> Iterator[str]:
        return iter(self._inits)

    def __len__(self) -> int:
        return len(self._inits)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape of `name` without reading it."""
        t = self._inits[name]
        return _TYPES[t.data_type][0], tuple(int(d) for d in t.dims)


def aliases(model, refs: dict[str, ExternalRef]) -> dict[str, str]:
    """Initializers that point at the same external bytes: later name -> first name."""
    first: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for t in model.graph.initializer:
        ref = refs.get(t.name)
        if ref is None:
            continue
        key = (ref.identity, ref.offset, ref.length, t.data_type, tuple(t.dims))
        if key in first and first[key] != t.name:
            out[t.name] = first[key]
        else:
            first.setdefault(key, t.name)
    return out
