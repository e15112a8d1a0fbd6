"""Recognizing a file by its content: exists and is a regular non-empty file, a pickle stream, where
its pickle bytes are (to name what a refused pickle wanted)."""

from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path

from ..errors import BadInputError
from ._errors import library_call
from .safety.zip import is_zip

_PICKLE_SCAN = 1 << 20


def check_file(path: Path) -> tuple[bytes, int]:
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


def is_pickle(path: Path, head: bytes) -> bool:
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


def pickle_head(path: Path, head: bytes) -> bytes | None:
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

