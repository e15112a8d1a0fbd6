"""Open model and data files: the one place where `compress` reads a model file.

`load(path)` recognizes the format by content (zip entries, magic bytes, the safetensors header),
not by extension, and never lets the file run code unless the user passes `trust_pickle=True`:

- `.pt2` (torch.export.save): see `_pt2_safety` for how `torch.export.load`'s open doors are shut;
- `.pt`/`.pth`: a state_dict (or a dict holding one under "state_dict"/"model") through
  `torch.load(weights_only=True, mmap=True)`; a pickled `nn.Module` only with trust_pickle;
  TorchScript archives through `torch.jit.load`;
- `.safetensors` and sharded `*.safetensors.index.json`: header validated first, tensors lazy;
- `.onnx`: protobuf without external data; external references validated, tensors lazy.

`load_data(path)` reads the calibration/test split file (see ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import pickletools
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _onnx_safety as onnx_safety
from . import _pt2_safety as pt2_safety
from . import _safetensors_header as st_header
from ._library_errors import library_call, short
from ._pickle_guard import trusted_load, weights_only_load
from ._zip_safety import check_archive, is_zip
from .errors import BadInputError, CompressError, UnsafePickleError

KINDS = ("pt2", "state_dict", "module", "torchscript", "safetensors", "onnx")
SUPPORTED = ("supported: .pt2 (torch.export.save), .pt/.pth (state_dict or TorchScript), "
             ".safetensors or *.safetensors.index.json, .onnx")
_PICKLE_SCAN = 1 << 20
_SCRIPT_NAMESPACES = {"aten", "prim", "prims", "quantized", "_quantized", "quantized_decomposed", "profiler"}
_DENIED_OPS = {"aten::save", "aten::from_file"}


@dataclass
class Loaded:
    """A model file, opened: its tensors, aliases and (where the format has them) module and inputs.

    `tensors` holds every parameter and buffer name; names in `aliases` share storage with their
    canonical name (skip them to count unique storage). For safetensors and ONNX it is lazy: each
    tensor is read when indexed.
    """

    path: Path
    kind: str
    tensors: Mapping[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)
    module: nn.Module | None = None
    example_inputs: tuple[torch.Tensor, ...] | None = None
    program: Any = None  # torch.export.ExportedProgram for kind "pt2"
    onnx_model: Any = None  # onnx.ModelProto (external data not loaded) for kind "onnx"
    sha256: str = ""

    def describe(self) -> str:
        """One line: file, kind, tensor count and size, aliases, module and example inputs.

        >>> load("samples/digits_mlp.pt2").describe()
        'digits_mlp.pt2: pt2, 6 tensors, 50,610 values (202.4 KB), runnable module, example inputs [4, 64]'
        """
        values = size = 0
        for name in self.tensors:
            if name in self.aliases:
                continue
            dtype, shape = _spec(self.tensors, name)
            values += math.prod(shape)
            size += math.prod(shape) * _itemsize(dtype)
        n = len(self.tensors)
        parts = [f"{self.path.name}: {self.kind}", f"{n} tensor{'' if n == 1 else 's'}",
                 f"{values:,} values ({_human(size)})"]
        if self.aliases:
            parts.append(f"{len(self.aliases)} alias{'es' if len(self.aliases) > 1 else ''}")
        if self.module is not None:
            parts.append("runnable module")
        if self.example_inputs:
            shapes = ", ".join(str(list(t.shape)) for t in self.example_inputs if isinstance(t, torch.Tensor))
            parts.append(f"example inputs {shapes}")
        return ", ".join(parts)


@dataclass
class DataSplits:
    """Calibration and test data: inputs (first dimension = samples) and optional targets."""

    calib_inputs: torch.Tensor
    calib_targets: torch.Tensor | None
    test_inputs: torch.Tensor
    test_targets: torch.Tensor | None
    path: Path


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
    head, size = _check_file(path)
    suffix = path.suffix.lower()
    if is_zip(head):
        loaded = _load_zip(path, trust_pickle)
    elif st_header.is_safetensors(head, size):
        loaded = _load_safetensors(path)
    elif _is_pickle(path, head):
        loaded = _load_pickle(path, trust_pickle)
    elif head[:1] == b"\x08" or suffix == ".onnx":
        loaded = _load_onnx(path)
    elif suffix == ".safetensors":  # not sniffed: let the header check say what is wrong
        loaded = _load_safetensors(path)
    elif suffix == ".json" or head.lstrip()[:1] == b"{":
        loaded = _load_sharded(path)
    else:
        raise BadInputError(f"{path}: unrecognized model file (starts with {head[:8]!r}); {SUPPORTED}")
    loaded.sha256 = _sha256(path)
    return loaded


def load_data(path: Path | str) -> DataSplits:
    """Read a data file: a dict saved by `torch.save`, loaded with `weights_only=True`.

    Keys: `calib_inputs`, `test_inputs` (tensors, first dimension = samples), optional
    `calib_targets`/`test_targets` (one per sample) and `version` (1). Anything else is an error.

    >>> data = load_data("samples/digits_data.pt")
    >>> data.calib_inputs.shape, data.test_targets.dtype
    (torch.Size([1257, 64]), torch.int64)
    """
    path = Path(path)
    head, _ = _check_file(path)
    if not (is_zip(head) or _is_pickle(path, head)):
        raise BadInputError(f"{path}: not a torch.save file; save the splits with "
                            "torch.save({'calib_inputs': ..., 'test_inputs': ...}, path)")
    if is_zip(head):
        with library_call(path, "opening the zip archive"), zipfile.ZipFile(path) as zf:
            listing = check_archive(path, zf)
        if "data.pkl" not in listing.entries:
            what = "a .pt2 program" if "archive_format" in listing.entries else "a zip archive"
            raise BadInputError(f"{path}: {what}, not a data file; save the splits with "
                                "torch.save({'calib_inputs': ..., 'test_inputs': ...}, path)")
    obj = weights_only_load(path, str(path), pickle_bytes=_pickle_head(path, head), mmap=is_zip(head),
                            hint="a data file must be a plain dict of tensors saved with torch.save")
    return _splits(obj, path)


# --- files and formats ---------------------------------------------------------------------------

def _check_file(path: Path) -> tuple[bytes, int]:
    if not path.exists():
        raise BadInputError(f"{path}: file not found")
    if path.is_dir():
        raise BadInputError(f"{path}: is a folder, not a model file (for sharded safetensors give the "
                            "*.safetensors.index.json)")
    if not path.is_file():
        raise BadInputError(f"{path}: not a regular file")
    with library_call(path, "opening the file"), open(path, "rb") as f:
        head = f.read(64)
        size = path.stat().st_size
    if size == 0:
        raise BadInputError(f"{path}: file is empty")
    return head, size


def _is_pickle(path: Path, head: bytes) -> bool:
    """A pickle stream: protocol 2+ starts with PROTO; protocol 0/1 must parse up to STOP within 1 MiB."""
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return True
    with open(path, "rb") as f:
        window = f.read(_PICKLE_SCAN)
    ops = 0
    try:
        for op, _, _ in pickletools.genops(io.BytesIO(window)):
            ops += 1
            if op.name == "STOP":
                return ops > 1
    except (ValueError, EOFError, UnicodeDecodeError, KeyError):
        return False
    return False


def _pickle_head(path: Path, head: bytes) -> bytes | None:
    """The raw pickle bytes used to name refused globals (`data.pkl` of a zip, else the file's start)."""
    if is_zip(head):
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith("/data.pkl")]
                return zf.read(names[0]) if names else None
        except (zipfile.BadZipFile, OSError, KeyError):
            return None
    with open(path, "rb") as f:
        return f.read(64 << 20)


