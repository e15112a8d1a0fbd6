"""Turn the exceptions libraries raise on bad files into one-line `BadInputError`s naming the file.

Only library calls (torch, onnx, safetensors, zipfile) are wrapped, never our own code, so a bug
here still surfaces as itself. Failure types the libraries are known to raise on truncated or
corrupt input map to "truncated or corrupt"; anything else keeps its type name in the message.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import BadInputError, CompressError

# What torch/onnx/zipfile/protobuf raise when a file is cut short or its bytes are garbage.
_CORRUPT = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    struct.error,
    UnicodeDecodeError,
    json.JSONDecodeError,
    pickle.UnpicklingError,
    OverflowError,
    MemoryError,
)


def short(e: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message, cut to `limit` characters."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def library_call(path: Path | str, what: str) -> Iterator[None]:
    """Run a library call on `path`; a failure becomes one BadInputError that names the file.

    >>> with library_call("m.onnx", "reading the ONNX protobuf"):
    ...     open("m.onnx", "rb")
    Traceback (most recent call last):
    ...
    compress.errors.BadInputError: m.onnx: reading the ONNX protobuf failed: No such file or directory
    """
    try:
        yield
    except CompressError:
        raise
    except _CORRUPT as e:
        raise BadInputError(f"{path}: {what} failed, the file is truncated or corrupt "
                            f"({type(e).__name__}: {short(e)})") from e
    except OSError as e:
        raise BadInputError(f"{path}: {what} failed: {e.strerror or short(e)}") from e
    except Exception as e:  # the final catch-all keeps the original type visible
        raise BadInputError(f"{path}: {what} failed ({type(e).__name__}: {short(e)})") from e
