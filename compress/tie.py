"""The `compress tie` pipeline: plan, (soft-tie and fine-tune,) merge, measure, write.

`tie(loaded, cfg, data=..., out_dir=...)` never touches the loaded model: it works on a copy and
writes three files into `out_dir` together (atomically): the merged model (`<stem>.tied.pt2`, a
`torch.export` program with a dynamic batch dimension, when the input has a graph or a module with
example inputs; otherwise `<stem>.tied.pt`, a state_dict of codebooks + indices), the plan
(`<stem>.plan.json`) and a report (`<stem>.report.json`).

    >>> result = tie(io.load("samples/digits_mlp.pt2"), TieConfig(bits=4), out_dir="compressed")
    >>> result.report["size"]["after_bytes"] < result.report["size"]["before_bytes"]
    True
"""

from __future__ import annotations

import copy
import hashlib
import io as _io
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from ._atomic import atomic_outputs, check_output, staging_dir
from ._units import format_bytes
from .codebook import Codebooks, bits_for
from .errors import BadInputError, CompressError, UnsupportedModelError
from .finetune import FinetuneConfig, FinetuneResult, finetune_, loss_mode, train_mode
from .merge import current_weight, merge_
from .plan import TieConfig, TiePlan, analyze, json_text

REPORT_VERSION = 1
_STATIC = object()  # "export without dynamic dimensions"
DEFAULT_OUT_DIR = Path("compressed")


@dataclass
class TieResult:
    """What `tie` made: the merged model (in memory) and its codebooks, the plan, the report, the paths.

    The exporters take `model`, `codebooks` and `example_inputs` from here.
    """

    model: nn.Module
    plan: TiePlan
    codebooks: Codebooks
    report: dict
    model_path: Path
    plan_path: Path
    report_path: Path
    example_inputs: tuple | None = None
    finetune: FinetuneResult | None = None
    exports: list = field(default_factory=list)  # ExportReport per exported file (ONNX, safetensors)
    verification: list = field(default_factory=list)  # VerifyResult per exported file

    @property
    def paths(self) -> list[Path]:
        return [self.model_path, self.plan_path, self.report_path, *self.export_paths]

    @property
    def export_paths(self) -> list[Path]:
        return [Path(f) for e in self.exports for f in e.files]

    @property
    def verified(self) -> bool | None:
        """True when every export matched the merged model; None when nothing was verified."""
        return all(v.passed for v in self.verification) if self.verification else None

    def to_table(self):
        """A rich table: size, bits per weight, output error and accuracy, before and after."""
        return summary_table(self.report)


def output_paths(input_path: str | Path, out_dir: str | Path, graph: bool) -> tuple[Path, Path, Path]:
    """`<stem>.tied.pt2` (or `.tied.pt`), `<stem>.plan.json`, `<stem>.report.json` inside `out_dir`."""
    stem = Path(input_path).name
    for suffix in (".safetensors", ".onnx", ".pt2", ".pth", ".pt", ".bin", ".ckpt"):
        if stem.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    out = Path(out_dir)
    return (out / f"{stem}.tied.{'pt2' if graph else 'pt'}", out / f"{stem}.plan.json",
            out / f"{stem}.report.json")