def _load_zip(path: Path, trust: bool) -> Loaded:
    with library_call(path, "opening the zip archive"):
        zf = zipfile.ZipFile(path)
    with zf:
        listing = check_archive(path, zf)
        names = listing.entries
        if "archive_format" in names or any(n.startswith("models/") for n in names):
            return _load_pt2(path, zf, listing, trust)
        if "data.pkl" in names and ("constants.pkl" in names or any(n.startswith("code/") for n in names)):
            return _load_torchscript(path, trust)
        if "data.pkl" in names:
            return _load_torch_save(path, zf.read(listing.entries["data.pkl"]), trust)
    raise BadInputError(f"{path}: a zip archive but not one torch writes (no data.pkl, no models/); "
                        f"{SUPPORTED}")


def _load_pt2(path: Path, zf: zipfile.ZipFile, listing, trust: bool) -> Loaded:
    models = pt2_safety.check_entries(path, listing, zf)
    if not trust:
        pt2_safety.check_payloads(path, listing, zf, models)
    with warnings.catch_warnings(), pt2_safety.captured_torch_export_log() as swallowed:
        warnings.simplefilter("ignore")
        program = _export_load(path, trust, swallowed)
        if not trust:
            pt2_safety.check_program(program, path)
        with library_call(path, "building the module from the exported program"):
            module = program.module()
    _retie_shared_parameters(module)
    tensors = dict(program.state_dict)
    for name, value in program.constants.items():
        if isinstance(value, torch.Tensor) and name not in tensors:
            tensors[name] = value
    args = program.example_inputs[0] if program.example_inputs else None
    return Loaded(path=path, kind="pt2", tensors=tensors, aliases=find_aliases(_named_tensors(module)),
                  module=module, example_inputs=tuple(args) if args is not None else None, program=program)


