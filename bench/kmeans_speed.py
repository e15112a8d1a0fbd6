"""Clustering speed: weights per second for the same tensors and the same K (16), with the error.

Kernels, each called on the same float32 values:

- `ours`: `compress.kmeans.kmeans_1d(values, 16)`;
- `sklearn n_init=1` / `sklearn default`: `sklearn.cluster.KMeans(16, ...)` on the values as a column
  (scikit-learn >= 1.4 resolves the default `n_init="auto"` to 1 run for k-means++, so the two differ
  only by that default);
- `cml ptp`: coremltools 9.0 `KMeans._cluster_weights_1d` with the default `KMeansConfig(n_bits=4)`, the
  function `PostTrainingPalettizer` calls per tensor (fast mode: values cast to fp16, rounded to 4
  decimals, clustered as weighted unique values by the exact 1D DP of the `kmeans1d` package);
- `cml exact`: the same with `enable_fast_kmeans_mode=False` (the exact DP on all values).

Sections: all of MiniLM's weight matrices (40 tensors, 22.7M weights), one 4096x4096 synthetic
matrix, growth from 1e4 to 1e8 weights, and the end-to-end palettizer on MiniLM (coremltools
`PostTrainingPalettizer.compress()` vs this toolkit's `analyze` + `merge_`, same tensors, K=16).
SSE is the sum of squared differences to the assigned centre, in float64 on the original values.

A slow peer stops at what fits: a run predicted (from its measured speed) to take more than
`--cap` seconds is skipped, and a method stops taking more tensors in a section after `--budget`
seconds; the tables say how much each covered.

    python bench/kmeans_speed.py          # ~5 min on 2 cores
    python bench/kmeans_speed.py --quick
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import _common as C
import numpy as np

K = 16
SIZES = (10**4, 10**5, 10**6, 10**7, 10**8)


# --- the kernels ------------------------------------------------------------------------------------

def _ours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from compress.kmeans import kmeans_1d

    r = kmeans_1d(x, K)
    return r.centers, r.labels


def _sklearn(n_init):
    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.cluster import KMeans

        kw = {} if n_init is None else {"n_init": n_init}
        km = KMeans(n_clusters=K, random_state=0, **kw).fit(x.reshape(-1, 1))
        return km.cluster_centers_.ravel(), km.labels_
    return run


def _cml(fast: bool):
    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        C.import_coremltools()
        from coremltools.optimize.torch._utils.k_means import KMeans, KMeansConfig

        cfg = KMeansConfig(n_bits=4, enable_fast_kmeans_mode=fast)
        with C.silenced():
            centers, labels = KMeans._cluster_weights_1d(torch.from_numpy(x), None, cfg)
        return centers.numpy().ravel(), labels.numpy()
    return run


KERNELS: dict[str, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    "ours": _ours,
    "cml ptp": _cml(True),
    "cml exact": _cml(False),
    "sklearn n_init=1": _sklearn(1),
    "sklearn default": _sklearn(None),
}


def sse(x: np.ndarray, centers: np.ndarray, labels: np.ndarray) -> float:
    err = x.astype(np.float64) - np.asarray(centers, dtype=np.float64)[np.asarray(labels, dtype=np.int64)]
    return float(err @ err)


# --- measuring under a budget -----------------------------------------------------------------------

@dataclass
class Cell:
    """One kernel on one tensor: median seconds over `runs` and the SSE; or why it was skipped."""

    method: str
    tensor: str
    numel: int
    seconds: float | None = None
    runs: list[float] = field(default_factory=list)
    sse: float | None = None
    k_found: int | None = None
    skipped: str = ""


class Meter:
    """Times kernels; skips a run predicted (linearly from the method's largest timed run) to exceed `cap`."""

    def __init__(self, repeat: int, cap: float, budget: float):
        self.repeat, self.cap, self.budget = repeat, cap, budget
        self.largest: dict[str, tuple[int, float]] = {}  # method -> (weights, median seconds) of its largest run
        self.spent: dict[tuple[str, str], float] = {}
        self.warm: set[str] = set()

    def predicted(self, method: str, n: int) -> float | None:
        if method not in self.largest:
            return None
        size, secs = self.largest[method]
        # below half a second, fixed costs dominate and a linear guess overshoots: just run it
        return secs * n / size if secs >= 0.5 else None

    def measure(self, method: str, section: str, name: str, x: np.ndarray, unlimited: bool = False) -> Cell:
        cell = Cell(method, name, x.size)
        spent = self.spent.get((method, section), 0.0)
        guess = self.predicted(method, x.size)
        if not unlimited and spent >= self.budget:
            cell.skipped = f"section budget of {self.budget:.0f} s used"
            return cell
        if not unlimited and guess is not None and guess > self.cap:
            cell.skipped = f"predicted {guess:.0f} s > cap {self.cap:.0f} s"
            return cell
        if method not in self.warm:  # imports and first-call costs stay out of the timings
            KERNELS[method](synthetic(4096, seed=9))
            self.warm.add(method)
        room = max(self.budget - spent, 0.0) if not unlimited else max(self.cap, 30.0)
        timing, (centers, labels) = C.time_runs(lambda: KERNELS[method](x), self.repeat, budget_s=room)
        self.spent[(method, section)] = spent + sum(timing.runs)
        if x.size >= self.largest.get(method, (0, 0.0))[0]:
            self.largest[method] = (x.size, timing.median)
        cell.seconds, cell.runs = timing.median, timing.runs
        cell.sse, cell.k_found = sse(x, centers, labels), int(np.unique(np.asarray(labels)).size)
        gc.collect()
        return cell


# --- tensors ----------------------------------------------------------------------------------------

def minilm_tensors() -> list[tuple[str, np.ndarray]]:
    """Every 2-D float weight in MiniLM's safetensors file (as float32), smallest first."""
    from safetensors import safe_open

    out = []
    with safe_open(str(C.minilm_path() / "model.safetensors"), "np") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open has keys() but is not iterable)
            x = f.get_tensor(name)
            if x.ndim == 2 and np.issubdtype(x.dtype, np.floating) and name.endswith("weight"):
                out.append((name, x.astype(np.float32).reshape(-1)))
    return sorted(out, key=lambda t: (t[1].size, t[0]))


