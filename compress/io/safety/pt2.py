"""Loading a `.pt2` (`torch.export.save`) without letting the file run code.

`torch.export.load` in torch 2.13 is not safe on untrusted files. Read in
`torch/export/pt2_archive/_package.py` and `torch/_export/serde/serialize.py`:

- `data/sample_inputs/<model>.pt` (and legacy `data/weights|constants/<model>.pt`) go through
  `deserialize_torch_artifact`, which tries `torch.load(weights_only=True)` and on ANY exception
  retries with `weights_only=False`;
- weights and tensor constants marked `use_pickle` are `torch.load(weights_only=False)`-ed directly;
- constants named `opaque_obj_*` are `pickle.loads`-ed, `custom_obj_*` go to the TorchBind unpickler;
- anything under `data/aotinductor/` is loaded as a compiled shared library;
- strings in `models/*.json` become code (see `pt2_policy`).

So, unless the user trusts the file: (1) every entry is checked (`safety.zip`, then an allow-list
of the paths torch writes; native code refused); (2) every pickle-bearing entry is loaded with
`weights_only=True` first and a refusal names the entry; every JSON entry passes `_pt2_policy`;
(3) `torch.export.load` runs inside `guarded_serde`, which swaps the unsafe calls in those two
torch modules for safe ones, so no `weights_only=False` load or `pickle.loads` can happen even if
the zip reader torch uses saw different bytes than ours; (4) the loaded graph may only call torch
operators, and its names and guards are checked again before `program.module()` generates code.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import operator
import pickle
import re
import threading
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ...errors import BadInputError, UnsafePickleError
from .pickle import TRUST_HINT, refusal, weights_only_load
from .pt2_policy import check_guard, check_json_text, check_name, check_sym_expr
from .tensors import check_view
from .zip import ZipListing

_FIXED_ENTRIES = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_ENTRY = re.compile(r"(models/[^/]+\.json|data/(weights|constants)/[^/]+|data/sample_inputs/[^/]+\.pt"
                    r"|extra/.+)\Z")
_ALLOWED_NAMESPACES = {"aten", "prims", "quantized", "_quantized", "quantized_decomposed"}
_DENIED_OPS = {"aten::save", "aten::from_file"}  # write or map arbitrary files
_LOCK = threading.Lock()


def check_entries(path: Path, listing: ZipListing, zf: zipfile.ZipFile) -> list[str]:
    """Allow-list the archive's entries; return the model names (from `models/<name>.json`)."""
    for name in listing.entries:
        if name.startswith("data/aotinductor/"):
            raise BadInputError(f"{path}: entry {listing.full(name)!r} is AOTInductor compiled code; refused "
                                "(compress loads only the exported program)")
        if name not in _FIXED_ENTRIES and not _ENTRY.match(name):
            raise BadInputError(f"{path}: unexpected entry {listing.full(name)!r} in a .pt2 archive; refused")
    for name, want in (("archive_format", "pt2"), ("archive_version", "0")):
        got = _read(zf, listing, name).decode("utf-8", "replace").strip() if name in listing.entries else None
        if got != want:
            raise BadInputError(f"{path}: {name} is {got!r}, expected {want!r}; re-save the program with "
                                "torch.export.save on torch >= 2.7")
    models = [n[len("models/"):-len(".json")] for n in listing.entries if n.startswith("models/")]
    if "model" not in models:
        raise BadInputError(f"{path}: no models/model.json in the archive; not a torch.export.save file")
    return models


def check_payloads(path: Path, listing: ZipListing, zf: zipfile.ZipFile, models: list[str]) -> None:
    """Check every JSON entry; load every pickle-bearing entry with weights_only=True, refusing on failure."""
    raw: set[str] = set()
    pickled: set[str] = set()
    for model in models:
        spec = f"models/{model}.json"
        check_json_text(_read(zf, listing, spec), _where(path, listing, spec))
        pickled.add(f"data/sample_inputs/{model}.pt")
        for kind in ("weights", "constants"):
            legacy = f"data/{kind}/{model}.pt"
            if legacy in listing.entries:
                pickled.add(legacy)
            cfg_name = f"data/{kind}/{model}_{kind}_config.json"
            if cfg_name in listing.entries:
                cfg = check_json_text(_read(zf, listing, cfg_name), _where(path, listing, cfg_name))
                _classify_payloads(path, listing, cfg, kind, raw, pickled)
    for name in sorted(listing.entries):
        in_data = name.startswith(("data/weights/", "data/constants/")) and not name.endswith("_config.json")
        if in_data and name not in raw:
            pickled.add(name)
    for name in sorted(pickled):
        if name not in listing.entries:
            raise BadInputError(f"{path}: entry {listing.full(name)!r} is missing; the archive is incomplete")
        data = _read(zf, listing, name)
        if data:
            weights_only_load(data, _where(path, listing, name), pickle_bytes=_inner_pickle(data))


