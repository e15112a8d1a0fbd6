"""Model size audit: where the bytes are, and how much parameter sharing could save.

`audit(loaded, cfg)` reads every tensor once, one at a time (the tensor mapping of a safetensors
or ONNX file is lazy), and keeps only small summaries:

- per tensor: shape, dtype, parameters, bytes; exact unique values; the fewest groups that keep
  every value within `cfg.tolerance` of its group's centre, and their entropy (bits per weight);
  the bytes and RMS error of a hard merge to each of `cfg.bits` (1D k-means codebook + packed
  indices); rows (output channels, filters, embedding rows) that repeat another row of the tensor;
- across tensors (`find_tensor_ties`): storage already shared (aliases), exact duplicates,
  near duplicates and transposed duplicates;
- totals: bytes now (shared storage counted once) and projected at each bit width, with and
  without storing each tied duplicate once, and the largest savings first.

    report = audit(compress.io.load("model.pt2"), AuditConfig(tolerance=1e-3))
    rich.print(report.to_table(top=20))

The JSON form (`to_dict`) is documented field by field in docs/audit-json.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ._units import format_bytes, format_iec
from .codebook import bits_for
from .errors import BadInputError
from .kmeans import cover_starts, kmeans_1d_many

REPORT_VERSION = 1
CONFIG_VERSION = 1
TIE_KINDS = ("shared", "exact", "transposed", "near")
_MAX_LISTED_CENTERS = 16
_SKETCH_GRID = 8


# --- configuration --------------------------------------------------------------------------------

@dataclass(frozen=True)
class AuditConfig:
    """What `audit` measures.

    Attributes:
        tolerance: absolute value tolerance (default 1e-3). Values within it of a shared centre
            count as one group; two rows repeat each other when no element differs by more. Trained
            weights typically have a standard deviation of 0.01-0.1 (all-MiniLM-L6-v2: 0.04-0.1), so
            1e-3 is about 1-10% of it; the report lists each tensor's std to judge it by. For
            tensor-level ties the same number is a *relative* error, ||a - b|| / max(||a||, ||b||).
        bits: index widths to project a hard merge at (each 1..16): 2**bits shared values per tensor.
        min_size: float tensors with fewer elements are kept as they are in the projected totals
            (biases and norms are small; merging them costs accuracy and saves little).
        row_pair_budget: most candidate row pairs examined per tensor when looking for repeated
            rows; when it runs out the count is a lower bound (`exhaustive: false`).
        examples: how many examples to keep per finding.
    """

    tolerance: float = 1e-3
    bits: tuple[int, ...] = (8, 4, 2)
    min_size: int = 1024
    row_pair_budget: int = 2_000_000
    examples: int = 3
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        tol = self.tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
            raise BadInputError(
                f"audit config: tolerance must be a finite number >= 0 (--tolerance), got {tol!r}")
        bits = tuple(self.bits) if isinstance(self.bits, (list, tuple)) else None
        if not bits or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 16 for b in bits):
            raise BadInputError(
                f"audit config: bits must be a non-empty list of integers 1..16, got {self.bits!r}")
        for key in ("min_size", "row_pair_budget", "examples"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BadInputError(f"audit config: {key} must be an integer >= 0, got {value!r}")
        if self.version != CONFIG_VERSION:
            raise BadInputError(
                f"audit config: version {self.version!r} is not supported (this is {CONFIG_VERSION})")
        object.__setattr__(self, "tolerance", float(tol))
        object.__setattr__(self, "bits", tuple(sorted(set(bits), reverse=True)))

    def to_dict(self) -> dict:
        return {"version": self.version, "tolerance": self.tolerance, "bits": list(self.bits),
                "min_size": self.min_size, "row_pair_budget": self.row_pair_budget, "examples": self.examples}

    @classmethod
    def from_dict(cls, d: Mapping) -> AuditConfig:
        """Build from a plain dict; unknown keys are refused by name.

        >>> AuditConfig.from_dict({"tolerance": 0.01, "bits": [4]}).bits
        (4,)
        """
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise BadInputError(
                    f"audit config: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        d = dict(d)
        if "bits" in d and isinstance(d["bits"], list):
            d["bits"] = tuple(d["bits"])
        return cls(**d)


# --- report pieces --------------------------------------------------------------------------------

@dataclass
class MergeEstimate:
    """A hard merge of one tensor to `bits`-bit indices: `centers` shared values (k-means, <= 2**bits)."""

    bits: int
    centers: int
    index_bits: int
    bytes: int
    rms_error: float
    max_error: float
    values: list[float] | None = None

    @classmethod
    def from_dict(cls, d: Mapping) -> MergeEstimate:
        return cls(**d)


@dataclass
class RowRepeats:
    """Rows (first-axis slices) of one tensor that repeat another row to within the tolerance."""

    rows: int
    row_size: int
    count: int
    exhaustive: bool
    examples: list[tuple[int, int, float]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Mapping) -> RowRepeats:
        d = dict(d)
        d["examples"] = [(int(i), int(j), float(e)) for i, j, e in d["examples"]]
        return cls(**d)


@dataclass
class TensorAudit:
    """Everything the audit measured about one named tensor (`None` where it does not apply)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    parameters: int
    bytes: int
    unique: int | None = None
    nonfinite: int = 0
    min: float | None = None
    max: float | None = None
    std: float | None = None
    groups: int | None = None
    entropy_bits: float | None = None
    merges: list[MergeEstimate] = field(default_factory=list)
    rows: RowRepeats | None = None
    mergeable: bool = False
    shared_with: str | None = None
    note: str | None = None

    def merge_at(self, bits: int) -> MergeEstimate | None:
        return next((m for m in self.merges if m.bits == bits), None)

    def projected_bytes(self, bits: int) -> int:
        """Bytes at `bits` in the projected totals: merged when mergeable and smaller, else as now."""
        m = self.merge_at(bits)
        return min(self.bytes, m.bytes) if self.mergeable and m is not None else self.bytes

    @classmethod
    def from_dict(cls, d: Mapping) -> TensorAudit:
        d = dict(d)
        d["shape"] = tuple(d["shape"])
        d["merges"] = [MergeEstimate.from_dict(m) for m in d["merges"]]
        d["rows"] = None if d["rows"] is None else RowRepeats.from_dict(d["rows"])
        return cls(**d)