def synthetic(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n, dtype=np.float32) * 0.02).astype(np.float32)


# --- sections ---------------------------------------------------------------------------------------

def section_minilm(meter: Meter, methods: list[str], tensors) -> tuple[list[Cell], C.Table]:
    cells = [meter.measure(m, "minilm", n, x, unlimited=(m == "ours")) for m in methods for n, x in tensors]
    total = sum(x.size for _, x in tensors)
    t = C.Table("kmeans_minilm", f"K-means on MiniLM's {len(tensors)} weight matrices ({total / 1e6:.1f}M weights), K={K}",
                ["method", "tensors done", "weights done", "time (sum of medians)", "weights/s", "ours on the same",
                 "ours faster by", "SSE vs ours"])
    ours = {c.tensor: c for c in cells if c.method == "ours"}
    for m in methods:
        done = [c for c in cells if c.method == m and c.seconds is not None]
        if not done:
            t.add(m, f"0/{len(tensors)}", "0", "—", "—", "—", "—", "—")
            continue
        secs, n = sum(c.seconds for c in done), sum(c.numel for c in done)
        o_secs = sum(ours[c.tensor].seconds for c in done)
        o_sse = sum(ours[c.tensor].sse for c in done)
        t.add(m, f"{len(done)}/{len(tensors)}", f"{n / 1e6:.2f}M", C.fmt_s(secs), f"{n / secs / 1e6:.2f}M",
              C.fmt_s(o_secs), C.fmt_ratio(secs / o_secs), f"{sum(c.sse for c in done) / o_sse:.4f}")
    t.notes = [(f"Times are the sum over tensors of each tensor's median of up to {meter.repeat} runs. "
               f"'SSE vs ours' > 1 means more error than ours on the same tensors.")]
    return cells, t


