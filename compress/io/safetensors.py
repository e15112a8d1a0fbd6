"""safetensors: validate the header ourselves, then read tensors lazily through `safe_open`.

The header is an 8-byte little-endian length and a UTF-8 JSON object. Before the file reaches the
safetensors library we check it completely: length within the file and at most 100 MB, no
duplicate keys, names without NUL, known dtypes, non-negative shapes whose byte count matches the
offsets, offsets that tile the data region exactly (no overlap, no gap, no trailing bytes), and
`__metadata__` a str -> str map. Sharded checkpoints (`*.safetensors.index.json`) must keep their
shards inside the index's folder, and each shard's tensors must match the index.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInputError
from ._errors import library_call

MAX_HEADER = 100 * 1024 * 1024
MAX_INDEX = 100 * 1024 * 1024
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1), "U8": (torch.uint8, 1), "I8": (torch.int8, 1),
    "U16": (torch.uint16, 2), "I16": (torch.int16, 2), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "U32": (torch.uint32, 4), "I32": (torch.int32, 4), "F32": (torch.float32, 4),
    "U64": (torch.uint64, 8), "I64": (torch.int64, 8), "F64": (torch.float64, 8), "C64": (torch.complex64, 8),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
    "F8_E4M3FNUZ": (torch.float8_e4m3fnuz, 1), "F8_E5M2FNUZ": (torch.float8_e5m2fnuz, 1),
    "F8_E8M0": (torch.float8_e8m0fnu, 1),
}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
_MAX_BYTES = (1 << 63) - 1


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives: dtype, shape and [start, end) within the data region."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorSpec]
    metadata: dict[str, str]


def is_safetensors(head: bytes, size: int) -> bool:
    """Content sniffing: an 8-byte length followed by '{'."""
    return len(head) >= 9 and head[8:9] == b"{" and size >= 9


def read_header(path: Path) -> Header:
    """Read and validate the header of a `.safetensors` file; raise BadInputError naming the problem."""
    size = path.stat().st_size
    with library_call(path, "reading the safetensors header"), open(path, "rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise BadInputError(f"{path}: file is {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", first)
        if n > MAX_HEADER:
            raise BadInputError(f"{path}: safetensors header claims {n} bytes, more than the 100 MB limit")
        if 8 + n > size:
            raise BadInputError(f"{path}: safetensors header length {n} runs past the end of the "
                                f"{size}-byte file (truncated?)")
        raw = f.read(n)
    return parse_header(raw, size - 8 - n, str(path))


def parse_header(raw: bytes, data_size: int, where: str) -> Header:
    """Validate header bytes against a data region of `data_size` bytes."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise BadInputError(f"{where}: safetensors header is not valid UTF-8 (byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise BadInputError(f"{where}: safetensors header is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(obj, dict):
        raise BadInputError(f"{where}: safetensors header is a JSON {type(obj).__name__}, expected an object")
    metadata = _metadata(obj.pop("__metadata__", {}), where)
    tensors = {name: _spec(name, entry, where) for name, entry in obj.items()}
    _check_tiling(tensors, data_size, where)
    return Header(tensors, metadata)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k[:80]!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _metadata(meta: Any, where: str) -> dict[str, str]:
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BadInputError(f"{where}: safetensors __metadata__ must map strings to strings")
    return meta


def _spec(name: str, entry: Any, where: str) -> TensorSpec:
    label = f"{where}: tensor {name[:80]!r}"
    if not name or "\x00" in name:
        raise BadInputError(f"{where}: safetensors tensor name {name[:80]!r} is empty or contains NUL")
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise BadInputError(f"{label} must have exactly dtype, shape and data_offsets (got {keys})")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise BadInputError(f"{label} has unknown dtype {_show(dtype, 20)}; known: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise BadInputError(f"{label} has an invalid shape {_show(shape)} (need non-negative integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets):
        raise BadInputError(f"{label} has invalid data_offsets {_show(offsets)}")
    start, end = offsets
    nbytes = DTYPES[dtype][1]
    for d in shape:
        nbytes *= d
        if nbytes > _MAX_BYTES:
            raise BadInputError(f"{label}: shape {shape[:8]} overflows the byte count")
    if end < start or end - start != nbytes:
        raise BadInputError(f"{label}: data_offsets [{start}, {end}] hold {end - start} bytes but dtype "
                            f"{dtype} x shape {shape} needs {nbytes}")
    return TensorSpec(dtype, tuple(shape), start, end)


def _show(value: Any, limit: int = 80) -> str:
    """A value from the file, quoted and cut, safe for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_tiling(tensors: dict[str, TensorSpec], data_size: int, where: str) -> None:
    pos = 0
    for name, spec in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if spec.start < pos:
            raise BadInputError(f"{where}: tensor {name[:80]!r} at bytes [{spec.start}, {spec.end}] overlaps "
                                "the previous tensor")
        if spec.start > pos:
            raise BadInputError(f"{where}: gap of {spec.start - pos} bytes before tensor {name[:80]!r}")
        pos = spec.end
    if pos > data_size:
        raise BadInputError(f"{where}: tensor data ends at byte {pos} but the data region has {data_size} "
                            "bytes (truncated?)")
    if pos < data_size:
        raise BadInputError(f"{where}: {data_size - pos} trailing bytes after the last tensor")


def read_index(path: Path) -> dict[str, Path]:
    """Validate a `*.safetensors.index.json`; return tensor name -> shard path (inside the index's folder)."""
    if path.stat().st_size > MAX_INDEX:
        raise BadInputError(f"{path}: index file is larger than 100 MB")
    with library_call(path, "reading the shard index"):
        text = path.read_bytes().decode("utf-8")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise BadInputError(f"{path}: shard index is not valid JSON ({str(e)[:120]})") from None
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BadInputError(f"{path}: shard index has no 'weight_map' (tensor name -> shard file)")
    folder = path.parent.resolve()
    shards: dict[str, Path] = {}
    out: dict[str, Path] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise BadInputError(f"{path}: weight_map[{name[:80]!r}] is not a file name")
        if file not in shards:
            shards[file] = _shard_path(path, folder, file)
        out[name] = shards[file]
    return out


def _shard_path(index: Path, folder: Path, file: str) -> Path:
    norm = os.path.normpath(file)
    if (not file or "\x00" in file or "\\" in file or os.path.isabs(file) or norm == ".."
            or norm.startswith("../")):
        raise BadInputError(f"{index}: shard {file[:80]!r} is outside the index's folder; refused")
    shard = folder / norm
    if not shard.exists():
        raise BadInputError(f"{index}: shard {file!r} not found next to the index")
    real = shard.resolve()
    if real != folder and folder not in real.parents:
        raise BadInputError(f"{index}: shard {file!r} resolves outside the index's folder (symlink); refused")
    if not real.is_file():
        raise BadInputError(f"{index}: shard {file!r} is not a regular file")
    if real.stat().st_nlink > 1:  # a hard link is another name for a file that may live anywhere
        raise BadInputError(f"{index}: shard {file!r} has {real.stat().st_nlink} hard links; refused (copy the file "
                            "instead)")
    return shard


class SafetensorsTensors(Mapping):
    """Tensors of one or more safetensors files, read one at a time through memory-mapped `safe_open`.

    `sources` maps each exposed name to (file, stored name); an alias maps to its kept tensor.
    """

    def __init__(self, sources: dict[str, tuple[Path, str]], specs: dict[str, TensorSpec]):
        self._sources = sources
        self._specs = specs
        self._handles: dict[Path, Any] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        file, stored = self._sources[name]
        with library_call(file, f"reading tensor {name!r}"):
            return self._handle(file).get_tensor(stored)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape of `name` without reading it."""
        s = self._specs[self._sources[name][1] if name not in self._specs else name]
        return s.torch_dtype, s.shape

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            from safetensors import safe_open
            self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        return self._handles[file]


def load_safetensors(path: Path) -> tuple[SafetensorsTensors, dict[str, str]]:
    """One `.safetensors` file: lazy tensors (aliases included) and alias -> kept name."""
    header = read_header(path)
    sources = {name: (path, name) for name in header.tensors}
    aliases = _aliases(header, sources)
    return SafetensorsTensors(sources, dict(header.tensors)), aliases


def load_sharded(index: Path) -> tuple[SafetensorsTensors, dict[str, str]]:
    """A sharded checkpoint: every shard validated, every name in the index found in its shard."""
    weight_map = read_index(index)
    headers = {shard: read_header(shard) for shard in dict.fromkeys(weight_map.values())}
    sources: dict[str, tuple[Path, str]] = {}
    specs: dict[str, TensorSpec] = {}
    for name, shard in weight_map.items():
        if name not in headers[shard].tensors:
            raise BadInputError(f"{index}: tensor {name[:80]!r} is listed in shard {shard.name} but not "
                                "stored there")
        sources[name] = (shard, name)
        specs[name] = headers[shard].tensors[name]
    for shard, header in headers.items():
        extra = sorted(set(header.tensors) - {n for n, s in weight_map.items() if s == shard})
        if extra:
            raise BadInputError(f"{index}: shard {shard.name} stores {extra[0][:80]!r}, which the index "
                                "does not list for it")
    aliases: dict[str, str] = {}
    for header in headers.values():
        aliases.update(_aliases(header, sources))
    return SafetensorsTensors(sources, specs), aliases


def _aliases(header: Header, sources: dict[str, tuple[Path, str]]) -> dict[str, str]:
    """`save_model` drops shared tensors and records `dropped -> kept` in the metadata."""
    aliases: dict[str, str] = {}
    for dropped, kept in header.metadata.items():
        if dropped not in header.tensors and kept in header.tensors and dropped not in sources:
            aliases[dropped] = kept
            sources[dropped] = sources[kept]
    return aliases
