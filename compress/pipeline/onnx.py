"""`tie_onnx`: cluster an ONNX model's weights without its PyTorch source, write codebook ONNX, check it.

Float initializers that feed a MatMul, Gemm, Conv or Gather weight slot are the candidates; the
`TieConfig` decides as it does for any model (`exclude`/`include` globs, `min_elements`, `by_name`
overrides; an ONNX graph has no module types, so `by_type` does not apply), and each is clustered by
the same core (`tying.cluster_tensor`), each row decoded from its own codebook row (`Granularity`).
Others stay dense and the report lists them with the reason.

The written file is then run in onnxruntime against the input with the clustered initializers
replaced by their decoded values (the "merged" model: the decode must be exact, within `atol`/`rtol`)
and against the input itself (output error, cosine, top-1 agreement: what clustering cost).

Example::

    result = tie_onnx("model.onnx", "compressed/model.tied.onnx", TieConfig(bits=4))
    result.verified, result.export.vs_bound
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import onnx
import torch

from ..atomic import check_output
from ..codebook import Codebooks, TensorCodebook, index_dtype
from ..errors import BadInputError, Option
from ..export import ExportReport, graph, onnx_bound
from ..export.locate import FLOAT_TYPES
from ..export.onnx import rewrite_onnx
from ..export.report import TensorEntry
from ..io import read_onnx
from ..records import Record
from ..tying import TieConfig, check_finite, cluster_tensor
from ..verify import VerifyResult, verify
from .exports import ExportOptions, check_strict
from .inputs import InputSpec, example_inputs

WEIGHT_SLOTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (1,), "Gather": (0,)}
_ONNX_DTYPES = {1: torch.float32, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16, 7: torch.int64,
                6: torch.int32, 9: torch.bool, 2: torch.uint8, 3: torch.int8}
_BATCH = 2
_OTHER_DYNAMIC = 8


@dataclass
class OnnxTieResult(Record):
    """What `tie_onnx` made: the written file's report and its check in onnxruntime (None: not run)."""

    export: ExportReport
    verification: VerifyResult | None = None
    notes: list[str] = field(default_factory=list)

    _what = "onnx tie result"

    @property
    def verified(self) -> bool | None:
        return None if self.verification is None else self.verification.passed


def tie_onnx(onnx_in: str | Path, onnx_out: str | Path, cfg: TieConfig | None = None, *,
             force: bool = False, export: ExportOptions | None = None, inputs: tuple | None = None
             ) -> OnnxTieResult:
    """Cluster the weights of an ONNX file into codebooks, write the codebook ONNX to `onnx_out`, check it.

    Args:
        onnx_in: the model (external data must sit inside its folder).
        onnx_out: the file to write (never the input).
        cfg: the `TieConfig` (default: 4 bits per tensor); `importance` and `by_type` need a PyTorch model.
        force: overwrite an existing output.
        export: `verify`, `provider`, `atol`/`rtol`, `bound` and `strict` apply (default `ExportOptions()`).
        inputs: the batch to check on (default: random inputs of the graph's input types, batch 2,
            other dynamic dimensions 8).

    Returns:
        `OnnxTieResult`: the `ExportReport` of the written file (per tensor its storage, bytes and
        bound; the independent bound) and the `VerifyResult`.
    """
    cfg, export = cfg or TieConfig(), export or ExportOptions()
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
    merged = _merged(proto, cbs) if export.verify else None
    bound = onnx_bound(proto, sum(f.stat().st_size for f in _input_files(onnx_in)), cbs)
    report = rewrite_onnx(proto, cbs, onnx_out, skipped=skipped, force=force, inputs=[onnx_in])
    if export.bound:
        report.independent_bound = bound
    result = OnnxTieResult(report, notes=[loss.text(onnx_out.name) for loss in report.losses()])
    if merged is not None:
        x = inputs if inputs is not None else graph_inputs(merged)  # token-like ints in [0, 2)
        try:
            result.verification = verify(onnx_out, merged, x, provider=export.provider, atol=export.atol,
                                         rtol=export.rtol, original=onnx_in, measure_runtime=False)
        except BadInputError:
            unrunnable = _unrunnable(onnx_in, x, export.provider)
            if unrunnable is None:  # the input runs and the tied file does not: that is ours to report
                raise
            result.notes.append(f"{onnx_out.name} not checked in onnxruntime: it cannot run the input model "
                                f"either ({unrunnable})")
    if export.strict:
        check_strict([report], onnx_out.parent)
    return result


def _unrunnable(path: Path, inputs, provider: str) -> str | None:
    """Why onnxruntime cannot run the model at `path` (in a child process), or None when it can."""
    try:
        verify(path, path, inputs, provider=provider, measure_runtime=False)
    except BadInputError as e:
        return str(e).split(": ", 1)[-1]
    return None


def graph_inputs(proto: onnx.ModelProto) -> tuple[torch.Tensor, ...]:
    """Seeded example inputs of the graph's input types: batch 2, other dynamic dimensions 8."""
    inits = {t.name for t in proto.graph.initializer}
    specs = []
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dtype = _ONNX_DTYPES.get(tt.elem_type)
        if dtype is None:
            raise BadInputError(f"input `{inp.name}` has an element type this check cannot make; give inputs (",
                                Option("data"), " or ", Option("input_shape"), ")")
        shape = tuple(d.dim_value if d.HasField("dim_value") else (_BATCH if i == 0 else _OTHER_DYNAMIC)
                      for i, d in enumerate(tt.shape.dim))
        specs.append(InputSpec(str(dtype).removeprefix("torch."), shape))
    return example_inputs(specs)


def _merged(proto: onnx.ModelProto, cbs: Codebooks) -> onnx.ModelProto:
    """A copy of `proto` whose clustered initializers hold their decoded (shared) values."""
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for t in out.graph.initializer:
        cb = cbs.tensors.get(t.name)
        if cb is not None:
            value = cb.decode().detach()
            t.CopyFrom(numpy_helper.from_array(value.float().numpy().astype(numpy_helper.to_array(t).dtype), t.name))
    return out


def _input_files(path: Path) -> list[Path]:
    """The .onnx file and the external data files it names (checked inside its folder by `read_onnx`)."""
    files = {path}
    for t in read_onnx(path, load_data=False).graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                files.add(path.parent / e.value)
    return sorted(files)


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
