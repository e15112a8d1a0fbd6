"""The one clustering core every pipeline uses: which tensors are tied, and their shared values.

- `decide(name, tensor, module_type, cfg)`: cluster it, or keep it and say why ("bias",
  "norm layer", "small (< 1024 elements)", "excluded by 'fc1.*'", ...);
- `cluster_tensor(w, settings)`: K shared values per codebook row (1D k-means, or the fewest values
  within a tolerance) and each weight's nearest one;
- `nearest_labels(w, centers, grain)`: the nearest shared value of each weight's codebook row.

The in-memory planner (`analyze`), the checkpoint streamer and the ONNX tie all call these, so the
three agree on rules, limits (1..8 bits, K <= 256) and the row -> codebook-row mapping
(`Granularity`).

    >>> import torch
    >>> w = torch.linspace(-1, 1, 2048).reshape(32, 64)
    >>> c = cluster_tensor(w, TieConfig(bits=2).settings(), name="w")
    >>> c.k, c.centers.shape, int(c.labels.max())
    (4, (1, 4), 3)
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np
import torch

from .. import registry
from ..errors import BadInputError, Option
from ..granularity import Granularity
from ..kmeans import fewest_centers, kmeans_1d
from .config import MAX_BITS, MAX_K, Settings, TieConfig


@dataclass(frozen=True)
class Decision:
    """`action` is "cluster" (with `settings`) or "keep"; `reason` says why."""

    action: str
    reason: str
    settings: Settings | None = None


@dataclass
class Clustering:
    """One tensor clustered: `centers` [groups, k] (float64), `labels` (uint8, the tensor's shape)."""

    grain: Granularity
    k: int
    centers: np.ndarray
    labels: np.ndarray
    max_error: float
    rel_error: float


def short_type(module_type: str | None) -> str | None:
    """`Linear` for `torch.nn.modules.linear.Linear`."""
    return None if module_type is None else module_type.rpartition(".")[2]


def decide(name: str, p: torch.Tensor, module_type: str | None, cfg: TieConfig) -> Decision:
    """Whether the parameter `name` is clustered, with which settings, and why (a meta tensor will do).

    `module_type` is the qualified class name of the owning module, or None when unknown (then a
    parameter is clustered when it has at least 2 dims and is named `*weight`).

    >>> decide("fc.bias", torch.zeros(10), "torch.nn.modules.linear.Linear", TieConfig()).reason
    'bias'
    """
    attr = name.rpartition(".")[2]
    short = short_type(module_type)
    if not p.is_floating_point():
        return Decision("keep", f"{str(p.dtype).removeprefix('torch.')} dtype (not floating point)")
    if p.numel() == 0:  # nothing to store, even when an include glob names it
        return Decision("keep", "empty (0 elements)")
    for pattern in cfg.exclude:
        if fnmatchcase(name, pattern):
            return Decision("keep", f"excluded by {pattern!r}")
    settings = cfg.resolved(name, short).for_shape(tuple(p.shape), cfg.dim)
    if not settings.enabled:
        return Decision("keep", f"disabled by {settings.source}")
    for pattern in cfg.include:
        if fnmatchcase(name, pattern):
            return Decision("cluster", f"included by {pattern!r}", settings)
    if module_type is not None and registry.is_norm(module_type):
        return Decision("keep", "norm layer")
    if attr.startswith("bias") or attr.endswith("bias"):
        return Decision("keep", "bias")
    if p.numel() < cfg.min_elements:
        return Decision("keep", f"small (< {cfg.min_elements} elements)")
    if module_type is not None and registry.is_registered(module_type):
        if registry.is_clusterable(module_type, attr):
            return Decision("cluster", f"{short}.{attr}", settings)
        return Decision("keep", f"not a registered weight of {short}")
    why = "module type unknown" if module_type is None else f"{short} is not registered"
    if p.ndim >= 2 and attr.endswith("weight"):
        return Decision("cluster", f"{why}; fallback rule: >= 2 dims and named *weight", settings)
    return Decision("keep", f"{why}; not a >= 2-dim *weight")


def check_finite(name: str, p: torch.Tensor) -> None:
    """Refuse a tensor with NaN or infinite values, naming it and the way out."""
    bad = int((~torch.isfinite(p.detach())).sum())
    if bad:
        raise BadInputError(f"`{name}` has {bad} NaN/Inf values; clean the checkpoint or pass ",
                            Option("exclude", name, many=True))


def cluster_tensor(w: torch.Tensor, settings: Settings, *, importance: torch.Tensor | None = None,
                   name: str = "tensor") -> Clustering:
    """Cluster `w` per codebook row of `settings.grain` into K shared values and assign every weight.

    K is `2**settings.bits` (k-means weighted by `importance` when given), or with a tolerance the
    fewest values keeping every weight within it (the most any row needs, at most 256). Rows that
    need fewer values repeat their last one.
    """
    grain = settings.grain
    values = w.double().cpu().numpy().reshape(grain.rows(tuple(w.shape)), -1)
    imp = None if importance is None else importance.double().cpu().numpy().reshape(values.shape)
    blocks = grain.row_blocks(values.shape[0])
    if settings.tolerance is not None:
        results = [fewest_centers(values[b], settings.tolerance) for b in blocks]
        k = max(len(r.centers) for r in results)
        if k > MAX_K:
            raise BadInputError(f"`{name}` needs {k} shared values to stay within tolerance {settings.tolerance}, "
                                f"more than {MAX_K} ({MAX_BITS} bits); raise ", Option("tolerance"), " or use ",
                                Option("bits"))
    else:
        k = 2 ** settings.bits
        if k > w.numel():
            raise BadInputError(f"`{name}` has {w.numel()} elements, fewer than K={k} ({settings.bits} bits); "
                                "use fewer bits or pass ", Option("exclude", name, many=True))
        results = [kmeans_1d(values[b], k, None if imp is None else imp[b]) for b in blocks]
    centers = np.zeros((len(blocks), k))
    labels = np.zeros(values.shape, dtype=np.uint8)
    for g, (b, r) in enumerate(zip(blocks, results)):
        centers[g, : len(r.centers)] = r.centers
        centers[g, len(r.centers):] = r.centers[-1]
        labels[b] = r.labels.reshape(values[b].shape)
    row_group = grain.group_of_rows(values.shape[0]).numpy()
    err = np.take_along_axis(centers[row_group], labels.astype(np.int64), 1) - values
    norm = float(np.sqrt(np.einsum("ij,ij->", values, values)))  # einsum: no BLAS call, no temporary
    rel = float(np.sqrt(np.einsum("ij,ij->", err, err)) / norm) if norm > 0 else 0.0
    return Clustering(grain, k, centers, labels.reshape(tuple(w.shape)), float(np.abs(err).max()), rel)


def nearest_labels(w: torch.Tensor, centers: torch.Tensor, grain: Granularity) -> torch.Tensor:
    """Index of the nearest shared value of each element's codebook row (ties go to the lower value).

    `centers` is [groups, K]; the result (int64) has `w`'s shape and indexes each group's row as
    given (centres need not be sorted).
    """
    # one codebook for the whole tensor: one row, so the boundaries are not repeated per row
    rows = 1 if grain.kind == "tensor" or w.ndim == 0 else w.shape[0]
    flat = w.reshape(rows, -1).to(torch.float64)
    c = centers.to(torch.float64)
    order = c.argsort(dim=1, stable=True)
    sorted_c = c.gather(1, order)
    mids = (sorted_c[:, 1:] + sorted_c[:, :-1]) / 2
    g = grain.group_of_rows(rows)
    pos = torch.searchsorted(mids[g].contiguous(), flat.contiguous(), side="left")
    return order[g].gather(1, pos).reshape(w.shape)
