"""An ONNX model read whole, with its external data, for onnxruntime and the ONNX tie.

`read_onnx` opens the file through `load` (the toolkit's hardened reader: it parses the protobuf and
validates every external reference) and checks the external data again before loading it, since
onnx and onnxruntime would otherwise follow any `location` a file names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BadInputError, UnsafePickleError
from .load import load
from .onnx import all_tensors

if TYPE_CHECKING:
    import onnx


def read_onnx(path: str | Path, *, load_data: bool = True) -> onnx.ModelProto:
    """The model at `path`, with its external data loaded (`load_data`) after checking every location.

    Example::

        proto = read_onnx("compressed/digits_mlp.onnx")
    """
    import onnx


    path = Path(path)
    _check_onnx_file(path)
    try:
        loaded = load(path)
    except UnsafePickleError as e:
        # an ONNX reader never unpickles, so trusting the file (which the refusal suggests) cannot help
        raise BadInputError(f"{path}: not an ONNX model (it holds a pickle, which is never unpickled here: "
                            "it would run code); give an .onnx file") from e
    if loaded.kind != "onnx" or loaded.onnx_model is None:
        raise BadInputError(f"{path}: not an ONNX model (read as {loaded.kind}); give an .onnx file")
    proto = loaded.onnx_model
    check_external_data(proto, path)
    if load_data:
        onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
    return proto


def check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse external data outside the model's folder, missing files and ranges past their end."""
    folder = path.resolve().parent
    for t in all_tensors(proto):
        if t.data_location != 1:  # EXTERNAL
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        target = (folder / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(folder) or "_ORT_MEM_ADDR_" in location:
            raise BadInputError(f"{path}: tensor `{t.name}` reads external data from {location!r}, outside "
                                f"the model's folder; refusing to read it")
        if not target.is_file():
            raise BadInputError(f"{path}: external data file {location!r} for tensor `{t.name}` is missing; "
                                f"copy it next to the model")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > target.stat().st_size:
            raise BadInputError(f"{path}: external data file {location!r} is truncated (tensor `{t.name}` "
                                f"needs {end:,} bytes, the file has {target.stat().st_size:,})")


def _check_onnx_file(path: Path) -> None:
    if not path.exists():
        raise BadInputError(f"{path}: no such file")
    if not path.is_file():
        raise BadInputError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise BadInputError(f"{path}: the file is empty")
