"""Merge with a chosen assignment: nearest, or error-compensated from calibration inputs; vector
codebooks, outliers, and bits spread over a budget.

`assign_(model, plan, cfg, batches)` is `merge_` for the quality settings of `TieConfig`:

- `method`: "compensated" observes each tied layer's inputs through the layers already merged
  (`observe.passes`), fits the layer's shared values by k-means weighted with diag(H), and assigns its
  weights column by column passing the error on (`gptq.assign_compensated`); weights whose inputs
  cannot be observed (tied tensors, weights read by other ops) get the nearest value, and the result
  says which and why. "nearest" keeps `merge_`'s assignment.
- `dim` 2 or 4: vector codebooks (`fit.fit_tables`); a tensor whose last axis does not divide by `dim`
  stays scalar, with a note.
- `outliers`: that share of each tensor's weights kept exactly.
- `budget`: bits per tensor from the output error each one causes at each candidate width
  (`budget.allocate`), measured on the unmerged model; the total never exceeds the budget.

The result is a plain `Codebooks` (every exporter reads it) and the plan's tensors are updated to what
was done (method, K, dim, outliers, shared values).

Example::

    plan = analyze(model, TieConfig(bits=3, method="compensated"))
    result = assign_(model, plan, plan.config, batches_of(calib_inputs))
    result.codebooks, result.tensors["fc1.weight"]    # 'compensated'
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..codebook import Alias, Codebooks, TensorCodebook, attach_codebook_, index_dtype
from ..errors import BadInputError, Option
from ..execution import flatten, train_mode
from ..records import SKIP, Record
from . import observe
from .budget import Allocation, allocate, candidates, cost_bits
from .config import MAX_BITS, TieConfig
from .fit import fit_tables
from .gptq import Assignment, assign_compensated, assign_nearest, take
from .merge import alias_, current_weight, live_parameter
from .plan import TensorPlan, TiePlan

SENSITIVITY_ROWS = 64


@dataclass
class AssignResult(Record):
    """What `assign_` did: per tensor "compensated" or "nearest" (with why), the calibration used,
    the bit allocation under a budget, notes, and the seconds it took."""

    codebooks: Codebooks | None = field(default=None, metadata=SKIP)
    method: str = "nearest"
    calibration: str = ""
    passes: int = 0
    tensors: dict[str, str] = field(default_factory=dict)
    allocation: Allocation | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    _what = "assignment result"


@dataclass
class _Spec:
    """One tensor to merge: its plan entry, how it is stored (bits per weight, dim) and its rows."""

    plan: TensorPlan
    bits: int | None  # bits per weight (None: K from a tolerance)
    k: int
    dim: int
    fixed: bool  # bits set by the plan's own K (not by the budget)

    @property
    def name(self) -> str:
        return self.plan.name

    def matrix(self, w: torch.Tensor) -> torch.Tensor:
        return w.detach().reshape(self.plan.grain.rows(tuple(w.shape)), -1)

    def with_bits(self, bits: int) -> _Spec:
        return _Spec(self.plan, bits, 1 << (bits * self.dim), self.dim, self.fixed)


def resolve_method(method: str, batches) -> str:
    """"compensated" or "nearest" for `method` ("auto": compensated when calibration batches exist)."""
    if method == "auto":
        return "compensated" if batches else "nearest"
    if method == "compensated" and not batches:
        raise BadInputError("error-compensated assignment (", Option("method", "compensated"),
                            ") needs calibration inputs: pass ", Option("data"), " or a model with example inputs")
    return method


def assign_(model: nn.Module, plan: TiePlan, cfg: TieConfig | None = None, batches: Sequence[tuple] | None = None,
            *, calibration: str = "", announce: Callable[[str], None] | None = None) -> AssignResult:
    """Merge `model` in place as `plan` says, assigning weights by `cfg.method` (see the module docstring).

    Args:
        model: the module to merge (changed in place).
        plan: from `analyze`; its clustered tensors are updated to what was done.
        cfg: the quality settings (method, dim, outliers, budget; default `plan.config`).
        batches: calibration batches, each a tuple of model arguments (`observe.batches_of`).
        calibration: how to name the batches in messages ("256 calibration rows").
        announce: called once, before the work, with what will be done and how long it should take.

    Returns:
        `AssignResult` with the codebooks.
    """
    started = time.perf_counter()
    cfg = cfg or plan.config
    method = resolve_method(cfg.method, batches)
    result = AssignResult(method=method, calibration=calibration)
    specs = _specs(plan, cfg, result.notes)
    tied = {t.name for t in plan.ties} | {t.target for t in plan.ties}
    params = {s.name: live_parameter(model, s.name) for s in specs.values()}
    fitted: dict[tuple, torch.Tensor] = {}  # shared values fitted while measuring, used again to merge
    observed: dict[str, str] = {}
    if method == "compensated":
        census = observe.Census.of(model, {n: p for n, p in params.items() if n not in tied}, batches)
        observed = census.observable
        result.tensors.update({n: f"nearest: {why}" for n, why in census.unobservable.items()})
    result.tensors.update({n: "nearest: tied to another tensor" for n in specs if n in tied and method != "nearest"})
    if announce is not None:
        announce(_plan_text(specs, observed, batches, cfg, model))
    if cfg.budget is not None:
        result.allocation = _allocate(model, specs, params, observed, batches, cfg, fitted)
        specs = {n: s if s.fixed else s.with_bits(result.allocation.bits[n]) for n, s in specs.items()}
    out = Codebooks()
    for name, spec in specs.items():
        if name not in observed:
            result.tensors.setdefault(name, "nearest")
            out.tensors[name] = _merge_nearest(model, spec, cfg, fitted)
    if observed:
        def handle(name: str, h: torch.Tensor) -> torch.Tensor:
            out.tensors[name] = _compensated(specs[name], params[name], h, cfg, fitted)
            result.tensors[name] = "compensated"
            return out.tensors[name].decode()

        def commit(names: list[str]) -> None:
            result.passes += 1
            for name in names:
                attach_codebook_(model, out.tensors[name])

        how = observe.sequential(model, {n: params[n] for n in observed}, batches, handle, commit)
        if how == "passes":
            result.notes.append(f"the calibration batches took different paths through the model: inputs "
                                f"observed in {result.passes} passes")
    for tie in plan.ties:
        alias_(model, tie)
        out.aliases[tie.name] = Alias(tie.name, tie.target, tie.transpose)
    _update_plan(plan, out, result.tensors)
    result.codebooks = out
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _specs(plan: TiePlan, cfg: TieConfig, notes: list[str]) -> dict[str, _Spec]:
    out = {}
    for tp in plan.clustered():
        bits = tp.k.bit_length() - 1 if tp.k & (tp.k - 1) == 0 else None
        dim = cfg.dim
        if dim > 1 and (not tp.shape or tp.shape[-1] % dim):
            notes.append(f"`{tp.name}` left scalar: its last axis ({tp.shape[-1] if tp.shape else 0}) does not "
                         f"divide by dim {dim}")
            dim = 1
        elif dim > 1 and (bits is None or bits * dim > MAX_BITS):
            notes.append(f"`{tp.name}` left scalar: {tp.k} values per weight need more than {MAX_BITS}-bit indices "
                         f"as vectors of {dim}")
            dim = 1
        k = tp.k if dim == 1 else 1 << (bits * dim)
        # under a budget a tensor keeps its K when an override (by_name, by_type, tolerance) set it
        out[tp.name] = _Spec(tp, bits, k, dim, fixed=cfg.budget is not None and (bits is None or bits != cfg.bits))
    return out


def _plan_text(specs: dict[str, _Spec], observed: dict, batches, cfg: TieConfig, model: nn.Module) -> str:
    weights = sum(s.plan.numel for s in specs.values())
    what = (f"error-compensated assignment of {len(observed)} of {len(specs)} tensors "
            f"({weights:,} weights) from {sum(len(b[0]) for b in batches)} calibration rows"
            if observed else f"nearest assignment of {len(specs)} tensors ({weights:,} weights)")
    extras = [f"vectors of {cfg.dim}" if cfg.dim > 1 else "", f"{100 * cfg.outliers:g}% outliers" if cfg.outliers
              else "", f"a budget of {cfg.budget:g} bits per weight" if cfg.budget is not None else ""]
    return what + "".join(f", {e}" for e in extras if e)


def _tables(spec: _Spec, w2: torch.Tensor, weights: torch.Tensor | None, fitted: dict | None = None
            ) -> torch.Tensor:
    """Per-row tables [rows, K, dim] for `w2`, from the plan's centres, a fit made before, or a new fit."""
    grain = spec.plan.grain
    key = (spec.name, spec.k, spec.dim, weights is None)
    if spec.dim == 1 and weights is None and spec.k == spec.plan.k:
        centers = spec.plan.centers_tensor()
    elif fitted is not None and key in fitted:
        centers = fitted[key]
    else:
        centers = fit_tables(w2, grain, spec.k, spec.dim, weights)
        if fitted is not None:
            fitted[key] = centers
    rows = grain.group_of_rows(w2.shape[0])
    centers = centers if spec.dim > 1 else centers.unsqueeze(-1)
    return centers[rows]


