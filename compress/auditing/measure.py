"""`audit(loaded, cfg)`: where a model's bytes are, and how much parameter sharing could save.

Reads every tensor once, one at a time (the tensor mapping of a safetensors or ONNX file is lazy),
and keeps only small summaries:

- per tensor: shape, dtype, parameters, bytes; exact unique values; the fewest groups that keep
  every value within `cfg.tolerance` of its group's centre, and their entropy (bits per weight);
  the bytes and RMS error of a hard merge to each of `cfg.bits` (1D k-means codebook + packed
  indices); rows (output channels, filters, embedding rows) that repeat another row of the tensor;
- across tensors (`find_tensor_ties`): storage already shared (aliases), exact duplicates,
  near duplicates and transposed duplicates;
- totals: bytes now (shared storage counted once) and projected at each bit width, with and
  without storing each tied duplicate once, and the largest savings first.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from ..codebook import bits_for
from ..kmeans import cover_starts, kmeans_1d_many
from .onnx import audit_onnx
from .report import (
    AuditConfig,
    AuditReport,
    AuditTotals,
    MergeEstimate,
    ProjectedSize,
    RowRepeats,
    Saving,
    TensorAudit,
    TensorTie,
)
from .ties import TieFinder, graph_ties

_MAX_LISTED_CENTERS = 16


def audit(loaded, cfg: AuditConfig | None = None, *, progress: bool | None = None) -> AuditReport:
    """Measure how much parameter sharing could shrink a loaded model.

    Args:
        loaded: what `compress.io.load` returns; only `.path`, `.kind`, `.tensors` (name -> tensor,
            read one at a time) and `.aliases` (name -> canonical name of shared storage) are used.
        cfg: what to measure (`AuditConfig()` by default).
        progress: show a progress bar on stderr once the audit has run for 2 s; `None` shows it
            only when stderr is a terminal.

    Returns:
        `AuditReport`; nothing in `loaded` is changed.

    >>> from compress.io import load
    >>> report = audit(load("samples/digits_mlp.pt2"), progress=False)
    >>> report.totals.bytes, [p.bytes for p in report.totals.projected]
    (202440, [56888, 30368, 17972])
    """
    cfg = cfg or AuditConfig()
    start = time.perf_counter()
    tensors: Mapping[str, torch.Tensor] = loaded.tensors
    aliases = {a: c for a, c in dict(getattr(loaded, "aliases", None) or {}).items() if a != c}
    finder = TieFinder(cfg.tie_tolerance)
    rows: list[TensorAudit] = []
    with _progress(len(tensors), progress) as step:
        for name in tensors:
            if name in aliases:
                continue
            rows.append(_audit_tensor(name, tensors[name], cfg, finder))
            step(name)
    rows += _alias_rows(rows, aliases)
    ties = graph_ties(getattr(loaded, "program", None), rows) + finder.ties(tensors, aliases)
    totals, savings = _totals(rows, ties, cfg)
    report = AuditReport(str(loaded.path), str(loaded.kind), _file_bytes(loaded.path), cfg, rows, ties,
                         totals, savings, round(time.perf_counter() - start, 3))
    if getattr(loaded, "onnx_model", None) is not None:
        report.onnx = audit_onnx(loaded.onnx_model)
    return report


def _is_float(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point


def _audit_tensor(name: str, t: torch.Tensor, cfg: AuditConfig, finder: TieFinder) -> TensorAudit:
    """Per-tensor numbers; a finite float tensor is also fingerprinted for ties."""
    n = t.numel()
    row = TensorAudit(name, tuple(int(s) for s in t.shape), str(t.dtype).removeprefix("torch."), n,
                      n * t.element_size())
    if n == 0:
        row.note = "empty"
        return row
    if not _is_float(t):
        row.note = f"left alone: {_kind_of(t.dtype)}"
        if not t.dtype.is_complex:
            row.unique = int(torch.unique(t.detach()).numel())
        return row
    # float32 stays float32 (half the memory of float64 on the largest tensors); halves are widened
    x = t.detach().reshape(-1)
    x = (x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)).numpy()
    finite = np.isfinite(x)
    row.nonfinite = int(n - np.count_nonzero(finite))
    if row.nonfinite:
        row.note = f"left alone: {_nonfinite_text(x, finite)}"
        row.unique = int(np.unique(x).size)
        return row
    del finite
    if t.ndim >= 2 and t.shape[0] >= 2:
        row.rows = _row_repeats(x.reshape(t.shape[0], -1), cfg)
    if n >= 2:
        finder.add(name, t, x)
    row.std = float(x.std(dtype=np.float64))
    xs = np.sort(x)
    del x  # one sorted copy from here on
    new_value = _new_value_mask(xs)
    distinct = int(np.count_nonzero(new_value))
    row.unique, row.min, row.max = distinct, float(xs[0]), float(xs[-1])
    groups = _group_sizes(xs, new_value, cfg.tolerance)
    row.groups, row.entropy_bits = int(groups.size), _entropy(groups)
    # k-means runs on the distinct values weighted by count when values repeat a lot, else on all
    # of them; only what it needs stays alive, so the peak is k-means' own working memory
    if distinct * 4 <= n:
        starts = np.flatnonzero(new_value)
        values, weights = xs[starts], np.diff(np.append(starts, n))
        del xs
    else:
        values, weights = xs, None
    del new_value
    # one sort and one set of prefix sums serve every bit width
    fits = kmeans_1d_many(values, [2 ** b for b in cfg.bits], None if weights is None else weights.astype(np.float64),
                          presorted=True, labels=False)
    row.merges = [_merge_estimate(values, weights, n, bits, t.element_size(), r) for bits, r in zip(cfg.bits, fits)]
    row.mergeable = n >= cfg.min_size
    return row


def _new_value_mask(xs: np.ndarray) -> np.ndarray:
    """True where sorted `xs` starts a new distinct value (one byte per value, no index arrays)."""
    mask = np.empty(xs.size, dtype=bool)
    mask[0] = True
    np.not_equal(xs[1:], xs[:-1], out=mask[1:])
    return mask


def _kind_of(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "complex" if dtype.is_complex else "integer"


def _nonfinite_text(x: np.ndarray, finite: np.ndarray) -> str:
    nan = int(np.isnan(x).sum())
    inf = int((~finite).sum()) - nan
    parts = [f"{nan:,} NaN" if nan else "", f"{inf:,} Inf" if inf else ""]
    return ", ".join(p for p in parts if p)


def _group_sizes(xs: np.ndarray, new_value: np.ndarray, tolerance: float) -> np.ndarray:
    """Sizes of the fewest groups of sorted `xs` within `tolerance` of their centre (at 0: the
    distinct values). Greedy interval cover, as `fewest_centers`, without per-value labels."""
    starts = np.flatnonzero(new_value) if tolerance == 0 else cover_starts(xs, 2 * tolerance)
    return np.diff(np.append(starts, xs.size))


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(max(0.0, -(p * np.log2(p)).sum()))


def _merge_estimate(values: np.ndarray, weights: np.ndarray | None, n: int, bits: int,
                    element_size: int, r) -> MergeEstimate:
    """The error over all `n` values of `r`, the k-means of `values` (sorted; with `weights`,
    distinct values and their counts) to 2**bits shared values.

    Half-precision weights have at most 65,536 distinct values: clustering them with their counts
    as weights is the same objective as clustering every value, for far less work.
    """
    k = int(r.centers.size)
    index_bits = bits_for(k)
    return MergeEstimate(
        bits=bits, centers=k, index_bits=index_bits,
        bytes=k * element_size + math.ceil(n * index_bits / 8),
        rms_error=float(np.sqrt(max(r.inertia, 0.0) / n)),  # inertia: count-weighted SSE over all n values
        max_error=r.max_error,
        values=[float(c) for c in r.centers] if k <= _MAX_LISTED_CENTERS else None,
    )


def _row_repeats(m: np.ndarray, cfg: AuditConfig) -> RowRepeats:
    """Rows within `tolerance` (max abs difference) of another row, without comparing all pairs.

    Identical rows are found by sorting their bytes. Two distinct rows within tolerance t have every
    element within t, so they sit in the same or adjacent cells of a grid of cell width t over the
    three widest-spread columns: only such pairs are compared, first on up to 16 more columns, then
    element by element. Work is bounded by `cfg.row_pair_budget` candidate pairs.
    """
    rows, cols = m.shape
    view = np.ascontiguousarray(m).view(np.dtype((np.void, m.dtype.itemsize * cols))).reshape(rows)
    _, reps, inverse = np.unique(view, return_index=True, return_inverse=True)
    inverse = inverse.reshape(rows)
    twin = np.bincount(inverse, minlength=reps.size) > 1  # per distinct row: has a repeat
    found = _identical_row_examples(inverse, reps)
    exhaustive = True
    if cfg.tolerance > 0 and reps.size > 1:
        near, exhaustive = _near_row_pairs(m, reps, twin, cfg)
        found += near
    return RowRepeats(rows, cols, int(twin[inverse].sum()), exhaustive, sorted(found)[: cfg.examples])


def _identical_row_examples(inverse: np.ndarray, reps: np.ndarray, limit: int = 1000) -> list:
    order = np.argsort(inverse, kind="stable")
    dup = order[1:][inverse[order[1:]] == inverse[order[:-1]]][:limit]
    return [(int(reps[inverse[j]]), int(j), 0.0) for j in dup]


def _near_row_pairs(m: np.ndarray, reps: np.ndarray, twin: np.ndarray, cfg: AuditConfig):
    """Pairs of distinct rows within tolerance; marks `twin` (per distinct row) in place."""
    tol = cfg.tolerance
    by_spread = np.argsort(-m.std(axis=0), kind="stable")
    grid = m[np.ix_(reps, by_spread[:3])]
    checks = [grid] + ([m[np.ix_(reps, by_spread[3:19])]] if m.shape[1] > 3 else [])
    key, strides = _cell_keys(grid, tol)
    order = np.argsort(key, kind="stable")
    cells, start, count = np.unique(key[order], return_index=True, return_counts=True)
    found: list[tuple[int, int, float]] = []
    budget = cfg.row_pair_budget
    for offset in _half_neighbourhood(len(strides)):
        target = cells + int(np.dot(offset, strides))
        pos = np.minimum(np.searchsorted(cells, target), cells.size - 1)
        a = np.flatnonzero(cells[pos] == target)
        b = pos[a]
        for i, j in _cell_pairs(start[a], count[a], start[b], count[b], order):
            if not any(offset) and i.size:
                i, j = i[i < j], j[i < j]
            budget -= i.size
            if budget < 0:
                return found, False
            keep = ~(twin[i] & twin[j])
            i, j = i[keep], j[keep]
            for c in checks:  # cheap necessary conditions before the full rows
                keep = np.all(np.abs(c[i] - c[j]) <= tol, axis=1)
                i, j = i[keep], j[keep]
            diff = _max_abs_diff(m, reps[i], reps[j])
            near = diff <= tol
            twin[i[near]] = twin[j[near]] = True
            if len(found) < 1000:
                found += [(int(min(p, q)), int(max(p, q)), float(e))
                          for p, q, e in zip(reps[i[near]], reps[j[near]], diff[near])]
    return found, True


def _cell_keys(grid: np.ndarray, tol: float) -> tuple[np.ndarray, list[int]]:
    """One int64 key per row for its grid cell (cell width just over `tol`), and the per-column strides."""
    cells = np.floor(grid / (tol * (1 + 1e-9))).astype(np.int64)
    cells -= cells.min(axis=0) - 1  # >= 1, so the cell below the lowest stays distinct
    spans = [int(s) for s in cells.max(axis=0) + 2]
    dims = 1
    while dims < len(spans) and math.prod(spans[: dims + 1]) < 2 ** 62:
        dims += 1
    strides = [math.prod(spans[d + 1: dims]) for d in range(dims)]
    return cells[:, :dims] @ np.array(strides, dtype=np.int64), strides


def _half_neighbourhood(dims: int) -> list[tuple[int, ...]]:
    """The zero offset and every offset in {-1, 0, 1}^dims that is lexicographically positive."""
    return [o for o in itertools.product((-1, 0, 1), repeat=dims) if o >= (0,) * dims]


def _cell_pairs(sa, na, sb, nb, order, chunk: int = 250_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every (row of cell a, row of cell b) for the listed cell pairs, in chunks, as distinct-row ids."""
    sizes = na.astype(np.int64) * nb
    ends = np.cumsum(sizes)
    total = int(ends[-1]) if ends.size else 0
    for lo in range(0, total, chunk):
        k = np.arange(lo, min(lo + chunk, total))
        p = np.searchsorted(ends, k, side="right")
        within = k - (ends[p] - sizes[p])
        yield order[sa[p] + within // nb[p]], order[sb[p] + within % nb[p]]


def _max_abs_diff(m: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    out = np.empty(i.size)
    step = max(1, 4_000_000 // max(m.shape[1], 1))
    for s in range(0, i.size, step):
        out[s:s + step] = np.abs(m[i[s:s + step]] - m[j[s:s + step]]).max(axis=1, initial=0.0)
    return out


def _alias_rows(rows: list[TensorAudit], aliases: Mapping[str, str]) -> list[TensorAudit]:
    by_name = {r.name: r for r in rows}
    out = []
    for alias, canonical in aliases.items():
        src = by_name.get(canonical)
        if src is None:
            continue
        out.append(TensorAudit(alias, src.shape, src.dtype, src.parameters, src.bytes, shared_with=canonical,
                               note=f"shared with {canonical}"))
    return out


def _file_bytes(path) -> int | None:
    with contextlib.suppress(OSError, TypeError):
        if os.path.isfile(path):
            return os.path.getsize(path)
    return None


def _totals(rows: list[TensorAudit], ties: list[TensorTie],
            cfg: AuditConfig) -> tuple[AuditTotals, list[Saving]]:
    stored = [r for r in rows if r.shared_with is None]
    by_name = {r.name: r for r in stored}
    dropped = _dropped_by_ties(ties, by_name)
    savings: list[Saving] = []
    for r in stored:
        saved = {b: r.bytes - r.projected_bytes(b) for b in cfg.bits}
        if r.mergeable and any(saved.values()):
            savings.append(Saving("merge", [r.name], "hard merge", saved))
    for tie, r in dropped:
        detail = tie.kind if tie.kind == "exact" else f"{tie.kind}, rel. error {tie.rel_error:.2g}"
        savings.append(Saving("tie", [tie.a, tie.b], detail, {b: r.projected_bytes(b) for b in cfg.bits}))
    widest = cfg.bits[0]
    savings.sort(key=lambda s: (-s.bytes_saved[widest], s.names))
    projected = []
    for b in cfg.bits:
        merged = [r for r in stored if r.projected_bytes(b) < r.bytes]
        sse = sum(r.merge_at(b).rms_error ** 2 * r.parameters for r in merged)
        n = sum(r.parameters for r in merged)
        total = sum(r.projected_bytes(b) for r in stored)
        projected.append(ProjectedSize(b, total, total - sum(r.projected_bytes(b) for _, r in dropped),
                                       len(merged), float(math.sqrt(sse / n)) if n else 0.0))
    totals = AuditTotals(len(rows), len(stored), sum(r.parameters for r in stored),
                         sum(r.bytes for r in stored), sum(r.bytes for _, r in dropped), projected)
    return totals, savings


def _dropped_by_ties(ties: list[TensorTie],
                     by_name: dict[str, TensorAudit]) -> list[tuple[TensorTie, TensorAudit]]:
    """Greedy: drop `b` of each tie whose `a` is kept, so each dropped tensor has a kept partner.

    An exact copy of a dropped tensor goes too (its values equal the dropped one's, so the same
    kept partner serves both within the same error).
    """
    order = {n: i for i, n in enumerate(by_name)}
    gone: set[str] = set()
    out = []
    for tie in sorted((t for t in ties if t.kind != "shared"), key=lambda t: (order[t.a], order[t.b])):
        if tie.b in gone or (tie.a in gone and tie.kind != "exact"):
            continue
        gone.add(tie.b)
        out.append((tie, by_name[tie.b]))
    return out


@contextlib.contextmanager
def _progress(total: int, enabled: bool | None, delay: float = 2.0):
    """Yield `step(name)`; a rich bar on stderr appears once `delay` seconds have passed."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    start = time.perf_counter()
    bar = task = None
    done = 0

    def step(name: str) -> None:
        nonlocal bar, task, done
        done += 1
        if not enabled:
            return
        if bar is None and time.perf_counter() - start > delay:
            from rich.console import Console
            from rich.progress import Progress
            bar = Progress(console=Console(stderr=True), transient=True)
            bar.start()
            task = bar.add_task("auditing", total=total, completed=done)
        if bar is not None:
            bar.update(task, completed=done, description=f"audit: {name}")

    try:
        yield step
    finally:
        if bar is not None:
            bar.stop()
