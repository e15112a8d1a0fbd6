"""Hard merge: every group of a planned tensor becomes one shared value, stored as a codebook.

`merge_(model, plan)` replaces each clustered weight by a `CodebookParametrization` whose `original`
is the codebook [groups, K] (in the weight's own dtype) and whose `index` buffer (uint8) has the
weight's shape, so the state_dict, `torch.export` and the exporters see only the compact form.
Tensor-level ties make two names one parameter object: an equal copy reads the same codebook
(or the same dense parameter) and a transposed copy reads it through `.t()`, a second
parametrization that `torch.export` traces like any other op.

    >>> from torch import nn
    >>> from compress.tying import TieConfig, analyze
    >>> model = nn.Sequential(nn.Linear(64, 32))
    >>> codebooks = merge_(model, analyze(model, TieConfig(bits=4)))
    >>> model[0].weight.unique().numel() <= 16
    True
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..codebook import Alias, Codebooks, TensorCodebook, attach_codebook_, index_dtype
from ..errors import BadInputError
from .cluster import nearest_labels
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

    """
    centers, labels = centers or {}, labels or {}
    out = Codebooks()
    for tp in plan.clustered():
        w = current_weight(model, tp.name)
        _check_shape(tp, w)
        c = (centers[tp.name] if tp.name in centers else tp.centers_tensor()).to(w.dtype)
        lab = labels[tp.name] if tp.name in labels else nearest_labels(w.detach(), c, tp.grain)
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
