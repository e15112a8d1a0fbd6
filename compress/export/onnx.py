"""ONNX export with every merged tensor stored as its codebook plus narrow indices.

`export_onnx` runs `torch.onnx.export(..., dynamo=True)` with a dynamic batch dimension, then
rewrites the graph: each merged weight (whatever dense constant the exporter made of it: the weight,
its transpose, a reshaped copy; found by exact value, never by guess) becomes a codebook initializer,
an index initializer in the narrowest type (see `_decode.py`) and the decode
`Cast -> [+ row offsets] -> Gather`. Tied tensors are stored once (a Transpose node where a copy was
transposed) and identical initializers are deduplicated by content. A merged weight that cannot be
located stays dense and the report says which.

`rewrite_onnx` writes the codebook form of an existing ONNX graph whose initializers were clustered
without the PyTorch model (`compress.pipeline.tie_onnx`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from ..atomic import atomic_outputs, check_output
from ..codebook import Codebooks, TensorCodebook
from ..errors import BadInputError, UnsupportedModelError
from ..execution import as_args, eval_mode
from ..packing import packed_size
from ..state import storage_names
from . import graph as _graph
from ._decode import (
    CODEBOOK_DTYPES,
    MIN_OPSET,
    Constants,
    IndexLayout,
    choose_layout,
    decode_graph,
    native_layout,
    onnx_float_type,
    packed_overhead,
)
from .report import ExportReport, TensorEntry

EXTERNAL_THRESHOLD = 1_800_000_000  # protobuf cannot hold 2 GiB: larger models use external data
FLOAT_TYPES = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16,
                TensorProto.DOUBLE: torch.float64, TensorProto.BFLOAT16: torch.bfloat16}


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
        print(report.file_bytes, report.bound_bytes)
    """
    path = Path(path)
    stored = _codebook_dtype(codebook_dtype)
    _check_codebooks(codebooks)
    check_output(path, force=force)
    layouts = {n: choose_layout(cb, packed_overhead(cb)) for n, cb in codebooks.tensors.items()}
    opset = max([MIN_OPSET.get(lay.onnx_type, 0) for lay in layouts.values()], default=0) or None
    proto, notes = _torch_to_onnx(model, example_inputs, opset)
    seeds = {s for name in codebooks.tensors for s in storage_names(name)}
    origin = _graph.fold_from(proto, seeds)
    targets = {n: cb.decode().detach() for n, cb in codebooks.tensors.items()}
    dense_ties = _dense_tie_targets(model, codebooks)
    job = _Job(proto, codebooks, layouts, stored, origin, notes)
    job.locate(targets, dense_ties)
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
    notes = _raise_opset(proto, needed, layouts)
    job = _Job(proto, codebooks, layouts, None, {}, notes)
    job.uses = {n: [_Use(n, "same")] for n in codebooks.tensors}
    job.skipped = list(skipped)
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


