"""ONNX export with every merged tensor stored as its codebook plus narrow indices.

`export_onnx` traces the merged model with each decode as one placeholder node (`trace.py`), lets
the exporter optimize the rest of the graph, then replaces each placeholder by the real decode
(`_decode.py`): a codebook initializer, an index initializer in the narrowest type, and
`Cast -> [+ row offsets] -> Gather`, with the layout ops the graph applies to the weight moved onto
the indices (`layout.py`). Whatever the exporter does after the decode (reorder an LSTM's gates,
transpose, reshape, concatenate) runs on indices or after the gather: nothing is folded into a dense
constant. A tensor the tracer could not mark is looked for by value (`locate.py`); one that still
ends up dense is named in the report with the bytes it costs (`ExportReport.densified`).

`rewrite_onnx` writes the codebook form of an existing ONNX graph whose initializers were clustered
without the PyTorch model (`compress.pipeline.tie_onnx`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from onnx import helper
from torch import nn

from ..atomic import atomic_outputs, check_output
from ..codebook import Codebooks, TensorCodebook
from ..errors import BadInputError, UnsupportedModelError
from ..packing import packed_size
from . import graph as _graph
from ._decode import (
    CODEBOOK_DTYPES,
    MIN_OPSET,
    Constants,
    Decoder,
    IndexLayout,
    choose_layout,
    native_layout,
    packed_overhead,
)
from .affine import fold_batchnorm
from .baked import StoredIndex
from .layout import replace_placeholders
from .locate import FLOAT_TYPES, dense_tie_targets, locate_by_value
from .report import ExportReport, TensorEntry
from .runtime_form import runtime_form
from .trace import DOMAIN, is_placeholder, placeholder, placeholder_tensor, trace_onnx

EXTERNAL_THRESHOLD = 1_800_000_000  # protobuf cannot hold 2 GiB: larger models use external data


def export_onnx(model: nn.Module | torch.export.ExportedProgram, codebooks: Codebooks, path: str | Path,
                example_inputs, *, codebook_dtype: str = "float32", dedup: bool = True, force: bool = False,
                external_data: bool | None = None) -> ExportReport:
    """Export a merged model to ONNX with codebook storage; returns what was written, tensor by tensor.

    Args:
        model: the merged model (`merge_` output, or a merged `.pt2` program / its `.module()`).
        codebooks: the merged tensors (`merge_`'s return, or `codebooks_from_state_dict(model)`).
        path: the `.onnx` file to write (plus `<path>.data` when the model uses external data).
        example_inputs: a tensor or tuple of tensors; dimension 0 is exported as a dynamic batch.
        codebook_dtype: "float32", or "float16" to halve codebooks (a Cast restores the weight dtype).
        dedup: store identical (or transposed-identical) initializers once.
        force: overwrite existing output files.
        external_data: store tensors in `<path>.data`; default: only when the model exceeds 1.8 GB.

    Example::

        codebooks = merge_(model, plan)
        report = export_onnx(model, codebooks, "out/model.onnx", torch.rand(1, 64))
        print(report.file_bytes, report.bound_bytes, report.losses())
    """
    path = Path(path)
    stored = _codebook_dtype(codebook_dtype)
    _check_codebooks(codebooks)
    check_output(path, force=force)
    layouts = {n: choose_layout(cb, packed_overhead(cb)) for n, cb in codebooks.tensors.items()}
    opset = max([MIN_OPSET.get(lay.onnx_type, 0) for lay in layouts.values()], default=0) or None
    proto, hooked = trace_onnx(model, codebooks, example_inputs, opset)
    _graph.strip_debug_metadata(proto)
    notes, widened = _raise_opset(proto, opset or 0, layouts)  # a TorchScript export stops at opset 20
    job = _Job(proto, codebooks, layouts, stored, _fixed_batch_notes(proto) + notes)
    job.widened = widened
    traced = {placeholder_tensor(n) for n in _graph.all_nodes(proto.graph) if is_placeholder(n)}
    job.unused = hooked - traced  # hooked but never decoded: the forward pass does not read it
    # also traced ones: a declared alias may hold a separate dense copy of a merged tensor
    locate_by_value(proto, codebooks, list(codebooks.tensors), dense_tie_targets(model, codebooks), job.namer)
    return job.write(path, dedup=dedup, force=force, external_data=external_data)


def rewrite_onnx(proto: onnx.ModelProto, codebooks: Codebooks, path: str | Path, *,
                 skipped: Sequence[TensorEntry] = (), force: bool = False, inputs: Sequence[Path] = ()
                 ) -> ExportReport:
    """Write `proto` with each initializer named in `codebooks` stored as its codebook + indices.

    For an ONNX model without its PyTorch source (`compress.pipeline.tie_onnx`): the initializer
    keeps its name as the output of its decode; the model's opset is raised when sub-byte index
    types need it (or the indices fall back to UINT8, with a note). `skipped` lists tensors left
    dense on purpose, with the reason, for the report.
    """
    _check_codebooks(codebooks)
    layouts = {n: choose_layout(cb, packed_overhead(cb)) for n, cb in codebooks.tensors.items()}
    needed = max([MIN_OPSET.get(lay.onnx_type, 0) for lay in layouts.values()], default=0)
    notes, widened = _raise_opset(proto, needed, layouts)
    g = proto.graph
    for field_ in (g.initializer, g.input):  # (an initializer may be listed as an input too: its default)
        kept = [t for t in field_ if t.name not in codebooks.tensors]
        del field_[:]
        field_.extend(kept)
    for name in reversed(list(codebooks.tensors)):
        g.node.insert(0, placeholder(name, name))
    job = _Job(proto, codebooks, layouts, None, notes)
    job.skipped, job.widened = list(skipped), widened
    return job.write(Path(path), dedup=True, force=force, external_data=None, inputs=inputs)


# --- the export -----------------------------------------------------------------------------------

def _codebook_dtype(name: str) -> torch.dtype:
    if name not in CODEBOOK_DTYPES:
        raise BadInputError(f"codebook dtype {name!r} is not supported; use one of {', '.join(CODEBOOK_DTYPES)}")
    return CODEBOOK_DTYPES[name]


def _check_codebooks(codebooks: Codebooks) -> None:
    for name, cb in codebooks.tensors.items():
        if cb.codebook.dtype not in (torch.float32, torch.float16, torch.float64, torch.bfloat16):
            raise BadInputError(f"`{name}`: codebook dtype {cb.codebook.dtype} is not a float type")
        if tuple(cb.indices.shape) != cb.index_shape:
            raise BadInputError(f"`{name}`: indices have shape {tuple(cb.indices.shape)}, expected {cb.index_shape}")
        if cb.indices.numel() and (int(cb.indices.min()) < 0 or int(cb.indices.max()) >= cb.k):
            raise BadInputError(f"`{name}`: indices must lie in 0..{cb.k - 1} for a codebook of {cb.k} values")


def _fixed_batch_notes(proto: onnx.ModelProto) -> list[str]:
    notes = []
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            notes.append(f"input `{inp.name}` has a fixed batch size {dims[0].dim_value} (the model or its "
                         f".pt2 specializes it; export the .pt2 with a dynamic batch Dim to lift this)")
    return notes


@dataclass
class _Job:
    """One rewrite of a graph with decode placeholders into codebook storage."""

    proto: onnx.ModelProto
    codebooks: Codebooks
    layouts: dict[str, IndexLayout]
    stored: torch.dtype | None  # codebook dtype in the file; None: the tensor's own
    notes: list[str]
    skipped: list[TensorEntry] = field(default_factory=list)
    unused: set[str] = field(default_factory=set)
    widened: set[str] = field(default_factory=set)  # tensors whose indices a fallback stored wider

    def __post_init__(self) -> None:
        self.namer = _graph.Namer(self.proto)

    def write(self, path: Path, *, dedup: bool, force: bool, external_data: bool | None,
              inputs: Sequence[Path] = ()) -> ExportReport:
        g = self.proto.graph
        consts = Constants(self.namer)
        decoders = {n: Decoder(cb, self.layouts[n], self.stored or cb.codebook.dtype).named(self.namer)
                    for n, cb in self.codebooks.tensors.items()}
        placement = replace_placeholders(self.proto, decoders, self.namer, consts)
        self.moved = placement.moved
        for value in fold_batchnorm(g, set(placement.gathered), consts, self.namer):
            for tensor in placement.gathered[value]:
                self.moved.setdefault(tensor, []).append("BatchNorm folded into a per-channel scale after the decode")
        g.initializer.extend(consts.initializers)
        self.notes += runtime_form(self.proto, {d.index_name: StoredIndex(d.cb.k, d.cb.numel, d.layout)
                                                for d in decoders.values() if d.elementwise})
        opsets = [o for o in self.proto.opset_import if o.domain != DOMAIN]
        del self.proto.opset_import[:]
        self.proto.opset_import.extend(opsets)
        _graph.eliminate_dead(g)
        stored_as = {n: [d.codebook_name, d.index_name, *(o for o in d.outlier_names if o)]
                     for n, d in decoders.items()}
        protected = [name for names in stored_as.values() for name in names]
        count, saved, mapping = _graph.dedup_initializers(self.proto, protected) if dedup else (0, 0, {})
        # IR 4 lets initializers stand apart from the graph inputs (the new codebooks and indices do)
        self.proto.ir_version = max(self.proto.ir_version, _min_ir(self.proto), 4)
        external = external_data if external_data is not None else (
            sum(_graph.data_size(t) for t in g.initializer) > EXTERNAL_THRESHOLD)
        files = _write(self.proto, path, external=external, force=force, inputs=inputs)
        report = ExportReport("onnx", str(path), sum(f.stat().st_size for f in files), 0, 0,
                              dedup_count=count, dedup_saved_bytes=saved, files=[str(f) for f in files],
                              opset=_opset(self.proto), notes=list(self.notes))
        self._fill(report, stored_as, mapping)
        return report

    def _fill(self, report: ExportReport, stored_as: dict[str, list[str]], mapping: dict[str, str]) -> None:
        g = self.proto.graph
        sizes = {t.name: _graph.data_size(t) for t in g.initializer}
        accounted: set[str] = set()
        merged_dense = 0
        for name, cb in self.codebooks.tensors.items():
            entry = self._merged_entry(name, cb, stored_as[name], sizes)
            report.tensors.append(entry)
            accounted.update(entry.stored_as)
            merged_dense += cb.numel * cb.codebook.element_size()
        for alias in self.codebooks.aliases.values():
            how = "transposed " if alias.transpose else ""
            report.tensors.append(TensorEntry(alias.name, [], "alias", 0, 0, note=f"{how}alias of `{alias.target}`"))
        notes = {e.name: e.note for e in self.skipped}
        for t in g.initializer:
            if t.name in accounted or (t.data_type not in FLOAT_TYPES and sizes[t.name] < 1024):
                continue
            report.tensors.append(TensorEntry(t.name, list(t.dims), "dense", sizes[t.name], sizes[t.name],
                                              note=notes.get(t.name, "")))
            accounted.add(t.name)
        report.graph_bytes = report.file_bytes - sum(e.actual_bytes for e in report.tensors)
        dense_data = sum(e.actual_bytes for e in report.tensors if e.storage == "dense")
        report.dense_reference_bytes = report.graph_bytes + dense_data + merged_dense
        for loss in report.losses():
            report.notes.append(loss.text(Path(report.path).name))

    def _merged_entry(self, name: str, cb: TensorCodebook, names: list[str], sizes: dict[str, int]) -> TensorEntry:
        layout = self.layouts[name]
        stored = self.stored or cb.codebook.dtype
        cb_bytes = cb.codebook.numel() * torch.tensor([], dtype=stored).element_size()
        bound = packed_size(cb.index_count, cb.bits) + cb_bytes + cb.outlier_bytes
        common = {"shape": list(cb.shape), "k": cb.k, "bits": cb.bits, "granularity": cb.granularity}
        present = [n for n in names if n in sizes]
        if not present and name in self.unused:
            return TensorEntry(name, storage="unused", actual_bytes=0, bound_bytes=0, note=(
                "not in the exported graph: the forward pass does not read it"), **common)
        if not present:  # dense, wherever the exporter put it: counted as its dense size
            return TensorEntry(name, storage="dense", actual_bytes=0, bound_bytes=bound, note=(
                "not found in the exported graph: the exporter folded it into another constant (stored dense), "
                "or the forward pass does not read it"), dense_bytes=cb.numel * cb.codebook.element_size(), **common)
        notes = [layout.note, _moved_note(self.moved.get(name)), _rounding_note(cb, stored)]
        actual = sum(sizes[n] for n in present)
        return TensorEntry(name, storage="codebook", actual_bytes=actual, bound_bytes=bound, index_type=layout.label,
                           stored_as=present, note="; ".join(n for n in notes if n),
                           widened_bytes=max(actual - bound, 0) if name in self.widened else 0, **common)


def _moved_note(ops: list[str] | None) -> str:
    if not ops:
        return ""
    layout = [op for op in dict.fromkeys(ops) if " " not in op]
    other = [op for op in dict.fromkeys(ops) if " " in op]
    return "; ".join(([f"{', '.join(layout)} applied to its indices"] if layout else []) + other)


def _rounding_note(cb: TensorCodebook, stored: torch.dtype) -> str:
    if stored == cb.codebook.dtype:
        return ""
    err = (cb.codebook.to(stored).to(cb.codebook.dtype) - cb.codebook).abs().max().item()
    return f"codebook stored as {str(stored).removeprefix('torch.')} (max rounding error {err:.2g})"


def _min_ir(proto: onnx.ModelProto) -> int:
    return helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)  # custom domains


def _opset(proto: onnx.ModelProto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _write(proto: onnx.ModelProto, path: Path, *, external: bool, force: bool,
           inputs: Sequence[Path]) -> list[Path]:
    data_path = path.with_name(path.name + ".data")
    targets = [path, data_path] if external else [path]
    if not external:
        _check(proto, path)
    with atomic_outputs(targets, force=force, inputs=inputs) as temps:
        _graph.save(proto, temps[0], temps[1] if external else None, data_path.name if external else None)
        if external:  # the checker would look for the data file under its final name, not there yet
            _check(_graph.skeleton(proto), path)
    return targets


def _check(proto: onnx.ModelProto, path: Path) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0]
        raise UnsupportedModelError(f"{path}: the rewritten graph fails onnx.checker ({first}); "
                                    f"nothing was written; please report this model") from e


def _raise_opset(proto: onnx.ModelProto, needed: int, layouts: dict[str, IndexLayout]) -> tuple[list[str], set[str]]:
    """Bring the model to opset `needed` (for UINT2/UINT4); failing that, store indices as UINT8.

    Returns the notes and the tensors whose indices were widened.
    """
    current = _opset(proto) or 0
    if needed <= current:
        return [], set()
    try:
        converted = onnx.version_converter.convert_version(proto, needed)
        onnx.checker.check_model(converted)
    except (onnx.version_converter.ConvertError, onnx.checker.ValidationError, RuntimeError) as e:
        widened = {name for name, layout in layouts.items() if layout.onnx_type in MIN_OPSET}
        for name in widened:
            layouts[name] = native_layout(8)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        note = f"could not convert the model from opset {current} to {needed} ({reason}); indices stored as UINT8"
        return [note], widened
    proto.CopyFrom(converted)
    return [f"model converted from opset {current} to {needed} for sub-byte index types"], set()