def tie(loaded, cfg: TieConfig | None = None, *, data=None, finetune: FinetuneConfig | None = None,
        out_dir: str | Path = DEFAULT_OUT_DIR, force: bool = False, data_path: str | Path | None = None,
        export: ExportOptions | None = None) -> TieResult:
    """Tie the weights of a loaded model and write the merged model, the plan and a report.

    Args:
        loaded: what `compress.io.load` returns (the input is not changed).
        cfg: the `TieConfig` (default: 4 bits, one codebook per tensor).
        data: `DataSplits` from `compress.io.load_data`, for importance, fine-tuning and accuracy.
        finetune: how to fine-tune when `data` is given (default `FinetuneConfig()`); with
            `epochs=0` and `codebook_epochs=0`, or without data, it is post-training clustering only.
        out_dir: the folder for the three outputs (created when needed).
        force: overwrite existing outputs.
        data_path: the data file, for messages and so that it is never overwritten
            (default: `data.path` when the splits carry it).
        export: which files to export next to the merged model and how to verify them
            (default `ExportOptions()`: ONNX when the model has a graph, safetensors always,
            both verified on the CPU); `ExportOptions(onnx=False, safetensors=False)` skips it.

    Returns:
        `TieResult` with the merged model, codebooks, plan, report and output paths.

    >>> result = tie(io.load("model.pt2"), TieConfig(bits=2), data=io.load_data("data.pt"), out_dir="out")
    """
    started = time.perf_counter()
    cfg = cfg or TieConfig()
    data_path = data_path if data_path is not None else getattr(data, "path", None)
    model, reference, examples = _working_copy(loaded, data)
    graph = reference is not None and examples is not None
    paths = output_paths(loaded.path, out_dir, graph)
    export = export or ExportOptions()
    export_paths = _export_targets(paths[0], export, graph)
    inputs = [Path(loaded.path)] + ([Path(data_path)] if data_path else [])
    for p in [*paths, *export_paths]:
        check_output(p, force=force, inputs=inputs)
    ft = _finetune_config(finetune, data, reference, loaded.path)
    if data is not None and reference is not None:
        _check_data(data, model, examples, data_path)
    plan = analyze(model, cfg, data=data, program=getattr(loaded, "program", None))
    before = _stored_bytes(model)
    originals = {t.name: current_weight(model, t.name).detach().clone() for t in plan.clustered()}
    ft_result = None
    if ft is not None:
        ft_result = finetune_(model, plan, data, ft, original=reference)
        codebooks = ft_result.codebooks
    else:
        codebooks = merge_(model, plan)
    if not distributed.is_main():  # under torchrun, rank 0 alone measures, exports and writes the files
        return TieResult(model, plan, codebooks, {}, *paths, examples, ft_result)
    quality = _quality(reference, model, data, examples)
    payload, dynamic = _serialize(model, examples if graph else None, getattr(loaded, "program", None))
    report = _report(loaded, data_path, cfg, ft, plan, codebooks, originals, before, _stored_bytes(model), quality,
                     ft_result, paths, dynamic, time.perf_counter() - started)
    with staging_dir(out_dir) as staging:
        notes: list[str] = []
        try:
            exports, checks = _export_and_verify(model, codebooks, examples if graph else None, reference, data,
                                                 export, export_paths, Path(staging), notes)
        except CompressError as e:  # name the output folder, not the staging folder inside it
            raise type(e)(str(e).replace(str(Path(staging)), str(out_dir))) from e
        report["notes"] = notes
        staged = [Path(f) for e in exports for f in e.files]
        for e in exports:  # the reports name the staging folder's files; point them at the outputs
            e.files = [str(Path(out_dir) / Path(f).name) for f in e.files]
            e.path = str(Path(out_dir) / Path(e.path).name)
        for v in checks:
            v.path = str(Path(out_dir) / Path(v.path).name)
        report["outputs"]["exports"] = [Path(f).name for e in exports for f in e.files]
        report["exports"] = [e.to_dict() for e in exports]
        report["verification"] = [v.to_dict() for v in checks]
        with atomic_outputs([*paths, *(Path(out_dir) / p.name for p in staged)], force=force,
                            inputs=inputs) as tmps:
            tmps[0].write_bytes(payload)
            tmps[1].write_text(plan.to_json(), encoding="utf-8")
            tmps[2].write_text(json_text(report), encoding="utf-8")
            for src, tmp in zip(staged, tmps[3:]):
                os.replace(src, tmp)
    return TieResult(model, plan, codebooks, report, *paths, examples, ft_result, exports, checks)


@dataclass
class ExportOptions:
    """What `tie` exports after merging, and how it verifies the exports.

    `onnx`: write `<stem>.onnx` (only for models with a graph and example inputs); `safetensors`:
    write `<stem>.safetensors`; `verify`: run the ONNX file in onnxruntime on the test (or example)
    inputs and load the safetensors back, against the merged model, within `atol`/`rtol`.
    """

    onnx: bool = True
    safetensors: bool = True
    verify: bool = True
    provider: str = "cpu"
    atol: float = 1e-4
    rtol: float = 1e-4
    codebook_dtype: str = "float32"


