"""Pictures of an audit: value histograms of the largest tensors with their shared values marked.

Needs matplotlib (the `plot` extra). Uses matplotlib's object API with the Agg canvas, so it never
touches pyplot's global state or opens a window.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_outputs
from .auditing import AuditReport, TensorAudit
from .errors import BadInputError, CompressError
from .kmeans import kmeans_1d
from .units import format_iec

_BINS = 160


def plot_audit(report: AuditReport, tensors: Mapping[str, torch.Tensor], path: Path | str, *, count: int = 6,
               bits: int = 4, force: bool = False, inputs: Sequence[Path | str] = ()) -> Path:
    """Write a PNG of value histograms of the `count` largest float tensors, `bits`-bit centres as lines.

    Args:
        report: the audit of the model.
        tensors: the same name -> tensor mapping the audit read (each plotted tensor is read again).
        path: the PNG to write (atomically).
        count: how many tensors, largest first (at most 6 fit one readable page).
        bits: which hard merge's shared values to draw (taken from the report when it lists them).
        force, inputs: as in `compress.atomic.atomic_outputs`.

    Example::

        loaded = compress.io.load("samples/digits_gru.pt2")
        plot_audit(compress.audit(loaded), loaded.tensors, "gru-audit.png")
    """
    figure_cls, canvas_cls = _matplotlib()
    chosen = _largest_float_tensors(report, count)
    if not chosen:
        raise BadInputError(f"{report.path}: no float tensors to plot")
    cols = min(3, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig = figure_cls(figsize=(5.6 * cols, 3.9 * rows), layout="constrained")
    canvas_cls(fig)
    fig.suptitle(f"{Path(report.path).name}: value histograms, {bits}-bit shared values (red)", fontsize=13)
    for i, row in enumerate(chosen):
        _draw(fig.add_subplot(rows, cols, i + 1), row, tensors[row.name], bits)
    with atomic_outputs([path], force=force, inputs=inputs) as (tmp,):
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise CompressError("plotting needs matplotlib: pip install 'compress[plot]'") from e
    return Figure, FigureCanvasAgg


def _largest_float_tensors(report: AuditReport, count: int) -> list[TensorAudit]:
    analysed = [t for t in report.tensors if t.merges and t.shared_with is None]
    return sorted(analysed, key=lambda t: (-t.bytes, t.name))[:count]


def _draw(ax, row: TensorAudit, tensor: torch.Tensor, bits: int) -> None:
    x = tensor.detach().reshape(-1).to(torch.float64).numpy()
    merge = row.merge_at(bits)
    centers = np.asarray(merge.values) if merge is not None and merge.values is not None \
        else kmeans_1d(x, 2 ** bits).centers
    counts, edges = np.histogram(x, bins=int(np.clip(2 * math.sqrt(x.size), 20, _BINS)))
    ax.vlines(centers, 0, 1, transform=ax.get_xaxis_transform(), colors="#c44e52", linewidth=0.9, alpha=0.8,
              zorder=1)
    ax.stairs(counts, edges, fill=True, color="#4c72b0", alpha=0.9, zorder=2)
    log = counts.max() >= 100  # tails and outliers (which often own a shared value) stay visible
    if log:
        ax.set_yscale("log")
    shape = "x".join(map(str, row.shape))
    ax.set_title(f"{_short(row.name)}\n{shape} {row.dtype}, {format_iec(row.bytes)}", fontsize=10)
    ax.set_xlabel("value", fontsize=9)
    ax.set_ylabel("count (log scale)" if log else "count", fontsize=9)
    ax.tick_params(labelsize=8)
    label = f"{len(centers)} shared values"
    if merge is not None:
        label += f"\nRMS error {merge.rms_error:.1e}"
    ax.text(0.98, 0.95, label, transform=ax.transAxes, ha="right", va="top", fontsize=8,
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8, "edgecolor": "#cccccc"})


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]