def _retie_shared_parameters(module: nn.Module) -> None:
    """Make the names of one saved parameter one `nn.Parameter` object again.

    `torch.export.load` gives each name of a shared parameter (a tied embedding and head, one layer
    used three times) its own `Parameter` over the same storage; planning and fine-tuning treat
    distinct objects as distinct weights, so the tie would be lost.
    """
    first: dict[tuple, nn.Parameter] = {}
    for owner in module.modules():
        for attr, p in list(owner._parameters.items()):
            if p is None or p.numel() == 0:
                continue
            key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.stride()), tuple(p.shape), p.dtype)
            kept = first.setdefault(key, p)
            if kept is not p:
                owner._parameters[attr] = kept


def _export_load(path: Path, trust: bool, swallowed: list[BaseException]):
    try:
        with (contextlib.nullcontext() if trust else pt2_safety.guarded_serde(path)), \
                library_call(path, "torch.export.load"):
            return torch.export.load(str(path))
    except BadInputError as e:
        if not swallowed or isinstance(e, UnsafePickleError):
            raise
        cause = swallowed[-1]  # torch logged the real error and raised a generic one
        if isinstance(cause, CompressError):
            raise cause from None
        raise BadInputError(f"{path}: torch.export.load failed "
                            f"({type(cause).__name__}: {short(cause)})") from cause


def _load_torchscript(path: Path, trust: bool) -> Loaded:
    # torch.jit.load reads data.pkl/constants.pkl with TorchScript's own unpickler, which resolves only
    # TorchScript classes and a fixed set of torch rebuild functions: a pickle naming os.system fails with
    # "Unknown type name 'posix.system'" and runs nothing (checked on torch 2.13). code/ is TorchScript,
    # compiled by the TorchScript compiler, not executed as Python. What it can still do is call an
    # operator that touches files (aten::save, aten::from_file), so the graphs are checked below.
    with warnings.catch_warnings(), library_call(path, "torch.jit.load"):
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")
    if not trust:
        _check_script_ops(module, path)
    tensors = dict(module.state_dict())
    return Loaded(path=path, kind="torchscript", tensors=tensors, aliases=find_aliases(tensors.items()),
                  module=module)


def _check_script_ops(module: torch.jit.ScriptModule, path: Path) -> None:
    for sub_name, sub in module.named_modules():
        for method in sub._c._method_names():
            graph = sub._c._get_method(method).inlined_graph
            for kind in _node_kinds(graph.nodes()):
                namespace = kind.split("::", 1)[0]
                if namespace not in _SCRIPT_NAMESPACES or kind in _DENIED_OPS:
                    where = f"{sub_name or 'model'}.{method}"
                    raise UnsafePickleError(f"{path}: TorchScript method {where} calls {kind}, which is "
                                            "not a plain tensor operator; refused; pass --trust-pickle "
                                            "only for files you trust")


def _node_kinds(nodes) -> Iterable[str]:
    for node in nodes:
        yield node.kind()
        for block in node.blocks():
            yield from _node_kinds(block.nodes())


def _load_torch_save(path: Path, data_pkl: bytes, trust: bool) -> Loaded:
    if trust:
        obj = trusted_load(path, str(path))
    else:
        obj = weights_only_load(path, str(path), pickle_bytes=data_pkl, mmap=True)
    return _from_object(path, obj)


def _load_pickle(path: Path, trust: bool) -> Loaded:
    if trust:
        obj = trusted_load(path, str(path))
    else:
        obj = weights_only_load(path, str(path), pickle_bytes=_pickle_head(path, b""))
    return _from_object(path, obj)


def _from_object(path: Path, obj: Any) -> Loaded:
    """What torch.load returned: a module (only reachable with trust), or a state_dict (maybe wrapped)."""
    module = obj if isinstance(obj, nn.Module) else _wrapped_module(obj)
    if module is not None:
        tensors = dict(module.state_dict())
        return Loaded(path=path, kind="module", tensors=tensors,
                      aliases=find_aliases(_named_tensors(module)), module=module)
    state_dict = _state_dict(obj)
    if state_dict is None:
        raise BadInputError(f"{path}: holds {_what(obj)}, not a state_dict (a dict of tensors, or one under "
                            "'state_dict' or 'model'); " + SUPPORTED)
    return Loaded(path=path, kind="state_dict", tensors=state_dict, aliases=find_aliases(state_dict.items()))


def _wrapped_module(obj: Any) -> nn.Module | None:
    if isinstance(obj, Mapping):
        for key in ("model", "module"):
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
    return None


def _state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    flat = _flat_state_dict(obj)
    if flat is not None:
        return flat
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = _flat_state_dict(obj.get(key))
            if inner is not None:
                return inner
    return None


