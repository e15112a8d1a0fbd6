"""`tie_onnx`: cluster an ONNX model's weights without its PyTorch source, and write codebook ONNX.

Float initializers that feed a MatMul, Gemm, Conv or Gather weight slot are the candidates; the
`TieConfig` decides as it does for any model (`exclude`/`include` globs, `min_elements`, `by_name`
overrides; an ONNX graph has no module types, so `by_type` does not apply), and each is clustered by
the same core (`tying.cluster_tensor`). Others stay dense and the report lists them with the reason.

Example::

    report = tie_onnx("model.onnx", "compressed/model.tied.onnx", TieConfig(bits=4))
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import torch

from ..atomic import check_output
from ..codebook import Codebooks, TensorCodebook, index_dtype
from ..errors import BadInputError, Option
from ..export import graph
from ..export.onnx import FLOAT_TYPES, rewrite_onnx
from ..export.report import ExportReport, TensorEntry
from ..io import read_onnx
from ..tying import TieConfig, check_finite, cluster_tensor

WEIGHT_SLOTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (1,), "Gather": (0,)}


def tie_onnx(onnx_in: str | Path, onnx_out: str | Path, cfg: TieConfig | None = None, *,
             force: bool = False) -> ExportReport:
    """Cluster the weights of an ONNX file into codebooks and write the codebook ONNX to `onnx_out`.

    Args:
        onnx_in: the model (external data must sit inside its folder).
        onnx_out: the file to write (never the input).
        cfg: the `TieConfig` (default: 4 bits per tensor); `importance` and `by_type` need a PyTorch model.
        force: overwrite an existing output.

    Returns:
        the `ExportReport` of the written file: per tensor its storage, bytes and bound.
    """
    cfg = cfg or TieConfig()
    if cfg.importance:
        raise BadInputError(f"{onnx_in}: importance weighting needs the PyTorch model and data; an ONNX file is "
                            "tied post-training (drop ", Option("importance"), ")")
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    check_output(onnx_out, force=force, inputs=[onnx_in])
    proto = read_onnx(onnx_in)
    chosen, skipped = _candidates(proto, cfg)
    cbs = Codebooks()
    for init in chosen:
        cbs.tensors[init.name] = _cluster(init, cfg)
    return rewrite_onnx(proto, cbs, onnx_out, skipped=skipped, force=force, inputs=[onnx_in])


def _candidates(proto, cfg: TieConfig) -> tuple[list, list[TensorEntry]]:
    weights = set()
    for node in graph.all_nodes(proto.graph):
        for slot in WEIGHT_SLOTS.get(node.op_type, ()):
            if slot < len(node.input):
                weights.add(node.input[slot])
    chosen, skipped = [], []
    for t in proto.graph.initializer:
        if t.data_type not in FLOAT_TYPES:
            continue
        reason = _reason_to_skip(t, cfg, t.name in weights)
        if reason is None:
            chosen.append(t)
        else:
            size = graph.data_size(t)
            skipped.append(TensorEntry(t.name, list(t.dims), "dense", size, size, note=f"left dense: {reason}"))
    return chosen, skipped


def _reason_to_skip(t, cfg: TieConfig, is_weight: bool) -> str | None:
    if any(fnmatchcase(t.name, pattern) for pattern in cfg.exclude):
        return "excluded"
    if not cfg.resolved(t.name, None).enabled:
        return "disabled by a by_name override"
    if any(fnmatchcase(t.name, pattern) for pattern in cfg.include):
        return None
    if graph.numel(t) < max(cfg.min_elements, 1):
        return f"fewer than {cfg.min_elements:,} elements"
    if not is_weight:
        return "not a MatMul/Gemm/Conv/Gather weight"
    return None


def _cluster(init, cfg: TieConfig) -> TensorCodebook:
    from onnx import numpy_helper

    values = numpy_helper.to_array(init)
    dtype = FLOAT_TYPES[init.data_type]
    w = torch.from_numpy(np.ascontiguousarray(values).astype(np.float64))
    check_finite(init.name, w)
    c = cluster_tensor(w, cfg.resolved(init.name, None), name=init.name)
    k = max(len(np.unique(row)) for row in c.centers)  # rows padded with repeats need no more columns
    codebook = torch.from_numpy(c.centers[:, :k]).to(dtype)
    indices = torch.from_numpy(c.labels.astype(np.int64)).to(index_dtype(k))
    return TensorCodebook(init.name, tuple(int(d) for d in init.dims), c.grain.kind, codebook, indices,
                          c.grain.group_size)