def _export_targets(model_path: Path, export: ExportOptions, graph: bool) -> list[Path]:
    stem = model_path.name.rsplit(".tied.", 1)[0]
    out = []
    if export.onnx and graph:
        out.append(model_path.parent / f"{stem}.onnx")
    if export.safetensors:
        out.append(model_path.parent / f"{stem}.safetensors")
    return out


def _cpu_lacks_bfloat16(model: nn.Module, provider: str) -> bool:
    cpu = provider.lower() in ("cpu", "cpuexecutionprovider")
    return cpu and any(t.dtype == torch.bfloat16 for t in (*model.parameters(), *model.buffers()))


def _export_and_verify(model: nn.Module, codebooks: Codebooks, examples: tuple | None, reference, data,
                       export: ExportOptions, targets: list[Path], staging: Path,
                       notes: list[str]) -> tuple[list, list]:
    """Export into `staging` (the final names, so external data references stay right) and verify.

    What could not be checked is said in `notes` (never skipped silently).
    """
    from .export import export_onnx, export_safetensors
    from .verify import verify, verify_safetensors

    exports, checks = [], []
    for target in targets:
        path = staging / target.name
        if target.suffix == ".onnx":
            exports.append(export_onnx(model, codebooks, path, examples, codebook_dtype=export.codebook_dtype))
            if export.verify and _cpu_lacks_bfloat16(model, export.provider):
                notes.append(f"{target.name} not run in onnxruntime: its CPU provider has no bfloat16 kernels "
                             "(verify it on a GPU with --provider cuda); the safetensors file is verified")
            elif export.verify:
                x = data.test_inputs if data is not None and len(data.test_inputs) else examples
                y = data.test_targets if data is not None and len(data.test_inputs) else None
                checks.append(verify(path, model, x, provider=export.provider, atol=export.atol,
                                     rtol=export.rtol, original=reference, measure_runtime=False, targets=y))
        else:
            exports.append(export_safetensors(model, codebooks, path))
            if export.verify:
                checks.append(verify_safetensors(path, model))
    return exports, checks


# --- the working model ----------------------------------------------------------------------------

def _working_copy(loaded, data) -> tuple[nn.Module, nn.Module | None, tuple | None]:
    """(model to merge, untouched reference or None, example inputs or None).

    A module without example inputs borrows two calibration rows as its example when data is given.
    """
    module = getattr(loaded, "module", None)
    examples = getattr(loaded, "example_inputs", None)
    if isinstance(module, nn.Module) and not isinstance(module, torch.jit.ScriptModule):
        if not examples and data is not None and len(data.calib_inputs):
            examples = (data.calib_inputs[:2].clone(),)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation on deepcopy
            # a copy: `program.module()` shares its tensors with the program (and with loaded.module)
            return copy.deepcopy(module), module, (tuple(examples) if examples else None)
    return _tensor_module(loaded.tensors, getattr(loaded, "aliases", {}) or {}), None, None


def _tensor_module(tensors, aliases: dict[str, str]) -> nn.Module:
    """A bare module whose parameters are a checkpoint's tensors (for inputs without a graph)."""
    root = nn.Module()
    made: dict[str, nn.Parameter] = {}
    for name in tensors:
        *path, attr = name.split(".")
        module = root
        for part in path:
            if not part:
                raise UnsupportedModelError(f"tensor name {name!r} has an empty path segment; rename it")
            if not hasattr(module, part):
                _add(module.add_module, name, part, nn.Module())
            module = getattr(module, part)
        target = aliases.get(name)
        if target in made:  # storage shared in the file stays one parameter
            p = made[target]
        else:
            p = nn.Parameter(tensors[name].detach().clone(), requires_grad=False)
        made[name] = p
        _add(module.register_parameter, name, attr, p)
    return root


def _add(register, name: str, attr: str, value) -> None:
    try:
        register(attr, value)
    except (KeyError, TypeError) as e:
        raise UnsupportedModelError(f"tensor {name!r} cannot be placed in a module tree ({e}); rename it") from e