def _torch_to_onnx(model, example_inputs, opset: int | None) -> tuple[onnx.ModelProto, list[str]]:
    args = as_args(example_inputs)
    dynamic = None
    if not isinstance(model, torch.export.ExportedProgram):
        dynamic = tuple({0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() else None
                        for a in args)
    with eval_mode(model), warnings.catch_warnings(), _quiet_torch_onnx():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(model, args, dynamo=True, optimize=True, opset_version=opset,
                                        dynamic_shapes=dynamic, verbose=False)
        except Exception as e:  # the exporter raises many types; the first line says what failed
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsupportedModelError(f"torch.onnx.export could not export the model: {first}") from e
    proto = program.model_proto
    _graph.strip_debug_metadata(proto)
    return proto, _fixed_batch_notes(proto)


@contextlib.contextmanager
def _quiet_torch_onnx() -> Iterator[None]:
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _fixed_batch_notes(proto: onnx.ModelProto) -> list[str]:
    notes = []
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            notes.append(f"input `{inp.name}` has a fixed batch size {dims[0].dim_value} (the model or its "
                         f".pt2 specializes it; export the .pt2 with a dynamic batch Dim to lift this)")
    return notes


def _dense_tie_targets(model, codebooks: Codebooks) -> dict[str, torch.Tensor]:
    """Dense values of alias targets that are not merged (ties without a codebook)."""
    wanted = {a.target for a in codebooks.aliases.values() if a.target not in codebooks.tensors}
    if not wanted:
        return {}
    if isinstance(model, torch.export.ExportedProgram):
        state = model.state_dict
    else:
        state = model.state_dict() if isinstance(model, nn.Module) else {}
    return {n: state[n].detach() for n in wanted if n in state}


@dataclass
class _Use:
    """An initializer of the exported graph holding a target's value: as is, transposed or reshaped."""

    init: str
    how: str  # "same" | "transpose" | "reshape"
    dims: list[int] | None = None  # the initializer's shape, for "reshape"


@dataclass
class _Job:
    """One rewrite of an exported graph into codebook storage."""

    proto: onnx.ModelProto
    codebooks: Codebooks
    layouts: dict[str, IndexLayout]
    stored: torch.dtype | None  # codebook dtype in the file; None: the tensor's own
    origin: dict[str, set[str]]  # folded constant -> storage names it was computed from
    notes: list[str]
    uses: dict[str, list[_Use]] = field(default_factory=dict)
    dense_uses: dict[str, list[_Use]] = field(default_factory=dict)
    skipped: list[TensorEntry] = field(default_factory=list)
    _new_initializers: list[TensorProto] = field(default_factory=list)

    def locate(self, targets: dict[str, torch.Tensor], dense_ties: dict[str, torch.Tensor]) -> None:
        index = _ValueIndex(self.proto.graph)
        claimed: set[str] = set()
        for name, value in targets.items():
            self.uses[name] = [u for u in index.find(value) if u.init not in claimed]
            claimed.update(u.init for u in self.uses[name])
        for name, value in dense_ties.items():
            self.dense_uses[name] = [u for u in index.find(value) if u.init not in claimed]
            claimed.update(u.init for u in self.dense_uses[name])

    def write(self, path: Path, *, dedup: bool, force: bool, external_data: bool | None,
              inputs: Sequence[Path] = ()) -> ExportReport:
        g = self.proto.graph
        namer = _graph.Namer(self.proto)
        consts = Constants(namer)
        new_nodes, stored_as = [], {}
        for name, uses in self.uses.items():
            if uses:
                nodes, names = self._rewrite(name, uses, namer, consts)
                new_nodes += nodes
                stored_as[name] = names
        for name, uses in self.dense_uses.items():
            new_nodes += self._tie_dense(name, uses)
        removed = {u.init for uses in self.uses.values() for u in uses}
        removed |= {u.init for uses in self.dense_uses.values() for u in uses[1:]}
        kept = [t for t in g.initializer if t.name not in removed]
        del g.initializer[:]
        g.initializer.extend(kept + self._new_initializers + consts.initializers)
        for node in reversed(new_nodes):
            g.node.insert(0, node)
        _graph.eliminate_dead(g)
        count, saved, mapping = (0, 0, {})
        if dedup:
            count, saved, mapping = _graph.dedup_initializers(self.proto)
        self.proto.ir_version = max(self.proto.ir_version, _min_ir(self.proto))
        external = external_data if external_data is not None else (
            sum(_graph.data_size(t) for t in g.initializer) > EXTERNAL_THRESHOLD)
        files = _write(self.proto, path, external=external, force=force, inputs=inputs)
        report = ExportReport("onnx", str(path), sum(f.stat().st_size for f in files), 0, 0,
                              dedup_count=count, dedup_saved_bytes=saved, files=[str(f) for f in files],
                              opset=_opset(self.proto), notes=list(self.notes))
        self._fill(report, stored_as, mapping)
        return report

    def _rewrite(self, name: str, uses: list[_Use], namer, consts) -> tuple[list, list[str]]:
        cb, layout = self.codebooks.tensors[name], self.layouts[name]
        weight_dtype = cb.codebook.dtype
        stored = self.stored or weight_dtype
        same = [u for u in uses if u.how == "same"]
        out = same[0].init if same else namer(name)
        decoded = decode_graph(cb, layout, out, namer, consts, stored, weight_dtype)
        self._new_initializers.extend(decoded.initializers)
        nodes = list(decoded.nodes)
        for use in uses:
            if use.init != out:
                nodes.append(_adapter(out, use, consts))
        return nodes, [decoded.codebook_name, decoded.index_name]

    def _tie_dense(self, name: str, uses: list[_Use]) -> list:
        # Keep the first copy found; the others read it (through a Transpose where they were transposed).
        if len(uses) < 2:
            return []
        first, nodes = uses[0], []
        for use in uses[1:]:
            if use.how == first.how and use.dims == first.dims:
                nodes.append(helper.make_node("Identity", [first.init], [use.init]))
            elif {use.how, first.how} == {"same", "transpose"}:
                nodes.append(helper.make_node("Transpose", [first.init], [use.init], perm=[1, 0]))
            else:
                self.dense_uses[name] = [first]
                return []
        return nodes

    def _fill(self, report: ExportReport, stored_as: dict[str, list[str]], mapping: dict[str, str]) -> None:
        g = self.proto.graph
        sizes = {t.name: _graph.data_size(t) for t in g.initializer}
        accounted: set[str] = set()
        merged_dense = 0
        for name, cb in self.codebooks.tensors.items():
            entry = self._merged_entry(name, cb, stored_as.get(name), sizes, mapping)
            report.tensors.append(entry)
            accounted.update(entry.stored_as)
            merged_dense += cb.numel * cb.codebook.element_size()
        for alias in self.codebooks.aliases.values():
            how = "transposed " if alias.transpose else ""
            report.tensors.append(TensorEntry(alias.name, [], "alias", 0, 0, note=f"{how}alias of `{alias.target}`"))
        by_origin = self._origins()
        by_origin.update({e.name: e.note for e in self.skipped})
        for t in g.initializer:
            if t.name in accounted or (t.data_type not in FLOAT_TYPES and sizes[t.name] < 1024):
                continue
            note = by_origin.get(t.name, "")
            report.tensors.append(TensorEntry(t.name, list(t.dims), "dense", sizes[t.name], sizes[t.name], note=note))
            accounted.add(t.name)
        report.graph_bytes = report.file_bytes - sum(e.actual_bytes for e in report.tensors)
        dense_data = sum(e.actual_bytes for e in report.tensors if e.storage == "dense")
        report.dense_reference_bytes = report.graph_bytes + dense_data + merged_dense

    def _merged_entry(self, name, cb, names, sizes, mapping) -> TensorEntry:
        layout = self.layouts[name]
        stored = self.stored or cb.codebook.dtype
        cb_bytes = cb.codebook.numel() * torch.tensor([], dtype=stored).element_size()
        bound = packed_size(cb.index_count, cb.bits) + cb_bytes + cb.outlier_bytes
        common = {"shape": list(cb.shape), "k": cb.k, "bits": cb.bits, "granularity": cb.granularity}
        if not names:
            note = ("not found in the exported graph as a constant (the exporter may have folded it into "
                    "another constant, listed below, or the forward pass does not use it)")
            return TensorEntry(name, storage="dense", actual_bytes=0, bound_bytes=0, note=note, **common)
        present = [n for n in names if n in sizes]
        shared = [f"`{n}` shares `{mapping[n]}`" for n in names if n in mapping]
        notes = [layout.note] + shared + [self._rounding_note(cb, stored)]
        return TensorEntry(name, storage="codebook", actual_bytes=sum(sizes[n] for n in present),
                           bound_bytes=bound, index_type=layout.label, stored_as=present,
                           note="; ".join(n for n in notes if n), **common)

    @staticmethod
    def _rounding_note(cb: TensorCodebook, stored: torch.dtype) -> str:
        if stored == cb.codebook.dtype:
            return ""
        err = (cb.codebook.to(stored).to(cb.codebook.dtype) - cb.codebook).abs().max().item()
        return f"codebook stored as {str(stored).removeprefix('torch.')} (max rounding error {err:.2g})"

    def _origins(self) -> dict[str, str]:
        owners = {}
        for name in self.codebooks.tensors:
            for s in storage_names(name):
                owners[s] = name
        notes = {}
        for value, seeds in self.origin.items():
            names = sorted({owners.get(s, s) for s in seeds})
            notes[value] = (f"computed from merged {', '.join(f'`{n}`' for n in names)} by the exporter "
                            f"(e.g. concatenated or reordered): stored dense, not as a codebook")
        return notes


def _adapter(src: str, use: _Use, consts: Constants) -> onnx.NodeProto:
    if use.how == "same":
        return helper.make_node("Identity", [src], [use.init])
    if use.how == "transpose":
        return helper.make_node("Transpose", [src], [use.init], perm=[1, 0])
    target = consts(np.array(use.dims, np.int64), f"{use.init}.shape")
    return helper.make_node("Reshape", [src, target], [use.init])


class _ValueIndex:
    """Float initializers by (element type, element count, content hash), for exact value matching."""

    def __init__(self, graph: onnx.GraphProto):
        self.by_key: dict[tuple, list[TensorProto]] = {}
        for t in graph.initializer:
            if t.data_type in FLOAT_TYPES and t.data_location != TensorProto.EXTERNAL:
                data = _graph.tensor_bytes(t)
                self.by_key.setdefault((t.data_type, hashlib.sha256(data).digest()), []).append(t)

    def find(self, value: torch.Tensor) -> list[_Use]:
        onnx_type = onnx_float_type(value.dtype)
        found = self._lookup(onnx_type, value, "same")
        if value.dim() == 2:
            found += [u for u in self._lookup(onnx_type, value.t(), "transpose")
                      if u.init not in {f.init for f in found}]
        return found

    def _lookup(self, onnx_type: int, value: torch.Tensor, how: str) -> list[_Use]:
        data = _torch_bytes(value)
        uses = []
        for t in self.by_key.get((onnx_type, hashlib.sha256(data).digest()), []):
            if _graph.tensor_bytes(t) != data:
                continue
            if list(t.dims) == list(value.shape):
                uses.append(_Use(t.name, how))
            elif how == "same":
                uses.append(_Use(t.name, "reshape", list(t.dims)))
        return uses


def _torch_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _min_ir(proto: onnx.ModelProto) -> int:
    return helper.find_min_ir_version_for(list(proto.opset_import))


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


def _raise_opset(proto: onnx.ModelProto, needed: int, layouts: dict[str, IndexLayout]) -> list[str]:
    """Bring the model to opset `needed` (for UINT2/UINT4); failing that, store indices as UINT8."""
    current = _opset(proto) or 0
    if needed <= current:
        return []
    try:
        converted = onnx.version_converter.convert_version(proto, needed)
        onnx.checker.check_model(converted)
    except (onnx.version_converter.ConvertError, onnx.checker.ValidationError, RuntimeError) as e:
        for name, layout in layouts.items():
            if layout.onnx_type in MIN_OPSET:
                layouts[name] = native_layout(8)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [f"could not convert the model from opset {current} to {needed} ({reason}); indices stored as UINT8"]
    proto.CopyFrom(converted)
    return [f"model converted from opset {current} to {needed} for sub-byte index types"]
