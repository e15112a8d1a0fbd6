"""Reading ONNX files safely: external data must live inside the model's folder and be complete.

`read_onnx` is how `tie_onnx`, `verify` and `make_session` open ONNX files: through `compress.io.load`
(the toolkit's hardened reader: it parses the protobuf and validates every external reference); the
checks here run on its result too, since onnx and onnxruntime would otherwise follow any `location`
a file names.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import TensorProto

from ..errors import BadInputError, UnsafePickleError
from . import _graph


def read_onnx(path: str | Path, *, load_data: bool = True) -> onnx.ModelProto:
    """The model at `path`, with its external data loaded (`load_data`) after checking every location.

    >>> proto = read_onnx("out/model.onnx")
    """
    from .. import io as cio

    path = Path(path)
    _check_file(path)
    try:
        loaded = cio.load(path)
    except UnsafePickleError as e:
        # an ONNX reader never unpickles, so --trust-pickle (which the refusal suggests) cannot help
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
    for t in _graph._tensors(proto.graph):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        target = (folder / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(folder):
            raise BadInputError(f"{path}: tensor `{t.name}` reads external data from {location!r}, outside "
                                f"the model's folder; refusing to read it")
        if not target.is_file():
            raise BadInputError(f"{path}: external data file {location!r} for tensor `{t.name}` is missing; "
                                f"copy it next to the model")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > target.stat().st_size:
            raise BadInputError(f"{path}: external data file {location!r} is truncated (tensor `{t.name}` "
                                f"needs {end:,} bytes, the file has {target.stat().st_size:,})")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise BadInputError(f"{path}: no such file")
    if not path.is_file():
        raise BadInputError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise BadInputError(f"{path}: the file is empty")
