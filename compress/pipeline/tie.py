"""The `compress tie` pipeline for a model in memory: plan, (soft-tie and fine-tune,) merge, measure, write.

`tie(loaded, cfg, data=..., out_dir=...)` never touches the loaded model: it works on a copy and
writes its files into `out_dir` together (atomically): the merged model (`<stem>.tied.pt2`, a
`torch.export` program with a dynamic batch dimension, when the input has a graph or a module with
example inputs; otherwise `<stem>.tied.pt`, a state_dict of codebooks + indices), the plan
(`<stem>.plan.json`), the report (`<stem>.report.json`), and the exports (`<stem>.onnx`,
`<stem>.safetensors`), each verified against the merged model.

    >>> import compress
    >>> result = tie(compress.io.load("samples/digits_mlp.pt2"), TieConfig(bits=4),
    ...              out_dir=getfixture("tmp_path"), export=ExportOptions(onnx=False))
    >>> result.report.size.after_bytes < result.report.size.before_bytes
    True
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_outputs, check_output, staging_dir
from ..codebook import Codebooks
from ..errors import BadInputError, CompressError, Option, UnsupportedModelError
from ..execution import loss_mode, train_mode
from ..tying import (
    FinetuneConfig,
    FinetuneResult,
    TieConfig,
    TiePlan,
    analyze,
    current_weight,
    distributed,
    estimate_importance,
    finetune_,
    merge_,
)
from .assign import assign_and_refine, quality_notes, takes_quality_path
from .exports import ExportOptions, check_strict, export_and_verify, export_targets
from .measure import quality, stored_bytes
from .report import Outputs, TieReport, build_report
from .serialize import serialize

DEFAULT_OUT_DIR = Path("compressed")


@dataclass
class TieResult:
    """What `tie` made: the merged model (in memory) and its codebooks, the plan, the report, the paths.

    The exporters take `model`, `codebooks` and `example_inputs` from here.
    """

    model: nn.Module
    plan: TiePlan
    codebooks: Codebooks
    report: TieReport
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
        return self.report.to_table()


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
        export: ExportOptions | None = None, example_inputs: tuple | None = None) -> TieResult:
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
        example_inputs: inputs to trace and export the model with, for a model that has none
            (`compress.pipeline.inputs.example_inputs` makes them from shapes); default: the loaded
            file's own, else two calibration rows of `data`.

    Returns:
        `TieResult` with the merged model, codebooks, plan, report and output paths.

    Example::

        result = tie(compress.io.load("model.pt2"), TieConfig(bits=2), data=compress.io.load_data("data.pt"),
                     out_dir="out")
    """
    started = time.perf_counter()
    run = _Run.prepare(loaded, cfg or TieConfig(), data, data_path, export or ExportOptions(), Path(out_dir), force,
                       example_inputs)
    ft = _finetune_config(finetune, data, run.runs_here, loaded.path)
    if data is not None and run.reference is not None:
        _check_data(data, run.reference if run.scripted else run.model, run.examples, run.data_path)
    plan, codebooks, ft_result, originals, before = _tie_model(run, ft)
    if not distributed.is_main():  # under torchrun, rank 0 alone measures, exports and writes the files
        return TieResult(run.model, plan, codebooks, None, *run.paths, run.examples, ft_result)
    run.runnable = _merged_script(run.reference, run.model) if run.scripted else run.model
    payload, dynamic = serialize(run.model, None if run.scripted else run.graph_examples,
                                 getattr(loaded, "program", None))
    outputs = Outputs(*(p.name for p in run.paths), "pt2" if dynamic is not None else "state_dict", dynamic)
    report = build_report(loaded, run.data_path, run.cfg, ft, plan, codebooks, originals, before,
                          stored_bytes(run.model), quality(run.reference, run.runnable, data, run.examples),
                          ft_result, outputs, time.perf_counter() - started)
    report.notes.extend(_no_onnx_notes(run))
    report.quality_path = run.quality  # the error-compensated / vector / outlier / budget path (pipeline.assign)
    report.notes = [*quality_notes(run.quality, run.cfg, run.runs_here), *report.notes]
    exports, checks = _write(run, payload, plan, codebooks, report)
    if run.export.strict:
        check_strict(exports, run.out_dir)
    return TieResult(run.model, plan, codebooks, report, *run.paths, run.examples, ft_result, exports, checks)


