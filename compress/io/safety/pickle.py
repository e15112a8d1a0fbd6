"""Pickles are read only by torch's weights-only unpickler unless the user trusts the file.

A refused pickle becomes an `UnsafePickleError` that names the file, the archive entry and the
globals the pickle wanted (found by reading its opcodes, never by running it), and tells the user
about trusting the file (`trust_pickle`).
"""

from __future__ import annotations

import contextlib
import io
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ...errors import TRUST, BadInputError, Option, UnsafePickleError
from .._errors import library_call, short
from .pickle_scan import check_pickle_cost

TRUST_HINT = ("pass ", TRUST, " only for files you trust")
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
               "BINUNICODE8"}
_MAX_SCAN = 64 << 20
_SPARSE = "torch._utils._rebuild_sparse_tensor"


def refusal(where: str, detail: str, hint: tuple[str | Option, ...] = TRUST_HINT) -> UnsafePickleError:
    """The error for a pickle we will not run: `where` names the file (and entry)."""
    return UnsafePickleError(f"{where}: refused to unpickle ({detail}): a pickle runs code from the file; ",
                             *hint)


def pickle_globals(data: bytes) -> list[str]:
    """Globals a pickle imports (`GLOBAL`, `INST`, `STACK_GLOBAL`), read from its opcodes without running it.

    >>> pickle_globals(pickle.dumps(len))
    ['builtins.len']
    """
    found: list[str] = []
    strings: list[str] = []
    memo: dict[int, str | None] = {}
    top: str | None = None
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data[:_MAX_SCAN])):
            name = op.name
            if name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            if name in _STRING_OPS and isinstance(arg, str):
                strings.append(arg)
            elif name in ("BINGET", "LONG_BINGET", "GET") and memo.get(arg):
                strings.append(memo[arg])  # type: ignore[arg-type]
            elif name == "MEMOIZE":
                memo[len(memo)] = top
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = top
            top = arg if name in _STRING_OPS and isinstance(arg, str) else None
            if name == "STOP":
                break
    except (ValueError, EOFError, KeyError, pickle.UnpicklingError, UnicodeDecodeError):
        pass  # a damaged tail: report what was readable
    return found


def disallowed_globals(data: bytes) -> list[str]:
    """The globals of `data` that torch's weights-only unpickler would refuse, in order, once each."""
    allowed = _allowed_globals()
    out: list[str] = []
    for g in pickle_globals(data):
        if g not in allowed and g not in out:
            out.append(g)
    return out


def weights_only_load(source: bytes | Path, where: str, *, pickle_bytes: bytes | None = None,
                      mmap: bool = False, hint: tuple[str | Option, ...] = TRUST_HINT) -> Any:
    """`torch.load(weights_only=True)`; a refused pickle raises UnsafePickleError naming `where`.

    `pickle_bytes` is the raw pickle (for a zip, its `data.pkl`): its cost is checked first
    (`pickle_scan`), and it names what a refused pickle needs. `mmap` memory-maps a zip-format file
    instead of reading it.
    """
    if isinstance(source, bytes):
        pickle_bytes = source if pickle_bytes is None else pickle_bytes
    if pickle_bytes is not None:
        scanned = check_pickle_cost(pickle_bytes, where)
        _check_storages(source, scanned.persistent_ids, where)
        if _SPARSE in scanned.globals:  # refused before torch rebuilds (and trusts) its indices
            raise BadInputError(f"{where}: holds a sparse tensor; compress reads dense (strided) tensors only and "
                                "never trusts sparse indices: convert it with .to_dense() and save it again")
    try:
        with _torch_source(source, mmap) as (src, use_mmap), warnings.catch_warnings(), \
                library_call(where, "reading the pickle"):
            warnings.simplefilter("ignore")  # protocol 4/5 and legacy-format chatter
            return torch.load(src, weights_only=True, map_location="cpu", mmap=use_mmap)
    except BadInputError as e:
        cause = e.__cause__
        if isinstance(cause, pickle.UnpicklingError) and "weights only load failed" in str(cause).lower():
            if pickle_bytes is not None and not _parses(pickle_bytes):
                raise BadInputError(f"{where}: not a valid pickle, the file is truncated or "
                                    "corrupt") from cause
            raise refusal(where, _needs(cause, pickle_bytes), hint) from cause
        raise