def _classify_payloads(path: Path, listing: ZipListing, cfg: Any, kind: str, raw: set[str],
                       pickled: set[str]) -> None:
    entries = cfg.get("config") if isinstance(cfg, dict) else None
    if not isinstance(entries, dict):
        raise BadInputError(f"{path}: data/{kind} config has no 'config' mapping; the archive is corrupt")
    for fqn, meta in entries.items():
        file = meta.get("path_name") if isinstance(meta, dict) else None
        if not isinstance(file, str) or "/" in file:
            raise BadInputError(f"{path}: data/{kind} config entry {fqn!r} has no valid path_name")
        name = f"data/{kind}/{file}"
        where = _where(path, listing, name)
        if file.startswith("opaque_obj_"):
            raise refusal(where, "an object saved with pickle.dumps")
        if file.startswith("custom_obj_"):
            raise refusal(where, "a TorchBind custom object")
        if meta.get("use_pickle"):
            pickled.add(name)
        else:
            raw.add(name)
            _check_raw_payload(where, fqn, meta.get("tensor_meta"), listing.entries.get(name))


# serialized ScalarType -> bytes per element (torch._export.serde.schema.ScalarType)
_ELEMENT_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 16, 12: 1, 13: 2, 28: 2, 29: 1,
                  30: 1, 31: 1, 32: 1, 33: 1, 34: 4, 35: 8}
_STRIDED = 7  # schema.Layout.Strided


