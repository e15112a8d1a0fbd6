"""The built-in loop: soft tying while fine-tuning, hard merge, then a short tune of the codebooks.

`finetune_(model, plan, data, FinetuneConfig())`:

1. soft tying (`SoftTie`) for `epochs` epochs of Adam on seeded mini-batches of the calibration
   data, the strength warming up linearly over the first `warmup` fraction of the steps;
2. `SoftTie.finalize()`: the hard merge (the model then stores codebooks + indices);
3. `codebook_epochs` more epochs with the indices fixed, training the codebooks (shared values) and
   the parameters that were not tied (biases, norms).

The loss is cross-entropy when the data has integer targets, reconstruction MSE when the model's
output has its input's shape (an autoencoder), and otherwise distillation: MSE to the original
model's outputs (only inputs are needed). The run is reproducible: same inputs and seed, same bits.
Every statistic comes from local tensors and the centre re-estimation lives in one function of
`soft_tie`, so a torch.distributed version only has to all-reduce gradients and those sums.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .codebook import Codebooks, TensorCodebook
from .errors import BadInputError
from .merge import merge_
from .plan import TiePlan
from .soft_tie import PRIORS, SoftTie

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; only for the annotation

FINETUNE_VERSION = 1
LOSS_MODES = ("cross-entropy", "reconstruction", "distillation")


@dataclass
class FinetuneConfig:
    """How `finetune_` trains.

    Args:
        epochs: soft-tying epochs over the calibration inputs (0: merge right away). None: enough
            epochs for `min_steps` optimizer steps, and at least 3 (16 on the 1,257 digits samples).
        min_steps: the optimizer steps the automatic `epochs` aims for: soft tying needs steps to
            warm up and collapse the clusters, whatever the data set's size.
        lr: Adam learning rate for the weights (the mixture prior's parameters use the same).
        batch_size: mini-batch size.
        strength: lambda at the end of the warm-up (see `SoftTie`; the pull on a weight is about
            lambda * (w - its centre) for either prior).
        prior: "pairwise" or "mixture".
        zero_component: (mixture) one component fixed at 0.
        warmup: fraction of the soft-tying steps over which lambda grows linearly from 0.
        update_every: steps between centre re-estimations (pairwise).
        codebook_epochs: epochs after the merge that tune the shared values and untied parameters.
        seed: seeds the batch order and any randomness in the model (dropout).
        progress: show a progress bar on stderr; None: only when stderr is a terminal.

    >>> FinetuneConfig.from_dict({"epochs": 5, "prior": "mixture"}).epochs
    5
    """

    epochs: int | None = None
    min_steps: int = 600
    lr: float = 1e-3
    batch_size: int = 32
    strength: float = 1.0
    prior: str = "pairwise"
    zero_component: bool = False
    warmup: float = 0.5
    update_every: int = 20
    codebook_epochs: int = 2
    seed: int = 0
    progress: bool | None = None
    version: int = FINETUNE_VERSION

    def __post_init__(self) -> None:
        checks = [
            (self.epochs is None or self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}"),
            (self.min_steps >= 0, f"min_steps must be >= 0, got {self.min_steps}"),
            (self.codebook_epochs >= 0, f"codebook_epochs must be >= 0, got {self.codebook_epochs}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.prior in PRIORS, f"prior must be one of {', '.join(PRIORS)}, got {self.prior!r}"),
            (0 <= self.warmup <= 1, f"warmup must be a fraction between 0 and 1, got {self.warmup}"),
            (self.update_every >= 1, f"update_every must be >= 1, got {self.update_every}"),
            (math.isfinite(self.strength) and self.strength >= 0,
             f"strength must be a finite number >= 0, got {self.strength}"),
            (not self.zero_component or self.prior == "mixture",
             "a zero component (--zero-component) needs the mixture prior (--prior mixture)"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInputError(f"fine-tuning: {message}")

    def epochs_for(self, samples: int) -> int:
        """The soft-tying epochs for a calibration set of `samples` rows (resolves `epochs=None`)."""
        if self.epochs is not None:
            return self.epochs
        return max(3, math.ceil(self.min_steps / max(1, math.ceil(samples / self.batch_size))))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise BadInputError(f"fine-tuning config: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        return cls(**d)


@dataclass
class FinetuneResult:
    """What the loop did: the codebooks of the merged model, the loss used and per-epoch history."""

    codebooks: Codebooks
    mode: str
    steps: int
    history: list[dict] = field(default_factory=list)
    epochs: int = 0

    def to_dict(self) -> dict:
        return {"mode": self.mode, "epochs": self.epochs, "steps": self.steps, "history": self.history}


def loss_mode(outputs: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor | None) -> str:
    """"reconstruction" when the output has the input's shape, "cross-entropy" with integer targets,
    else "distillation".

    >>> loss_mode(torch.zeros(4, 10), torch.zeros(4, 64), torch.zeros(4, dtype=torch.long))
    'cross-entropy'
    """
    if outputs.shape == inputs.shape:
        return "reconstruction"
    if targets is not None and not targets.is_floating_point() and not targets.is_complex():
        return "cross-entropy"
    return "distillation"


def finetune_(model: nn.Module, plan: TiePlan, data, cfg: FinetuneConfig | None = None, *,
              original: nn.Module | None = None) -> FinetuneResult:
    """Soft-tie `model` while fine-tuning it on `data`, merge it, tune the codebooks (in place).

    Args:
        model: the module to train and merge (changed in place).
        plan: from `analyze`.
        data: `DataSplits`; only `calib_inputs` (and `calib_targets` when present) are used.
        cfg: the `FinetuneConfig`.
        original: the reference for distillation (default: a copy of `model` taken first).

    Returns:
        `FinetuneResult` with the merged model's codebooks.

    >>> result = finetune_(model, plan, data, FinetuneConfig(epochs=3))
    >>> result.mode
    'cross-entropy'
    """
    cfg = cfg or FinetuneConfig()
    if not plan.clustered():  # nothing to pull together: training would only change the model
        return FinetuneResult(merge_(model, plan), "none", 0)
    inputs, targets = data.calib_inputs, data.calib_targets
    if len(inputs) == 0:
        raise BadInputError("fine-tuning needs calibration inputs; the data file has none")
    with torch.no_grad(), train_mode(model, False):
        kind = loss_mode(model(inputs[:2]), inputs[:2], targets)
    teacher = _teacher_outputs(original if original is not None else copy.deepcopy(model), inputs) \
        if kind == "distillation" else None
    loss_fn = _loss_fn(kind, inputs, targets, teacher)
    history: list[dict] = []
    with torch.random.fork_rng(devices=[]), train_mode(model, True), _Progress(cfg) as bar:
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        steps_per_epoch = math.ceil(len(inputs) / cfg.batch_size)
        epochs = cfg.epochs_for(len(inputs))
        st = SoftTie(model, plan, strength=cfg.strength, prior=cfg.prior, zero_component=cfg.zero_component,
                     warmup_steps=round(cfg.warmup * epochs * steps_per_epoch), update_every=cfg.update_every)
        if epochs:
            # the prior learns slower than the weights, so the mixture follows the clusters instead of
            # all its components drifting to the densest value (seen on the digits CNN at 1 bit)
            opt = torch.optim.Adam([{"params": list(model.parameters())},
                                    {"params": st.parameters(), "lr": cfg.lr / 10}], lr=cfg.lr)
            bar.start("soft tying", epochs * steps_per_epoch)
            for epoch in range(epochs):
                history.append(_epoch(model, opt, loss_fn, _batches(len(inputs), cfg.batch_size, gen), st, bar)
                               | {"epoch": epoch + 1, "phase": "soft tying"})
        codebooks = st.finalize()
        if cfg.codebook_epochs and codebooks.tensors:
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr / 10)
            bar.start("tuning codebooks", cfg.codebook_epochs * steps_per_epoch)
            for epoch in range(cfg.codebook_epochs):
                history.append(_epoch(model, opt, loss_fn, _batches(len(inputs), cfg.batch_size, gen), None, bar)
                               | {"epoch": epoch + 1, "phase": "codebooks"})
    return FinetuneResult(refresh_codebooks(model, codebooks), kind, st.steps, history, epochs)


def refresh_codebooks(model: nn.Module, codebooks: Codebooks) -> Codebooks:
    """Codebooks with their shared values read back from the model (after training them)."""
    out = Codebooks(aliases=dict(codebooks.aliases))
    for name, cb in codebooks.tensors.items():
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path) if path else model
        values = module.parametrizations[attr].original.detach().clone()
        out.tensors[name] = TensorCodebook(cb.name, cb.shape, cb.granularity, values, cb.indices, cb.group_size)
    return out


def _epoch(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable, batches: Iterator[torch.Tensor],
           st: SoftTie | None, bar: _Progress) -> dict:
    totals = {"loss": 0.0, "penalty": 0.0}
    n = 0
    for idx in batches:
        task = loss_fn(model, idx)
        penalty = st.penalty() if st is not None else torch.zeros(())
        opt.zero_grad(set_to_none=True)
        (task + penalty).backward()
        opt.step()
        if st is not None:
            st.step()
        totals["loss"] += float(task.detach())
        totals["penalty"] += float(penalty.detach())
        n += 1
        bar.advance(totals["loss"] / n, float(penalty.detach()), st)
    out = {k: v / max(n, 1) for k, v in totals.items()}
    if st is not None:
        out["distance"] = st.stats()["distance"]
    return out


@contextlib.contextmanager
def train_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Train or eval mode (dropout, batch norm) inside the block, restored after; exported programs
    have no modes and are left as they are."""
    was = model.training
    try:
        model.train(training)
    except NotImplementedError:
        yield
        return
    try:
        yield
    finally:
        model.train(was)


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    yield from torch.randperm(n, generator=gen).split(batch_size)


@torch.no_grad()
def _teacher_outputs(original: nn.Module, inputs: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    with train_mode(original, False):
        return torch.cat([original(inputs[s:s + batch_size]) for s in range(0, len(inputs), batch_size)])


def _loss_fn(mode: str, inputs: torch.Tensor, targets: torch.Tensor | None, teacher: torch.Tensor | None
             ) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    if mode == "cross-entropy":
        return lambda model, idx: F.cross_entropy(model(inputs[idx]), targets[idx])
    if mode == "reconstruction":
        return lambda model, idx: F.mse_loss(model(inputs[idx]), inputs[idx])
    return lambda model, idx: F.mse_loss(model(inputs[idx]), teacher[idx])


class _Progress:
    """A rich progress bar on stderr (loss, penalty, mean distance to the centres), off when not a TTY."""

    def __init__(self, cfg: FinetuneConfig):
        self.enabled = cfg.progress
        self._progress = None
        self._task = None
        self._count = 0

    def __enter__(self) -> Self:
        from rich.console import Console

        console = Console(stderr=True)
        if self.enabled is None:
            self.enabled = console.is_terminal
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                      console=console, transient=True)
            self._progress.start()
        return self

    def start(self, description: str, total: int) -> None:
        if self._progress is not None:
            self._task = self._progress.add_task(description, total=total, info="")

    def advance(self, loss: float, penalty: float, st: SoftTie | None) -> None:
        if self._progress is None or self._task is None:
            return
        self._count += 1
        if self._count % 10 == 1:  # the distance costs a pass over the weights: refresh now and then
            info = f"loss {loss:.4f}"
            if st is not None:
                info += f"  penalty {penalty:.3g}  |w-c| {st.stats()['distance']:.2e}"
            self._progress.update(self._task, info=info)
        self._progress.update(self._task, advance=1)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
