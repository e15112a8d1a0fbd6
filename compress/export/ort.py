"""ORT format (`.ort`, onnxruntime's flatbuffer format for mobile and minimal builds) that keeps the codebooks.

onnxruntime's own converter (`python -m onnxruntime.tools.convert_onnx_models_to_ort`, defaults)
constant-folds the `Cast -> Gather` decode, so the codebook model becomes a dense one (measured: the
tied digits CNN, 10,359 B as ONNX, became a 47,384 B `.ort`, larger than its fp32 ONNX). `export_ort`
converts with constant folding off, so the `.ort` stores codebooks and indices as the ONNX does.

The ORT format has no 4-bit or 2-bit tensor type (onnxruntime 1.32 refuses a UINT4 initializer in an
`.ort` file), so UINT4/UINT2 index initializers are stored as uint8 bytes holding the same packed
bits, with a small in-graph unpack (BitShift, BitwiseAnd, Reshape: standard ops) in front of their
consumer: the index bytes stay ceil(n * bits / 8); the unpack nodes cost a few hundred bytes, which the
report states.

An `.ort` model is loaded without graph optimizations (onnxruntime applies them when the file is
written, not when it is read), so the decode runs at every inference, as in the keep-compressed mode
of `compress.runtime`: the weights stay compressed in memory, each run decodes them.

Example::

    report = export_ort("compressed/digits_cnn.onnx", "compressed/digits_cnn.ort")
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..atomic import atomic_outputs, check_output, staging_dir
from ..errors import UnsupportedModelError
from ..io import read_onnx
from . import graph as _graph
from .report import ExportReport

SUB_BYTE = {TensorProto.UINT4: 4, TensorProto.UINT2: 2}
EXTERNAL_THRESHOLD = 1_800_000_000  # protobuf cannot hold 2 GiB


def export_ort(onnx_path: str | Path, ort_path: str | Path, *, force: bool = False) -> ExportReport:
    """Convert a codebook ONNX file to ORT format without folding its decode into dense weights.

    Args:
        onnx_path: the ONNX file (`export_onnx`'s output, or any ONNX model).
        ort_path: the `.ort` file to write (atomically).
        force: overwrite an existing output.

    Returns:
        an `ExportReport` (format "ort") with the file size and a note per sub-byte index tensor
        stored as packed uint8.
    """
    onnx_path, ort_path = Path(onnx_path), Path(ort_path)
    check_output(ort_path, force=force, inputs=[onnx_path])
    proto = read_onnx(onnx_path)
    notes = _repack_sub_byte(proto)
    with staging_dir(ort_path.parent) as tmp:
        source = Path(tmp) / "model.onnx"
        large = proto.ByteSize() > EXTERNAL_THRESHOLD
        onnx.save(proto, str(source), save_as_external_data=large, location="model.onnx.data")
        with atomic_outputs([ort_path], force=force, inputs=[onnx_path]) as (out,):
            _convert(source, out)
    size = ort_path.stat().st_size
    return ExportReport("ort", str(ort_path), size, 0, 0, files=[str(ort_path)], opset=_opset(proto), notes=notes)


def _convert(source: Path, out: Path) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # basic: no hardware-specific layouts (NCHWc) in the file; constant folding off: the decode stays
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
    opts.add_session_config_entry("session.save_model_format", "ORT")
    opts.optimized_model_filepath = str(out)
    try:
        ort.InferenceSession(str(source), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types (Fail, InvalidGraph, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedModelError(f"{source.name}: onnxruntime could not convert the model to ORT format: "
                                    f"{first}") from e


def _repack_sub_byte(proto: onnx.ModelProto) -> list[str]:
    """Replace each UINT4/UINT2 initializer by packed uint8 bytes and an unpack; returns the notes."""
    g = proto.graph
    namer = _graph.Namer(proto)
    notes, nodes, kept = [], [], []
    consts: dict[tuple, str] = {}
    for t in g.initializer:
        bits = SUB_BYTE.get(t.data_type)
        if bits is None:
            kept.append(t)
            continue
        packed = np.frombuffer(_graph.tensor_bytes(t), dtype=np.uint8)
        name = namer(f"{t.name}.packed")
        kept.append(numpy_helper.from_array(packed.copy(), name))
        before = sum(n.ByteSize() for n in nodes)
        nodes += _unpack(name, t.name, bits, list(t.dims), packed.size, namer, kept, consts)
        cost = sum(n.ByteSize() for n in nodes) - before
        notes.append(f"`{t.name}`: UINT{bits} indices stored as packed uint8 ({packed.size:,} bytes, the same bits) "
                     f"with an in-graph unpack of about {cost:,} bytes: the ORT format has no {bits}-bit type")
    del g.initializer[:]
    g.initializer.extend(kept)
    for node in reversed(nodes):
        g.node.insert(0, node)
    return notes


def _unpack(packed: str, out: str, bits: int, dims: list[int], nbytes: int, namer, inits: list,
            consts: dict[tuple, str]) -> list:
    """uint8 [nbytes] -> uint8 indices with `dims` (element i in bits i*bits.. of the stream, lsb first).

    Constants with the same value are shared by every unpack (`consts`)."""
    per = 8 // bits
    n = math.prod(dims)

    def const(value: np.ndarray, base: str) -> str:
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in consts:
            consts[key] = namer(f"unpack.{base}")
            inits.append(numpy_helper.from_array(value, consts[key]))
        return consts[key]

    shifts = const(np.arange(per, dtype=np.uint8).reshape(1, per) * bits, "shifts")
    mask = const(np.array((1 << bits) - 1, dtype=np.uint8), "mask")
    column = const(np.array([nbytes, 1], dtype=np.int64), "column")
    flat = const(np.array([-1], dtype=np.int64), "flat")
    count = const(np.array([n], dtype=np.int64), "count")
    start = const(np.array([0], dtype=np.int64), "start")
    shape = const(np.array(dims, dtype=np.int64), "shape")
    v = {k: namer(f"{packed}.{k}") for k in ("col", "shifted", "masked", "flat", "cut")}
    return [
        helper.make_node("Reshape", [packed, column], [v["col"]]),
        helper.make_node("BitShift", [v["col"], shifts], [v["shifted"]], direction="RIGHT"),
        helper.make_node("BitwiseAnd", [v["shifted"], mask], [v["masked"]]),
        helper.make_node("Reshape", [v["masked"], flat], [v["flat"]]),
        helper.make_node("Slice", [v["flat"], start, count], [v["cut"]]),
        helper.make_node("Reshape", [v["cut"], shape], [out]),
    ]


def _opset(proto: onnx.ModelProto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
