"""`load(path)`: open any supported model file by its content, never letting it run code.

The format is recognized by content (zip entries, magic bytes, the safetensors header), not by
extension; each format has its reader module (`pt2`, `torch_save`, `torchscript`, `safetensors`,
`onnx`) and `safety/` holds the checks that keep pickles, zip tricks and `.pt2` payloads from running.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from ..errors import BadInputError
from . import onnx as onnx_reader
from . import safetensors as st_reader
from ._errors import library_call
from .loaded import Loaded, file_sha256
from .pt2 import load_pt2
from .safety.tensors import check_tensors
from .safety.zip import check_archive, is_zip
from .sniff import check_file, is_pickle
from .torch_save import SUPPORTED, load_pickle, load_torch_save
from .torchscript import load_torchscript

KINDS = ("pt2", "state_dict", "module", "torchscript", "safetensors", "onnx")


def load(path: Path | str, *, trust_pickle: bool = False) -> Loaded:
    """Open a model file of any supported format without letting it run code.

    Args:
        path: a `.pt2`, `.pt`/`.pth`, `.safetensors`, `*.safetensors.index.json` or `.onnx` file
            (recognized by content).
        trust_pickle: allow pickles that need the full unpickler (a pickled `nn.Module`, tensor
            subclasses): they run code from the file, so only for files the user trusts.

    Returns:
        a `Loaded`. Raises `BadInputError` (one line naming the file) for missing, empty,
        truncated, corrupt or unrecognized files and `UnsafePickleError` for refused pickles.

    >>> loaded = load("samples/digits_mlp.pt2")
    >>> loaded.kind, loaded.module(*loaded.example_inputs).shape
    ('pt2', torch.Size([4, 10]))
    """
    path = Path(path)
    head, size = check_file(path)
    suffix = path.suffix.lower()
    if is_zip(head):
        loaded = _load_zip(path, trust_pickle)
    elif st_reader.is_safetensors(head, size):
        loaded = _load_safetensors(path)
    elif is_pickle(path, head):
        loaded = load_pickle(path, trust_pickle)
    elif head[:1] == b"\x08" or suffix == ".onnx":
        loaded = _load_onnx(path)
    elif suffix == ".safetensors":  # not sniffed: let the header check say what is wrong
        loaded = _load_safetensors(path)
    elif suffix == ".json" or head.lstrip()[:1] == b"{":
        loaded = _load_sharded(path)
    else:
        raise BadInputError(f"{path}: unrecognized model file (starts with {head[:8]!r}); {SUPPORTED}")
    if loaded.kind not in ("safetensors", "onnx"):  # those two are checked from their headers, lazily read
        check_tensors(str(path), loaded.tensors.items())
        check_tensors(str(path), enumerate(loaded.example_inputs or ()), what="example input")
    loaded.sha256 = file_sha256(path)
    return loaded


def _load_zip(path: Path, trust: bool) -> Loaded:
    with library_call(path, "opening the zip archive"):
        zf = zipfile.ZipFile(path)
    with zf:
        listing = check_archive(path, zf)
        names = listing.entries
        if "archive_format" in names or any(n.startswith("models/") for n in names):
            return load_pt2(path, zf, listing, trust)
        if "data.pkl" in names and ("constants.pkl" in names or any(n.startswith("code/") for n in names)):
            return load_torchscript(path, zf, listing, trust)
        if "data.pkl" in names:
            return load_torch_save(path, zf.read(listing.entries["data.pkl"]), trust)
    raise BadInputError(f"{path}: a zip archive but not one torch writes (no data.pkl, no models/); "
                        f"{SUPPORTED}")


def _load_safetensors(path: Path) -> Loaded:
    tensors, aliases = st_reader.load_safetensors(path)
    return Loaded(path=path, kind="safetensors", tensors=tensors, aliases=aliases)


def _load_sharded(path: Path) -> Loaded:
    tensors, aliases = st_reader.load_sharded(path)
    return Loaded(path=path, kind="safetensors", tensors=tensors, aliases=aliases)


def _load_onnx(path: Path) -> Loaded:
    model = onnx_reader.load_proto(path)
    names = [t.name for t in model.graph.initializer]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise BadInputError(f"{path}: initializer {dup!r} is defined twice; the ONNX file is invalid")
    refs = onnx_reader.check_model(model, path)
    return Loaded(path=path, kind="onnx", tensors=onnx_reader.OnnxTensors(model, refs, path),
                  aliases=onnx_reader.aliases(model, refs), onnx_model=model)