def _finetune_config(finetune: FinetuneConfig | None, data, reference, path) -> FinetuneConfig | None:
    """The fine-tuning to run, or None for post-training clustering only."""
    if data is None:
        if finetune is not None and (finetune.epochs != 0 or finetune.codebook_epochs):
            raise BadInputError("fine-tuning (--epochs) needs calibration data (--data FILE)")
        return None
    ft = finetune or FinetuneConfig()
    if ft.epochs == 0 and not ft.codebook_epochs:
        return None
    if reference is None:
        raise BadInputError(f"{path} holds only tensors (no graph or module), so it cannot be fine-tuned; "
                            "pass --epochs 0 or give a .pt2 program")
    return ft


def _check_data(data, model: nn.Module, examples: tuple | None, data_path) -> None:
    """Refuse a data file whose shapes do not fit the model, naming the file and both shapes."""
    where = str(data_path) if data_path else "data"
    for split in ("calib", "test"):
        x, y = getattr(data, f"{split}_inputs"), getattr(data, f"{split}_targets")
        if examples:
            ex = examples[0]
            if tuple(x.shape[1:]) != tuple(ex.shape[1:]):
                raise BadInputError(f"{where}: {split}_inputs have shape {list(x.shape)}, the model expects "
                                    f"{['batch', *ex.shape[1:]]} (its example input is {list(ex.shape)})")
            if x.dtype != ex.dtype:
                raise BadInputError(f"{where}: {split}_inputs are {str(x.dtype).removeprefix('torch.')}, the model "
                                    f"expects {str(ex.dtype).removeprefix('torch.')}")
        if y is not None and len(y) != len(x):
            raise BadInputError(f"{where}: {split}_targets has {len(y)} rows, {split}_inputs has {len(x)}")
    x = data.calib_inputs[:3] if len(data.calib_inputs) else data.test_inputs[:3]
    try:
        with torch.no_grad(), train_mode(model, False):
            out = model(x)
    except Exception as e:  # the model's own error says what it wanted
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(f"{where}: the model fails on inputs of shape {list(x.shape)}: {first}") from e
    _check_targets(data, out, x, where)


def _check_targets(data, out: torch.Tensor, x: torch.Tensor, where: str) -> None:
    for split in ("calib", "test"):
        y = getattr(data, f"{split}_targets")
        if y is None or len(y) == 0 or loss_mode(out, x, y) != "cross-entropy":
            continue
        if out.ndim != 2:
            raise BadInputError(f"{where}: integer targets need a [batch, classes] output; the model gives "
                                f"{list(out.shape)}")
        if int(y.min()) < 0 or int(y.max()) >= out.shape[1]:
            raise BadInputError(f"{where}: {split}_targets range {int(y.min())}..{int(y.max())}, the model has "
                                f"{out.shape[1]} classes")


# --- measuring ------------------------------------------------------------------------------------

def _stored_bytes(model: nn.Module) -> dict:
    """Bytes as stored: each tensor object once; a codebook index at its ideal packed width."""
    seen: set[int] = set()
    params = buffers = packed_index = 0
    for _, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel() * p.element_size()
    for name, b in model.named_buffers(remove_duplicate=False):
        if id(b) in seen or name.endswith(".offset"):
            continue
        seen.add(id(b))
        if name.endswith(".index") and ".parametrizations." in name:
            k = _codebook_k(model, name)
            packed_index += -(-b.numel() * bits_for(k) // 8)
        else:
            buffers += b.numel() * b.element_size()
    return {"parameters": params, "buffers": buffers, "indices": packed_index,
            "total": params + buffers + packed_index}


def _codebook_k(model: nn.Module, index_name: str) -> int:
    owner, _, _ = index_name.rpartition(".0.index")
    return int(model.get_submodule(owner).original.shape[-1])


@torch.no_grad()
def _quality(reference: nn.Module | None, merged: nn.Module, data, examples: tuple | None) -> dict:
    """Output error of the merged model against the original on the test (or example) inputs."""
    if reference is None:
        return {"inputs": None}
    if data is not None and len(data.test_inputs):
        x, y, label = data.test_inputs, data.test_targets, f"test inputs ({len(data.test_inputs)})"
    elif examples:
        x, y, label = examples[0], None, f"example inputs ({len(examples[0])})"
    else:
        return {"inputs": None}
    a, b = _run(reference, x), _run(merged, x)
    out = {"inputs": label, "max_abs_error": float((a - b).abs().max()),
           "mean_cosine": float(F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).mean())}
    kind = loss_mode(a, x, y)
    if kind == "cross-entropy":
        out["accuracy_before"] = 100.0 * float((a.argmax(1) == y).double().mean())
        out["accuracy_after"] = 100.0 * float((b.argmax(1) == y).double().mean())
    elif kind == "reconstruction":
        out["mse_before"] = float(F.mse_loss(a.double(), x.double()))
        out["mse_after"] = float(F.mse_loss(b.double(), x.double()))
    return out


