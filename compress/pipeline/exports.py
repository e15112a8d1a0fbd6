"""The exports of a tie run: what to write (`ExportOptions`), writing and verifying them, and what the
run must say about them (the independent size bound, every tensor the files do not keep compact).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..codebook import Codebooks
from ..errors import Option, UnsupportedModelError, VerificationError
from ..export import ExportReport, Loss, export_onnx, export_safetensors
from ..export.bound import model_bound
from ..records import Record
from ..verify import verify, verify_safetensors


@dataclass
class ExportOptions(Record):
    """What `tie` exports after merging, and how it verifies the exports.

    `onnx`: write `<stem>.onnx` (only for models with a graph and example inputs); `safetensors`:
    write `<stem>.safetensors`; `verify`: run the ONNX file in onnxruntime on the test (or example)
    inputs and load the safetensors back, against the merged model, within `atol`/`rtol`;
    `bound`: measure the ONNX file against the independent size bound (one plain fp32 export of the
    original model); `strict`: fail (exit 1, files kept) when an export stores a merged tensor dense
    or its indices wider than planned.
    """

    onnx: bool = True
    safetensors: bool = True
    verify: bool = True
    provider: str = "cpu"
    atol: float = 1e-4
    rtol: float = 1e-4
    codebook_dtype: str = "float32"
    bound: bool = True
    strict: bool = False

    _what = "export options"


def export_targets(model_path: Path, export: ExportOptions, graph: bool) -> list[Path]:
    """`<stem>.onnx` (for a model with a graph) and `<stem>.safetensors` next to the merged model."""
    stem = model_path.name.rsplit(".tied.", 1)[0]
    out = []
    if export.onnx and graph:
        out.append(model_path.parent / f"{stem}.onnx")
    if export.safetensors:
        out.append(model_path.parent / f"{stem}.safetensors")
    return out


def export_and_verify(run, codebooks: Codebooks, staging: Path, notes: list[str]) -> tuple[list, list]:
    """Export into `staging` (the final names, so external data references stay right) and verify.

    `run` is the tie run (`tie._Run`). What could not be checked, and every tensor an export does not
    keep compact, is said in `notes` (never skipped silently).
    """
    export, model, examples = run.export, run.model, run.graph_examples
    exports, checks = [], []
    for target in run.export_paths:
        path = staging / target.name
        if target.suffix == ".onnx":
            try:
                report = export_onnx(run.runnable, codebooks, path, examples, codebook_dtype=export.codebook_dtype)
            except UnsupportedModelError as e:
                if not run.scripted:
                    raise
                notes.append(f"no ONNX written: {e} (TorchScript goes through the TorchScript-based exporter only); "
                             f"give the model as a .pt2 (torch.export.save) or a pickled nn.Module, or pass "
                             f"{Option('no_onnx').python()}")
                continue
            if export.bound:
                report.independent_bound = model_bound(run.reference, codebooks, examples,
                                                       codebook_dtype=export.codebook_dtype)
            exports.append(report)
            if export.verify and _cpu_lacks_bfloat16(model, export.provider):
                notes.append(f"{target.name} not run in onnxruntime: its CPU provider has no bfloat16 kernels "
                             "(verify it on a GPU with the CUDA provider); the safetensors file is verified")
            elif export.verify:
                checks.append(_verify_onnx(run, path))
        else:
            exports.append(export_safetensors(model, codebooks, path))
            if export.verify:
                checks.append(verify_safetensors(path, model))
    notes.extend(loss.text(Path(e.path).name) for e in exports for loss in e.losses())
    return exports, checks


def losses(exports: list[ExportReport]) -> list[tuple[str, Loss]]:
    """(file name, loss) for every merged tensor an export does not keep compact."""
    return [(Path(e.path).name, loss) for e in exports for loss in e.losses()]


def check_strict(exports: list[ExportReport], out_dir: Path) -> None:
    """`strict`: a `VerificationError` (exit 1) naming each tensor not kept compact; the files stay."""
    found = losses(exports)
    if found:
        what = "; ".join(loss.text(file) for file, loss in found)
        raise VerificationError(f"{what}; strict mode fails the run (the files in {out_dir} are kept for "
                                "inspection)")


def _cpu_lacks_bfloat16(model: nn.Module, provider: str) -> bool:
    cpu = provider.lower() in ("cpu", "cpuexecutionprovider")
    return cpu and any(t.dtype == torch.bfloat16 for t in (*model.parameters(), *model.buffers()))


def _verify_onnx(run, path: Path):
    data = run.data
    x = data.test_inputs if data is not None and len(data.test_inputs) else run.examples
    y = data.test_targets if data is not None and len(data.test_inputs) else None
    return verify(path, run.runnable, x, provider=run.export.provider, atol=run.export.atol, rtol=run.export.rtol,
                  original=run.reference, measure_runtime=False, targets=y, isolate=False)  # our own export
