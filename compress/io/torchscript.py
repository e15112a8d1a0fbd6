"""TorchScript archives (`torch.jit.save`): TorchScript is code, so its weights are read without it.

`torch.jit.load` compiles the archive's `code/` and runs it while loading: a class's
`@torch.jit.export def __setstate__` runs on load and may call any TorchScript operator
(`torch.save` writes files, a `while True` hangs). So without `trust_pickle` the archive is never
given to `torch.jit.load`. Its entries are allow-listed (after the zip checks every archive gets),
its `code/` files are parsed with `ast` (never compiled or run) only to learn each class's
parameter and buffer names and what code it carries, and `data.pkl` is read by a restricted
unpickler that builds only inert stand-ins for TorchScript objects and tensors over storages read
from the archive, each view checked against its storage (`safety.tensors`). The result has the
weights (`tensors`, named as `state_dict()` names them) and no module; `untrusted_code` says what
was not run, and running the model needs `trust_pickle=True`.
"""

from __future__ import annotations

import ast
import collections
import io
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import TRUST, BadInputError, UnsafePickleError
from ._errors import library_call, short
from .loaded import Loaded, find_aliases
from .safety.pickle_scan import check_pickle_cost
from .safety.tensors import check_view
from .safety.zip import ZipListing

_ENTRY = re.compile(r"(data\.pkl|constants\.pkl|traced_inputs\.pkl|bytecode\.pkl|version|byteorder|\.data/[\w.\-]+"
                    r"|(data|constants|traced_inputs)/\d+|code/[\w./\-]+\.py(\.debug_pkl)?|extra/.+)\Z")
_MAX_CODE = 64 << 20  # bytes of code/ parsed in all
_STORAGES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}
_IDENTITY = {"torch.jit._pickle.build_intlist", "torch.jit._pickle.build_doublelist",
             "torch.jit._pickle.build_boollist", "torch.jit._pickle.build_tensorlist",
             "torch.jit._pickle.build_complexlist"}


def load_torchscript(path: Path, zf: zipfile.ZipFile, listing: ZipListing, trust: bool) -> Loaded:
    """A TorchScript archive: with `trust`, `torch.jit.load` (runs its code); otherwise its weights only."""
    if trust:
        with warnings.catch_warnings(), library_call(path, "torch.jit.load"):
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location="cpu")
        tensors = dict(module.state_dict())
        return Loaded(path=path, kind="torchscript", tensors=tensors, aliases=find_aliases(tensors.items()),
                      module=module)
    _check_entries(path, listing, zf)
    code = _read_code(path, listing, zf)
    root = _ScriptUnpickler.read(path, listing, zf, code)
    tensors: dict[str, torch.Tensor] = {}
    _collect(root, "", tensors, code, path, depth=0)
    return Loaded(path=path, kind="torchscript", tensors=tensors, aliases=find_aliases(tensors.items()),
                  untrusted_code=code.describe(), notes=[code.note(path)])


# --- the archive's entries and code --------------------------------------------------------------------

def _check_entries(path: Path, listing: ZipListing, zf: zipfile.ZipFile) -> None:
    for name in listing.entries:
        if not _ENTRY.match(name):
            raise BadInputError(f"{path}: unexpected entry {listing.full(name)!r} in a TorchScript archive; refused")
    if "byteorder" in listing.entries:
        order = zf.read(listing.entries["byteorder"]).decode("utf-8", "replace").strip()
        if order != "little":
            raise BadInputError(f"{path}: TorchScript archive byte order {order[:20]!r}; only little-endian "
                                "archives are read")


@dataclass
class _Class:
    parameters: list[str] | None = None
    buffers: list[str] | None = None
    module: bool = False
    methods: list[str] = field(default_factory=list)


@dataclass
class _Code:
    classes: dict[str, _Class] = field(default_factory=dict)
    functions: int = 0
    unparsed: list[str] = field(default_factory=list)

    @property
    def methods(self) -> int:
        return sum(len(c.methods) for c in self.classes.values())

    def with_method(self, method: str) -> list[str]:
        return [q for q, c in self.classes.items() if method in c.methods]

    def describe(self) -> str:
        """What the archive would run, for messages: 'TorchScript code (N classes, M methods, ...)'."""
        parts = [f"{len(self.classes)} class{'es' if len(self.classes) != 1 else ''}",
                 f"{self.methods} method{'s' if self.methods != 1 else ''}"]
        if self.functions:
            parts.append(f"{self.functions} function{'s' if self.functions != 1 else ''}")
        hooks = self.with_method("__setstate__")
        if hooks:
            parts.append("__setstate__ (runs on load) in " + ", ".join(hooks[:3]) + (" ..." if len(hooks) > 3 else ""))
        return f"TorchScript code ({', '.join(parts)})"

    def note(self, path: Path) -> str:
        return (f"{path.name} is TorchScript, which is code: its {self.describe()} was not run; the weights were "
                "read without it")