@dataclass
class _Run:
    """One `tie` call: its inputs, the working copy of the model and the files it will write."""

    loaded: object
    cfg: TieConfig
    data: object
    data_path: Path | None
    export: ExportOptions
    out_dir: Path
    force: bool
    model: nn.Module
    reference: nn.Module | None
    examples: tuple | None
    paths: tuple[Path, Path, Path]
    export_paths: list[Path]
    runnable: nn.Module | None = None  # the merged model as something that runs (a TorchScript copy for scripts)
    quality: object = None  # pipeline.assign.QualityRun when that path ran

    @classmethod
    def prepare(cls, loaded, cfg: TieConfig, data, data_path, export: ExportOptions, out_dir: Path,
                force: bool, examples: tuple | None = None) -> _Run:
        """The working copy and the output paths, every output checked before any work."""
        data_path = data_path if data_path is not None else getattr(data, "path", None)
        model, reference, examples = _working_copy(loaded, data, examples)
        graph = reference is not None and examples is not None
        paths = output_paths(loaded.path, out_dir, graph and not isinstance(reference, torch.jit.ScriptModule))
        run = cls(loaded, cfg, data, None if data_path is None else Path(data_path), export, out_dir, force, model,
                  reference, examples, paths, export_targets(paths[0], export, graph))
        for p in [*run.paths, *run.export_paths]:
            check_output(p, force=force, inputs=run.inputs)
        return run

    @property
    def inputs(self) -> list[Path]:
        """Files that must never be overwritten."""
        return [Path(self.loaded.path)] + ([self.data_path] if self.data_path else [])

    @property
    def scripted(self) -> bool:
        """A TorchScript model: merged as tensors, exported and run as a TorchScript copy."""
        return isinstance(self.reference, torch.jit.ScriptModule)

    @property
    def runs_here(self) -> nn.Module | None:
        """The reference model when its forward pass may run here (a TorchScript file's code never does:
        its weights only), else None."""
        return None if self.scripted else self.reference

    @property
    def graph_examples(self) -> tuple | None:
        """Example inputs when the model can be traced (a graph to export), else None."""
        return self.examples if self.reference is not None else None


def _tie_model(run: _Run, ft: FinetuneConfig | None):
    """Plan, then fine-tune with soft tying or merge right away; (plan, codebooks, ft result, originals, bytes)."""
    if run.cfg.importance and run.data is None:
        raise BadInputError("importance weighting (", Option("importance"), ") needs calibration data (",
                            Option("data"), ")")
    importance = estimate_importance(run.model, run.data) if run.cfg.importance else None
    plan = analyze(run.model, run.cfg, importance=importance, program=getattr(run.loaded, "program", None))
    before = stored_bytes(run.model)
    originals = {t.name: current_weight(run.model, t.name).detach().clone() for t in plan.clustered()}
    if takes_quality_path(run.cfg, run.data, run.examples, run.runs_here):
        codebooks, run.quality = assign_and_refine(run.model, plan, run.cfg, run.data, run.examples, run.runs_here,
                                                   ft)
        return plan, codebooks, None, originals, before
    if ft is None:
        return plan, merge_(run.model, plan), None, originals, before
    result = finetune_(run.model, plan, run.data, ft, original=run.reference)
    return plan, result.codebooks, result, originals, before