def section_synthetic(meter: Meter, methods: list[str], n_side: int) -> tuple[list[Cell], C.Table]:
    x = synthetic(n_side * n_side, seed=1)
    name = f"{n_side}x{n_side}"
    cells = [meter.measure(m, "synthetic", name, x, unlimited=(m == "ours")) for m in methods]
    ours = cells[0]
    t = C.Table("kmeans_synthetic", f"K-means on one {name} synthetic matrix (N(0, 0.02^2), {x.size / 1e6:.1f}M "
                f"weights), K={K}", ["method", "runs", "median", "weights/s", "ours faster by", "SSE", "SSE vs ours"])
    for c in cells:
        if c.seconds is None:
            t.add(c.method, 0, "—", "—", "—", "—", c.skipped)
            continue
        t.add(c.method, len(c.runs), C.fmt_s(c.seconds), f"{c.numel / c.seconds / 1e6:.2f}M",
              C.fmt_ratio(c.seconds / ours.seconds), f"{c.sse:.6g}", f"{c.sse / ours.sse:.4f}")
    return cells, t


def section_growth(meter: Meter, methods: list[str], sizes: tuple[int, ...]) -> tuple[list[Cell], C.Table]:
    cells = []
    for n in sizes:
        x = synthetic(n, seed=2)
        cells += [meter.measure(m, "growth", f"{n:.0e}", x, unlimited=(m == "ours")) for m in methods]
        del x
        gc.collect()
    t = C.Table("kmeans_growth", "K-means time against tensor size (synthetic N(0, 0.02^2)), median seconds",
                ["method", *[f"{n:.0e}" for n in sizes]])
    for m in methods:
        row = []
        for n in sizes:
            c = next(c for c in cells if c.method == m and c.numel == n)
            row.append(C.fmt_s(c.seconds) if c.seconds is not None else "skipped")
        t.add(m, *row)
    t.notes = [(f"'skipped': predicted to take more than {meter.cap:.0f} s from the method's speed at the size before. "
               "sklearn default is left out here and in the 4096x4096 table: scikit-learn >= 1.4 resolves "
               "n_init='auto' to one run for k-means++, the same as n_init=1 (the MiniLM table times both); cml "
               "exact is left out of the 4096x4096 table (over a minute per run; its growth is above).")]
    return cells, t


def section_end_to_end(repeat: int, budget: float) -> tuple[dict, C.Table | None, str | None]:
    """coremltools PostTrainingPalettizer.compress() vs analyze + merge_ on MiniLM's BertModel."""
    import copy

    import torch

    plan_mod, why = C.toolkit("tying", "analyze", "TieConfig")
    merge_mod, why2 = C.toolkit("tying", "merge_")
    if plan_mod is None or merge_mod is None:
        return {}, None, why or why2
    pal = C.import_coremltools()
    st = C.load_minilm()
    bert = C.bert_of(st)
    cfg = pal.PostTrainingPalettizerConfig.from_dict({"global_config": {"n_bits": 4, "granularity": "per_tensor"}})

    def cml():
        model = copy.deepcopy(bert)
        with C.silenced():
            pal.PostTrainingPalettizer(model, cfg).compress(inplace=True)
        return model

    def ours(tie_tensors: bool = True):
        model = copy.deepcopy(bert)
        plan = plan_mod.analyze(model, plan_mod.TieConfig(bits=4, granularity="tensor", min_elements=0,
                                                          tie_tensors=tie_tensors))
        merge_mod.merge_(model, plan)
        return model, plan

    def copy_only():
        return copy.deepcopy(bert)

    torch.set_num_threads(torch.get_num_threads())
    t_copy, _ = C.time_runs(copy_only, repeat)
    t_cml, m_cml = C.time_runs(cml, repeat, budget_s=budget)
    t_ours, (_, plan) = C.time_runs(ours, repeat, budget_s=budget)
    t_notie, _ = C.time_runs(lambda: ours(False), repeat, budget_s=budget)
    n_cml = [n for n, p in m_cml.named_parameters() if p.dim() >= 2]
    clustered = [t.name for t in plan.clustered()]
    res = {"copy": t_copy.to_dict(), "cml": t_cml.to_dict(), "ours": t_ours.to_dict(), "ours_no_tie_search": t_notie.to_dict(),
           "ours_clustered": clustered, "cml_modules": len(n_cml)}
    t = C.Table("kmeans_end_to_end", "End to end on MiniLM (BertModel, every Linear and Embedding weight, 4 bits "
                "per tensor)", ["method", "runs", "median", "minus model copy", "ours faster by"])
    base = t_copy.median
    for name, tm in (("cml PostTrainingPalettizer.compress()", t_cml), ("ours analyze + merge_", t_ours),
                     ("ours, tie_tensors=False", t_notie)):
        t.add(name, len(tm.runs), C.fmt_s(tm.median), C.fmt_s(tm.median - base),
              C.fmt_ratio((t_cml.median - base) / (tm.median - base)))
    t.notes = [(f"Each run deep-copies the BertModel first (median {C.fmt_s(base)}, subtracted in 'minus model copy'). "
               f"ours clustered {len(clustered)} tensors; coremltools num_kmeans_workers=1 (its default). "
               f"tie_tensors=False skips the toolkit's search for equal/transposed tensors (on by default).")]
    return res, t, None