def _read_code(path: Path, listing: ZipListing, zf: zipfile.ZipFile) -> _Code:
    """Classes and their parameter/buffer names, read with `ast` from `code/*.py` (nothing is compiled)."""
    code = _Code()
    total = 0
    for name, info in listing.entries.items():
        if not (name.startswith("code/") and name.endswith(".py")):
            continue
        total += info.file_size
        if total > _MAX_CODE:
            raise BadInputError(f"{path}: the TorchScript code is larger than {_MAX_CODE >> 20} MiB; refused")
        module = "__torch__" if name == "code/__torch__.py" else name[len("code/"):-len(".py")].replace("/", ".")
        try:
            tree = ast.parse(zf.read(info).decode("utf-8"))
        except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
            code.unparsed.append(name)
            continue
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                code.classes[f"{module}.{node.name}"] = _class_info(node)
            elif isinstance(node, ast.FunctionDef):
                code.functions += 1
    return code


def _class_info(node: ast.ClassDef) -> _Class:
    info = _Class(module=any(isinstance(b, ast.Name) and b.id == "Module" for b in node.bases))
    for item in node.body:
        if isinstance(item, ast.FunctionDef):
            info.methods.append(item.name)
        elif isinstance(item, ast.Assign) and len(item.targets) == 1 and isinstance(item.targets[0], ast.Name):
            key = item.targets[0].id
            if key in ("__parameters__", "__buffers__"):
                names = _string_list(item.value)
                setattr(info, key.strip("_"), names)
    return info


def _string_list(node: ast.AST) -> list[str] | None:
    if isinstance(node, ast.List) and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
        return [e.value for e in node.elts]
    return None


# --- data.pkl, read without running anything ------------------------------------------------------------

