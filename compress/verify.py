"""Prove an exported model still computes what the merged PyTorch model computes.

`verify` runs the ONNX file in onnxruntime on a batch of inputs and compares every output with the
reference (merged) model; decode is exact, so differences are float reordering (~1e-6). With
`original`, it also says how far the compressed model is from the model before merging (max abs,
mean cosine, top-1 agreement). It measures load time, latency and memory of both session modes in a
fresh process. `verify_safetensors` loads a safetensors export and compares it bit for bit.

Example::

    result = verify("out/model.onnx", merged_model, torch.rand(64, 64))
    result.passed, result.checks[0].max_abs      # (True, 2.4e-07)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import BadInputError, Option
from .execution import as_args, run
from .records import Record
from .runtime import RuntimeStats, feed, make_session, measure, resolve_provider, session_options
from .state import effective_tensors

RESULT_VERSION = 1


@dataclass
class OutputCheck(Record):
    """One output (or one tensor, for safetensors): shapes, largest difference, and the verdict."""

    name: str
    shape: list[int]
    reference_shape: list[int]
    max_abs: float
    max_reference: float  # largest |reference| value, for the relative part of the tolerance
    atol: float
    rtol: float
    ok: bool

    @property
    def tolerance(self) -> float:
        return self.atol + self.rtol * self.max_reference

    def line(self) -> str:
        mark = "✓" if self.ok else "✗"
        shapes = f"{self.shape}" if self.shape == self.reference_shape else f"{self.shape} vs {self.reference_shape}"
        return f"{mark} {self.name} {shapes} max diff {self.max_abs:.3g} (tolerance {self.tolerance:.3g})"


@dataclass
class OriginalComparison(Record):
    """How far the compressed model's output is from the original (unmerged) model's."""

    name: str
    max_abs: float
    mean_cosine: float
    top1_agreement: float | None  # for 2-D outputs [batch, classes]


@dataclass
class VerifyResult(Record):
    """Outcome of `verify` / `verify_safetensors`; `passed` is True when every check is within tolerance."""

    path: str
    provider: str
    mode: str  # "default" | "keep_compressed" | "bit-exact" (safetensors)
    batch: int
    checks: list[OutputCheck] = field(default_factory=list)
    original: list[OriginalComparison] = field(default_factory=list)
    runtime: list[RuntimeStats] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    version: int = RESULT_VERSION

    _what = "verify result"
    _version_required = True
    _derived = ("passed",)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def lines(self) -> list[str]:
        """One line per output: ✓/✗, shapes, max diff and tolerance."""
        return [c.line() for c in self.checks]

    def to_table(self, checks: bool = True):
        """rich Tables: the checks (unless `checks=False`), the comparison with the original, the runtime."""
        from rich.console import Group
        from rich.table import Table

        table = Table(title=f"{self.path} ({self.provider or 'safetensors'}, {self.mode}, batch {self.batch})")
        for col in ("", "output", "shape", "max diff", "tolerance"):
            table.add_column(col)
        for c in self.checks:
            table.add_row("✓" if c.ok else "✗", c.name, str(c.shape), f"{c.max_abs:.3g}", f"{c.tolerance:.3g}")
        parts = [table] if checks else []
        if self.original:
            t = Table(title="vs the original model")
            for col in ("output", "max abs", "mean cosine", "top-1 agreement"):
                t.add_column(col)
            for o in self.original:
                top1 = "" if o.top1_agreement is None else f"{o.top1_agreement:.2%}"
                t.add_row(o.name, f"{o.max_abs:.3g}", f"{o.mean_cosine:.6f}", top1)
            parts.append(t)
        if self.runtime:
            t = Table(title="onnxruntime (measured in a fresh process)")
            for col in ("mode", "load s", "median ms", "resident MB", "peak MB"):
                t.add_column(col)
            for r in self.runtime:
                t.add_row(r.mode, f"{r.load_s:.3f}", f"{r.latency_ms:.3f}", f"{r.rss_mb:.1f}", f"{r.peak_mb:.1f}")
            parts.append(t)
        return Group(*parts)


def verify(onnx_path: str | Path, reference, inputs, *, provider: str = "cpu", atol: float = 1e-4,
           rtol: float = 1e-4, original=None, runs: int = 20, keep_compressed: bool = False,
           measure_runtime: bool = True, targets: torch.Tensor | None = None) -> VerifyResult:
    """Run `onnx_path` in onnxruntime on `inputs` and compare with the reference model's outputs.

    Args:
        onnx_path: the exported model.
        reference: the merged PyTorch model (nn.Module, or an ExportedProgram), or for a model tied
            from ONNX the merged ONNX model (a `ModelProto` or an .onnx path), run in onnxruntime.
        inputs: a tensor (or tuple of tensors) with the batch to run.
        provider: "cpu", "cuda" or a full onnxruntime provider name (never a silent fallback).
        atol, rtol: an output passes when |onnx - reference| <= atol + rtol * |reference| everywhere.
        original: optionally the model before merging (PyTorch or ONNX, as `reference`), to report how far
            compression moved outputs.
        runs: runs for the median latency.
        keep_compressed: check with constant folding off (weights stay codebook + indices in memory).
        measure_runtime: measure load time, latency and memory of both modes in a subprocess.
        targets: class labels of `inputs`, if any: top-1 agreement is then reported only for outputs
            with one column per class (without them, for every 2-D output).

    Example::

        result = verify("model.onnx", merged, data.test_inputs, original=dense)
        print("\\n".join(result.lines()))
    """
    onnx_path = Path(onnx_path)
    session = make_session(onnx_path, provider, keep_compressed)
    fed = feed(session, as_args(inputs))
    got = session.run(None, fed)
    names = [o.name for o in session.get_outputs()]
    want = _outputs(reference, inputs, provider)
    if len(want) != len(got):
        raise BadInputError(f"{onnx_path}: the ONNX model has {len(got)} outputs, the reference model "
                            f"{len(want)}; is ", Option("reference"), " the model this file was exported from?")
    batch = int(next(iter(fed.values())).shape[0]) if fed and next(iter(fed.values())).ndim else 1
    result = VerifyResult(str(onnx_path), session.get_providers()[0],
                          "keep_compressed" if keep_compressed else "default", batch)
    result.checks = [_compare(n, g, w, atol, rtol) for n, g, w in zip(names, got, want)]
    if original is not None:
        base = _outputs(original, inputs, provider)
        classes = int(targets.max()) + 1 if targets is not None and targets.numel() else None
        result.original = [_against_original(n, g, b, classes) for n, g, b in zip(names, got, base)]
    if measure_runtime:
        result.runtime = [measure(onnx_path, list(fed.values()), provider=provider, keep_compressed=kc, runs=runs)
                          for kc in (False, True)]
    return result


def verify_safetensors(path: str | Path, reference_state_dict) -> VerifyResult:
    """Load a safetensors export and compare every tensor bit for bit with the merged model's values.

    `reference_state_dict` is the merged model or its state_dict (codebook storage is decoded).

    Example::

        verify_safetensors("out/model.safetensors", merged_model).passed
    """
    from .io import load_codebook_safetensors

    loaded = load_codebook_safetensors(path)
    reference = effective_tensors(reference_state_dict)
    result = VerifyResult(str(path), "", "bit-exact", 0)
    for name, ref in reference.items():
        got = loaded.get(name)
        if got is None:
            result.checks.append(OutputCheck(name, [], list(ref.shape), float("inf"), 0.0, 0.0, 0.0, False))
            continue
        same = got.shape == ref.shape and got.dtype == ref.dtype and _bits_equal(got, ref)
        diff = (got.double() - ref.double()).abs().max().item() if got.shape == ref.shape and ref.numel() else 0.0
        result.checks.append(OutputCheck(name, list(got.shape), list(ref.shape), diff, 0.0, 0.0, 0.0, same))
    extra = sorted(set(loaded) - set(reference))
    if extra:
        result.notes.append(f"in the file but not in the reference: {', '.join(extra)}")
    return result


# --- comparisons --------------------------------------------------------------------------------

def _outputs(model, inputs, provider: str) -> list[np.ndarray]:
    """The outputs of a PyTorch model, or of an ONNX model (a `ModelProto` or an .onnx path) in onnxruntime."""
    if isinstance(model, (str, Path)):
        session = make_session(model, provider)
    elif type(model).__name__ == "ModelProto":
        import onnxruntime as ort

        session = ort.InferenceSession(model.SerializeToString(), session_options(),
                                       providers=[resolve_provider(provider)])
    else:
        return [t.detach().cpu().numpy() for t in run(model, inputs)]
    return session.run(None, feed(session, as_args(inputs)))


def _compare(name: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> OutputCheck:
    if got.shape != want.shape:
        return OutputCheck(name, list(got.shape), list(want.shape), float("inf"), 0.0, atol, rtol, False)
    g, w = got.astype(np.float64), want.astype(np.float64)
    diff = np.abs(g - w)
    max_abs = float(np.nanmax(diff)) if diff.size else 0.0
    max_ref = float(np.nanmax(np.abs(w))) if w.size else 0.0
    if want.dtype == np.float16:
        # onnxruntime and torch round half-precision results in different places: one rounding step
        # at the output's scale is not a disagreement, so never check finer than that
        eps = float(np.finfo(np.float16).eps)
        atol, rtol = max(atol, eps * max_ref), max(rtol, eps)
    ok = bool(np.allclose(g, w, atol=atol, rtol=rtol, equal_nan=True))
    return OutputCheck(name, list(got.shape), list(want.shape), max_abs, max_ref, atol, rtol, ok)


def _against_original(name: str, got: np.ndarray, base: np.ndarray, classes: int | None) -> OriginalComparison:
    g, b = got.astype(np.float64), base.astype(np.float64)
    if g.shape != b.shape:
        raise BadInputError(f"output `{name}` has shape {list(g.shape)}, the original model's {list(b.shape)}; "
                            "is ", Option("original"), " the model this one was compressed from?")
    rows_g, rows_b = g.reshape(max(len(g), 1) if g.ndim else 1, -1), b.reshape(max(len(b), 1) if b.ndim else 1, -1)
    norms = np.linalg.norm(rows_g, axis=1) * np.linalg.norm(rows_b, axis=1)
    cos = np.where(norms > 0, (rows_g * rows_b).sum(1) / np.where(norms > 0, norms, 1), 1.0)
    top1 = None
    if g.ndim == 2 and g.shape[1] >= 2 and classes in (None, g.shape[1]):
        top1 = float((g.argmax(1) == b.argmax(1)).mean())
    return OriginalComparison(name, float(np.abs(g - b).max()) if g.size else 0.0, float(cos.mean()), top1)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    if a.numel() == 0:
        return True
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.element_size() else torch.equal(a, b)