def targets(minilm_cells: list[Cell], e2e: dict) -> list[C.Target]:
    out = []
    ours = {c.tensor: c for c in minilm_cells if c.method == "ours"}
    cml = [c for c in minilm_cells if c.method == "cml ptp" and c.seconds is not None]
    goal = "clustering >= 5x faster than coremltools' post-training palettizer on MiniLM, same K"
    if cml:
        ratio = sum(c.seconds for c in cml) / sum(ours[c.tensor].seconds for c in cml)
        out.append(C.Target("k-means kernel vs cml", goal + " (kernel, all weight matrices)",
                            f"{ratio:.2f}x ({len(cml)}/{len(ours)} tensors)", ratio >= 5))
    if e2e:
        base = e2e["copy"]["median_s"]
        ratio = (e2e["cml"]["median_s"] - base) / (e2e["ours"]["median_s"] - base)
        out.append(C.Target("end to end vs cml", goal + " (PostTrainingPalettizer.compress vs analyze + merge_)",
                            f"{ratio:.2f}x", ratio >= 5))
    return out


def main() -> int:
    args = C.parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--cap", type=float, default=45.0, help="skip a run predicted to take longer (s)"),
        p.add_argument("--budget", type=float, default=15.0, help="seconds per method per section")))
    started = time.perf_counter()
    C.quiet()
    cap, budget = (5.0, 5.0) if args.quick else (args.cap, args.budget)
    repeat = 2 if args.quick else args.repeat
    missing = []
    if C.toolkit("kmeans", "kmeans_1d")[0] is None:
        raise SystemExit("compress.kmeans.kmeans_1d is missing; nothing to compare")
    methods = list(KERNELS)
    meter = Meter(repeat, cap, budget)
    tensors = minilm_tensors()
    if args.quick:
        tensors = tensors[:6]
    c1, t1 = section_minilm(meter, methods, tensors)
    # scikit-learn >= 1.4 resolves n_init="auto" to 1 for k-means++: the MiniLM section shows the two
    # defaults alike, so the larger sections time one of them. The exact DP's growth is in the growth
    # section; its single 4096x4096 run would take over a minute.
    big = [m for m in methods if m != "sklearn default"]
    c2, t2 = section_synthetic(meter, [m for m in big if m != "cml exact"], 1024 if args.quick else 4096)
    c3, t3 = section_growth(meter, big, SIZES[:3] if args.quick else SIZES)
    tables = [t1, t2, t3]
    e2e, t4, why = section_end_to_end(repeat, budget)
    if t4 is not None:
        tables.append(t4)
    if why:
        missing.append(why)
    png = plot(c3)
    C.finish("kmeans_speed", started, args, tables,
             {"k": K, "cap_s": cap, "budget_s": budget, "cells": [asdict(c) for c in c1 + c2 + c3],
              "end_to_end": e2e}, targets=targets(c1, e2e), missing=missing, plots=[png])
    return 0


def plot(cells: list[Cell]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m in KERNELS:
        pts = sorted((c.numel, c.seconds) for c in cells if c.method == m and c.seconds is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m, linestyle="-" if m == "ours" else "--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("weights in the tensor")
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"1D k-means time vs size, K={K}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return C.save_plot(fig, "kmeans_speed")


if __name__ == "__main__":
    raise SystemExit(main())
