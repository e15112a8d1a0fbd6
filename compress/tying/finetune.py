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

Launched by `torchrun` (`compress tie --nproc N`, or `torchrun --nproc-per-node N -m cli tie ...`),
every rank takes its own disjoint part of each global batch of `batch_size` samples, drawn from the
same seeded permutation as a single process; the model is wrapped in DistributedDataParallel, or
sharded with FSDP2 when `fsdp` is set, and `SoftTie` all-reduces its statistics (see
`compress.distributed`). The merged model then equals a single process's run up to floating-point
summation order. Only rank 0 shows the progress bar; a step that fails on one rank fails on all.
"""

from __future__ import annotations

import copy
import gc
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..codebook import Codebooks, TensorCodebook
from ..errors import BadInputError, Option, UnsupportedModelError
from ..execution import loss_mode, train_mode
from ..records import SKIP, Record
from . import distributed
from .merge import merge_
from .plan import TiePlan
from .soft_tie import PRIORS, SoftTie

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; only for the annotation

FINETUNE_VERSION = 1


@dataclass
class FinetuneConfig(Record):
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
        seed: seeds the batch order and any randomness in the model (dropout; rank r of a
            distributed run seeds its dropout with seed + r).
        progress: show a progress bar on stderr; None: only when stderr is a terminal (rank 0 only).
        fsdp: under torchrun, shard the parameters, gradients and optimizer state across the ranks
            with FSDP2 (`fully_shard`) during soft tying instead of replicating them (DDP); for
            models whose training state does not fit one process. No effect in a single process.

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
    fsdp: bool = False
    version: int = FINETUNE_VERSION

    _what = "fine-tuning config"

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
             ("a zero component (", Option("zero_component"), ") needs the mixture prior (",
              Option("prior", "mixture"), ")")),
        ]
        for ok, message in checks:
            if not ok:
                parts = message if isinstance(message, tuple) else (message,)
                raise BadInputError("fine-tuning: ", *parts)

    def epochs_for(self, samples: int) -> int:
        """The soft-tying epochs for a calibration set of `samples` rows (resolves `epochs=None`)."""
        if self.epochs is not None:
            return self.epochs
        return max(3, math.ceil(self.min_steps / max(1, math.ceil(samples / self.batch_size))))


@dataclass
class FinetuneResult(Record):
    """What the loop did: the codebooks of the merged model, the loss used and per-epoch history."""

    codebooks: Codebooks | None = field(default=None, metadata=SKIP)
    mode: str = "none"
    steps: int = 0
    history: list[dict] = field(default_factory=list)
    epochs: int = 0

    _what = "fine-tuning result"


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

    Example::

        result = finetune_(model, plan, data, FinetuneConfig(epochs=3))
        result.mode   # 'cross-entropy' with integer targets
    """
    cfg = cfg or FinetuneConfig()
    if not plan.clustered():  # nothing to pull together: training would only change the model
        return FinetuneResult(merge_(model, plan), "none", 0)
    kind, loss_fn = training_loss(model, data, original, "fine-tuning")
    with distributed.session() as group:
        _same_plan(plan, group)
        return _train(model, plan, cfg, loss_fn, kind, data.calib_inputs, group)