def _flat_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
        return None
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    others = [k for k in obj if k not in tensors and not k.endswith("_extra_state")]
    return tensors if tensors and not others else None


def _what(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = ", ".join(repr(k) for k in list(obj)[:5])
        return f"a dict with keys {keys}{', ...' if len(obj) > 5 else ''}"
    return f"a {type(obj).__name__}"


def _load_safetensors(path: Path) -> Loaded:
    tensors, aliases = st_header.load_safetensors(path)
    return Loaded(path=path, kind="safetensors", tensors=tensors, aliases=aliases)


def _load_sharded(path: Path) -> Loaded:
    tensors, aliases = st_header.load_sharded(path)
    return Loaded(path=path, kind="safetensors", tensors=tensors, aliases=aliases)


def _load_onnx(path: Path) -> Loaded:
    model = onnx_safety.load_proto(path)
    names = [t.name for t in model.graph.initializer]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise BadInputError(f"{path}: initializer {dup!r} is defined twice; the ONNX file is invalid")
    refs = onnx_safety.check_model(model, path)
    return Loaded(path=path, kind="onnx", tensors=onnx_safety.OnnxTensors(model, refs, path),
                  aliases=onnx_safety.aliases(model, refs), onnx_model=model)


# --- aliases, data splits, helpers ---------------------------------------------------------------

def find_aliases(named: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """Names whose tensors are the same view of the same storage (tied weights): other -> first name.

    >>> emb = torch.nn.Embedding(10, 4); head = torch.nn.Linear(4, 10, bias=False); head.weight = emb.weight
    >>> find_aliases([("emb.weight", emb.weight), ("head.weight", head.weight)])
    {'head.weight': 'emb.weight'}
    """
    first: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for name, t in named:
        if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.is_meta or t.layout != torch.strided:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.stride()), tuple(t.shape), t.dtype)
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


_SPLIT_KEYS = ("calib_inputs", "calib_targets", "test_inputs", "test_targets")


def _splits(obj: Any, path: Path) -> DataSplits:
    if not isinstance(obj, Mapping):
        raise BadInputError(f"{path}: holds {_what(obj)}; a data file is a dict with calib_inputs and "
                            "test_inputs")
    unknown = [k for k in obj if k not in _SPLIT_KEYS and k != "version"]
    if unknown:
        raise BadInputError(f"{path}: unknown key {unknown[0]!r}; allowed: version, {', '.join(_SPLIT_KEYS)}")
    if obj.get("version", 1) != 1:
        raise BadInputError(f"{path}: data file version {obj['version']!r} is not supported (expected 1)")
    calib = _inputs(obj, "calib_inputs", path)
    test = _inputs(obj, "test_inputs", path)
    return DataSplits(calib_inputs=calib, calib_targets=_targets(obj, "calib_targets", calib, path),
                      test_inputs=test, test_targets=_targets(obj, "test_targets", test, path), path=path)


def _inputs(obj: Mapping, key: str, path: Path) -> torch.Tensor:
    if key not in obj:
        raise BadInputError(f"{path}: missing {key!r}; a data file needs calib_inputs and test_inputs")
    t = _tensor(obj[key], key, path)
    if t.dim() == 0 or t.shape[0] == 0:
        raise BadInputError(f"{path}: {key} has shape {list(t.shape)}; it needs at least one sample "
                            "along the first dimension")
    return t


def _targets(obj: Mapping, key: str, inputs: torch.Tensor, path: Path) -> torch.Tensor | None:
    if obj.get(key) is None:
        return None
    t = _tensor(obj[key], key, path)
    if t.dim() == 0 or t.shape[0] != inputs.shape[0]:
        raise BadInputError(f"{path}: {key} has {t.shape[0] if t.dim() else 0} rows but "
                            f"{key.replace('targets', 'inputs')} has {inputs.shape[0]}; they must match")
    return t


def _tensor(value: Any, key: str, path: Path) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise BadInputError(f"{path}: {key} is a {type(value).__name__}, expected a tensor")
    if value.dtype == torch.bool or value.is_complex() or not (value.is_floating_point() or _is_int(value)):
        raise BadInputError(f"{path}: {key} has dtype {value.dtype}; use a float or integer tensor")
    if value.is_floating_point():
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise BadInputError(f"{path}: {key} has {bad} NaN or infinite values; clean the data")
    return value


def _is_int(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _spec(tensors: Mapping, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
    spec = getattr(tensors, "spec", None)
    if spec is not None:
        return spec(name)
    t = tensors[name]
    return t.dtype, tuple(t.shape)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with library_call(path, "hashing the file"), open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["DataSplits", "Loaded", "find_aliases", "load", "load_data"]
