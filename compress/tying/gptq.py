"""Assigning weights to fixed shared values: nearest, or error-compensated (second order, GPTQ-style).

A weight W [rows, cols] (a convolution's kernel flattened per output channel) whose inputs have Gram
matrix H = E[xxᵀ] causes the output error tr(ΔW H ΔWᵀ) when it becomes Q = W + ΔW. Assigning each
weight to its nearest shared value ignores H; `assign_compensated` walks the columns (runs of `dim`
columns for vector codebooks) in descending order of diag(H), assigns each to the nearest entry of its
row's table, and passes the error on to the columns not yet assigned through the Cholesky factor U of
H⁻¹ (Frantar et al., GPTQ, 2023; for vectors GPTVQ, van Baalen et al., 2024):

    err_j = (w_j - q_j) / U_jj;   W[:, j+1:] -= err_j ⊗ U[j, j+1:]

so that later weights absorb what earlier ones got wrong. H is damped by 1% of its mean diagonal. The
tables are fixed (at most K values per codebook row), so the result is a plain codebook + indices.

With `outliers` a share of the weights is kept exactly instead: within every run of columns, the
entries with the largest error (scaled by 1/U_jj², their output cost) take their own value and pass on
no error.

    >>> _ = torch.manual_seed(0)
    >>> w = torch.randn(8, 16, dtype=torch.float64)
    >>> tables = torch.linspace(-2, 2, 4, dtype=torch.float64).expand(8, 4).unsqueeze(-1)
    >>> x = torch.randn(200, 16, dtype=torch.float64)
    >>> near = assign_nearest(w, tables)
    >>> comp = assign_compensated(w, x.T @ x / 200, tables)
    >>> error = lambda labels: float(((take(tables, labels) - w) @ x.T).square().sum())
    >>> error(comp.labels) < error(near.labels)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DAMP = 0.01
BLOCK = 128
SWEEPS = 1


@dataclass
class Assignment:
    """`labels` [rows, cols / dim] (int64); outliers as flat positions in [rows, cols] and their values;
    `loss` the output error tr(ΔW H ΔWᵀ) it leaves (||ΔW||² without H)."""

    labels: torch.Tensor
    outlier_index: torch.Tensor | None
    outlier_value: torch.Tensor | None
    loss: float


def take(tables: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The values [rows, cols] that `labels` [rows, cols / dim] pick from per-row `tables` [rows, K, dim]."""
    rows, _, dim = tables.shape
    picked = tables.gather(1, labels.unsqueeze(-1).expand(rows, labels.shape[1], dim))
    return picked.reshape(rows, -1)


