"""onnxruntime sessions for codebook models, in the default or the memory-saving mode.

Default mode (a plain `onnxruntime.InferenceSession`, any options): onnxruntime constant-folds each
decode when the session loads, so the weights are dense in memory and inference runs at dense
speed. The exported graph is shaped so that this costs no more memory than the fp32 model: layout
ops (transposes) are applied to the indices, and an embedding table read by a Gather is never
decoded whole (its rows are gathered from the indices at run time).

`keep_compressed=True` keeps the weights as codebook + indices in memory and decodes them at every
run: constant folding off, and onnxruntime's memory pattern off (with it on, every run allocates one
block planned for the whole run, decoded weights included: MiniLM resident 59 MB at batch 8 against
42 MB without). The arena keeps the buffers of the largest decode between runs, so a model with
one very large layer keeps that layer's decoded size resident; `compressed_run_options()` returns
those buffers after every run at the cost of faulting the pages in again (a 4096x4096 layer:
resident 150 MB -> 22 MB, 18 ms -> 60 ms per run). Every run pays the decode: about 1 ns per weight
on these CPUs, so the mode suits large batches better than batch-1 latency; see BENCHMARKS.md
("Runtime") for the measured ratios. `verify` measures both modes.

Example::

    session = make_session("compressed/digits_mlp.onnx", provider="cpu", keep_compressed=True)
    session.run(None, {"x": x.numpy()})
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInputError, CompressError
from .records import Record
from .sandbox import RunBudget, run_limited

# Constant folding is what expands the decode into dense weights at load; the other optimizers stay on
# (turning them all off, ORT_DISABLE_ALL, measured the same memory and latency).
_CONFIG = {"optimization.disable_specified_optimizers": "ConstantFolding"}
_SHRINK = "memory.enable_memory_arena_shrinkage"  # a run option: the arena returns what the run freed
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_PACKAGE_FOR = {"CUDAExecutionProvider": "onnxruntime-gpu (pip install 'compress[gpu]') and a CUDA GPU",
                "TensorrtExecutionProvider": "onnxruntime-gpu with TensorRT",
                "DmlExecutionProvider": "onnxruntime-directml",
                "OpenVINOExecutionProvider": "onnxruntime-openvino"}


def resolve_provider(provider: str) -> str:
    """The onnxruntime provider name for `cpu`, `cuda` or a full name; refuses one that is not available."""
    import onnxruntime as ort

    name = PROVIDER_ALIASES.get(provider.lower(), provider)
    available = ort.get_available_providers()
    if name not in available:
        need = _PACKAGE_FOR.get(name, "an onnxruntime build that includes it")
        raise CompressError(f"{name} is not available in this onnxruntime: it needs {need}; "
                            f"available providers: {', '.join(available)}")
    return name


def session_options(keep_compressed: bool = False):
    """SessionOptions for the default mode, or with constant folding off (`keep_compressed`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if keep_compressed:
        for key, value in _CONFIG.items():
            opts.add_session_config_entry(key, value)
        opts.enable_mem_pattern = False
    return opts


def compressed_run_options(provider: str = "cpu"):
    """RunOptions that return the arenas' free memory after the run (`arena_devices`): for a
    keep-compressed session of a model with one very large layer (see the module docstring)."""
    import onnxruntime as ort

    opts = ort.RunOptions()
    opts.add_run_config_entry(_SHRINK, arena_devices(provider))
    return opts


def arena_devices(provider: str) -> str:
    """The arenas to shrink after a run: the CPU's, and the GPU's under the CUDA provider."""
    return "cpu:0;gpu:0" if PROVIDER_ALIASES.get(provider.lower(), provider) == "CUDAExecutionProvider" else "cpu:0"


def make_session(path: str | Path, provider: str = "cpu", keep_compressed: bool = False):
    """An `onnxruntime.InferenceSession` on exactly `provider` (never a silent fallback to CPU).

    Args:
        path: the `.onnx` file; external data must sit inside its folder.
        provider: "cpu", "cuda" or a full onnxruntime provider name.
        keep_compressed: keep weights as codebook + indices in memory (constant folding off).

    Example::

        session = make_session("model.onnx", "cuda")   # CompressError if onnxruntime-gpu is missing
    """
    import onnxruntime as ort

    from .io import read_onnx

    path = Path(path)
    name = resolve_provider(provider)
    read_onnx(path, load_data=False)
    release_freed_memory()  # the check parsed the protobuf in Python: give those pages back
    try:
        session = ort.InferenceSession(str(path), session_options(keep_compressed), providers=[name])
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(f"{path}: onnxruntime could not load the model: {first}") from e
    if session.get_providers()[0] != name:
        raise CompressError(f"{path}: onnxruntime fell back to {session.get_providers()[0]} instead of {name}; "
                            f"check the {name} installation")
    release_freed_memory()  # what onnxruntime freed while it loaded (constant folding's intermediates)
    return session


def release_freed_memory() -> None:
    """Return freed heap pages to the system (glibc's `malloc_trim`; a no-op elsewhere).

    glibc keeps freed blocks under its mmap threshold in the heap, so memory freed while a model was
    parsed or folded would otherwise stay resident for the life of the process.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)


def feed(session, inputs) -> dict[str, np.ndarray]:
    """Map inputs (arrays or tensors, in the model's input order) to the session's input names, checked."""
    arrays = [_as_array(x) for x in (inputs if isinstance(inputs, (tuple, list)) else (inputs,))]
    expected = session.get_inputs()
    if len(arrays) != len(expected):
        raise BadInputError(f"the model takes {len(expected)} inputs ({', '.join(i.name for i in expected)}), "
                            f"got {len(arrays)}")
    out = {}
    for spec, arr in zip(expected, arrays):
        want = [d if isinstance(d, int) else None for d in spec.shape]
        fits = len(want) == arr.ndim and all(w is None or w == s for w, s in zip(want, arr.shape))
        if not fits:
            shape = "[" + ", ".join(str(d) if isinstance(d, int) else str(d or "?") for d in spec.shape) + "]"
            raise BadInputError(f"input `{spec.name}` expects shape {shape} ({spec.type}), got "
                                f"{list(arr.shape)} ({arr.dtype}); check the data file")
        out[spec.name] = arr
    return out


def _as_array(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x)


# --- measuring in a fresh process ---------------------------------------------------------------

@dataclass
class RuntimeStats(Record):
    """Load time, median latency and resident memory of one session mode (measured in a subprocess)."""

    mode: str  # "default" | "keep_compressed"
    provider: str
    load_s: float
    latency_ms: float  # median over `runs`
    rss_mb: float  # resident memory the session adds, after its runs
    peak_mb: float  # the most it added at any moment (load, folding, a run's decode)
    runs: int

    _what = "runtime stats"


def measure(path: str | Path, inputs, *, provider: str = "cpu", keep_compressed: bool = False,
            runs: int = 20, scratch: str | Path | None = None, budget: RunBudget | None = None) -> RuntimeStats:
    """Measure a session in a fresh Python process (so memory is the session's alone).

    `inputs` are written as .npy files to `scratch` (a temporary folder by default). The process is
    stopped when it exceeds `budget` (time and memory; none by default).
    """
    import tempfile

    name = resolve_provider(provider)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        files = []
        for i, arr in enumerate(_as_array(x) for x in (inputs if isinstance(inputs, (tuple, list)) else (inputs,))):
            files.append(str(Path(tmp) / f"input{i}.npy"))
            np.save(files[-1], arr)
        job = {"path": str(path), "provider": name, "keep_compressed": keep_compressed, "config": _CONFIG,
               "runs": runs, "inputs": files}
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        if budget is None:
            proc = subprocess.run([sys.executable, "-c", _CHILD], check=False, input=json.dumps(job),
                                  capture_output=True, text=True, env=env)
        else:
            proc = run_limited([sys.executable, "-c", _CHILD], json.dumps(job), budget,
                               f"{path}: measuring the onnxruntime session", env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CompressError(f"{path}: measuring the onnxruntime session failed: {last}")
    d = json.loads(proc.stdout.strip().splitlines()[-1])
    return RuntimeStats("keep_compressed" if keep_compressed else "default", name, d["load_s"],
                        d["latency_ms"], d["rss_mb"], d["peak_mb"], runs)


# The child imports only onnxruntime and numpy (not torch, not this package): fast to start, and its
# memory baseline is taken after those imports.
_CHILD = r"""
import json, statistics, sys, time
import numpy as np
import onnxruntime as ort

def memory_mb(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def release_freed_memory():  # as compress.runtime.make_session does
    import ctypes, ctypes.util
    name = ctypes.util.find_library("c")
    try:
        trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        trim = None
    if trim is not None:
        trim(0)

job = json.loads(sys.stdin.read())
inputs = [np.load(f) for f in job["inputs"]]
base = memory_mb("VmRSS")
opts = ort.SessionOptions()
opts.log_severity_level = 3
if job["keep_compressed"]:  # as compress.runtime.session_options does
    for key, value in job["config"].items():
        opts.add_session_config_entry(key, value)
    opts.enable_mem_pattern = False
start = time.perf_counter()
session = ort.InferenceSession(job["path"], opts, providers=[job["provider"]])
release_freed_memory()
load = time.perf_counter() - start
if session.get_providers()[0] != job["provider"]:
    sys.exit("session fell back to " + session.get_providers()[0])
fed = {i.name: a for i, a in zip(session.get_inputs(), inputs)}
session.run(None, fed)
times = []
for _ in range(max(job["runs"], 1)):
    t = time.perf_counter()
    session.run(None, fed)
    times.append((time.perf_counter() - t) * 1000)
print(json.dumps({"load_s": load, "latency_ms": statistics.median(times),
                  "rss_mb": memory_mb("VmRSS") - base, "peak_mb": memory_mb("VmHWM") - base}))
"""
