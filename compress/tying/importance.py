"""Importance: how much each weight matters to the model's output, to weight the clustering.

Its own step: `estimate_importance(model, data)` returns name -> per-weight importance, which
`analyze(model, cfg, importance=...)` takes when `cfg.importance` is set.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..execution import loss_mode, train_mode


def estimate_importance(model: nn.Module, data, names: Iterable[str] | None = None, *, batch_size: int = 256,
                        seed: int = 0) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the loss per weight over the calibration inputs.

    With integer targets the loss is cross-entropy (or reconstruction MSE when the output has the
    input's shape); without targets it is `r . f(x)` with random signs r, whose squared gradient
    estimates the diagonal of J^T J, the curvature of output distillation (Hutchinson).

    Args:
        model: the module (its `requires_grad` flags are restored afterwards).
        data: `DataSplits`; only the calibration inputs (and targets) are used.
        names: the parameters to weigh (default: every floating-point parameter).

    Returns:
        name -> a float64 tensor of the parameter's shape, for `analyze(..., importance=)`.
    """
    wanted = None if names is None else set(names)
    params = {n: p for n, p in model.named_parameters()
              if p.is_floating_point() and (wanted is None or n in wanted)}
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    try:
        with train_mode(model, False):
            return _mean_squared_grads(model, params, data, batch_size, torch.Generator().manual_seed(seed))
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])


def _mean_squared_grads(model: nn.Module, params: dict, data, batch_size: int, gen: torch.Generator
                        ) -> dict[str, torch.Tensor]:
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    inputs, targets = data.calib_inputs, data.calib_targets
    batches = 0
    for start in range(0, len(inputs), batch_size):
        x = inputs[start:start + batch_size]
        out = model(x)
        kind = loss_mode(out, x, targets)
        if kind == "cross-entropy":
            loss = nn.functional.cross_entropy(out, targets[start:start + batch_size])
        elif kind == "reconstruction":
            loss = nn.functional.mse_loss(out, x)
        else:
            signs = torch.randint(0, 2, out.shape, generator=gen).to(out.dtype) * 2 - 1
            loss = (signs * out).sum() / len(x)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:
                sums[n] += g.double() ** 2
        batches += 1
    return {n: s / max(batches, 1) for n, s in sums.items()}
