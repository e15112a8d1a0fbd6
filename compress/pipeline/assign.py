"""The quality path of `tie`: error-compensated assignment, vector codebooks, outliers, a bit budget,
then training that can still move assignments.

`tie` takes this path when the resolved method is "compensated" (the default whenever calibration
inputs exist: `--data`, or else the model's example inputs, with a note) or when `dim`, `outliers` or
`budget` ask for it; `--method nearest` with none of those keeps the plain merge / soft-tying path.

With data and fine-tuning not switched off (`epochs` 0), the merged model is then refined
(`tying.refine_`): the latent weights and shared values are trained by distillation (or the task loss)
until the held-out loss stops improving, or for `epochs` epochs when given.

Before the work it estimates the time from one forward pass; when that is more than two minutes it
says so on stderr, and the report's notes always record the estimate and what ran.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..codebook import Codebooks
from ..errors import BadInputError, Option
from ..records import Record
from ..tying import FinetuneConfig, TieConfig, TiePlan
from ..tying.assign import AssignResult, assign_, resolve_method
from ..tying.observe import batches_of
from ..tying.refine import RefineConfig, RefineResult, refine_

CALIB_ROWS = 1024  # the most calibration rows observed for the assignment
BATCH_ROWS = 64
ANNOUNCE_S = 120


@dataclass
class QualityRun(Record):
    """What the quality path did: the assignment and the refinement (absent when not run)."""

    assignment: AssignResult | None = None
    refine: RefineResult | None = None
    estimate_s: float | None = None
    notes: list[str] = field(default_factory=list)

    _omit_none = True


def takes_quality_path(cfg: TieConfig, data, examples, reference) -> bool:
    """Whether `tie` runs `assign_` instead of the plain merge (see the module docstring)."""
    method = resolve_method(cfg.method, _calibration(data, examples, reference)[0])
    return method != "nearest" or cfg.dim > 1 or cfg.outliers > 0 or cfg.budget is not None


def refuse_quality_options(cfg: TieConfig, what: str) -> None:
    """Refuse settings only the in-memory path carries out, naming them (never ignore them silently)."""
    asked = [o for o, on in ((Option("method", "compensated"), cfg.method == "compensated"),
                             (Option("dim", cfg.dim), cfg.dim > 1), (Option("outliers"), cfg.outliers > 0),
                             (Option("budget", cfg.budget), cfg.budget is not None)) if on]
    if asked:
        parts = [p for o in asked for p in (o, ", ")][:-1]
        raise BadInputError(f"{what} is tied tensor by tensor with nearest assignment; ", *parts,
                            " need the whole model in memory (a .pt2, or a .safetensors file without streaming)")


def quality_notes(run: QualityRun | None, cfg: TieConfig, reference) -> list[str]:
    """The notes of the quality path, or, when the weights alone were tied by default, how to do better."""
    if run is not None:
        return list(run.notes)
    if cfg.method == "auto" and reference is None:
        return [("tied from the weights alone (nearest shared values); a model with a graph (.pt2) and --data gives "
                 "the error-compensated assignment, which keeps the outputs much closer")]
    return []


def assign_and_refine(model: nn.Module, plan: TiePlan, cfg: TieConfig, data, examples, reference,
                      ft: FinetuneConfig | None) -> tuple[Codebooks, QualityRun]:
    """Merge `model` by `assign_`, then refine it when `ft` asks for training; returns the codebooks."""
    batches, where = _calibration(data, examples, reference)
    run = QualityRun()
    if where and not (data is not None and len(data.calib_inputs)):
        run.notes.append(f"no --data: the error-compensated assignment used {where}; --data FILE with a few hundred "
                         "representative inputs gives it more to go on")
    elif where and len(data.calib_inputs) > CALIB_ROWS:
        run.notes.append(f"the assignment observed the first {CALIB_ROWS} of {len(data.calib_inputs)} calibration rows")
    refine = _refine_config(ft) if data is not None and reference is not None else None
    run.estimate_s = _estimate(model, plan, batches, refine, data)
    started = time.perf_counter()

    def announce(what: str) -> None:
        text = f"{what}{', then refinement through the merged model' if refine else ''}: about {_minutes(run.estimate_s)}"
        run.notes.append(f"planned: {text}")
        if run.estimate_s > ANNOUNCE_S:
            from rich.console import Console

            Console(stderr=True).print(f"compress tie: {text}", highlight=False)

    run.assignment = assign_(model, plan, cfg, batches, calibration=where, announce=announce)
    run.notes += run.assignment.notes
    codebooks = run.assignment.codebooks
    if refine is not None:
        run.refine = refine_(model, codebooks, data, refine, original=reference)
        codebooks = run.refine.codebooks
    run.notes.append(f"took {time.perf_counter() - started:.0f} s (estimated {run.estimate_s:.0f} s)")
    return codebooks, run


def _calibration(data, examples, reference) -> tuple[list[tuple] | None, str]:
    if reference is None:
        return None, ""
    if data is not None and len(data.calib_inputs):
        rows = data.calib_inputs[:CALIB_ROWS]
        return batches_of(rows, BATCH_ROWS), f"{len(rows)} calibration rows"
    if examples:
        return [tuple(examples)], f"the model's {len(examples[0])} example inputs"
    return None, ""


def _refine_config(ft: FinetuneConfig | None) -> RefineConfig | None:
    if ft is None:
        return None
    return RefineConfig(epochs=ft.epochs, batch_size=ft.batch_size, seed=ft.seed)


@torch.no_grad()
def _estimate(model: nn.Module, plan: TiePlan, batches, refine: RefineConfig | None, data) -> float:
    """Seconds: one forward pass over the calibration batches, the assignment's arithmetic, and
    (refining) `max_steps` steps of about three forward passes of a batch each."""
    forward = 0.0
    if batches:
        started = time.perf_counter()
        model(*batches[0])
        forward = (time.perf_counter() - started) * len(batches)
    work = sum(t.numel * (t.numel // max(t.shape[0], 1)) for t in plan.clustered() if t.shape)
    cols = sum(t.numel // max(t.shape[0], 1) for t in plan.clustered() if t.shape)
    seconds = forward + 4e-10 * work + 1e-3 * cols
    if refine is not None and batches:
        per_batch = forward / len(batches) * refine.batch_size / max(len(batches[0][0]), 1)
        steps = refine.max_steps if refine.epochs is None else \
            refine.epochs * -(-len(data.calib_inputs) // refine.batch_size)
        seconds += 3 * per_batch * steps
    return seconds


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