@dataclass(frozen=True)
class TensorTie:
    """Tensor `b` is (or could be) stored as tensor `a`.

    `kind`: "shared" (already one storage), "exact" (identical values), "transposed" (b == a.T
    to within the tolerance), "near" (same shape, within the tolerance). `rel_error` is
    ||a - b|| / max(||a||, ||b||) (with b transposed for "transposed").
    """

    a: str
    b: str
    kind: str
    rel_error: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> TensorTie:
        return cls(**d)


@dataclass
class ProjectedSize:
    """Stored bytes if every mergeable tensor were merged to `bits` (and, with ties, duplicates dropped)."""

    bits: int
    bytes: int
    bytes_with_ties: int
    merged_tensors: int
    rms_error: float

    @classmethod
    def from_dict(cls, d: Mapping) -> ProjectedSize:
        return cls(**d)


@dataclass
class AuditTotals:
    tensors: int
    stored_tensors: int
    parameters: int
    bytes: int
    tie_saved_bytes: int
    projected: list[ProjectedSize]

    @classmethod
    def from_dict(cls, d: Mapping) -> AuditTotals:
        d = dict(d)
        d["projected"] = [ProjectedSize.from_dict(p) for p in d["projected"]]
        return cls(**d)


@dataclass
class Saving:
    """One action and the bytes it saves at each bit width (merges and ties add up to the totals)."""

    kind: str
    names: list[str]
    detail: str
    bytes_saved: dict[int, int]

    @classmethod
    def from_dict(cls, d: Mapping) -> Saving:
        d = dict(d)
        d["bytes_saved"] = {int(b): int(n) for b, n in d["bytes_saved"].items()}
        return cls(**d)