def _merge_nearest(model: nn.Module, spec: _Spec, cfg: TieConfig, fitted: dict) -> TensorCodebook:
    w = current_weight(model, spec.name)
    w2 = spec.matrix(w).double()
    tables = _tables(spec, w2, None, fitted)
    cb = _codebook(spec, w, tables, assign_nearest(w2, tables, cfg.outliers))
    attach_codebook_(model, cb)
    return cb


def _compensated(spec: _Spec, w: torch.Tensor, h: torch.Tensor, cfg: TieConfig, fitted: dict) -> TensorCodebook:
    w2 = spec.matrix(w).double()
    weights = torch.diagonal(h).clamp_min(0).expand_as(w2)
    tables = _tables(spec, w2, weights, fitted)
    return _codebook(spec, w, tables, assign_compensated(w2, h, tables, outliers=cfg.outliers))


def _codebook(spec: _Spec, w: torch.Tensor, tables: torch.Tensor, a: Assignment) -> TensorCodebook:
    grain = spec.plan.grain
    first = [b.start for b in grain.row_blocks(tables.shape[0])]
    codebook = tables[first].to(w.dtype)
    codebook = codebook[..., 0] if spec.dim == 1 else codebook
    labels = a.labels.reshape(spec.plan.shape[:-1] + (spec.plan.shape[-1] // spec.dim,) if spec.plan.shape else ())
    cb = TensorCodebook(spec.name, tuple(spec.plan.shape), grain.kind, codebook.detach().clone(),
                        labels.to(index_dtype(spec.k)), grain.group_size, spec.dim,
                        None if a.outlier_index is None else a.outlier_index.to(torch.int32),
                        None if a.outlier_value is None else a.outlier_value.to(w.dtype))
    return cb


def _update_plan(plan: TiePlan, codebooks: Codebooks, how: dict[str, str]) -> None:
    for tp in plan.clustered():
        cb = codebooks.tensors.get(tp.name)
        if cb is None:
            continue
        tp.k, tp.labels = cb.k, None
        tp.centers = cb.codebook.double().tolist()
        tp.method = how.get(tp.name, "nearest").split(":")[0]
        tp.dim = cb.dim if cb.dim > 1 else None
        tp.outliers = cb.outlier_count or None


# --- the budget -------------------------------------------------------------------------------------

def _allocate(model: nn.Module, specs: dict[str, _Spec], params: dict[str, torch.Tensor], observed: dict,
              batches, cfg: TieConfig, fitted: dict) -> Allocation:
    """Measure each tensor's output error at each candidate width; choose the bits within the budget.

    Its own layer's error at each width comes from the assignment itself (tr(ΔW H ΔWᵀ), H observed on
    the unmerged model, or ||ΔW||² without inputs); the model's output error with the tensor alone tied
    at the width nearest the budget scales it to what the model's output feels."""
    widths = candidates(cfg.budget, cfg.dim)
    base = min(widths, key=lambda b: abs(b - cfg.budget))
    costs = {n: {b: _cost(s if s.fixed else s.with_bits(b), cfg)
                 for b in ([s.bits or (s.k - 1).bit_length()] if s.fixed else widths)} for n, s in specs.items()}
    local: dict[str, dict[int, float]] = {}
    at_base: dict[str, torch.Tensor] = {}

    def measure(name: str, h: torch.Tensor | None) -> None:
        local[name], at_base[name] = _local_errors(specs[name], params[name], h, costs[name], base, cfg, fitted)

    for name in specs:
        if name not in observed:
            measure(name, None)
    if observed:
        observe.sequential(model, {n: params[n] for n in observed}, batches, lambda n, h: measure(n, h),
                           lambda names: None)
    sample = _sample(batches)
    errors = local
    if sample:
        reference = _outputs(model, sample)
        errors = {}
        for name, errs in local.items():
            b0 = min(errs, key=lambda b: abs(b - base))
            measured = _output_error(model, params[name], at_base[name], sample, reference)
            errors[name] = {b: measured * e / errs[b0] for b, e in errs.items()}
    weights = sum(s.plan.numel for s in specs.values())
    chosen = allocate(costs, errors, weights, cfg.budget)
    spent = sum(costs[n][b] for n, b in chosen.items())
    how = ("relative output error on the first calibration rows with the tensor alone tied at "
           f"{base} bits, scaled to other widths by its layer's own output error" if sample
           else "weight error only (no inputs to run the model on)")
    return Allocation(cfg.budget, spent / max(weights, 1), chosen,
                      {n: {str(b): float(e) for b, e in errs.items()} for n, errs in errors.items()}, how)


def _cost(spec: _Spec, cfg: TieConfig) -> int:
    groups = spec.plan.grain.groups_for(spec.plan.shape)
    value_bits = 8 * torch.empty((), dtype=getattr(torch, spec.plan.dtype)).element_size()
    outliers = round(cfg.outliers * spec.plan.numel)
    count = spec.plan.numel // spec.dim
    if spec.bits is None:  # K from a tolerance: index bits as stored
        return cost_bits(count, (spec.k - 1).bit_length(), 1, groups, value_bits, outliers) \
            - groups * ((1 << (spec.k - 1).bit_length()) - spec.k) * value_bits
    return cost_bits(count, spec.bits, spec.dim, groups, value_bits, outliers)


def _local_errors(spec: _Spec, param: torch.Tensor, h, costs: dict[int, int], base: int, cfg: TieConfig,
                  fitted: dict) -> tuple[dict[int, float], torch.Tensor]:
    """The layer's own output error at each width in `costs`, and its tied value at the width nearest `base`."""
    w2 = spec.matrix(param).double()
    weights = None if h is None else torch.diagonal(h).clamp_min(0).expand_as(w2)
    local, nearest_base = {}, None
    for b in sorted(costs, key=lambda b: abs(b - base)):
        s = spec if spec.fixed else spec.with_bits(b)
        tables = _tables(s, w2, weights, fitted)
        a = assign_nearest(w2, tables, cfg.outliers) if h is None else \
            assign_compensated(w2, h, tables, outliers=cfg.outliers, sweeps=0)  # the greedy pass ranks widths
        local[b] = max(a.loss, 1e-30)
        if nearest_base is None:
            q = take(tables, a.labels)
            if a.outlier_index is not None:
                q.reshape(-1)[a.outlier_index] = a.outlier_value.double()
            nearest_base = q.reshape(param.shape).to(param.dtype)
    return local, nearest_base


def _sample(batches) -> list[tuple]:
    out, rows = [], 0
    for b in batches or ():
        if rows >= SENSITIVITY_ROWS:
            break
        out.append(b)
        rows += len(b[0])
    return out


@torch.no_grad()
def _outputs(model: nn.Module, batches: list[tuple]) -> list[torch.Tensor]:
    with train_mode(model, False):
        return [torch.cat([t.reshape(len(t), -1).float() for t in flatten(model(*b))], 1) for b in batches]


@torch.no_grad()
def _output_error(model: nn.Module, param: torch.Tensor, value: torch.Tensor, sample, reference) -> float:
    """Relative squared output error with `param` set to `value` (restored afterwards)."""
    saved = param.detach().clone()
    param.copy_(value)
    try:
        outs = _outputs(model, sample)
    finally:
        param.copy_(saved)
    num = sum(float((o - r).square().sum()) for o, r in zip(outs, reference))
    den = sum(float(r.square().sum()) for r in reference)
    return num / max(den, 1e-30)