# bytes per element of the storage types torch.save names (an untyped storage counts bytes)
_STORAGE_BYTES = {"FloatStorage": 4, "DoubleStorage": 8, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
                  "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
                  "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16, "UntypedStorage": 1, "QInt8Storage": 1,
                  "QUInt8Storage": 1, "QInt32Storage": 4}


def _check_storages(source: bytes | Path, pids: list, where: str) -> None:
    """Every storage a zip-format pickle names must be a record of the archive holding its bytes: torch
    memory-maps records and would read a short one's neighbours as tensor data."""
    sizes = _record_sizes(source)
    if sizes is None:
        return
    for pid in pids:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[2], str)):
            continue
        key, numel = pid[2], pid[4]
        element = _STORAGE_BYTES.get(str(pid[1]).rsplit(".", 1)[-1])
        have = sizes.get(f"data/{key}")
        if have is None:
            raise BadInputError(f"{where}: the pickle names storage data/{key[:40]!r}, which the archive does not "
                                "hold; the file is truncated or corrupt")
        if element and isinstance(numel, int) and numel * element > have:
            raise BadInputError(f"{where}: storage data/{key[:40]} needs {numel * element:,} bytes, the archive "
                                f"holds {have:,}; the file is truncated or corrupt")


def _record_sizes(source: bytes | Path) -> dict[str, int] | None:
    """Record name (below the archive's root folder) -> size, for a zip; None for a plain pickle."""
    try:
        if isinstance(source, bytes):
            if not source.startswith(b"PK"):
                return None
            zf = zipfile.ZipFile(io.BytesIO(source))
        else:
            with open(source, "rb") as f:
                if f.read(2) != b"PK":
                    return None
            zf = zipfile.ZipFile(source)
        with zf:
            return {i.filename.split("/", 1)[-1]: i.file_size for i in zf.infolist()}
    except (zipfile.BadZipFile, OSError, ValueError):
        return None  # torch's own reader says what is wrong


def trusted_load(source: Path, where: str) -> Any:
    """`torch.load(weights_only=False)`: only after the user passed trust_pickle=True."""
    with _torch_source(source, False) as (src, _), warnings.catch_warnings(), \
            library_call(where, "unpickling (trusted)"):
        warnings.simplefilter("ignore")
        return torch.load(src, weights_only=False, map_location="cpu")


@contextlib.contextmanager
def _torch_source(source: bytes | Path, mmap: bool) -> Iterator[tuple[Any, bool]]:
    """What to hand torch.load: a path only for mmap, since torch.load sends any path ending in
    `.safetensors` to the safetensors reader whatever the content; otherwise an open file."""
    if isinstance(source, bytes):
        yield io.BytesIO(source), False
    elif mmap and not str(source).endswith(".safetensors"):
        yield str(source), True
    else:
        with open(source, "rb") as f:
            yield f, False


def _parses(data: bytes) -> bool:
    """Whether the first pickle in `data` is a well-formed opcode stream (garbage is corrupt, not unsafe)."""
    try:
        for op, _, _ in pickletools.genops(io.BytesIO(data[:_MAX_SCAN])):
            if op.name == "STOP":
                return True
    except (ValueError, EOFError, KeyError, pickle.UnpicklingError, UnicodeDecodeError):
        return False
    return len(data) >= _MAX_SCAN  # cut by the scan window, not by the file


def _needs(e: BaseException, pickle_bytes: bytes | None) -> str:
    names = [repr(n)[1:-1][:80] for n in disallowed_globals(pickle_bytes)] if pickle_bytes else []
    if names:
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        return "it needs " + ", ".join(names[:3]) + more
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    if m:
        return f"it needs {m.group(1)}"
    m = re.search(r"Unsupported operand (\d+)", str(e))
    if m:
        code = chr(int(m.group(1)))
        op = next((o.name for o in pickletools.opcodes if o.code == code), m.group(1))
        return f"it uses the pickle opcode {op}, which the weights-only reader does not run"
    return short(e)


_ALLOWED: frozenset[str] | None = None


def _allowed_globals() -> frozenset[str]:
    global _ALLOWED
    if _ALLOWED is None:
        try:
            from torch import _weights_only_unpickler as w
            names = set(w._get_allowed_globals())
        except (ImportError, AttributeError):  # a private helper: without it every global is listed
            names = set()
        for g in torch.serialization.get_safe_globals():
            obj = g[0] if isinstance(g, tuple) else g
            names.add(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}")
        _ALLOWED = frozenset(names)
    return _ALLOWED
