"""Exact, fast, deterministic 1D k-means: the numeric kernel (numpy only).

In one dimension every cluster is a contiguous run of the sorted values, so after one sort each
Lloyd iteration is O(k log n): cluster boundaries are the midpoints between centres (`searchsorted`),
and cluster means come from prefix sums. Several deterministic starts (weighted quantiles, an even
grid, and an optimal dynamic programme on a histogram for small k) are refined this way and the
best weighted SSE wins. Optional per-value `weights` (e.g. squared gradients) make the clustering
care more about the weights that matter.

    >>> r = kmeans_1d(np.array([0.0, 0.1, 1.0, 1.1]), 2)
    >>> r.centers.tolist(), r.labels.tolist()
    ([0.05, 1.05], [0, 0, 1, 1])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_HIST_BINS = 512
_DP_MAX_K = 64
_CHUNK = 1 << 20
_REL_TOL = 1e-12


@dataclass(frozen=True)
class KMeans1D:
    """Sorted `centers` (float64, at most k), `labels` (int32, input order; None when not asked for),
    weighted SSE `inertia`, and the largest |value - its centre| `max_error`."""

    centers: np.ndarray
    labels: np.ndarray | None
    inertia: float
    iterations: int = 0
    max_error: float = 0.0


@dataclass(frozen=True)
class _Sorted:
    x: np.ndarray  # sorted values
    cw: np.ndarray | None  # prefix sums of weights, length n+1 (None: every weight is 1)
    cs: np.ndarray  # prefix sums of w*x
    cq: np.ndarray  # prefix sums of w*x^2

    @classmethod
    def build(cls, x: np.ndarray, w: np.ndarray | None, presorted: bool = False) -> _Sorted:
        # Memory matters (a 30522x384 embedding is 11.7M values): sort in the input's dtype, keep
        # prefix sums in float64, square and accumulate in place; unweighted counts are implicit.
        if w is None:
            xs = x if presorted else np.sort(x)
            cw = None
        else:
            order = slice(None) if presorted else np.argsort(x, kind="stable")
            xs, ws = x[order], w[order]
            cw = _prefix(ws)
        cs = _prefix(xs if w is None else ws * xs)
        cq = np.empty(xs.size + 1, dtype=np.float64)
        cq[0] = 0.0
        np.square(xs, out=cq[1:], dtype=np.float64)
        if w is not None:
            cq[1:] *= ws
        np.cumsum(cq[1:], out=cq[1:])
        return cls(xs, cw, cs, cq)

    def weight_between(self, s: np.ndarray, e: np.ndarray) -> np.ndarray:
        if self.cw is None:
            return (e - s).astype(np.float64)
        return self.cw[e] - self.cw[s]

    @property
    def total_weight(self) -> float:
        return float(len(self.x)) if self.cw is None else float(self.cw[-1])

    def segments(self, centers: np.ndarray) -> np.ndarray:
        """Start index of every cluster's run plus n at the end (length k+1)."""
        inner = np.searchsorted(self.x, _midpoints(centers, self.x.dtype), side="right")
        return np.concatenate([[0], inner, [len(self.x)]])

    def means_and_sse(self, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s, e = seg[:-1], seg[1:]
        w = self.weight_between(s, e)
        sx = self.cs[e] - self.cs[s]
        sq = self.cq[e] - self.cq[s]
        safe = np.where(w > 0, w, 1.0)
        mean = sx / safe
        sse = np.maximum(sq - sx * mean, 0.0)
        return mean, w, sse


def kmeans_1d(values: np.ndarray, k: int, weights: np.ndarray | None = None, *,
              max_iter: int = 500, presorted: bool = False) -> KMeans1D:
    """Cluster `values` into at most `k` shared values, minimising the (weighted) squared error.

    Args:
        values: any-shaped float array (flattened).
        k: number of shared values, >= 1.
        weights: optional non-negative importance per value (same size as `values`).
        max_iter: Lloyd iterations per start (each O(k log n); convergence is usually far sooner).
        presorted: `values` is already sorted ascending (skips the sort).

    Returns:
        `KMeans1D` with sorted centres and each value's label. When `values` has at most `k`
        distinct values, the centres are exactly those values and the error is zero.

    >>> kmeans_1d(np.array([3.0, 1.0, 3.0]), 4).centers.tolist()
    [1.0, 3.0]
    """
    return kmeans_1d_many(values, [k], weights, max_iter=max_iter, presorted=presorted)[0]


def kmeans_1d_many(values: np.ndarray, ks: list[int], weights: np.ndarray | None = None, *,
                   max_iter: int = 500, presorted: bool = False, labels: bool = True) -> list[KMeans1D]:
    """`kmeans_1d` for several k at once, sorting the values and building prefix sums once.

    With `labels=False` the per-value labels are not computed (`labels` is None): the error
    figures (`inertia`, `max_error`) come from the sorted values alone, for far less memory.

    >>> [len(r.centers) for r in kmeans_1d_many(np.arange(10.0), [2, 4])]
    [2, 4]
    """
    x = np.asarray(values).reshape(-1)
    if not np.issubdtype(x.dtype, np.floating) or x.dtype.itemsize < 4:
        x = x.astype(np.float32 if np.issubdtype(x.dtype, np.floating) else np.float64)
    for k in ks:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
    if x.size == 0:
        return [KMeans1D(np.zeros(0), np.zeros(0, dtype=np.int32), 0.0) for _ in ks]
    w = _check_weights(weights, x)
    data = _Sorted.build(x, w, presorted)
    uniq = _distinct_sorted(data.x)
    return [_fit(data, x, uniq, k, max_iter, labels) for k in ks]


def _fit(data: _Sorted, x: np.ndarray, uniq: np.ndarray, k: int, max_iter: int, labels: bool) -> KMeans1D:
    if len(uniq) <= k:
        lab = np.searchsorted(uniq, x).astype(np.int32) if labels else None
        return KMeans1D(uniq.astype(np.float64), lab, 0.0)
    best = None
    for init in _starts(data, uniq, k):
        centers, sse, iters = _lloyd(data, init, k, max_iter)
        if best is None or sse < best[1] - 1e-12 * max(abs(best[1]), 1.0):
            best = (centers, sse, iters)
    centers, sse, iters = best
    # cluster means come from prefix sums, which lose a value far below its neighbours' magnitude
    # (2e-311 next to 1.0): two clusters of such values can get the same mean; keep one of each
    centers = np.unique(centers)
    return KMeans1D(centers, assign(x, centers) if labels else None, float(sse), iters, _max_error(data, centers))


def _max_error(data: _Sorted, centers: np.ndarray) -> float:
    """Largest distance of a value to its centre: each cluster's extremes, from the sorted values."""
    seg = data.segments(centers)
    s, e = seg[:-1], seg[1:]
    full = e > s
    lo = data.x[s[full]].astype(np.float64)
    hi = data.x[e[full] - 1].astype(np.float64)
    c = centers[full]
    return float(np.maximum(np.abs(c - lo), np.abs(hi - c)).max(initial=0.0))


def _distinct_sorted(xs: np.ndarray) -> np.ndarray:
    keep = np.empty(xs.size, dtype=bool)
    keep[0] = True
    np.not_equal(xs[1:], xs[:-1], out=keep[1:])
    return xs[keep]


def _prefix(a: np.ndarray) -> np.ndarray:
    out = np.empty(a.size + 1, dtype=np.float64)
    out[0] = 0.0
    np.cumsum(a, dtype=np.float64, out=out[1:])
    return out


def assign(values: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest centre (ties go to the lower centre) for every value, int32."""
    x = np.asarray(values).reshape(-1)
    c = np.asarray(centers, dtype=np.float64)
    mids = _midpoints(c, x.dtype)
    out = np.empty(x.size, dtype=np.int32)
    for start in range(0, x.size, _CHUNK):  # chunks: no full-size int64 temporary
        out[start:start + _CHUNK] = np.searchsorted(mids, x[start:start + _CHUNK], side="left")
    return out


def _midpoints(centers: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # Compare in the values' own dtype: numpy would otherwise cast the whole (large) value array
    # to float64 on every search. Lloyd's segments and the final labels use the same boundaries.
    dtype = np.dtype(dtype if np.issubdtype(dtype, np.floating) and np.dtype(dtype).itemsize >= 4 else np.float64)
    mids = ((centers[1:] + centers[:-1]) / 2).astype(dtype)
    upper = centers[1:].astype(dtype)
    # adjacent centres: the midpoint can round up onto the upper centre, which must keep its own value
    return np.where(mids >= upper, np.nextafter(upper, dtype.type(-np.inf)), mids)


def kmeans_groups(values: np.ndarray, k: int, groups: int, weights: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, float]:
    """Cluster each of `groups` equal row blocks of `values` (shape [rows, ...]) independently.

    Rows are split into `groups` consecutive blocks (block size ceil(rows / groups)). Returns
    `(centers [groups, k], labels with values' shape, total SSE)`. A block with fewer than `k`
    distinct values repeats its last centre, so the table stays rectangular.
    """
    arr = np.asarray(values, dtype=np.float64)
    rows = arr.shape[0] if arr.ndim else 1
    flat = arr.reshape(rows, -1)
    wflat = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(rows, -1)
    size = -(-rows // groups)
    centers = np.zeros((groups, k))
    labels = np.zeros(flat.shape, dtype=np.int32)
    total = 0.0
    for g in range(groups):
        sl = slice(g * size, min((g + 1) * size, rows))
        r = kmeans_1d(flat[sl], k, None if wflat is None else wflat[sl])
        centers[g, : len(r.centers)] = r.centers
        centers[g, len(r.centers):] = r.centers[-1] if len(r.centers) else 0.0
        labels[sl] = r.labels.reshape(flat[sl].shape)
        total += r.inertia
    return centers, labels.reshape(arr.shape), total


def fewest_centers(values: np.ndarray, tolerance: float) -> KMeans1D:
    """The fewest shared values that keep every value within `tolerance` of its centre (exact, greedy).

    Sorted values are covered left to right by intervals of width 2*tolerance; each centre is the
    midpoint of its group's range, so the count is minimal and every error is <= tolerance.

    >>> fewest_centers(np.array([0.0, 0.05, 0.3]), 0.05).centers.tolist()
    [0.025, 0.3]
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return KMeans1D(np.zeros(0), np.zeros(0, dtype=np.int32), 0.0)
    xs = np.sort(x)
    starts = cover_starts(xs, 2 * tolerance)
    ends = np.concatenate([starts[1:], [len(xs)]])
    centers = (xs[starts] + xs[ends - 1]) / 2
    labels = (np.searchsorted(xs[starts], x, side="right") - 1).astype(np.int32)
    err = x - centers[labels]
    return KMeans1D(centers, labels, float(err @ err))


def cover_starts(xs: np.ndarray, width: float) -> np.ndarray:
    """Start index of each group when sorted `xs` is covered left to right by intervals of `width`
    (the fewest such groups: `fewest_centers` without labels)."""
    starts = []
    i, n = 0, len(xs)
    while i < n:
        starts.append(i)
        i = int(np.searchsorted(xs, xs[i] + width, side="right"))
    return np.asarray(starts, dtype=np.int64)


def _check_weights(weights, x: np.ndarray) -> np.ndarray | None:
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != x.shape:
        raise ValueError(f"weights have {w.size} values, values have {x.size}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and non-negative")
    if w.sum() <= 0:
        return None
    return w


def _starts(data: _Sorted, uniq: np.ndarray, k: int):
    q = (np.arange(k) + 0.5) / k * data.total_weight
    if data.cw is None:
        pos = q.astype(np.int64)
    else:
        pos = np.searchsorted(data.cw[1:], q)
    yield np.unique(data.x[np.minimum(pos, len(data.x) - 1)].astype(np.float64))
    yield np.linspace(uniq[0], uniq[-1], k)
    if k <= _DP_MAX_K:
        yield _histogram_dp(data, k)


def _lloyd(data: _Sorted, centers: np.ndarray, k: int, max_iter: int) -> tuple[np.ndarray, float, int]:
    centers = np.unique(centers)
    seg, prev = None, np.inf
    for it in range(1, max_iter + 1):
        new_seg = data.segments(centers)
        mean, w, sse = data.means_and_sse(new_seg)
        keep = w > 0
        centers = mean[keep]
        if not keep.all() or len(centers) < k:
            centers = _split_largest(data, centers, k)
            seg = None
            continue
        total = float(sse.sum())
        if seg is not None and np.array_equal(seg, new_seg):
            return centers, total, it
        # the last moves of a long Lloyd tail shift a boundary by one value and the error by less
        # than rounding: stop there (each iteration is O(k log n), but thousands add up)
        if seg is not None and prev - total <= _REL_TOL * total:
            return centers, total, it
        seg, prev = new_seg, total
    final = data.segments(centers)
    mean, w, sse = data.means_and_sse(final)
    return mean[w > 0], float(sse[w > 0].sum()), max_iter


def _split_largest(data: _Sorted, centers: np.ndarray, k: int) -> np.ndarray:
    """Refill to k centres by splitting the clusters with the largest error at their median."""
    centers = np.unique(centers)
    for _ in range(k):  # bounded: a split that adds no new centre ends the refill
        if len(centers) >= k:
            break
        seg = data.segments(centers)
        _, _, sse = data.means_and_sse(seg)
        spread = np.where(seg[1:] - seg[:-1] > 1, sse, -1.0)
        j = int(np.argmax(spread))
        if spread[j] <= 0:
            break
        s, e = seg[j], seg[j + 1]
        lo, hi = float(data.x[s]), float(data.x[e - 1])
        mid = float(data.x[(s + e) // 2])
        grown = np.unique(np.concatenate([np.delete(centers, j), [(lo + mid) / 2, (mid + hi) / 2]]))
        if len(grown) <= len(centers):
            break
        centers = grown
    return centers


def _histogram_dp(data: _Sorted, k: int) -> np.ndarray:
    """Optimal k-means of a weighted histogram of the values (O(k B^2) vectorised), as a start."""
    edges = np.linspace(data.x[0], data.x[-1], _HIST_BINS + 1)
    idx = np.searchsorted(data.x, edges[1:-1].astype(data.x.dtype), side="left")
    seg = np.unique(np.concatenate([[0], idx, [len(data.x)]]))
    mean, w, _ = data.means_and_sse(seg)
    keep = w > 0
    m, wt = mean[keep], w[keep]
    b = len(m)
    if b <= k:
        return m
    cw = np.concatenate([[0], np.cumsum(wt)])
    cs = np.concatenate([[0], np.cumsum(wt * m)])
    cq = np.concatenate([[0], np.cumsum(wt * m * m)])
    i = np.arange(b + 1)
    s, e = np.meshgrid(i, i, indexing="ij")  # cost of bins s..e-1
    ww = cw[e] - cw[s]
    sx = cs[e] - cs[s]
    cost = np.where(e > s, cq[e] - cq[s] - sx * sx / np.where(ww > 0, ww, 1), np.inf)
    best = cost[0].copy()
    back = np.zeros((k, b + 1), dtype=np.int64)
    for j in range(1, k):
        total = best[:, None] + cost
        back[j] = np.argmin(total, axis=0)
        best = total[back[j], i]
    cuts = [b]
    for j in range(k - 1, 0, -1):
        cuts.append(back[j][cuts[-1]])
    cuts.append(0)
    cuts = np.array(cuts[::-1])
    centers = [(cs[cuts[t + 1]] - cs[cuts[t]]) / (cw[cuts[t + 1]] - cw[cuts[t]])
               for t in range(len(cuts) - 1) if cuts[t + 1] > cuts[t]]
    return np.asarray(centers)