class _ScriptObject:
    """An inert stand-in for a TorchScript object: its class name and the state the pickle gave it."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Storage:
    def __init__(self, key: str, data: torch.Tensor):
        self.key, self.data = key, data


class _ScriptUnpickler(pickle.Unpickler):
    """Builds `_ScriptObject`s, tensors over checked storages, lists and dicts; refuses every other global."""

    def __init__(self, data: bytes, path: Path, listing: ZipListing, zf: zipfile.ZipFile, code: _Code):
        super().__init__(io.BytesIO(data))
        self.path, self.listing, self.zf, self.code = path, listing, zf, code
        self.classes: dict[str, type] = {}
        self.storages: dict[str, _Storage] = {}

    @classmethod
    def read(cls, path: Path, listing: ZipListing, zf: zipfile.ZipFile, code: _Code) -> Any:
        if "data.pkl" not in listing.entries:
            raise BadInputError(f"{path}: TorchScript archive without data.pkl; the file is corrupt")
        data = zf.read(listing.entries["data.pkl"])
        where = f"{path}: entry {listing.full('data.pkl')!r}"
        check_pickle_cost(data, where)
        try:
            return cls(data, path, listing, zf, code).load()
        except BadInputError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
                UnicodeDecodeError, OverflowError, MemoryError, RecursionError) as e:
            raise BadInputError(f"{where}: not a valid TorchScript pickle, the file is truncated or corrupt "
                                f"({type(e).__name__}: {short(e)})") from e

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if module == "__torch__" or module.startswith("__torch__."):
            if module.startswith("__torch__.torch.classes"):
                self._refuse(f"a TorchBind object ({full}), which is native code")
            if full not in self.classes:
                self.classes[full] = type(name, (_ScriptObject,), {"qualname": full, "__module__": __name__})
            return self.classes[full]
        if full in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor"):
            return self._rebuild_tensor
        if full == "torch._utils._rebuild_parameter":
            return lambda data, *_: data
        if full == "collections.OrderedDict":
            return collections.OrderedDict
        if full in _IDENTITY:
            return lambda value: value
        if full == "torch.jit._pickle.restore_type_tag":
            return lambda value, _type: value
        if module == "torch" and name in _STORAGES:
            return _STORAGES[name]
        self._refuse(f"it needs {full[:80]}")

    def persistent_load(self, pid: Any) -> _Storage:
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage" or not isinstance(pid[1], torch.dtype)
                or not isinstance(pid[2], str) or not isinstance(pid[4], int) or pid[4] < 0):
            raise BadInputError(f"{self.path}: TorchScript data.pkl has an invalid storage reference "
                                f"{str(pid)[:80]}; the file is corrupt")
        _, dtype, key, _, numel = pid
        if key not in self.storages:
            self.storages[key] = _Storage(key, self._read_storage(key, dtype, numel))
        storage = self.storages[key]
        if storage.data.dtype != dtype or storage.data.numel() < numel:
            raise BadInputError(f"{self.path}: storage data/{key} is referenced with two different types or "
                                "sizes; the file is corrupt")
        return storage

    def _read_storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        entry = f"data/{key}"
        info = self.listing.entries.get(entry)
        size = torch.empty((), dtype=dtype).element_size()
        if info is None or info.file_size < numel * size:
            have = "missing" if info is None else f"{info.file_size} bytes"
            raise BadInputError(f"{self.path}: storage {entry!r} needs {numel * size} bytes, the archive has {have}; "
                                "the file is truncated or corrupt")
        buf = torch.empty(numel * size, dtype=torch.uint8)
        with library_call(self.path, f"reading zip entry {entry!r}"), self.zf.open(info) as f:
            got = f.readinto(memoryview(buf.numpy())) if numel else 0
        if got != numel * size:
            raise BadInputError(f"{self.path}: storage {entry!r} ends early; the file is truncated or corrupt")
        return buf.view(dtype)

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> torch.Tensor:
        if not isinstance(storage, _Storage) or not isinstance(size, tuple) or not isinstance(stride, tuple):
            raise BadInputError(f"{self.path}: TorchScript data.pkl rebuilds a tensor from invalid arguments; the "
                                "file is corrupt")
        check_view(str(self.path), f"data/{storage.key}", size, stride, offset, storage.data.numel())
        return torch.as_strided(storage.data, size, stride, offset)

    def _refuse(self, detail: str):
        raise UnsafePickleError(f"{self.path}: entry {self.listing.full('data.pkl')!r}: refused to unpickle "
                                f"({detail}); TorchScript is code and runs when loaded; pass ", TRUST,
                                " only for files you trust")


_MAX_MODULE_DEPTH = 1000


def _collect(obj: Any, prefix: str, out: dict[str, torch.Tensor], code: _Code, path: Path, depth: int) -> None:
    """state_dict names: each module's parameters, then its buffers, then its submodules, recursively."""
    if not isinstance(obj, _ScriptObject):
        raise BadInputError(f"{path}: TorchScript data.pkl holds a {type(obj).__name__} where a module was "
                            "expected; the file is corrupt")
    if depth > _MAX_MODULE_DEPTH:
        raise BadInputError(f"{path}: TorchScript modules nested more than {_MAX_MODULE_DEPTH} deep; refused")
    state = getattr(obj, "state", None)
    info = code.classes.get(obj.qualname, _Class())
    if not isinstance(state, dict):
        hook = "__setstate__" in info.methods
        raise UnsafePickleError(f"{path}: TorchScript module {(prefix.rstrip('.') or 'model')!r} ({obj.qualname}) "
                                f"restores its state with {'its __setstate__ method' if hook else 'code'}, which "
                                "runs when loaded; its weights cannot be named without running it; pass ", TRUST,
                                " only for files you trust")
    if info.parameters is None or info.buffers is None:  # code not parsed: every tensor attribute
        names = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
    else:
        names = [*info.parameters, *info.buffers]
    for name in names:
        value = state.get(name)
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
    for name, value in state.items():
        if isinstance(value, _ScriptObject) and _is_module(value, code):
            _collect(value, f"{prefix}{name}.", out, code, path, depth + 1)


def _is_module(obj: _ScriptObject, code: _Code) -> bool:
    info = code.classes.get(obj.qualname)
    if info is not None:
        return info.module
    return isinstance(getattr(obj, "state", None), dict) and "training" in obj.state