def training_loss(model: nn.Module, data, original: nn.Module | None, what: str
                  ) -> tuple[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    """The loss the built-in loops train with, and its kind: cross-entropy with integer targets,
    reconstruction MSE for an autoencoder, else MSE to `original`'s outputs (a copy of `model` taken
    now when None). The loss takes the model and the indices of a batch of calibration rows."""
    inputs, targets = data.calib_inputs, data.calib_targets
    if len(inputs) == 0:
        raise BadInputError(f"{what} needs calibration inputs; the data file has none")
    with torch.no_grad(), train_mode(model, False):
        kind = loss_mode(model(inputs[:2]), inputs[:2], targets)
    teacher = _teacher_outputs(original if original is not None else copy.deepcopy(model), inputs) \
        if kind == "distillation" else None
    return kind, _loss_fn(kind, inputs, targets, teacher)


def _train(model: nn.Module, plan: TiePlan, cfg: FinetuneConfig, loss_fn: Callable, kind: str,
           inputs: torch.Tensor, group: distributed.Group) -> FinetuneResult:
    history: list[dict] = []
    with torch.random.fork_rng(devices=[]), train_mode(model, True), _Progress(cfg, group.main) as bar:
        torch.manual_seed(cfg.seed + group.rank)
        gen = torch.Generator().manual_seed(cfg.seed)
        steps_per_epoch = math.ceil(len(inputs) / cfg.batch_size)
        epochs = cfg.epochs_for(len(inputs))
        sharded = cfg.fsdp and group.active and epochs > 0
        work = _fsdp_copy(model, inputs[:1], group) if sharded else model
        st = SoftTie(work, plan, strength=cfg.strength, prior=cfg.prior, zero_component=cfg.zero_component,
                     warmup_steps=round(cfg.warmup * epochs * steps_per_epoch), update_every=cfg.update_every)
        show = group.any(bar.enabled)  # the distance on the bar is a collective: every rank computes it
        if epochs:
            # the prior learns slower than the weights, so the mixture follows the clusters instead of
            # all its components drifting to the densest value (seen on the digits CNN at 1 bit)
            opt = torch.optim.Adam([{"params": list(work.parameters())},
                                    {"params": st.parameters(), "lr": cfg.lr / 10}], lr=cfg.lr)
            runner = work if sharded else _replicated(work, group)
            bar.start("soft tying", epochs * steps_per_epoch)
            for epoch in range(epochs):
                step = _Step(runner, opt, loss_fn, st, group, show, catch=not sharded,
                             where=f"in soft-tying epoch {epoch + 1}")
                history.append(_epoch(step, _batches(len(inputs), cfg.batch_size, gen), bar)
                               | {"epoch": epoch + 1, "phase": "soft tying"})
            del runner, step, opt
        if sharded:
            distributed.copy_unsharded_(model, work, group)
        codebooks = st.finalize(model if sharded else None)
        del work
        if sharded:  # free the FSDP copy now: its states sit in reference cycles holding gloo work
            gc.collect()
        if cfg.codebook_epochs and codebooks.tensors:
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr / 10)
            runner = _replicated(model, group)
            bar.start("tuning codebooks", cfg.codebook_epochs * steps_per_epoch)
            for epoch in range(cfg.codebook_epochs):
                step = _Step(runner, opt, loss_fn, None, group, show, catch=True,
                             where=f"in codebook epoch {epoch + 1}")
                history.append(_epoch(step, _batches(len(inputs), cfg.batch_size, gen), bar)
                               | {"epoch": epoch + 1, "phase": "codebooks"})
            del runner, step
    return FinetuneResult(refresh_codebooks(model, codebooks), kind, st.steps, history, epochs)


def _same_plan(plan: TiePlan, group: distributed.Group) -> None:
    """Every rank trains rank 0's plan (proved equal by digest; adopted where it differs)."""
    theirs = distributed.same_bytes(plan.to_json().encode("utf-8"), group)
    if theirs is not None and not group.main:
        adopted = TiePlan.from_dict(json.loads(theirs.decode("utf-8")), source="rank 0's plan")
        plan.tensors[:] = adopted.tensors
        plan.ties[:] = adopted.ties


def refresh_codebooks(model: nn.Module, codebooks: Codebooks) -> Codebooks:
    """Codebooks with their shared values read back from the model (after training them)."""
    out = Codebooks(aliases=dict(codebooks.aliases))
    for name, cb in codebooks.tensors.items():
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path) if path else model
        values = module.parametrizations[attr].original.detach().clone()
        out.tensors[name] = TensorCodebook(cb.name, cb.shape, cb.granularity, values, cb.indices, cb.group_size)
    return out