def assign_nearest(w: torch.Tensor, tables: torch.Tensor, outliers: float = 0.0) -> Assignment:
    """Every run of `dim` weights to its nearest entry of its row's table; the worst `outliers` share kept.

    `w` [rows, cols], `tables` [rows, K, dim] (rows that share a codebook share its table).
    """
    rows, k, dim = tables.shape
    w = w.to(tables.dtype)
    vectors = w.reshape(rows, -1, dim)
    labels = torch.empty(vectors.shape[:2], dtype=torch.int64)
    step = max(1, (1 << 22) // max(1, vectors.shape[1] * k))  # rows per chunk: ~4M distances at a time
    for r in range(0, rows, step):
        v, t = vectors[r:r + step], tables[r:r + step]
        dist = (v.square().sum(-1, keepdim=True) - 2 * v @ t.transpose(1, 2) + t.square().sum(-1).unsqueeze(1))
        labels[r:r + step] = dist.argmin(-1)
    q = take(tables, labels)
    oi = ov = None
    count = round(outliers * w.numel())
    if count:
        oi = (w - q).abs().reshape(-1).topk(count).indices.sort().values
        ov = w.reshape(-1)[oi]
        q.reshape(-1)[oi] = ov
    return Assignment(labels, oi, ov, float((w - q).square().sum()))


def assign_compensated(w: torch.Tensor, h: torch.Tensor, tables: torch.Tensor, *, outliers: float = 0.0,
                       damp: float = DAMP, block: int = BLOCK, sweeps: int = SWEEPS) -> Assignment:
    """Error-compensated assignment of `w` [rows, cols] to per-row `tables` [rows, K, dim] under the
    input Gram matrix `h` [cols, cols] (see the module docstring), then `sweeps` passes of `descend`."""
    first = _greedy(w, h, tables, outliers, damp, block)
    if not sweeps:
        return first
    return descend(w, h, tables, first, sweeps=sweeps, damp=damp)


def descend(w: torch.Tensor, h: torch.Tensor, tables: torch.Tensor, start: Assignment, *, sweeps: int = 1,
            damp: float = DAMP) -> Assignment:
    """Coordinate descent on tr(E H Eᵀ), E = W - Q: each run of columns in turn moves to the table entry
    nearest to its best value given all the others, q + (E H)_j / H_jj, where that lowers the error.
    Outliers stay as they are. Starting from the greedy pass it can only improve it."""
    rows, _, dim = tables.shape
    cols = w.shape[1]
    W, tables = w.to(torch.float64), tables.to(torch.float64)
    H = h.to(torch.float64).clone()
    diag = torch.diagonal(H)
    diag[diag <= 0] = 1.0
    H += damp * float(diag.mean()) * torch.eye(cols, dtype=H.dtype)
    labels = start.labels.clone()
    Q = take(tables, labels)
    keep = torch.zeros(rows * cols, dtype=torch.bool)
    if start.outlier_index is not None:
        keep[start.outlier_index] = True
        Q.reshape(-1)[start.outlier_index] = start.outlier_value.to(Q.dtype)
    keep = keep.reshape(rows, cols)
    G = (W - Q) @ H
    d = torch.diagonal(H)
    pick = _Nearest(tables)
    order = torch.argsort(d.reshape(-1, dim).sum(1), descending=True, stable=True)
    for _ in range(sweeps):
        for run in order.tolist():
            c = slice(run * dim, run * dim + dim)
            q, hd = Q[:, c], d[c]
            lab, new = pick(q + G[:, c] / hd, hd)
            new = torch.where(keep[:, c], q, new)
            delta = q - new  # the change of E = W - Q
            gain = (delta.square() * hd + 2 * delta * G[:, c]).sum(1)
            if dim > 1:
                block = H[c, c]
                gain = gain + (delta @ block * delta).sum(1) - (delta.square() * hd).sum(1)
            better = gain < 0
            if not bool(better.any()):
                continue
            delta = delta * better[:, None]
            G += delta @ H[c, :]
            Q[:, c] = torch.where(better[:, None], new, q)
            labels[:, run] = torch.where(better, lab, labels[:, run])
    E = W - Q
    loss = float((E @ H * E).sum())
    return Assignment(labels, start.outlier_index, start.outlier_value, loss)


def _greedy(w: torch.Tensor, h: torch.Tensor, tables: torch.Tensor, outliers: float, damp: float,
            block: int) -> Assignment:
    rows, _, dim = tables.shape
    cols = w.shape[1]
    W = w.to(torch.float64).clone()
    tables = tables.to(torch.float64)
    perm, U = _factor(h.to(torch.float64), dim, damp)
    W = W[:, perm]
    labels = torch.empty(rows, cols // dim, dtype=torch.int64)
    out_pos, out_val, loss, taken = [], [], 0.0, 0
    total, runs = round(outliers * w.numel()), cols // dim  # outliers spread evenly over the runs
    pick = _Nearest(tables)
    block = max(dim, block - block % dim)
    for b1 in range(0, cols, block):
        b2 = min(b1 + block, cols)
        W1, U1 = W[:, b1:b2].clone(), U[b1:b2, b1:b2]
        E1 = torch.zeros_like(W1)
        d = torch.diagonal(U1)
        for i in range(0, b2 - b1, dim):
            wv = W1[:, i:i + dim]
            lab, q = pick(wv, 1 / d[i:i + dim].square())
            labels[:, (b1 + i) // dim] = lab
            n = round(total * ((b1 + i) // dim + 1) / runs) - taken
            if n > 0:
                taken += n
                score = ((wv - q).square() / d[i:i + dim].square()).reshape(-1)
                top = score.topk(min(n, score.numel())).indices
                q = q.clone()
                q.reshape(-1)[top] = wv.reshape(-1)[top]
                r, j = top // dim, top % dim
                out_pos.append(r * cols + perm[b1 + i + j])
                out_val.append(wv.reshape(-1)[top].clone())
            for j in range(dim):
                err = (W1[:, i + j] - q[:, j]) / U1[i + j, i + j]
                W1[:, i + j:] -= err[:, None] * U1[i + j, i + j:][None, :]
                E1[:, i + j] = err
                loss += float(err.square().sum())
        W[:, b2:] -= E1 @ U[b1:b2, b2:]
    order = perm.reshape(-1, dim)[:, 0] // dim  # the run each permuted run came from
    unpermuted = torch.empty_like(labels)
    unpermuted[:, order] = labels
    oi = ov = None
    if out_pos:
        oi, how = torch.cat(out_pos).sort()
        ov = torch.cat(out_val)[how]
    return Assignment(unpermuted, oi, ov, loss)


def _factor(h: torch.Tensor, dim: int, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Column order (runs of `dim`, descending diag(H)) and the upper Cholesky factor of (damped H)⁻¹."""
    cols = h.shape[0]
    h = h.clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0
    runs = diag.reshape(-1, dim).sum(1)
    order = torch.argsort(runs, descending=True, stable=True)
    perm = (order[:, None] * dim + torch.arange(dim)).reshape(-1)
    h = h[perm][:, perm]
    h += damp * float(torch.diagonal(h).mean()) * torch.eye(cols, dtype=h.dtype)
    for attempt in range(6):
        try:
            chol = torch.linalg.cholesky(h)
            break
        except torch.linalg.LinAlgError:  # not positive definite in floating point: damp more
            h += (10 ** attempt) * damp * float(torch.diagonal(h).mean()) * torch.eye(cols, dtype=h.dtype)
    else:
        raise torch.linalg.LinAlgError("the input Gram matrix stays singular after damping")
    return perm, torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


class _Nearest:
    """Nearest entry of each row's table for one run of columns, distances weighted per column."""

    def __init__(self, tables: torch.Tensor):
        self.tables = tables
        rows, _, dim = tables.shape
        self.rows = torch.arange(rows)
        if dim == 1:
            flat = tables[..., 0]
            self.order = flat.argsort(dim=1, stable=True)
            self.sorted = flat.gather(1, self.order)
            self.mids = ((self.sorted[:, 1:] + self.sorted[:, :-1]) / 2).contiguous()
        else:
            self.norms = tables.square()

    def __call__(self, wv: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tables.shape[2] == 1:
            pos = torch.searchsorted(self.mids, wv.contiguous())
            return self.order.gather(1, pos)[:, 0], self.sorted.gather(1, pos)
        diff = (self.tables - wv.unsqueeze(1)).square()
        lab = (diff * weights).sum(-1).argmin(1)
        return lab, self.tables[self.rows, lab]
