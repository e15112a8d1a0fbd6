"""Safetensors checkpoints read one tensor at a time, each through a memory map opened for it alone.

`compress.io.load` keeps one `safe_open` handle per shard, so every page read stays mapped and a
full pass over a checkpoint grows resident memory with its size. `open_checkpoint` instead opens a
map per tensor, which the tensor keeps alive and no longer: memory stays at the largest tensor.
The headers are validated exactly as `load` validates them (`io.safetensors`).

Example::

    loaded = open_checkpoint("ckpt/model.safetensors.index.json")   # a `Loaded` with lazy tensors
    report = compress.audit(loaded)
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..codebook import FILE_FORMAT
from ..errors import BadInputError
from . import safetensors as st_header
from ._errors import library_call
from .loaded import Loaded


def open_checkpoint(path: str | Path) -> Loaded:
    """A `Loaded` whose tensors are read one at a time, each through a memory map opened for it alone.

    `compress.io.load` keeps one handle per shard open, so every page read stays mapped and the
    resident memory of a full pass grows with the checkpoint; here it stays at the largest tensor.

    """
    ckpt = Checkpoint.open(Path(path))
    return Loaded(path=Path(path), kind="safetensors", tensors=CheckpointTensors(ckpt), aliases=dict(ckpt.aliases))



def is_safetensors_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a `.safetensors` file or a `*.safetensors.index.json` (by content), for routing."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(64)
    if st_header.is_safetensors(head, path.stat().st_size):
        return True
    return path.name.endswith(".safetensors.index.json") and head.lstrip()[:1] == b"{"



@dataclass(frozen=True)
class TensorSource:
    """Where one stored tensor's bytes are: the file, the name in it, and [start, end) in the file."""

    file: Path
    stored: str
    spec: st_header.TensorSpec
    offset: int  # absolute file offset of the tensor's first byte

    @property
    def nbytes(self) -> int:
        return self.spec.end - self.spec.start

    @property
    def dtype(self) -> torch.dtype:
        return self.spec.torch_dtype


@dataclass
class Checkpoint:
    path: Path
    sources: dict[str, TensorSource]  # stored tensors, in the checkpoint's order
    aliases: dict[str, str]  # name -> stored name it shares storage with
    metadata: dict[Path, dict[str, str]]

    @classmethod
    def open(cls, path: Path) -> Checkpoint:
        """Validate the file or index and every shard header (`compress.io`'s checks); read no tensor."""
        if not path.exists():
            raise BadInputError(f"{path}: file not found")
        if path.is_dir():
            raise BadInputError(f"{path}: is a folder; give the *.safetensors.index.json inside it (or a "
                                ".safetensors file)")
        with library_call(path, "opening the file"), open(path, "rb") as f:
            head = f.read(64)
        size = path.stat().st_size
        if st_header.is_safetensors(head, size) or (path.suffix == ".safetensors" and size):
            _, aliases = st_header.load_safetensors(path)
            files = {name: path for name in st_header.read_header(path).tensors}
        elif size and (path.name.endswith(".json") or head.lstrip()[:1] == b"{"):
            _, aliases = st_header.load_sharded(path)
            files = st_header.read_index(path)
        else:
            raise BadInputError(f"{path}: not a .safetensors file or a *.safetensors.index.json; checkpoints "
                                "are streamed from safetensors only (other formats are read whole by compress.io.load)")
        headers = {f: (st_header.read_header(f), data_start(f)) for f in dict.fromkeys(files.values())}
        sources = {}
        for name, file in files.items():
            header, base = headers[file]
            spec = header.tensors[name]
            sources[name] = TensorSource(file, name, spec, base + spec.start)
        if not sources:
            raise BadInputError(f"{path}: the checkpoint holds no tensors")
        return cls(path, sources, aliases, {f: h.metadata for f, (h, _) in headers.items()})

    def refuse_codebook_input(self) -> None:
        for file, meta in self.metadata.items():
            if meta.get("compress.format") == FILE_FORMAT:
                raise BadInputError(f"{file}: already a codebook checkpoint written by compress; there is nothing "
                                    "to tie (read it with compress.io.load_codebook_checkpoint)")

    def read(self, name: str) -> torch.Tensor:
        src = self.sources[self.aliases.get(name, name)]
        return read_tensor(src.file, src.stored)


def data_start(file: Path) -> int:
    with open(file, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def read_tensor(file: Path | str, stored: str) -> torch.Tensor:
    """One tensor through a memory map opened for it alone (the tensor keeps the map alive, no longer)."""
    from safetensors import safe_open

    with library_call(file, f"reading tensor {stored!r}"), safe_open(str(file), framework="pt") as f:
        return f.get_tensor(stored)


class CheckpointTensors(Mapping):
    """name -> tensor of a checkpoint, read on access; stored names in order, then aliases."""

    def __init__(self, ckpt: Checkpoint):
        self._ckpt = ckpt
        self._names = [*ckpt.sources, *(a for a in ckpt.aliases if a not in ckpt.sources)]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._ckpt.sources and name not in self._ckpt.aliases:
            raise KeyError(name)
        return self._ckpt.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape of `name` without reading it."""
        src = self._ckpt.sources[self._ckpt.aliases.get(name, name)]
        return src.dtype, src.spec.shape

