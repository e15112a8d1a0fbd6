"""Soft tying: a penalty that pulls the weights of each cluster together during training.

Use it from your own loop::

    st = SoftTie(model, plan, strength=1.0, warmup_steps=500)
    opt = torch.optim.Adam([*model.parameters(), *st.parameters()], lr=1e-3)
    for x, y in batches:
        loss = F.cross_entropy(model(x), y) + st.penalty()
        opt.zero_grad(); loss.backward(); opt.step()
        st.step()                      # warm-up counter; re-estimates centres every `update_every` steps
    codebooks = st.finalize()          # hard merge (calls merge_): model now stores codebooks

Two priors:

* "pairwise": lambda/2 * sum over pairs i<j of the same cluster of (w_i - w_j)^2, computed in O(n) as
  lambda/2 * sum_c n_c * sum_{i in c} (w_i - mean_c)^2. Its gradient on w_i is lambda * sum_j (w_i - w_j)
  = lambda * n_c * (w_i - mean_c): each pair is pulled together exactly as lambda * (w_i - w_j). That pull
  grows with the cluster size, so with `normalize=True` (the default, and what the CLI uses) each
  cluster's term is divided by n_c: the penalty is lambda/2 * sum_i (w_i - mean_c)^2 and the pull on
  every weight is lambda * (w_i - mean_c) whatever the tensor's size, so one `strength` suits all
  tensors. `normalize=False` is the exact pairwise form with lambda per pair.
* "mixture" (Ullrich et al. 2017, soft weight-sharing): each codebook group has a Gaussian mixture
  with learned means, log-variances and mixing logits (`st.parameters()`; give them to the
  optimizer); penalty = -lambda * sum_w log sum_k pi_k N(w; mu_k, sigma_k^2). With `normalize=True`
  each tensor's term is multiplied by its components' initial mean variance s0^2, so at the start
  the pull on a weight is about lambda * (w - mu_k), as in the pairwise prior; it grows as the
  variances shrink. Over the warm-up the largest variance a component may have shrinks 10^4-fold,
  so the mixture ends sharp and the hard merge changes little. `zero_component=True` fixes one
  component's mean at 0 (pruning). `finalize` sends each weight to its most responsible
  component's mean.

`strength` grows linearly from 0 over `warmup_steps` steps. All statistics come from the local
tensors; centre re-estimation is one function (`_cluster_sums`) that a distributed version can
all-reduce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .codebook import Codebooks
from .errors import BadInputError
from .merge import group_of_rows, live_parameter, merge_, nearest_labels
from .plan import TensorPlan, TiePlan

PRIORS = ("pairwise", "mixture")
_SHARPEN = math.log(1e-4)  # the variance cap shrinks by this factor over the warm-up
# Components start at a quarter of their cluster's variance: a mixture whose variances are as wide as
# the clusters has its maximum likelihood with the means merged (deterministic annealing's critical
# temperature is twice the cluster variance), which sent both 1-bit means of the digits CNN's head to 0.
_START = math.log(0.25)


@dataclass
class _Tensor:
    """One clustered tensor: the live parameter, its rows' codebook group, and its current clusters."""

    plan: TensorPlan
    param: nn.Parameter
    row_group: torch.Tensor  # codebook row of each first-axis row [rows]
    centers: torch.Tensor  # [groups, K] current shared values (float64, no grad)
    ids: torch.Tensor  # flat cluster id (group * K + label) of every element [numel]

    @property
    def groups(self) -> int:
        return self.centers.shape[0]

    @property
    def k(self) -> int:
        return self.centers.shape[1]

    def element_group(self) -> torch.Tensor:
        """Codebook row of every element, flat [numel]."""
        rows = self.row_group.numel()
        return self.row_group[:, None].expand(rows, self.param.numel() // max(rows, 1)).reshape(-1)


class SoftTie:
    """Soft weight tying for a planned model: `penalty()`, `step()`, `stats()`, `finalize()`.

    Args:
        model: the module being trained (its planned parameters are read live).
        plan: from `analyze`.
        strength: lambda, the penalty weight at the end of the warm-up (see the module docstring).
        prior: "pairwise" or "mixture".
        warmup_steps: lambda grows linearly from 0 to `strength` over this many `step()` calls.
        update_every: re-estimate centres and reassign weights every this many steps (pairwise).
        zero_component: (mixture) one component per group fixed at 0.
        normalize: divide each cluster's pairwise term by its size (mixture: scale by the initial variance).

    >>> st = SoftTie(model, plan, strength=0.5)
    >>> loss = task_loss + st.penalty()
    """

    def __init__(self, model: nn.Module, plan: TiePlan, *, strength: float = 1.0, prior: str = "pairwise",
                 warmup_steps: int = 0, update_every: int = 50, zero_component: bool = False,
                 normalize: bool = True):
        if prior not in PRIORS:
            raise BadInputError(f"unknown prior {prior!r}; use one of {', '.join(PRIORS)}")
        if not math.isfinite(strength) or strength < 0:
            raise BadInputError(f"strength must be a finite number >= 0, got {strength}")
        if zero_component and prior != "mixture":
            raise BadInputError("a zero component (--zero-component) needs the mixture prior (--prior mixture)")
        self.model, self.plan, self.strength, self.prior = model, plan, float(strength), prior
        self.warmup_steps, self.update_every = int(warmup_steps), max(1, int(update_every))
        self.zero_component, self.normalize = zero_component, normalize
        self.steps = 0
        self._last_penalty = 0.0
        self._tensors = [self._track(tp) for tp in plan.clustered()]
        self._mixture = _Mixture(self._tensors, zero_component) if prior == "mixture" else None

    def _track(self, tp: TensorPlan) -> _Tensor:
        p = live_parameter(self.model, tp.name)
        rows = p.shape[0] if p.ndim else 1
        centers = tp.centers_tensor().to(p.device)
        labels = nearest_labels(p.detach(), centers, tp.granularity, tp.group_size)
        t = _Tensor(tp, p, group_of_rows(rows, tp.granularity, tp.group_size).to(p.device), centers, labels)
        t.ids = t.element_group() * t.k + labels.reshape(-1)
        return t

    def parameters(self) -> list[nn.Parameter]:
        """The prior's learned parameters (mixture means, log-variances, logits); empty for "pairwise"."""
        return [] if self._mixture is None else self._mixture.parameters()

    @property
    def current_strength(self) -> float:
        """lambda now: `strength` scaled by the linear warm-up."""
        if self.warmup_steps <= 0:
            return self.strength
        return self.strength * min(1.0, self.steps / self.warmup_steps)

    def penalty(self) -> torch.Tensor:
        """The penalty to add to the task loss (a scalar with gradients to the weights and the prior)."""
        lam = self.current_strength
        if self._mixture is not None:
            total = sum(self._mixture.neg_log_prob(t, self.normalize) for t in self._tensors)
        else:
            total = sum(_pairwise(t.param.reshape(-1), t.ids, t.groups * t.k, self.normalize) / 2
                        for t in self._tensors)
        out = lam * total if self._tensors else torch.zeros(())
        self._last_penalty = float(out.detach())
        return out

    @torch.no_grad()
    def step(self) -> None:
        """Call after `optimizer.step()`: advances the warm-up; every `update_every` steps (pairwise)
        each weight moves to its nearest centre's cluster and the centres become the cluster means."""
        self.steps += 1
        if self._mixture is None and self.steps % self.update_every == 0:
            for t in self._tensors:
                _reestimate(t)
        if self._mixture is not None:
            self._mixture.clamp_(min(1.0, self.steps / self.warmup_steps) if self.warmup_steps > 0 else 0.0)

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """`distance`: mean |w - its centre| over all tied weights; `penalty`: the last penalty value."""
        total, count = 0.0, 0
        for t in self._tensors:
            centers, labels = self._targets(t)
            w = t.param.detach()
            flat_c = centers.to(w.dtype)[t.element_group(), labels.reshape(-1)]
            total += float((w.reshape(-1) - flat_c).abs().sum())
            count += w.numel()
        return {"distance": total / max(count, 1), "penalty": self._last_penalty,
                "strength": self.current_strength}

    @torch.no_grad()
    def centers(self) -> dict[str, torch.Tensor]:
        """Name -> the shared values [groups, K] each tensor would merge to now."""
        return {t.plan.name: self._targets(t)[0] for t in self._tensors}

    def _targets(self, t: _Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._mixture is not None:
            return self._mixture.means(t).detach(), self._mixture.responsible(t)
        w = t.param.detach()
        labels = nearest_labels(w, t.centers, t.plan.granularity, t.plan.group_size)
        return t.centers, labels

    @torch.no_grad()
    def finalize(self) -> Codebooks:
        """Hard-merge the model (`merge_`) to the current centres; returns the codebooks.

        Pairwise: weights go to their nearest centre, then the centres become the cluster means.
        Mixture: weights go to their most responsible component's mean.
        """
        centers, labels = {}, {}
        for t in self._tensors:
            if self._mixture is None:
                _reestimate(t)
            c, lab = self._targets(t)
            centers[t.plan.name], labels[t.plan.name] = c, lab
        return merge_(self.model, self.plan, centers=centers, labels=labels)


def _pairwise(w: torch.Tensor, ids: torch.Tensor, clusters: int, normalize: bool) -> torch.Tensor:
    """sum over clusters of sum_{i<j} (w_i - w_j)^2 (divided by the cluster size when `normalize`)."""
    counts = torch.bincount(ids, minlength=clusters).to(w.dtype)
    sums = torch.zeros(clusters, dtype=w.dtype, device=w.device).index_add(0, ids, w)
    means = sums / counts.clamp(min=1)
    d = w - means[ids]
    return (d * d).sum() if normalize else (counts[ids] * d * d).sum()


def _cluster_sums(w: torch.Tensor, ids: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sum of weights and count (float64). A distributed version all-reduces these two."""
    counts = torch.bincount(ids, minlength=clusters).to(torch.float64)
    sums = torch.zeros(clusters, dtype=torch.float64, device=w.device).index_add(0, ids, w.to(torch.float64))
    return sums, counts


def _reestimate(t: _Tensor) -> None:
    """One Lloyd step from the current weights: nearest-centre assignment, then cluster means.
    A cluster left empty keeps its old centre."""
    w = t.param.detach()
    labels = nearest_labels(w, t.centers, t.plan.granularity, t.plan.group_size)
    t.ids = t.element_group() * t.k + labels.reshape(-1)
    sums, counts = _cluster_sums(w.reshape(-1), t.ids, t.groups * t.k)
    flat = t.centers.reshape(-1).clone()
    filled = counts > 0
    flat[filled] = sums[filled] / counts[filled]
    t.centers = flat.reshape(t.groups, t.k)


class _Mixture:
    """Gaussian-mixture prior per codebook group: means, log-variances, mixing logits as parameters."""

    def __init__(self, tensors: list[_Tensor], zero_component: bool):
        self.zero = zero_component
        self.mu: dict[str, nn.Parameter] = {}
        self.log_var: dict[str, nn.Parameter] = {}
        self.logits: dict[str, nn.Parameter] = {}
        self.log_var0: dict[str, float] = {}  # log of the starting mean variance: scale and cap
        for t in tensors:
            self._init(t)

    def _init(self, t: _Tensor) -> None:
        name, c = t.plan.name, t.centers.clone()
        w = t.param.detach().reshape(-1).to(torch.float64)
        if self.zero:
            # the centre nearest 0 becomes the fixed zero component (index 0)
            nearest = c.abs().argmin(dim=1)
            keep = torch.ones_like(c, dtype=torch.bool).scatter_(1, nearest[:, None], False)
            c = torch.cat([torch.zeros(c.shape[0], 1, dtype=c.dtype), c[keep].reshape(c.shape[0], -1)], dim=1)
        groups, k = c.shape
        labels = _argmin_distance(w, c, t.element_group())
        ids = t.element_group() * k + labels
        _, counts = _cluster_sums(w, ids, groups * k)
        sq = torch.zeros(groups * k, dtype=torch.float64).index_add(0, ids, (w - c.reshape(-1)[ids]) ** 2)
        spread = max(float(w.var()) if w.numel() > 1 else 1.0, 1e-12)
        var = torch.where(counts > 1, sq / counts.clamp(min=1), torch.full_like(sq, spread / k ** 2))
        var = var.clamp(min=spread * 1e-4)
        dtype = t.param.dtype
        self.log_var0[name] = math.log(float(var.mean())) + _START
        self.mu[name] = nn.Parameter((c[:, 1:] if self.zero else c).to(dtype).clone())
        self.log_var[name] = nn.Parameter((var.log() + _START).reshape(groups, k).to(dtype))
        self.logits[name] = nn.Parameter(((counts + 1) / (counts + 1).sum()).log().reshape(groups, k).to(dtype))

    def parameters(self) -> list[nn.Parameter]:
        return [*self.mu.values(), *self.log_var.values(), *self.logits.values()]

    def means(self, t: _Tensor) -> torch.Tensor:
        mu = self.mu[t.plan.name]
        if self.zero:
            mu = torch.cat([torch.zeros(mu.shape[0], 1, dtype=mu.dtype, device=mu.device), mu], dim=1)
        return mu

    def _log_joint(self, t: _Tensor) -> torch.Tensor:
        """log pi_k + log N(w; mu_k, sigma_k^2) for every weight and component [numel, K]."""
        name = t.plan.name
        g = t.element_group()
        mu, log_var = self.means(t)[g], self.log_var[name][g]
        log_pi = torch.log_softmax(self.logits[name], dim=1)[g]
        w = t.param.reshape(-1, 1)
        return log_pi - 0.5 * (math.log(2 * math.pi) + log_var + (w - mu) ** 2 / log_var.exp())

    def neg_log_prob(self, t: _Tensor, normalize: bool) -> torch.Tensor:
        nll = -torch.logsumexp(self._log_joint(t), dim=1).sum()
        return nll * math.exp(self.log_var0[t.plan.name]) if normalize else nll

    @torch.no_grad()
    def responsible(self, t: _Tensor) -> torch.Tensor:
        """Most responsible component of every weight, with the weight's shape."""
        return self._log_joint(t).argmax(dim=1).reshape(t.param.shape)

    @torch.no_grad()
    def clamp_(self, progress: float) -> None:
        """Cap each log-variance: the initial mean variance, shrunk 10^4-fold as `progress` goes 0 -> 1."""
        for name, lv in self.log_var.items():
            top = self.log_var0[name] + progress * _SHARPEN
            lv.clamp_(min=top + _SHARPEN, max=top)


def _argmin_distance(w: torch.Tensor, centers: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    return (w[:, None] - centers[group]).abs().argmin(dim=1)
