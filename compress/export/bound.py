"""The independent size bound: what a codebook file of a model should weigh, computed without the file.

    bound = sum over merged tensors of ceil(n * bits / 8)      (indices, packed)
          + their codebooks (at the dtype stored)
          + per-channel scale vectors the export adds          (none today: BatchNorm stays a node)
          + every tensor that is not merged, once              (aliases and shared storage once)
          + the graph of a plain fp32 export of the same model (its file minus its weight data)

It comes from the plan's codebooks and the model's own tensors, so a file that silently stores a
merged tensor dense, or its indices wider than their bits, shows up as a ratio above 1 however the
file describes itself. `ExportReport.bound_bytes` is the other view: per tensor, what the written
graph holds.
"""

from __future__ import annotations

import math

import onnx
import torch
from torch import nn

from ..codebook import Codebooks
from ..errors import CompressError
from ..packing import packed_size
from . import graph as _graph
from ._decode import CODEBOOK_DTYPES
from .report import SizeBound
from .trace import first_line, quiet_exporter, script_onnx

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def merged_bytes(codebooks: Codebooks, codebook_dtype: str = "float32") -> tuple[int, int]:
    """(packed index bytes and outliers, codebook bytes) of every merged tensor; float16 codebooks when
    asked, else each codebook at its own width."""
    index = sum(packed_size(cb.index_count, cb.bits) + cb.outlier_bytes for cb in codebooks.tensors.values())
    narrow = CODEBOOK_DTYPES.get(codebook_dtype, torch.float32)
    width = {cb.name: min(cb.codebook.element_size(), torch.tensor([], dtype=narrow).element_size())
             for cb in codebooks.tensors.values()}
    table = sum(cb.codebook.numel() * width[cb.name] for cb in codebooks.tensors.values())
    return index, table


def model_bound(reference: nn.Module, codebooks: Codebooks, example_inputs, *,
                codebook_dtype: str = "float32") -> SizeBound:
    """The bound of `reference` (the model before merging) tied into `codebooks`.

    Exports `reference` once, plainly (fp32, the exporter's optimizer on, debug metadata dropped as
    in the codebook file), to measure its graph bytes.
    """
    index, table = merged_bytes(codebooks, codebook_dtype)
    skip = set(codebooks.tensors) | set(codebooks.aliases)
    dense, seen = 0, set()
    for name, t in reference.state_dict(keep_vars=True).items():
        if name in skip or not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else name
        if key in seen:
            continue
        seen.add(key)
        dense += t.numel() * t.element_size()
    graph, fp32, note = _plain_graph_bytes(reference, example_inputs)
    return SizeBound(index, table, 0, dense, graph, fp32, note)


def onnx_bound(proto: onnx.ModelProto, file_bytes: int, codebooks: Codebooks) -> SizeBound:
    """The bound of an ONNX model (`file_bytes` on disk) whose initializers `codebooks` names were merged."""
    index, table = merged_bytes(codebooks)
    weights, dense = _weight_bytes(proto), 0
    for t in proto.graph.initializer:
        if t.name not in codebooks.tensors and t.name in weights:
            dense += weights[t.name]
    return SizeBound(index, table, 0, dense, file_bytes - sum(weights.values()), file_bytes)


def _weight_bytes(proto: onnx.ModelProto) -> dict[str, int]:
    """Data bytes of the initializers that count as tensors (floats, and others of 1 KiB or more)."""
    out = {}
    for t in proto.graph.initializer:
        size = _graph.data_size(t)
        if t.data_type in _FLOAT_TYPES or size >= 1024:
            out[t.name] = size
    return out


def _plain_graph_bytes(model: nn.Module, example_inputs) -> tuple[int, int | None, str]:
    """(graph bytes, file bytes, note) of a plain fp32 ONNX export of `model`."""
    from ..execution import as_args, eval_mode

    args = as_args(example_inputs)
    dynamic = tuple({0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() else None for a in args)
    with eval_mode(model), quiet_exporter():
        try:
            if isinstance(model, torch.jit.ScriptModule):
                proto = script_onnx(model, args, fold=True)
            else:
                proto = torch.onnx.export(model, args, dynamo=True, optimize=True, dynamic_shapes=dynamic,
                                          verbose=False).model_proto
        except Exception as e:  # noqa: BLE001 - the exporter raises many types; the bound says it has no graph
            return 0, None, f"no plain fp32 export to measure the graph on ({first_line(e)}): graph bytes not counted"
    _graph.strip_debug_metadata(proto)
    weights = _weight_bytes(proto)
    for t in proto.graph.initializer:
        if t.name in weights:
            t.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(field)
    try:
        skeleton = proto.ByteSize()
    except (ValueError, CompressError):  # pragma: no cover - protobuf's own limits
        return 0, None, "the plain fp32 export is too large to measure: graph bytes not counted"
    # each cleared raw_data field still costs its tag and length prefix in the real file
    graph = skeleton + sum(1 + _varint_size(n) for n in weights.values() if n)
    return graph, graph + sum(weights.values()), ""


def _varint_size(n: int) -> int:
    return max(1, math.ceil(n.bit_length() / 7))
