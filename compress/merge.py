"""Hard merge: every group of a planned tensor becomes one shared value, stored as a codebook.

`merge_(model, plan)` replaces each clustered weight by a `CodebookParametrization` whose `original`
is the codebook [groups, K] (in the weight's own dtype) and whose `index` buffer (uint8) has the
weight's shape, so the state_dict, `torch.export` and the exporters see only the compact form.
Tensor-level ties make two names one parameter object: an equal copy reads the same codebook
(or the same dense parameter) and a transposed copy reads it through `.t()`, a second
parametrization that `torch.export` traces like any other op.

    >>> codebooks = merge_(model, analyze(model, TieConfig(bits=4)))
    >>> model.fc1.weight.unique().numel() <= 16
    True
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .codebook import Alias, Codebooks, TensorCodebook, attach_codebook_, index_dtype
from .errors import BadInputError
from .plan import PlannedTie, TensorPlan, TiePlan


class Transpose(nn.Module):
    """Parametrization reading another tensor transposed (a transposed tensor-level tie)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.t()


def merge_(model: nn.Module, plan: TiePlan, *, centers: dict[str, torch.Tensor] | None = None,
           labels: dict[str, torch.Tensor] | None = None) -> Codebooks:
    """Merge `model` in place as `plan` says; returns the codebooks and the aliases.

    Args:
        model: the module to change (its planned weights become codebook + indices).
        plan: from `analyze`.
        centers: optional name -> [groups, K] shared values replacing the plan's (e.g. re-estimated
            after fine-tuning).
        labels: optional name -> assignment (the weight's shape); by default every weight goes to the
            nearest shared value of its group, which after fine-tuning may differ from the plan's.

    Returns:
        `Codebooks` with one `TensorCodebook` per clustered tensor and one `Alias` per tie.

    >>> cbs = merge_(model, plan)
    >>> sorted(cbs.tensors)
    ['fc1.weight', 'fc2.weight']
    """
    centers, labels = centers or {}, labels or {}
    out = Codebooks()
    for tp in plan.clustered():
        w = current_weight(model, tp.name)
        _check_shape(tp, w)
        c = (centers[tp.name] if tp.name in centers else tp.centers_tensor()).to(w.dtype)
        lab = labels[tp.name] if tp.name in labels else nearest_labels(w.detach(), c, tp.granularity,
                                                                      tp.group_size)
        if lab.shape != w.shape:
            raise BadInputError(f"labels for `{tp.name}` have shape {tuple(lab.shape)}, the weight {tuple(w.shape)}")
        cb = TensorCodebook(tp.name, tp.shape, tp.granularity, c.detach().clone(),
                            lab.to(index_dtype(tp.k)), tp.group_size)
        attach_codebook_(model, cb)
        out.tensors[tp.name] = cb
    for tie in plan.ties:
        alias_(model, tie)
        out.aliases[tie.name] = Alias(tie.name, tie.target, tie.transpose)
    return out


def current_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor `name` as the model computes it (through any parametrization)."""
    module, attr = _owner(model, name)
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise BadInputError(f"the model has no parameter `{name}`; was the plan made for another model?") from e


def live_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """The `nn.Parameter` object stored under `name` (not a parametrized view)."""
    module, attr = _owner(model, name)
    if parametrize.is_parametrized(module, attr):
        raise BadInputError(f"`{name}` is already merged (parametrized); analyze the original model")
    p = module._parameters.get(attr)
    if p is None:
        raise BadInputError(f"the model has no parameter `{name}`; was the plan made for another model?")
    return p


def nearest_labels(w: torch.Tensor, centers: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """Index of the nearest shared value of each element's row group (ties go to the lower value).

    `centers` is [groups, K]; the result (int64) has `w`'s shape and indexes each group's row as given
    (centres need not be sorted).
    """
    # one codebook for the whole tensor: one row, so the boundaries are not repeated per row
    rows = 1 if granularity == "tensor" or w.ndim == 0 else w.shape[0]
    flat = w.reshape(rows, -1).to(torch.float64)
    c = centers.to(torch.float64)
    order = c.argsort(dim=1, stable=True)
    sorted_c = c.gather(1, order)
    mids = (sorted_c[:, 1:] + sorted_c[:, :-1]) / 2
    g = group_of_rows(rows, granularity, group_size)
    pos = torch.searchsorted(mids[g].contiguous(), flat.contiguous(), side="left")
    return order[g].gather(1, pos).reshape(w.shape)


def group_of_rows(rows: int, granularity: str, group_size: int | None) -> torch.Tensor:
    """Codebook row of each first-axis row of a tensor (int64, length `rows`)."""
    if granularity == "tensor":
        return torch.zeros(rows, dtype=torch.int64)
    r = torch.arange(rows, dtype=torch.int64)
    return r if granularity == "channel" else r // int(group_size)


def alias_(model: nn.Module, tie: PlannedTie) -> None:
    """Make `tie.name` read `tie.target`'s one parameter (through `.t()` when transposed)."""
    src_module, src_attr = _owner(model, tie.target)
    dst_module, dst_attr = _owner(model, tie.name)
    if parametrize.is_parametrized(src_module, src_attr):
        chain = src_module.parametrizations[src_attr]
        storage, steps = chain.original, list(chain)
    else:
        storage, steps = src_module._parameters.get(src_attr), []
        if storage is None:
            raise BadInputError(f"tie target `{tie.target}` is not a parameter of the model")
        if not tie.transpose and dst_module._parameters.get(dst_attr) is storage:
            return  # already the same parameter object
    if tie.transpose:
        steps = steps + [Transpose()]
    if parametrize.is_parametrized(dst_module, dst_attr):
        parametrize.remove_parametrizations(dst_module, dst_attr, leave_parametrized=False)
    expected = tuple(getattr(dst_module, dst_attr).shape)
    dst_module._parameters[dst_attr] = storage
    for step in steps:  # the same step modules, so both names share one index buffer
        parametrize.register_parametrization(dst_module, dst_attr, step, unsafe=True)
    got = tuple(getattr(dst_module, dst_attr).shape)
    if got != expected:
        raise BadInputError(f"tie `{tie.name}` -> `{tie.target}` gives shape {got}, expected {expected}")


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    try:
        return (model.get_submodule(path) if path else model), attr
    except AttributeError as e:
        raise BadInputError(f"the model has no parameter `{name}`; was the plan made for another model?") from e


def _check_shape(tp: TensorPlan, w: torch.Tensor) -> None:
    if tuple(w.shape) != tp.shape:
        raise BadInputError(f"`{tp.name}` has shape {tuple(w.shape)}, the plan says {tp.shape}; "
                            "was the plan made for another model?")