@dataclass
class _Step:
    """One optimizer step on this rank's part of a global batch (the whole batch in one process)."""

    model: nn.Module  # the module to call: the model, its DDP wrapper, or its FSDP-sharded copy
    opt: torch.optim.Optimizer
    loss_fn: Callable
    st: SoftTie | None
    group: distributed.Group
    show_distance: bool
    catch: bool  # turn an exception in the forward pass into an error on every rank (no collectives there)
    where: str

    def __call__(self, idx: torch.Tensor) -> tuple[float, float]:
        """(global batch loss, penalty) after one step on the global batch `idx`."""
        local = self.group.shard(idx)
        share = len(local) / len(idx) * self.group.world  # DDP and FSDP average the gradients over ranks
        if len(local) == 0:  # a global batch smaller than the world: a zero-weight sample keeps DDP in step
            local, share = idx[:1], 0.0
        penalty = self.st.penalty() if self.st is not None else torch.zeros(())
        task, error = self._forward(local)
        if self.group.active:
            mine = 0.0 if task is None or share == 0.0 else float(task.detach()) * len(local)
            loss = self.group.agree(error, [mine], self.where)[0] / len(idx)
            task = task * share
        else:
            loss = float(task.detach())
        self.opt.zero_grad(set_to_none=True)
        (task + penalty).backward()
        self.opt.step()
        if self.st is not None:
            self.st.step()
        return loss, float(penalty.detach())

    def _forward(self, idx: torch.Tensor) -> tuple[torch.Tensor | None, Exception | None]:
        if not (self.catch and self.group.active):
            return self.loss_fn(self.model, idx), None
        try:
            return self.loss_fn(self.model, idx), None
        except Exception as e:  # noqa: BLE001 - raised again on every rank by `agree`
            return None, e


def _epoch(step: _Step, batches: Iterator[torch.Tensor], bar: _Progress) -> dict:
    totals = {"loss": 0.0, "penalty": 0.0}
    n = 0
    for idx in batches:
        loss, penalty = step(idx)
        totals["loss"] += loss
        totals["penalty"] += penalty
        n += 1
        distance = None
        if bar.tick() and step.show_distance and step.st is not None:  # the distance costs a pass over the weights
            distance = step.st.stats()["distance"]
        bar.advance(totals["loss"] / n, penalty, distance, step.st is not None)
    out = {k: v / max(n, 1) for k, v in totals.items()}
    if step.st is not None:
        out["distance"] = step.st.stats()["distance"]
    return out


def _replicated(model: nn.Module, group: distributed.Group) -> nn.Module:
    """The model wrapped in DistributedDataParallel (which averages gradients), or itself in one process."""
    if not group.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


def _fsdp_copy(model: nn.Module, sample: torch.Tensor, group: distributed.Group) -> nn.Module:
    """A copy of `model` sharded with FSDP2: one unit per module that owns parameters (not shared with
    another module) and whose forward runs, then the root; parameters become `Shard(0)` DTensors.

    Modules whose forward never runs (a `.pt2` program's parameter holders, read by the graph) stay
    in the root's unit, which gathers them for the whole forward pass."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    work = copy.deepcopy(model)
    called = _modules_called(work, sample)
    owners: dict[int, int] = {}
    for module in work.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    mesh = init_device_mesh("cpu", (group.world,))
    try:
        for module in reversed(list(work.modules())):
            own = list(module.parameters(recurse=False))
            if module is not work and own and id(module) in called and all(owners[id(p)] == 1 for p in own):
                fully_shard(module, mesh=mesh)
        fully_shard(work, mesh=mesh)
    except (RuntimeError, ValueError, AssertionError) as e:  # torch's message names what it could not shard
        raise UnsupportedModelError(f"FSDP2 could not shard the model ({str(e).splitlines()[0]}); "
                                    "run without ", Option("fsdp"), " (DDP)") from e
    return work


@torch.no_grad()
def _modules_called(model: nn.Module, sample: torch.Tensor) -> set[int]:
    called: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda m, _: called.add(id(m))) for m in model.modules()]
    try:
        with train_mode(model, False):
            model(sample)
    finally:
        for h in hooks:
            h.remove()
    return called


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
    """A rich progress bar on stderr (loss, penalty, mean distance to the centres), off when not a TTY
    and on every rank but 0."""

    def __init__(self, cfg: FinetuneConfig, main: bool = True):
        self.enabled = cfg.progress if main else False
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

    def tick(self) -> bool:
        """Count a step (on every rank alike); True when the bar refreshes its numbers at this step."""
        self._count += 1
        return self._count % 10 == 1

    def advance(self, loss: float, penalty: float, distance: float | None, soft: bool) -> None:
        if self._progress is None or self._task is None:
            return
        if self._count % 10 == 1:
            info = f"loss {loss:.4f}"
            if soft:
                info += f"  penalty {penalty:.3g}"
            if distance is not None:
                info += f"  |w-c| {distance:.2e}"
            self._progress.update(self._task, info=info)
        self._progress.update(self._task, advance=1)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