def _write(run: _Run, payload: bytes, plan: TiePlan, codebooks: Codebooks, report: TieReport) -> tuple[list, list]:
    """Export and verify in a staging folder, then rename every output into place together."""
    with staging_dir(run.out_dir) as staging:
        try:
            exports, checks = export_and_verify(run, codebooks, Path(staging), report.notes)
        except CompressError as e:  # name the output folder, not the staging folder inside it
            e.parts = tuple(p.replace(str(Path(staging)), str(run.out_dir)) if isinstance(p, str) else p
                            for p in e.parts)
            e.args = (e.render(),)
            raise
        staged = [Path(f) for e in exports for f in e.files]
        for e in exports:  # the reports name the staging folder's files; point them at the outputs
            e.files = [str(run.out_dir / Path(f).name) for f in e.files]
            e.path = str(run.out_dir / Path(e.path).name)
        for v in checks:
            v.path = str(run.out_dir / Path(v.path).name)
        report.outputs.exports = [Path(f).name for e in exports for f in e.files]
        report.exports, report.verification = exports, checks
        with atomic_outputs([*run.paths, *(run.out_dir / p.name for p in staged)], force=run.force,
                            inputs=run.inputs) as tmps:
            tmps[0].write_bytes(payload)
            tmps[1].write_text(plan.to_json(), encoding="utf-8")
            tmps[2].write_text(report.to_json(), encoding="utf-8")
            for src, tmp in zip(staged, tmps[3:]):
                os.replace(src, tmp)
    return exports, checks


# --- the working model ----------------------------------------------------------------------------

def _working_copy(loaded, data, given: tuple | None = None) -> tuple[nn.Module, nn.Module | None, tuple | None]:
    """(model to merge, untouched reference or None, example inputs or None).

    A module without example inputs (`given` or its file's) borrows two calibration rows of `data`.
    """
    module = getattr(loaded, "module", None)
    examples = given or getattr(loaded, "example_inputs", None)
    if not examples and isinstance(module, nn.Module) and data is not None and len(data.calib_inputs):
        examples = (data.calib_inputs[:2].clone(),)
    if isinstance(module, torch.jit.ScriptModule) and examples:  # tied as tensors, exported as TorchScript
        tensors = _tensor_module(loaded.tensors, getattr(loaded, "aliases", {}) or {})
        return tensors, module, tuple(examples)
    if isinstance(module, nn.Module) and not isinstance(module, torch.jit.ScriptModule):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation on deepcopy
            # a copy: `program.module()` shares its tensors with the program (and with loaded.module)
            return copy.deepcopy(module), module, (tuple(examples) if examples else None)
    return _tensor_module(loaded.tensors, getattr(loaded, "aliases", {}) or {}), None, None


def _merged_script(script: torch.jit.ScriptModule, merged: nn.Module) -> torch.jit.ScriptModule:
    """A copy of the TorchScript module holding the merged (decoded) values of `merged`'s tensors."""
    from ..state import effective_tensors

    copy_ = copy.deepcopy(script)
    with torch.no_grad():
        copy_.load_state_dict(effective_tensors(merged), strict=False)
    return copy_


def _no_onnx_notes(run: _Run) -> list[str]:
    """Why no ONNX file is written when one was asked for, and which option gives one."""
    if not run.export.onnx or run.graph_examples is not None:
        return []
    module = getattr(run.loaded, "module", None)
    shape, data = Option("input_shape").python(), Option("data").python()
    if isinstance(module, nn.Module):
        return [(f"no ONNX written: {run.loaded.path} has no example inputs to trace it with; give them with "
                f"{shape} (e.g. '1x3x224x224', 'int64:1x128') or {data}")]
    return [(f"no ONNX written: {run.loaded.path} holds tensors only (no graph to export); give the model as a .pt2 "
            "(torch.export.save with example inputs)")]


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
            raise BadInputError("fine-tuning (", Option("epochs"), ") needs calibration data (", Option("data"), ")")
        return None
    ft = finetune or FinetuneConfig()
    if ft.epochs == 0 and not ft.codebook_epochs:
        return None
    if reference is None:
        raise BadInputError(f"{path} holds only tensors (no graph or module), so it cannot be fine-tuned; "
                            "pass ", Option("epochs", 0), " or give a .pt2 program")
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
