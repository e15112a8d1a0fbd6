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

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import BadInputError, CompressError, Option
from .execution import as_args, run
from .records import Record
from .runtime import RuntimeStats, make_session, measure, resolve_provider
from .sandbox import RunBudget, package_dir, run_limited
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
           measure_runtime: bool = True, targets: torch.Tensor | None = None, isolate: bool = True,
           budget: RunBudget | None = None) -> VerifyResult:
    """Run `onnx_path` in onnxruntime on `inputs` and compare with the reference model's outputs.

    Args:
        onnx_path: the exported model.
        reference: the merged PyTorch model (nn.Module, or an ExportedProgram), or for a model tied
            from ONNX the merged ONNX model (a `ModelProto` or an .onnx path), run in onnxruntime.
        inputs: a tensor (or tuple of tensors) with the batch to run.
        provider: "cpu", "cuda" or a full onnxruntime provider name (never a silent fallback).
        atol, rtol: an output passes when |onnx - reference| <= atol + rtol * |reference| everywhere;
            an output with a NaN or infinite value never passes.
        original: optionally the model before merging (PyTorch or ONNX, as `reference`), to report how far
            compression moved outputs.
        runs: runs for the median latency.
        keep_compressed: check with constant folding off (weights stay codebook + indices in memory).
        measure_runtime: measure load time, latency and memory of both modes in a subprocess.
        targets: class labels of `inputs`, if any: top-1 agreement is then reported only for outputs
            with one column per class (without them, for every 2-D output).
        isolate: run onnxruntime in a child process within `budget` (the file may be a stranger's:
            a graph can loop or allocate without bound); False runs it here (for a file just exported).
        budget: time and memory for one run (default `RunBudget.for_model` of the file, its external
            data and the inputs). A graph whose constants already ask for more is refused unrun.

    Example::

        result = verify("model.onnx", merged, data.test_inputs, original=dense)
        print("\\n".join(result.lines()))
    """
    from .io import read_onnx
    from .io.onnx_cost import check_run_cost

    onnx_path = Path(onnx_path)
    name = resolve_provider(provider)
    proto = read_onnx(onnx_path, load_data=False)
    arrays = [x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x) for x in as_args(inputs)]
    budget = budget or RunBudget.for_model(_declared_bytes(onnx_path, proto) + sum(a.nbytes for a in arrays))
    check_run_cost(proto, onnx_path, budget.memory_bytes)  # a graph that asks for too much is refused unrun
    fed = _feed(proto, arrays, onnx_path)
    names, got, used = _run(onnx_path, fed, name, keep_compressed, isolate, budget)
    want = _outputs(reference, inputs, fed, name, isolate, budget)
    if len(want) != len(got):
        raise BadInputError(f"{onnx_path}: the ONNX model has {len(got)} outputs, the reference model "
                            f"{len(want)}; is ", Option("reference"), " the model this file was exported from?")
    batch = int(next(iter(fed.values())).shape[0]) if fed and next(iter(fed.values())).ndim else 1
    result = VerifyResult(str(onnx_path), used, "keep_compressed" if keep_compressed else "default", batch)
    result.checks = [_compare(n, g, w, atol, rtol) for n, g, w in zip(names, got, want)]
    result.notes += [note for n, g, w in zip(names, got, want) if (note := _not_finite(n, g, w))]
    if original is not None:
        base = _outputs(original, inputs, fed, name, isolate, budget)
        classes = int(targets.max()) + 1 if targets is not None and targets.numel() else None
        result.original = [_against_original(n, g, b, classes) for n, g, b in zip(names, got, base)]
    if measure_runtime:
        result.runtime = [measure(onnx_path, list(fed.values()), provider=provider, keep_compressed=kc, runs=runs,
                                  budget=RunBudget(budget.seconds * (runs + 2), budget.memory_bytes))
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

def _run(path: Path, fed: dict, provider: str, keep_compressed: bool, isolate: bool, budget: RunBudget
         ) -> tuple[list[str], list, str]:
    """(output names, outputs, provider used) of one run, in a child process within `budget` when `isolate`."""
    if isolate:
        return _run_isolated(path, fed, provider, keep_compressed, budget)
    return _run_here(path, fed, provider, keep_compressed)


def _outputs(model, inputs, fed: dict, provider: str, isolate: bool, budget: RunBudget) -> list[np.ndarray]:
    """The outputs of a PyTorch model, or of an ONNX model (a `ModelProto` or an .onnx path) in onnxruntime
    on the same feed (a stranger's ONNX file in a child process within `budget`, as the file checked)."""
    if isinstance(model, (str, Path)):
        return _run(Path(model), fed, provider, False, isolate, budget)[1]
    if type(model).__name__ == "ModelProto":
        import onnx

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "reference.onnx"
            onnx.save(model, str(path), save_as_external_data=model.ByteSize() > 1_800_000_000,
                      location="reference.onnx.data")
            return _run(path, fed, provider, False, isolate, budget)[1]
    return [t.detach().cpu().numpy() for t in run(model, inputs)]


def _compare(name: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> OutputCheck:
    if got.shape != want.shape:
        return OutputCheck(name, list(got.shape), list(want.shape), float("inf"), 0.0, atol, rtol, False)
    g, w = got.astype(np.float64), want.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: NaN, reported and never ok
        diff = np.abs(g - w)
    max_abs = float(np.max(diff)) if diff.size else 0.0  # NaN when either side has one: shown, and never ok
    max_ref = float(np.nanmax(np.abs(w))) if w.size and not np.isnan(w).all() else 0.0
    if want.dtype == np.float16:
        # onnxruntime and torch round half-precision results in different places: one rounding step
        # at the output's scale is not a disagreement, so never check finer than that
        eps = float(np.finfo(np.float16).eps)
        atol, rtol = max(atol, eps * max_ref), max(rtol, eps)
    finite = bool(np.isfinite(g).all() and np.isfinite(w).all())
    ok = finite and bool(np.allclose(g, w, atol=atol, rtol=rtol))
    return OutputCheck(name, list(got.shape), list(want.shape), max_abs, max_ref, atol, rtol, ok)


def _not_finite(name: str, got: np.ndarray, want: np.ndarray) -> str:
    """A note for an output holding NaN or infinite values (never a pass, whatever the other side says)."""
    bad = [f"the ONNX output has {n:,}" for n in [_count_not_finite(got)] if n]
    bad += [f"the reference output has {n:,}" for n in [_count_not_finite(want)] if n]
    return f"`{name}`: {' and '.join(bad)} NaN or infinite values; a non-finite output fails the check" if bad else ""


def _count_not_finite(a: np.ndarray) -> int:
    return int((~np.isfinite(a)).sum()) if a.dtype.kind in "fc" else 0


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


# --- running the ONNX file ----------------------------------------------------------------------

def _feed(proto, arrays: list[np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """The inputs by the graph's input names, each checked against the declared type and shape."""
    from onnx import helper

    inits = {i.name for i in proto.graph.initializer}
    specs = [v for v in proto.graph.input if v.name not in inits]
    if len(arrays) != len(specs):
        raise BadInputError(f"{path}: the model takes {len(specs)} inputs ({', '.join(v.name for v in specs)}), got "
                            f"{len(arrays)}")
    out = {}
    for spec, arr in zip(specs, arrays):
        tensor = spec.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        try:
            want = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        except (KeyError, TypeError, ValueError):
            want = None
        shape = "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                                for d in tensor.shape.dim) + "]"
        kind = want.name if want is not None else f"ONNX type {tensor.elem_type}"
        if want is not None and arr.dtype != want:
            raise BadInputError(f"{path}: input `{spec.name}` is {want.name} {shape}, the data gives {arr.dtype.name} "
                                f"{list(arr.shape)}; save the inputs as {want.name}")
        if tensor.HasField("shape") and (len(dims) != arr.ndim or any(d is not None and d != s
                                                                      for d, s in zip(dims, arr.shape))):
            raise BadInputError(f"{path}: input `{spec.name}` expects shape {shape} ({kind}), got {list(arr.shape)} "
                                f"({arr.dtype.name}); check the data file")
        out[spec.name] = np.ascontiguousarray(arr)
    return out


def _declared_bytes(path: Path, proto) -> int:
    """The file and the external data files it names (each once)."""
    from .io.onnx import all_tensors

    locations = {e.value for t in all_tensors(proto) if t.data_location == 1 for e in t.external_data
                 if e.key == "location"}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations
                                     if (path.parent / loc).is_file())


def _run_here(path: Path, fed: dict, provider: str, keep_compressed: bool) -> tuple[list[str], list, str]:
    session = make_session(path, provider, keep_compressed)
    try:
        got = session.run(None, fed)
    except Exception as e:  # onnxruntime's own exception types (InvalidArgument, Fail, ...)
        raise BadInputError(f"{path}: onnxruntime could not run the model: {_first_line(e)}") from e
    return [o.name for o in session.get_outputs()], got, session.get_providers()[0]


def _run_isolated(path: Path, fed: dict, provider: str, keep_compressed: bool,
                  budget: RunBudget) -> tuple[list[str], list, str]:
    """One run in a child process (onnxruntime and numpy only) within `budget`; its outputs come back as .npy."""
    with tempfile.TemporaryDirectory() as tmp:
        inputs = {}
        for i, (name, arr) in enumerate(fed.items()):
            inputs[name] = str(Path(tmp) / f"in{i}.npy")
            np.save(inputs[name], arr)
        job = {"package": str(Path(package_dir()).parent), "path": str(path), "provider": provider,
               "keep_compressed": keep_compressed, "inputs": inputs, "out": tmp}
        proc = run_limited([sys.executable, "-c", _RUN_CHILD], json.dumps(job), budget,
                           f"{path}: running the model in onnxruntime")
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise BadInputError(f"{path}: onnxruntime stopped while running the model: {last[:200]}")
        reply = json.loads(lines[-1])
        if "error" in reply:
            if reply["error"] == "fallback":
                raise CompressError(f"{path}: onnxruntime fell back to {reply['message']} instead of {provider}; "
                                    f"check the {provider} installation")
            raise BadInputError(f"{path}: onnxruntime could not {reply['error']} the model: {reply['message']}")
        try:
            return reply["names"], [np.load(f, allow_pickle=False) for f in reply["outputs"]], reply["provider"]
        except (OSError, ValueError) as e:
            raise BadInputError(f"{path}: onnxruntime's outputs could not be read back: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


# The child imports onnxruntime, numpy and `compress.runtime` alone (under a bare `compress` package,
# so not the library's torch-importing `__init__`): the session options are exactly `make_session`'s.
_RUN_CHILD = r"""
import json, sys, types
job = json.loads(sys.stdin.read())
package = types.ModuleType("compress")
package.__path__ = [job["package"] + "/compress"]
sys.modules["compress"] = package
import numpy as np
import onnxruntime as ort
from compress.runtime import session_options

def reply(**kw):
    print(json.dumps(kw))
    sys.exit(0)

def first(e):
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]

try:
    session = ort.InferenceSession(job["path"], session_options(job["keep_compressed"]), providers=[job["provider"]])
except Exception as e:
    reply(error="load", message=first(e))
if session.get_providers()[0] != job["provider"]:
    reply(error="fallback", message=session.get_providers()[0])
try:
    got = session.run(None, {name: np.load(f) for name, f in job["inputs"].items()})
    files = []
    for i, value in enumerate(got):
        value = np.asarray(value)
        if value.dtype.hasobject:
            reply(error="run", message="output %d is not a tensor (a sequence or map)" % i)
        files.append(job["out"] + "/out%d.npy" % i)
        np.save(files[-1], value, allow_pickle=False)
except Exception as e:
    reply(error="run", message=first(e))
reply(names=[o.name for o in session.get_outputs()], outputs=files, provider=session.get_providers()[0])
"""
