"""Sharded codebook safetensors: shards filled in order, streamed to disk, and a Hugging Face index.

The shards use the codebook format of `export_safetensors` (`<name>.codebook`, `<name>.indices`
packed "lsb0", dense tensors under their own names, the recipe in `__metadata__`; see
`compress.io.codebook_files`), so each shard is readable on its own. Tensor bytes are appended to a
data file per shard as they come (a dense tensor is copied from its source file, never loaded), and
the safetensors header is written when the shard is finished. A codebook and its indices stay in one
shard; an alias is recorded in the shard holding its target.

Example::

    writer = ShardWriter(folder, max_bytes=1 << 30)
    writer.put_codebook("fc1.weight", "F32", shape, codebook_bytes, groups, k, bits, packed, grain)
    writer.put_dense("fc1.bias", source)          # an `io.checkpoint.TensorSource`
    writer.finish()
    index = writer.index_json({"compress.source": "model.safetensors"})
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..codebook import FILE_FORMAT, FILE_FORMAT_VERSION, Recipe
from ..errors import BadInputError
from ..granularity import Granularity
from ..io.checkpoint import TensorSource
from ..io.safetensors import DTYPES
from ..packing import PACKING

INDEX_NAME = "model.safetensors.index.json"
_COPY_CHUNK = 8 << 20


@dataclass
class _Entry:
    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # in the shard's data file
    nbytes: int


class _Shard:
    """One output shard being written: tensor bytes appended to a data file, the header kept aside."""

    def __init__(self, folder: Path, number: int):
        self.number = number
        self.data_path = folder / f".shard-{number:05d}.data"
        self._fd: int | None = os.open(self.data_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.entries: list[_Entry] = []
        self.recipes: dict[str, dict] = {}
        self.aliases: dict[str, dict] = {}
        self.size = 0

    def put(self, key: str, dtype: str, shape: tuple[int, ...], data: bytes | np.ndarray | TensorSource) -> None:
        if isinstance(data, TensorSource):
            with open(data.file, "rb", buffering=0) as src:
                copy_bytes(src.fileno(), data.offset, self._fd, data.nbytes)
            n = data.nbytes
        else:
            view = memoryview(data).cast("B")
            write_all(self._fd, view)
            n = view.nbytes
        self.entries.append(_Entry(key, dtype, tuple(shape), self.size, n))
        self.size += n

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def finish(self, final: Path) -> None:
        """Write `final`: header (entries ordered by alignment, like safetensors), then the data, copied."""
        self.close()
        order = sorted(self.entries, key=lambda e: (-DTYPES[e.dtype][1], e.key))
        header: dict[str, Any] = {"__metadata__": {
            "compress.format": FILE_FORMAT, "compress.format_version": str(FILE_FORMAT_VERSION),
            "compress.tensors": json.dumps(self.recipes, sort_keys=True),
            "compress.aliases": json.dumps(self.aliases, sort_keys=True)}}
        pos = 0
        for e in order:
            header[e.key] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
            pos += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(self.data_path, "rb", buffering=0) as src, open(final, "xb", buffering=0) as dst:
            write_all(dst.fileno(), struct.pack("<Q", len(raw)) + raw)
            for e in order:
                copy_bytes(src.fileno(), e.offset, dst.fileno(), e.nbytes)
        self.data_path.unlink()


class ShardWriter:
    """Shards of at most `max_bytes` tensor bytes, filled in order, written into `folder`."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.shards: list[_Shard] = []
        self.names: list[str] = []
        self.placed: dict[str, int] = {}  # logical name -> shard number
        self.stored: dict[str, list[str]] = {}  # logical name -> the keys it is stored under

    def _shard_for(self, nbytes: int) -> _Shard:
        if not self.shards or (self.shards[-1].size and self.shards[-1].size + nbytes > self.max_bytes):
            self.shards.append(_Shard(self.folder, len(self.shards) + 1))
        return self.shards[-1]

    def put_codebook(self, name: str, dtype: str, shape: tuple[int, ...], codebook: bytes, groups: int, k: int,
                     bits: int, packed: np.ndarray, grain: Granularity) -> None:
        """A merged tensor: its codebook's raw bytes (`dtype`, a safetensors code) and packed indices."""
        shard = self._shard_for(len(codebook) + packed.nbytes)
        keys = [f"{name}.codebook", f"{name}.indices"]
        shard.put(keys[0], dtype, (groups, k), codebook)
        shard.put(keys[1], "U8", (packed.size,), packed)
        torch_dtype = str(DTYPES[dtype][0]).removeprefix("torch.")
        shard.recipes[name] = Recipe(keys[0], keys[1], bits, k, PACKING, list(shape), torch_dtype, grain.kind,
                                     grain.group_size).to_dict()
        self._place(name, shard, keys)

    def put_dense(self, name: str, source: TensorSource) -> None:
        """A tensor copied byte for byte from its source file."""
        shard = self._shard_for(source.nbytes)
        shard.put(name, source.spec.dtype, source.spec.shape, source)
        self._place(name, shard, [name])

    def put_alias(self, name: str, target: str, transpose: bool) -> None:
        """`name` is stored as `target` (already put), transposed when `transpose`."""
        shard = self.shards[self.placed[target] - 1]
        shard.aliases[name] = {"target": target, "transpose": transpose}
        self._place(name, shard, [])

    def _place(self, name: str, shard: _Shard, keys: list[str]) -> None:
        self.placed[name] = shard.number
        self.stored[name] = keys

    def finish(self) -> None:
        """Write every shard's file (`model-0000i-of-0000n.safetensors`)."""
        n = len(self.shards)
        for shard in self.shards:
            name = f"model-{shard.number:05d}-of-{n:05d}.safetensors"
            shard.finish(self.folder / name)
            self.names.append(name)

    def abort(self) -> None:
        for shard in self.shards:
            shard.close()

    def shard_name(self, name: str) -> str:
        """The file holding logical tensor `name` (after `finish`)."""
        return self.names[self.placed[name] - 1]

    def index_json(self, metadata: dict) -> dict:
        """The index: `weight_map` (stored key -> shard) and `metadata` (format, every logical tensor's
        shard, `total_size`, plus `metadata`)."""
        weight_map = {key: self.shard_name(name) for name, keys in self.stored.items() for key in keys}
        meta = {"total_size": sum(s.size for s in self.shards), "compress.format": FILE_FORMAT,
                "compress.format_version": str(FILE_FORMAT_VERSION),
                "compress.tensors": {name: self.shard_name(name) for name in self.stored}, **metadata}
        return {"metadata": meta, "weight_map": weight_map}


def write_all(fd: int, data) -> None:
    """Write all of `data` to the file descriptor (os.write may write less than asked)."""
    view = memoryview(data)
    while view.nbytes:
        view = view[os.write(fd, view):]


def copy_bytes(src: int, start: int, dst: int, n: int) -> None:
    """Copy `n` bytes at `start` of `src` to the current position of `dst`, a bounded chunk at a time."""
    done = 0
    while done < n:
        step = min(_COPY_CHUNK, n - done)
        try:
            got = os.copy_file_range(src, dst, step, start + done)
        except (AttributeError, OSError):  # no copy_file_range here, or not across these file systems
            got = 0
        if got == 0:
            chunk = os.pread(src, step, start + done)
            if not chunk:
                raise BadInputError("tensor data ends early (file truncated while being read?)")
            write_all(dst, chunk)
            got = len(chunk)
        done += got