def _run(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    with train_mode(model, False):
        return torch.cat([model(x[s:s + batch]) for s in range(0, len(x), batch)])


# --- writing --------------------------------------------------------------------------------------

def _serialize(model: nn.Module, examples: tuple | None, program=None) -> tuple[bytes, bool | None]:
    """The merged model as `.pt2` bytes (with the input's dynamic dimensions) or a state_dict."""
    buf = _io.BytesIO()
    if examples is None:
        torch.save(model.state_dict(), buf)
        return buf.getvalue(), None
    dims = _dynamic_shapes(program, examples)
    try:
        exported = torch.export.export(model, tuple(examples), dynamic_shapes=dims)
    except Exception as e:  # torch's own message says which guard or op failed
        if program is not None or dims is None:
            raise UnsupportedModelError(f"torch.export failed on the merged model: {str(e).splitlines()[0]}") from e
        # a module (not a program) may pin its batch size: export it static; the report says so
        return _serialize(model, examples, program=_STATIC)
    for node in exported.graph.nodes:
        # provenance of the re-traced program's nodes: debug text only, and io.load refuses it
        node.meta.pop("from_node", None)
    torch.export.save(exported, buf)
    return buf.getvalue(), dims is not None


def _dynamic_shapes(program, examples: tuple) -> tuple | None:
    """The first dimension of each input, dynamic with the input program's range (a module: batch >= 1)."""
    if program is _STATIC:
        return None
    if program is None:
        first = examples[0].shape[0] if examples[0].ndim else None
        batch = torch.export.Dim("batch", min=1)
        return tuple({0: batch} if t.ndim and t.shape[0] == first else None for t in examples)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    dims, by_symbol = [], {}
    for name in program.graph_signature.user_inputs:
        val = placeholders[name].meta.get("val")
        size = val.shape[0] if isinstance(val, torch.Tensor) and val.ndim else None
        if not isinstance(size, torch.SymInt):
            dims.append(None)
            continue
        expr = size.node.expr
        if expr not in by_symbol:
            r = program.range_constraints.get(expr)
            upper = _finite_int(None if r is None else r.upper)
            lower = 1 if r is None else max(1, int(r.lower))
            by_symbol[expr] = torch.export.Dim(f"batch{len(by_symbol) or ''}", min=lower, max=upper)
        dims.append({0: by_symbol[expr]})
    return tuple(dims) if by_symbol and len(dims) == len(examples) else None


def _finite_int(value) -> int | None:
    """A range bound as an int, or None for torch's unbounded `int_oo`."""
    import sympy

    return int(value) if isinstance(value, (int, sympy.Integer)) else None


def _report(loaded, data_path, cfg: TieConfig, ft: FinetuneConfig | None, plan: TiePlan, codebooks: Codebooks,
            originals: dict, before: dict, after: dict, quality: dict, ft_result: FinetuneResult | None, paths,
            dynamic, seconds: float) -> dict:
    return {
        "version": REPORT_VERSION,
        "tool": {"name": "compress", "version": _version("compress")},
        "packages": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "input": {"path": str(loaded.path), "kind": str(getattr(loaded, "kind", "")),
                  "sha256": getattr(loaded, "sha256", None) or _sha256(loaded.path)},
        "data": None if data_path is None else {"path": str(data_path), "sha256": _sha256(data_path)},
        "options": {"tie": cfg.to_dict(), "finetune": None if ft is None else ft.to_dict()},
        "outputs": {"model": paths[0].name, "plan": paths[1].name, "report": paths[2].name,
                    "format": "pt2" if dynamic is not None else "state_dict", "dynamic_batch": dynamic},
        "tensors": [_tensor_row(t, codebooks, originals) for t in plan.tensors],
        "size": _size_section(before, after, plan, codebooks),
        "quality": quality,
        "finetune": None if ft_result is None else ft_result.to_dict(),
        "seconds": round(seconds, 3),
    }


def _tensor_row(t, codebooks: Codebooks, originals: dict[str, torch.Tensor]) -> dict:
    row = {"name": t.name, "action": t.action, "reason": t.reason, "shape": list(t.shape), "dtype": t.dtype}
    cb = codebooks.tensors.get(t.name)
    if cb is not None:
        row.update(granularity=cb.granularity, group_size=cb.group_size, k=cb.k, bits=cb.bits,
                   distinct_values=int(torch.unique(cb.decode()).numel()),
                   bytes_before=t.numel * cb.codebook.element_size(), bytes_after=cb.packed_bytes(),
                   bits_per_weight=8 * cb.packed_bytes() / t.numel, **_weight_error(originals[t.name], cb))
    return row


def _weight_error(original: torch.Tensor, cb) -> dict:
    """How far the merged tensor is from the input's (after fine-tuning this includes the training)."""
    w = original.double()
    err = cb.decode().double() - w
    norm = float(torch.linalg.vector_norm(w))
    return {"max_abs_error": float(err.abs().max()),
            "rel_error": float(torch.linalg.vector_norm(err)) / norm if norm else 0.0}


def _size_section(before: dict, after: dict, plan: TiePlan, codebooks: Codebooks) -> dict:
    weights = sum(t.numel for t in plan.tensors if not (t.action == "alias" and t.reason.startswith("the same")))
    tied = sum(cb.numel for cb in codebooks.tensors.values())
    tied_bytes = sum(cb.packed_bytes() for cb in codebooks.tensors.values())
    return {
        "before_bytes": before["total"], "after_bytes": after["total"],
        "ratio": before["total"] / after["total"] if after["total"] else None,
        "bits_per_weight_before": 8 * before["parameters"] / weights if weights else None,
        "bits_per_weight_after": 8 * (after["parameters"] + after["indices"]) / weights if weights else None,
        "tied_weights": tied, "tied_bits_per_weight": 8 * tied_bytes / tied if tied else None,
        "note": "bytes as stored: every tensor once, codebooks counted, indices at their packed bit width",
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _sha256(path) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def summary_table(report: dict):
    """Before/after rich table of a tie report: bytes, bits per weight, output error, accuracy."""
    from rich.table import Table

    size, q = report["size"], report["quality"]
    table = Table(title=f"compress tie: {Path(report['input']['path']).name}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("size", format_bytes(size["before_bytes"]), format_bytes(size["after_bytes"]))
    if size["bits_per_weight_before"] is not None:
        table.add_row("bits per weight (codebooks counted)", f"{size['bits_per_weight_before']:.2f}",
                      f"{size['bits_per_weight_after']:.2f}")
    if size["tied_bits_per_weight"] is not None:
        table.add_row("bits per tied weight", "", f"{size['tied_bits_per_weight']:.2f} "
                      f"({size['tied_weights']:,} weights)")
    if q.get("inputs"):
        table.add_row(f"output max abs error ({q['inputs']})", "0", f"{q['max_abs_error']:.3g}")
        table.add_row("output mean cosine", "1", f"{q['mean_cosine']:.6f}")
    if "accuracy_before" in q:
        table.add_row("accuracy", f"{q['accuracy_before']:.2f}%", f"{q['accuracy_after']:.2f}%")
    if "mse_before" in q:
        table.add_row("reconstruction MSE", f"{q['mse_before']:.5f}", f"{q['mse_after']:.5f}")
    return table
