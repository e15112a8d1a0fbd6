"""Fitting the shared values of one tensor: K scalars (1D k-means) or K vectors of `dim` weights.

`fit_tables(w, grain, k, dim, weights)` returns the codebook [groups, k] (scalar) or
[groups, k, dim] (vector), weighted per weight by `weights` (e.g. diag(H), the output cost of each
input column) when given. Vector k-means starts from the grid of the scalar solution (k = k1**dim
points: a k1-value scalar codebook in every coordinate), so it is never worse than scalar k-means to
begin with, then runs weighted Lloyd iterations on up to 16,384 sampled runs per codebook row.

    >>> w = torch.randn(16, 64, dtype=torch.float64)
    >>> fit_tables(w, Granularity("tensor"), 16, 2).shape
    torch.Size([1, 16, 2])
"""

from __future__ import annotations

import numpy as np
import torch

from ..granularity import Granularity
from ..kmeans import kmeans_1d

SAMPLE = 1 << 14
ITERATIONS = 10


def fit_tables(w: torch.Tensor, grain: Granularity, k: int, dim: int = 1,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """`k` shared values (or vectors) of `w` [rows, cols] per codebook row of `grain` (float64)."""
    per_axis = k if dim == 1 else round(k ** (1 / dim))
    if per_axis ** dim != k:
        raise ValueError(f"a vector codebook needs k = n**{dim}, got {k}")
    out = []
    for g, rows in enumerate(grain.row_blocks(w.shape[0])):
        block = w[rows].to(torch.float64)
        wt = None if weights is None else weights[rows].to(torch.float64)
        scalar = _scalar(block, per_axis, wt)
        out.append(scalar.unsqueeze(-1) if dim == 1 else _vectors(block, scalar, dim, wt, seed=g))
    tables = torch.stack(out)
    return tables[..., 0] if dim == 1 else tables


def _scalar(block: torch.Tensor, k: int, wt: torch.Tensor | None) -> torch.Tensor:
    values = block.reshape(-1).numpy()
    r = kmeans_1d(values, k, None if wt is None else np.ascontiguousarray(wt.reshape(-1).numpy()))
    centers = np.full(k, r.centers[-1])
    centers[: len(r.centers)] = r.centers
    return torch.from_numpy(centers)


def _vectors(block: torch.Tensor, scalar: torch.Tensor, dim: int, wt: torch.Tensor | None,
             seed: int) -> torch.Tensor:
    x = block.reshape(-1, dim)
    w = torch.ones_like(x) if wt is None else wt.reshape(-1, dim).clamp_min(0)
    if len(x) > SAMPLE:
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:SAMPLE]
        x, w = x[pick], w[pick]
    grid = torch.cartesian_prod(*[scalar] * dim).reshape(-1, dim)
    centers = grid.clone()
    for _ in range(ITERATIONS):
        labels = nearest_vectors(x, centers, w)
        num = torch.zeros_like(centers).index_add_(0, labels, x * w)
        den = torch.zeros_like(centers).index_add_(0, labels, w)
        moved = torch.where(den > 0, num / den.clamp_min(1e-300), centers)
        if torch.equal(moved, centers):
            break
        centers = moved
    return centers


def nearest_vectors(x: torch.Tensor, centers: torch.Tensor, w: torch.Tensor | None = None,
                    chunk: int = 1 << 15) -> torch.Tensor:
    """Index of the nearest of `centers` [K, dim] for each row of `x` [n, dim], distances weighted
    per coordinate by `w` [n, dim] when given."""
    out = torch.empty(len(x), dtype=torch.int64)
    c = centers.float()  # float32 distances: twice as fast, and only the order of close calls can change
    c2 = c.square()
    for s in range(0, len(x), chunk):
        xs = x[s:s + chunk].float()
        ws = torch.ones_like(xs) if w is None else w[s:s + chunk].float()
        dist = ws @ c2.T - 2 * (xs * ws) @ c.T
        out[s:s + chunk] = dist.argmin(1)
    return out
