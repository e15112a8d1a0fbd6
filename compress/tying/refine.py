"""Training that can still move assignments: distillation (or the task loss) through the merged model.

`refine_(model, codebooks, data, RefineConfig())` starts from a merged model (error-compensated or
nearest) and trains, with Adam, a latent copy of every merged weight and its codebook. The forward pass
uses the codebook value nearest to each latent weight (re-assigned as the latent weights move, every
step for scalar codebooks, every `reassign_every` steps for vector ones) and passes the gradient
straight through to the latent weight (a straight-through estimator) and into the shared values. The
latent weights start exactly on their assigned values, so the first step computes what the merge
gave; a weight changes its index once its latent value crosses the midpoint to another shared value.
Outliers stay exact: their latent values are trained and stored as they end.

The loss is cross-entropy with integer targets, reconstruction MSE for an autoencoder, otherwise MSE
to the original model's outputs. Without a fixed `epochs`, training stops once the loss on held-out
calibration rows has not improved by `min_improvement` (relative) for `patience` epochs, and after
at most `max_steps` optimizer steps; the best epoch's weights are kept.

Example::

    result = refine_(model, codebooks, data, RefineConfig(epochs=10), original=reference)
    result.codebooks        # the same tensors, re-assigned and with trained shared values
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..codebook import Codebooks, TensorCodebook, attach_codebook_, decode_tensor, index_dtype
from ..errors import BadInputError
from ..execution import train_mode
from ..records import SKIP, Record
from .finetune import training_loss
from .fit import nearest_vectors

REFINE_VERSION = 1


@dataclass
class RefineConfig(Record):
    """How `refine_` trains.

    Args:
        epochs: fixed epochs over the calibration rows (all of them); None: until the held-out loss
            stops improving, at most `max_steps` steps.
        max_steps: the most optimizer steps when `epochs` is None.
        lr: Adam learning rate of each tensor's latent weights, as a share of the mean gap between its
            neighbouring shared values (the distance a weight must travel to change its index), so one
            value suits 1-bit and 4-bit tensors, large weights and small.
        codebook_lr: the same for its shared values.
        untied_lr: Adam learning rate of the untied one-dimensional parameters (`train_untied`).
        batch_size: mini-batch size.
        holdout: fraction of the calibration rows held out to decide when to stop (epochs None).
        patience: epochs without improvement before stopping (epochs None).
        min_improvement: relative held-out loss improvement that counts.
        reassign_every: steps between re-assignments of vector codebooks (scalar: every step).
        train_untied: also train the untied one-dimensional parameters (biases, norm scales).
        seed: seeds the batch order and the held-out rows.
    """

    epochs: int | None = None
    max_steps: int = 400
    lr: float = 0.01
    codebook_lr: float = 0.005
    untied_lr: float = 1e-4
    batch_size: int = 32
    holdout: float = 0.1
    patience: int = 3
    min_improvement: float = 0.002
    reassign_every: int = 10
    train_untied: bool = True
    seed: int = 0
    version: int = REFINE_VERSION

    _what = "refine config"

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 0:
            raise BadInputError(f"refine: epochs must be >= 0, got {self.epochs}")
        if not (self.lr > 0 and self.codebook_lr >= 0 and self.batch_size >= 1 and 0 <= self.holdout < 1):
            raise BadInputError("refine: lr > 0, codebook_lr >= 0, batch_size >= 1 and 0 <= holdout < 1 are needed")


@dataclass
class RefineResult(Record):
    """What `refine_` did: loss mode, steps, per-epoch losses, which epoch was kept and why it stopped."""

    codebooks: Codebooks | None = field(default=None, metadata=SKIP)
    mode: str = "none"
    steps: int = 0
    epochs: int = 0
    kept_epoch: int = 0
    stopped: str = ""
    moved: float = 0.0  # share of the indices that changed
    history: list[dict] = field(default_factory=list)

    _what = "refine result"


class _Latent(nn.Module):
    """Parametrization: the latent weight -> its nearest codebook values (straight-through)."""

    def __init__(self, cb: TensorCodebook, reassign_every: int):
        super().__init__()
        self.cb = cb
        self.codebook = nn.Parameter(cb.codebook.detach().clone())
        self.register_buffer("index", cb.indices.long().clone())
        self.offsets = cb.grain.row_offsets(cb.index_shape, cb.k)
        self.every = 1 if cb.dim == 1 else reassign_every
        self.count = 0
        self.stale = False

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if self.stale:
            if self.count % self.every == 0:
                self.index = nearest_indices(latent.detach(), self.codebook.detach(), self.cb)
            self.count += 1
            self.stale = False
        oi = self.cb.outlier_index
        q = decode_tensor(self.codebook, self.index, self.cb.shape, self.cb.grain, self.cb.dim, oi,
                          None if oi is None else latent.reshape(-1)[oi.long()])
        return q + (latent - latent.detach())

    def final(self, latent: torch.Tensor) -> TensorCodebook:
        labels = nearest_indices(latent.detach(), self.codebook.detach(), self.cb)
        oi = self.cb.outlier_index
        return TensorCodebook(self.cb.name, self.cb.shape, self.cb.granularity, self.codebook.detach().clone(),
                              labels.to(index_dtype(self.cb.k)), self.cb.group_size, self.cb.dim, oi,
                              None if oi is None else latent.detach().reshape(-1)[oi.long()].clone())


def nearest_indices(w: torch.Tensor, codebook: torch.Tensor, cb: TensorCodebook) -> torch.Tensor:
    """The nearest entry of its codebook row for every (run of `cb.dim`) weight(s) of `w`."""
    grain, dim = cb.grain, cb.dim
    rows = grain.rows(cb.shape)
    flat = w.reshape(rows, -1, dim)
    out = torch.empty(flat.shape[:2], dtype=torch.int64)
    for g, block in enumerate(grain.row_blocks(rows)):
        table = codebook[g].reshape(-1, dim)
        if dim == 1:
            order = table[:, 0].argsort()
            s = table[order, 0]
            pos = torch.searchsorted(((s[1:] + s[:-1]) / 2).contiguous(), flat[block, :, 0].contiguous())
            out[block] = order[pos]
        else:
            out[block] = nearest_vectors(flat[block].reshape(-1, dim), table).reshape(out[block].shape)
    return out.reshape(cb.index_shape)


def refine_(model: nn.Module, codebooks: Codebooks, data, cfg: RefineConfig | None = None, *,
            original: nn.Module | None = None) -> RefineResult:
    """Train the merged `model`'s assignments and shared values (in place); see the module docstring.

    Tensors that another name aliases keep their merge (training one name would untie the other).
    """
    cfg = cfg or RefineConfig()
    kind, loss_fn = training_loss(model, data, original, "refining")
    aliased = {a.target for a in codebooks.aliases.values()}
    names = [n for n in codebooks.tensors if n not in aliased]
    steps = {n: _swap_in(model, codebooks.tensors[n], cfg.reassign_every) for n in names}
    try:
        result = _train(model, steps, loss_fn, len(data.calib_inputs), cfg)
    finally:
        finals = {n: _swap_out(model, n) for n in names}
    before = sum(codebooks.tensors[n].index_count for n in names)
    moved = sum(int((finals[n].indices.long() != codebooks.tensors[n].indices.long()).sum()) for n in names)
    out = Codebooks(dict(codebooks.tensors), dict(codebooks.aliases))
    out.tensors.update(finals)
    result.codebooks, result.mode, result.moved = out, kind, moved / max(before, 1)
    return result


def _swap_in(model: nn.Module, cb: TensorCodebook, every: int) -> _Latent:
    module, attr = _owner(model, cb.name)
    parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    step = _Latent(cb, every)
    parametrize.register_parametrization(module, attr, step, unsafe=True)
    return step


def _swap_out(model: nn.Module, name: str) -> TensorCodebook:
    module, attr = _owner(model, name)
    chain = module.parametrizations[attr]
    cb = chain[0].final(chain.original)
    attach_codebook_(model, cb)
    return cb


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _train(model: nn.Module, steps: dict[str, _Latent], loss_fn, n: int, cfg: RefineConfig) -> RefineResult:
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n, generator=gen)
    held = order[: int(cfg.holdout * n)] if cfg.epochs is None else order[:0]
    train = order[len(held):]
    latents = [model.get_submodule(name.rpartition(".")[0]).parametrizations[name.rpartition(".")[2]].original
               for name in steps] if steps else []
    flags = {p: p.requires_grad for p in model.parameters()}
    taken = {id(p) for p in latents} | {id(s.codebook) for s in steps.values()}
    untied = [p for p in model.parameters() if id(p) not in taken and p.dim() == 1 and p.is_floating_point()] \
        if cfg.train_untied else []
    for p in model.parameters():
        p.requires_grad_(False)
    for p in latents + [s.codebook for s in steps.values()] + untied:
        p.requires_grad_(True)
    if not latents and not untied:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        return RefineResult(stopped="nothing to train: every merged tensor is shared with another name")
    gaps = [_gap(s) for s in steps.values()]
    groups = [{"params": [t], "lr": cfg.lr * g} for t, g in zip(latents, gaps)]
    groups += [{"params": [s.codebook], "lr": cfg.codebook_lr * g} for s, g in zip(steps.values(), gaps)]
    opt = torch.optim.Adam(groups + ([{"params": untied, "lr": cfg.untied_lr}] if untied else []))
    latents = latents + untied  # trained, snapshotted and restored alike
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    epochs = cfg.epochs if cfg.epochs is not None else max(1, cfg.max_steps // per_epoch)
    result = RefineResult()
    best, best_state, waited = _held_loss(model, loss_fn, held), _snapshot(latents, steps), 0
    result.stopped = f"{epochs} epochs" if cfg.epochs is not None else f"at most {cfg.max_steps} steps"
    with train_mode(model, False):
        for epoch in range(epochs):
            total = 0.0
            for idx in train[torch.randperm(len(train), generator=gen)].split(cfg.batch_size):
                for s in steps.values():
                    s.stale = True
                loss = loss_fn(model, idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                result.steps += 1
            held_loss = _held_loss(model, loss_fn, held)
            result.history.append({"epoch": epoch + 1, "loss": total / per_epoch, "held_out": held_loss})
            result.epochs = epoch + 1
            if cfg.epochs is not None:
                continue
            if held_loss < best * (1 - cfg.min_improvement):
                best, waited, result.kept_epoch = held_loss, 0, epoch + 1
                best_state = _snapshot(latents, steps)
            else:
                waited += 1
                if waited >= cfg.patience:
                    result.stopped = f"held-out loss stopped improving after epoch {result.kept_epoch}"
                    break
    if cfg.epochs is None:
        _restore(latents, steps, best_state)
    else:
        result.kept_epoch = result.epochs
    for p in model.parameters():
        p.requires_grad_(flags.get(p, False))
    return result


@torch.no_grad()
def _gap(step: _Latent) -> float:
    """Mean distance between neighbouring shared values of a codebook (per coordinate for vectors)."""
    cb = step.codebook.detach().double()
    per_axis = max(round(step.cb.k ** (1 / step.cb.dim)) - 1, 1)
    spans = cb.amax(dim=1) - cb.amin(dim=1)  # [groups] or [groups, dim]
    return max(float(spans.mean()) / per_axis, 1e-12)


@torch.no_grad()
def _held_loss(model: nn.Module, loss_fn, held: torch.Tensor) -> float:
    if len(held) == 0:
        return math.inf
    return float(loss_fn(model, held))


def _snapshot(latents: list, steps: dict[str, _Latent]) -> list[torch.Tensor]:
    return [t.detach().clone() for t in latents] + [s.codebook.detach().clone() for s in steps.values()]


@torch.no_grad()
def _restore(latents: list, steps: dict[str, _Latent], state: list[torch.Tensor]) -> None:
    for t, v in zip(latents + [s.codebook for s in steps.values()], state):
        t.copy_(v)