@dataclass
class AuditReport:
    """The result of `audit`: per-tensor rows (in the file's order), ties, totals and savings."""

    path: str
    kind: str
    file_bytes: int | None
    config: AuditConfig
    tensors: list[TensorAudit]
    ties: list[TensorTie]
    totals: AuditTotals
    savings: list[Saving]
    seconds: float
    version: int = REPORT_VERSION

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (documented in docs/audit-json.md); no NaN or infinity in it."""
        d = dataclasses.asdict(self)
        d["config"] = self.config.to_dict()
        for s in d["savings"]:
            s["bytes_saved"] = {str(b): n for b, n in s["bytes_saved"].items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> AuditReport:
        if d.get("version") != REPORT_VERSION:
            raise BadInputError(f"audit report version {d.get('version')!r} is not supported "
                                f"(this is version {REPORT_VERSION}); re-run `compress audit`")
        return cls(
            path=d["path"], kind=d["kind"], file_bytes=d["file_bytes"],
            config=AuditConfig.from_dict(d["config"]),
            tensors=[TensorAudit.from_dict(t) for t in d["tensors"]],
            ties=[TensorTie.from_dict(t) for t in d["ties"]],
            totals=AuditTotals.from_dict(d["totals"]),
            savings=[Saving.from_dict(s) for s in d["savings"]],
            seconds=d["seconds"], version=d["version"],
        )

    def to_json(self) -> str:
        import json
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def to_table(self, top: int | None = None):
        """A rich renderable: tensors by size, ties, totals, largest savings (`top` rows per list)."""
        from rich import box
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        parts = [Text(_headline(self), style="bold")]
        for sec in _sections(self, top):
            table = Table(title=sec.title, title_justify="left", title_style="bold", caption=sec.caption,
                          caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
            for head, just, width in zip(sec.headers, sec.justify, _min_widths(sec)):
                table.add_column(head, justify="right" if just == "r" else "left", overflow="fold",
                                 no_wrap=just == "r", min_width=width, style="cyan" if just == "c" else None)
            for r in sec.rows:
                table.add_row(*r)
            parts += [Text(""), table]
        return Group(*parts)

    def to_markdown(self, top: int | None = None) -> str:
        """The same sections as GitHub-flavoured markdown, for CI summaries."""
        out = [f"**{_headline(self)}**", ""]
        for sec in _sections(self, top):
            out += [f"### {sec.title}", "", "| " + " | ".join(sec.headers) + " |",
                    "|" + "|".join("---:" if j == "r" else "---" for j in sec.justify) + "|"]
            out += ["| " + " | ".join(_md_cell(c, j) for c, j in zip(r, sec.justify)) + " |"
                    for r in sec.rows]
            out += (["", f"_{sec.caption}_"] if sec.caption else []) + [""]
        return "\n".join(out)


# --- the audit ------------------------------------------------------------------------------------

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
    finder = _TieFinder(cfg.tolerance)
    rows: list[TensorAudit] = []
    with _progress(len(tensors), progress) as step:
        for name in tensors:
            if name in aliases:
                continue
            rows.append(_audit_tensor(name, tensors[name], cfg, finder))
            step(name)
    rows += _alias_rows(rows, aliases)
    ties = _graph_ties(getattr(loaded, "program", None), rows) + finder.ties(tensors, aliases)
    totals, savings = _totals(rows, ties, cfg)
    return AuditReport(str(loaded.path), str(loaded.kind), _file_bytes(loaded.path), cfg, rows, ties,
                       totals, savings, round(time.perf_counter() - start, 3))


def find_tensor_ties(tensors: Mapping[str, torch.Tensor], tolerance: float,
                     aliases: Mapping[str, str] | None = None) -> list[TensorTie]:
    """Pairs of float tensors that are (or could be) one storage.

    Reads each tensor once to fingerprint it (content hash, norm, an 8x8 grid of block means),
    compares fingerprints of tensors with the same number of elements, and re-reads only the pairs
    whose fingerprints could be within `tolerance` (the grid is a contraction, so none is missed).

    Args:
        tensors: name -> tensor (may be lazy: each is read when indexed).
        tolerance: largest relative error ||a - b|| / max(||a||, ||b||) for "near" and "transposed".
        aliases: name -> canonical name for storage already shared (reported as "shared").

    Returns:
        `TensorTie`s, "shared" then "exact", "transposed", "near"; `a` comes first in `tensors`.
        Each tensor is `b` at most once: tied to its first exact copy, or else to the first earlier
        tensor it matches that is not itself tied to another (a star around first occurrences,
        not every pair of a cluster of near copies).

    >>> w = torch.randn(8, 4)
    >>> find_tensor_ties({"enc": w, "dec": w.t().clone()}, 1e-3)
    [TensorTie(a='enc', b='dec', kind='transposed', rel_error=0.0)]
    """
    if not math.isfinite(tolerance) or tolerance < 0:
        raise BadInputError(f"tie tolerance must be a finite number >= 0, got {tolerance!r}")
    aliases = {a: c for a, c in dict(aliases or {}).items() if a != c}
    finder = _TieFinder(float(tolerance))
    for name in tensors:
        if name in aliases:
            continue
        t = tensors[name]
        if _is_float(t) and t.numel() >= 2:
            flat = t.detach().reshape(-1).to(torch.float64).numpy()
            if np.isfinite(flat).all():
                finder.add(name, t, flat)
    return finder.ties(tensors, aliases)


# --- one tensor -----------------------------------------------------------------------------------

def _is_float(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point


def _audit_tensor(name: str, t: torch.Tensor, cfg: AuditConfig, finder: _TieFinder) -> TensorAudit:
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


# --- ties between tensors -------------------------------------------------------------------------

@dataclass
class _Fingerprint:
    name: str
    order: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    digest: bytes
    norm: float
    grid: np.ndarray  # weighted block means: an L2 contraction of the tensor viewed as 2D


class _TieFinder:
    """Collects fingerprints during one pass, then compares plausible pairs (re-reading lazily)."""

    def __init__(self, tolerance: float):
        self.tolerance = tolerance
        self.prints: list[_Fingerprint] = []

    def add(self, name: str, t: torch.Tensor, flat: np.ndarray) -> None:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        shape = tuple(int(s) for s in t.shape)
        self.prints.append(_Fingerprint(name, len(self.prints), shape, t.dtype, hashlib.blake2b(raw).digest(),
                                        float(np.linalg.norm(flat)), _grid(flat.reshape(_as_2d(shape)))))

    def ties(self, tensors: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> list[TensorTie]:
        out = [TensorTie(c, a, "shared", 0.0) for a, c in aliases.items()]
        reps: list[_Fingerprint] = []
        seen: dict[tuple, _Fingerprint] = {}
        for fp in self.prints:
            key = (fp.shape, fp.dtype, fp.digest)
            if key in seen:
                out.append(TensorTie(seen[key].name, fp.name, "exact", 0.0))
            else:
                seen[key] = fp
                reps.append(fp)
        candidates = sorted(self._candidates(reps), key=lambda c: (c[1].order, c[0].order))
        out += self._first_partners(tensors, candidates)
        rank = {fp.name: fp.order for fp in self.prints}
        return sorted(out, key=lambda t: (TIE_KINDS.index(t.kind), rank.get(t.a, -1), rank.get(t.b, -1),
                                          t.a, t.b))

    def _first_partners(self, tensors, candidates) -> list[TensorTie]:
        """Tie each tensor to the first earlier tensor it matches that is not itself tied to another.

        A star around first occurrences rather than every pair of a cluster of near copies.
        """
        taken: set[str] = set()
        out = []
        for _, group in itertools.groupby(candidates, key=lambda c: (c[1].order, c[0].order)):
            same_pair = list(group)
            a, b = same_pair[0][0], same_pair[0][1]
            kinds = [kind for _, _, kind in same_pair]
            if a.name in taken or b.name in taken:
                continue
            checked = (self._confirm(tensors, a, b, kind) for kind in kinds)
            confirmed = [t for t in checked if t is not None]
            if confirmed:
                out.append(min(confirmed, key=lambda t: t.rel_error))
                taken.add(b.name)
        return out

    def _candidates(self, reps: list[_Fingerprint]) -> Iterator[tuple[_Fingerprint, _Fingerprint, str]]:
        by_shape: dict[tuple, list[_Fingerprint]] = {}
        for fp in reps:
            by_shape.setdefault(fp.shape, []).append(fp)
        for shape, group in by_shape.items():
            yield from ((a, b, "near") for a, b in self._close(group, group, transpose=False))
            if len(shape) == 2 and shape[0] <= shape[1]:
                other = group if shape[0] == shape[1] else by_shape.get(shape[::-1], [])
                yield from ((a, b, "transposed") for a, b in self._close(group, other, transpose=True))

    def _close(self, left: list[_Fingerprint], right: list[_Fingerprint], transpose: bool):
        """Pairs whose fingerprints allow a relative error within the tolerance (no false negatives)."""
        if not left or not right:
            return
        same = left is right
        gl = np.stack([fp.grid.reshape(-1) for fp in left])
        gr = np.stack([(fp.grid.T if transpose else fp.grid).reshape(-1) for fp in right])
        nl = np.array([fp.norm for fp in left])
        nr = np.array([fp.norm for fp in right])
        for s in range(0, len(left), 512):
            block = gl[s:s + 512]
            dist = np.sqrt(np.maximum(0.0, (block * block).sum(1)[:, None] + (gr * gr).sum(1)[None, :]
                                      - 2 * block @ gr.T))
            scale = np.maximum(nl[s:s + 512, None], nr[None, :])
            limit = self.tolerance * scale + 1e-6 * scale
            ok = (dist <= limit) & (np.abs(nl[s:s + 512, None] - nr[None, :]) <= limit)
            for i, j in zip(*np.nonzero(ok)):
                a, b = left[s + i], right[j]
                if same and a.order >= b.order:
                    continue
                yield (a, b) if a.order < b.order else (b, a)

    def _confirm(self, tensors, a: _Fingerprint, b: _Fingerprint, kind: str) -> TensorTie | None:
        ta, tb = tensors[a.name].detach(), tensors[b.name].detach()
        if kind == "transposed":
            tb = tb.t()
        diff = torch.linalg.vector_norm((ta.double() - tb.double()).reshape(-1)).item()
        scale = max(a.norm, b.norm)
        rel = diff / scale if scale > 0 else 0.0
        return TensorTie(a.name, b.name, kind, float(rel)) if rel <= self.tolerance else None


_TRANSPOSES = {"aten.t.default", "aten.transpose.int", "aten.numpy_T.default", "aten.permute.default"}


def _graph_ties(program, rows: list[TensorAudit]) -> list[TensorTie]:
    """2D parameters an exported program reads both as they are and transposed: one storage, two uses.

    Reported as "shared" ties with `b` = `NAME.T` (e.g. a tied autoencoder's decoder reading the
    encoder weight through `aten.t`).
    """
    signature = getattr(program, "graph_signature", None)
    if signature is None:
        return []
    names = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    is_2d = {r.name for r in rows if len(r.shape) == 2}
    out = []
    for node in program.graph.nodes:
        name = names.get(node.name) if node.op == "placeholder" else None
        if name not in is_2d:
            continue
        kinds = {str(user.target) in _TRANSPOSES for user in node.users}
        if kinds == {True, False}:
            out.append(TensorTie(name, f"{name}.T", "shared", 0.0))
    return out


def _as_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def _grid(m: np.ndarray) -> np.ndarray:
    """Block sums / sqrt(block size) over an up-to-8x8 grid: ||grid(a) - grid(b)|| <= ||a - b||."""
    rs, cs = _split_starts(m.shape[0]), _split_starts(m.shape[1])
    sums = np.add.reduceat(np.add.reduceat(m, rs, axis=0), cs, axis=1)
    rsize = np.diff(np.append(rs, m.shape[0]))
    csize = np.diff(np.append(cs, m.shape[1]))
    return sums / np.sqrt(np.outer(rsize, csize))


def _split_starts(n: int) -> np.ndarray:
    g = min(_SKETCH_GRID, n)
    sizes = np.full(g, n // g)
    sizes[: n % g] += 1
    return np.concatenate([[0], np.cumsum(sizes)[:-1]])


# --- totals ---------------------------------------------------------------------------------------

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


# --- rendering ------------------------------------------------------------------------------------

@dataclass
class _Section:
    title: str
    headers: list[str]
    justify: str  # one letter per column: "l" text, "c" a tensor name (code in markdown), "r" numbers
    rows: list[list[str]]
    caption: str | None = None


def _min_widths(sec: _Section) -> list[int]:
    # names fold rather than vanish; numbers never wrap
    widths = []
    for i, just in enumerate(sec.justify):
        longest = max((len(row[i]) for row in sec.rows), default=0)
        widths.append(min(longest, 50) if just == "c" else min(longest, 9) if just == "l" else 0)
    return widths


def _headline(r: AuditReport) -> str:
    t = r.totals
    file = f"; file {format_bytes(r.file_bytes)}" if r.file_bytes is not None else ""
    return (f"{r.path} ({r.kind}): {t.tensors} tensors, {t.parameters:,} parameters, "
            f"{format_bytes(t.bytes)} of tensor data{file}; tolerance {r.config.tolerance:g}; "
            f"{r.seconds:.2f} s")


def _sections(r: AuditReport, top: int | None) -> list[_Section]:
    secs = [_tensor_section(r, top)]
    if r.ties:
        secs.append(_tie_section(r, top))
    secs.append(_totals_section(r))
    if r.savings:
        secs.append(_savings_section(r, top))
    return secs


def _limit(items: list, top: int | None, what: str) -> tuple[list, str | None]:
    if top is None or len(items) <= top:
        return items, None
    return items[:top], f"{len(items) - top} more {what} not shown"


def _tensor_section(r: AuditReport, top: int | None) -> _Section:
    bits = r.config.bits
    rows, more = _limit(sorted(r.tensors, key=lambda t: (-t.bytes, t.name)), top, "tensors")
    headers = ["tensor", "shape", "dtype", "size", "unique", "groups", "entropy",
               *(f"RMS @{b}" for b in bits), "rows repeated", "note"]
    body = []
    for t in rows:
        merges = [t.merge_at(b) for b in bits]
        body.append([t.name, "x".join(map(str, t.shape)) or "scalar", t.dtype, format_iec(t.bytes),
                     _num(t.unique), _num(t.groups),
                     "-" if t.entropy_bits is None else f"{t.entropy_bits:.2f}"]
                    + ["-" if m is None else f"{m.rms_error:.1e}" for m in merges]
                    + [_rows_text(t.rows), _note(t)])
    tol = f"{r.config.tolerance:g}"
    caption = (f"groups: fewest shared values keeping every value within {tol}; entropy: bits per weight "
               f"of those groups; RMS @b: error of a hard merge to b-bit indices; rows repeated: rows "
               f"within {tol} of another row; kept: under {r.config.min_size:,} elements, not merged in "
               "the totals.")
    return _Section("Tensors, largest first", headers, "cllrrrr" + "r" * len(bits) + "rl", body,
                    caption if more is None else f"{more}. {caption}")


def _num(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def _rows_text(rows: RowRepeats | None) -> str:
    if rows is None:
        return "-"
    return f"{'' if rows.exhaustive else '>='}{rows.count:,}/{rows.rows:,}"


def _note(t: TensorAudit) -> str:
    if t.note:
        return t.note
    return "" if t.mergeable else "kept"


def _tie_section(r: AuditReport, top: int | None) -> _Section:
    size = {t.name: t.bytes for t in r.tensors}
    ties, caption = _limit(r.ties, top, "ties")
    body = [[t.a, t.b, t.kind, f"{t.rel_error:.2e}",
             "already shared" if t.kind == "shared" else format_iec(size.get(t.b, 0))] for t in ties]
    return _Section("Tensors that are, or could be, one storage",
                    ["kept", "tied", "kind", "rel. error", "copy size"], "cclrr", body, caption)


def _totals_section(r: AuditReport) -> _Section:
    t = r.totals
    body = [["now", format_bytes(t.bytes), "1.00x", "-", "-"]]
    if t.tie_saved_bytes:
        now = t.bytes - t.tie_saved_bytes
        body.append(["  duplicates stored once", format_bytes(now), _ratio(t.bytes, now), "-", "0"])
    for p in t.projected:
        body.append([f"merged to {p.bits} bits", format_bytes(p.bytes), _ratio(t.bytes, p.bytes),
                     f"{p.merged_tensors:,}", f"{p.rms_error:.2e}"])
        if p.bytes_with_ties != p.bytes:
            body.append(["  and duplicates stored once", format_bytes(p.bytes_with_ties),
                         _ratio(t.bytes, p.bytes_with_ties), "", ""])
    caption = (f"Float tensors of at least {r.config.min_size:,} elements are merged where it saves bytes; "
               "codebook + packed indices; RMS error over the merged tensors.")
    return _Section("Totals (shared storage counted once)", ["", "bytes", "smaller by", "tensors merged",
                                                              "RMS error"], "lrrrr", body, caption)


def _ratio(now: int, new: int) -> str:
    return f"{now / new:.2f}x" if new else "-"


def _savings_section(r: AuditReport, top: int | None) -> _Section:
    bits = r.config.bits
    items, caption = _limit(r.savings, top, "savings")
    body = [[s.kind if s.kind == "merge" else f"tie ({s.detail})",
             s.names[0] if s.kind == "merge" else f"{s.names[1]} -> {s.names[0]}"]
            + [format_iec(s.bytes_saved.get(b, 0)) for b in bits] for s in items]
    return _Section("Largest savings first", ["action", "tensor"] + [f"saves at {b}-bit" for b in bits],
                    "lc" + "r" * len(bits), body, caption)


def _md_cell(text: str, just: str) -> str:
    text = text.replace("|", "\\|")
    return f"`{text}`" if just == "c" and text else text


# --- progress -------------------------------------------------------------------------------------

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


__all__ = ["AuditConfig", "AuditReport", "TensorAudit", "TensorTie", "audit", "find_tensor_ties"]