def _check_raw_payload(where: str, fqn: str, meta: Any, info: zipfile.ZipInfo | None) -> None:
    """A weight stored as raw bytes: torch views its bytes with `tensor_meta`'s sizes, strides and offset
    (and allocates `torch.zeros(sizes)` for an empty entry), so check them against the entry's size first."""
    if not isinstance(meta, dict) or info is None:
        return  # torch itself refuses a missing tensor_meta or entry
    sizes, strides, offset = (_ints(meta.get(k)) for k in ("sizes", "strides", "storage_offset"))
    if sizes is None or strides is None or offset is None or len(offset) != 1:
        raise BadInputError(f"{where}: tensor_meta of {fqn!r} needs integer sizes, strides and storage_offset "
                            "(a stored weight has no symbolic shape); the file is corrupt")
    if meta.get("layout") != _STRIDED:
        raise BadInputError(f"{where}: {fqn!r} has layout {meta.get('layout')!r}; compress reads dense (strided) "
                            "tensors only")
    element = _ELEMENT_BYTES.get(meta.get("dtype"))
    if element is None:
        raise BadInputError(f"{where}: {fqn!r} has an unknown or unsupported dtype {meta.get('dtype')!r}")
    check_view(where, fqn, sizes, strides, offset[0], info.file_size // element)


def _ints(value: Any) -> list[int] | None:
    """`[{"as_int": n}, ...]` (or one `{"as_int": n}`) as integers; None when anything else is there."""
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        n = item.get("as_int") if isinstance(item, dict) and set(item) == {"as_int"} else None
        if not isinstance(n, int) or isinstance(n, bool):
            return None
        out.append(n)
    return out


def _inner_pickle(data: bytes) -> bytes:
    """The `data.pkl` of a nested torch.save zip (for naming what it needs), else the bytes themselves."""
    if not data.startswith(b"PK"):
        return data
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            names = [n for n in inner.namelist() if n.endswith("data.pkl")]
            return inner.read(names[0]) if names else b""
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return b""


def _read(zf: zipfile.ZipFile, listing: ZipListing, name: str) -> bytes:
    return zf.read(listing.entries[name])


def _where(path: Path, listing: ZipListing, name: str) -> str:
    return f"{path}: entry {listing.full(name)!r}"


@contextlib.contextmanager
def guarded_serde(path: Path) -> Iterator[None]:
    """While active, torch's `.pt2` reader cannot unpickle with weights_only=False, pickle.loads,
    load TorchBind objects or AOTInductor libraries, and re-checks every JSON and expression it parses."""
    from torch._export.serde import serialize as serde
    from torch.export.pt2_archive import _package as pkg

    where = str(path)
    real_load, real_bytes_to_dc = torch.load, serde._bytes_to_dataclass
    real_payload_cfg = pkg._load_payload_config
    real_sympy = serde.sympy

    def forced_load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return real_load(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise refusal(where, "a pickle inside the program") from e

    def refuse(what: str):
        def _refuse(*_a, **_k):
            raise refusal(where, what)
        return _refuse

    def artifact(serialized):
        if isinstance(serialized, (dict, tuple)):
            return serialized
        if len(serialized) == 0:
            return {}
        artifact = forced_load(io.BytesIO(serialized))
        if not isinstance(artifact, (tuple, dict)):
            raise BadInputError(f"{where}: a serialized artifact holds a {type(artifact).__name__}, "
                                "expected a tuple or dict; the file is corrupt")
        return artifact

    def bytes_to_dataclass(cls, data):
        check_json_text(data, f"{where}: models json")
        return real_bytes_to_dc(cls, data)

    def payload_config(reader, config_file):
        check_json_text(reader.read_string(config_file), f"{where}: {config_file}")
        return real_payload_cfg(reader, config_file)

    def sympify(expr, *args, **kwargs):
        if isinstance(expr, str):
            check_sym_expr(expr, where)
        return real_sympy.sympify(expr, *args, **kwargs)

    def aoti(*_a, **_k):
        raise BadInputError(f"{where}: AOTInductor compiled code; refused")

    patches = [
        (pkg, "torch", _Proxy(torch, load=forced_load,
                              _C=_Proxy(torch._C, _pickle_load_obj=refuse("a TorchBind object")))),
        (pkg, "pickle", _Proxy(pickle, loads=refuse("an object saved with pickle.dumps"),
                               load=refuse("an object saved with pickle.dump"))),
        (pkg, "_load_aoti", aoti),
        (pkg, "_load_payload_config", payload_config),
        (serde, "deserialize_torch_artifact", artifact),
        (serde, "_bytes_to_dataclass", bytes_to_dataclass),
        (serde, "sympy", _Proxy(real_sympy, sympify=sympify)),
    ]
    with _LOCK:
        saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
        try:
            for mod, name, value in patches:
                setattr(mod, name, value)
            yield
        finally:
            for mod, name, value in saved:
                setattr(mod, name, value)


class _Proxy(types.ModuleType):
    """A stand-in for a module inside one torch module: the overrides, else the real attribute."""

    def __init__(self, real: types.ModuleType, **overrides: Any):
        super().__init__(real.__name__)
        self.__dict__["_real"] = real
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_real"], name)


@contextlib.contextmanager
def captured_torch_export_log() -> Iterator[list[BaseException]]:
    """Keep torch.export's warnings (tracebacks of swallowed errors) off the user's terminal; collect the
    exceptions they carry, since `torch.export.load` replaces the real error with a generic one."""
    logger = logging.getLogger("torch.export")
    errors: list[BaseException] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info and record.exc_info[1] is not None:
                errors.append(record.exc_info[1])

    handlers, propagate = logger.handlers[:], logger.propagate
    logger.handlers = [_Collect(level=logging.WARNING)]
    logger.propagate = False
    try:
        yield errors
    finally:
        logger.handlers = handlers
        logger.propagate = propagate


def check_program(program: torch.export.ExportedProgram, path: Path) -> None:
    """The loaded graph may only call torch operators; names and guards must be plain (checked again,
    now on what torch actually deserialized, before `program.module()` generates code from them)."""
    where = str(path)
    for gm in _graph_modules(program.graph_module):
        for node in gm.graph.nodes:
            _check_node(node, where)
    for guard in getattr(program, "_guards_code", None) or []:
        check_guard(guard, where)


def _graph_modules(root: torch.nn.Module) -> Iterator[torch.fx.GraphModule]:
    for module in root.modules():
        if isinstance(module, torch.fx.GraphModule):
            yield module


def _check_node(node: torch.fx.Node, where: str) -> None:
    if node.op == "call_function":
        _check_target(node.target, node.name, where)
        for key in node.kwargs:
            if not (isinstance(key, str) and key.isidentifier() and key.isascii()):
                check_name(str(key), "keyword name", where)
    elif node.op in ("placeholder", "call_method"):
        if not (isinstance(node.target, str) and node.target.isidentifier() and node.target.isascii()):
            check_name(str(node.target), f"{node.op} name", where)
    elif node.op in ("get_attr", "call_module"):
        check_name(node.target, f"{node.op} target", where)


def _check_target(target: Any, node: str, where: str) -> None:
    if isinstance(target, torch._ops.HigherOrderOperator) or _is_sym_op(target):
        return
    if isinstance(target, torch._ops.OpOverload):
        qualified = target.name().split(".", 1)[0]
        namespace = qualified.split("::", 1)[0]
        if namespace in _ALLOWED_NAMESPACES and qualified not in _DENIED_OPS:
            return
        label = target.name()
    else:
        label = getattr(target, "__qualname__", None) or repr(target)
        label = f"{getattr(target, '__module__', '') or ''}.{label}".lstrip(".")
    raise UnsafePickleError(f"{where}: node {node!r} calls {label}, which is not a built-in torch operator; "
                            "refused because running it could run code from the file; ", *TRUST_HINT)


_SYM: frozenset | None = None


def _is_sym_op(target: Any) -> bool:
    try:
        return target in _sym_ops()
    except TypeError:  # unhashable: not a function
        return False


def _sym_ops() -> frozenset:
    global _SYM
    if _SYM is None:
        try:
            from torch._export.serde.serialize import _SYM_OPS as ops  # private: fall back to our own list
        except ImportError:
            ops = set()
        basics = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                  operator.truediv, operator.mod, operator.pow, operator.neg, operator.pos, operator.eq,
                  operator.ne, operator.lt, operator.le, operator.gt, operator.ge, math.trunc,
                  torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_ite}
        _SYM = frozenset(set(ops) | basics)
    return _SYM
