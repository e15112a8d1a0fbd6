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

`strength` grows linearly from 0 over `warmup_steps` steps.

Under torch.distributed (torchrun, see `compress.distributed`) each rank computes the penalty on the
rows it owns: its FSDP2 shard, or the same row chunk of a DDP replica (multiplied by the world size,
since DDP averages gradients). The per-cluster sufficient statistics are all-reduced: sums, squares
and counts for "pairwise" (cluster means, centre re-estimation), responsibilities and their first
and second moments for "mixture" (the prior's gradient is that of the EM surrogate
Q(theta) = -sum_i sum_k gamma_ik log(pi_k N(w_i; mu_k, sigma_k^2)), which equals the log-likelihood's at
the current theta). So every rank holds the same centres, assignments and prior after every step, and
the gradients equal a single process's. `penalty()`, `step()`, `stats()` and `finalize()` are then
collectives: call them on every rank in the same order. `penalty()` returns the global value on
every rank.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..codebook import Codebooks
from ..errors import BadInputError, Option, UnsupportedModelError
from . import distributed
from .cluster import nearest_labels
from .merge import live_parameter, merge_
from .mixture import Mixture
from .plan import TensorPlan, TiePlan
from .tracked import TiedTensor, check_shard, cluster_sums, is_sharded

PRIORS = ("pairwise", "mixture")


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
        distributed: None (default): follow torch.distributed when a process group of several ranks is
            initialized (the model trained with DDP or FSDP2); False: every rank works alone on its
            full tensors.

    Example::

        st = SoftTie(model, plan, strength=0.5)
        loss = task_loss + st.penalty()
    """

    def __init__(self, model: nn.Module, plan: TiePlan, *, strength: float = 1.0, prior: str = "pairwise",
                 warmup_steps: int = 0, update_every: int = 50, zero_component: bool = False,
                 normalize: bool = True, distributed: bool | None = None):
        if prior not in PRIORS:
            raise BadInputError(f"unknown prior {prior!r}; use one of {', '.join(PRIORS)}")
        if not math.isfinite(strength) or strength < 0:
            raise BadInputError(f"strength must be a finite number >= 0, got {strength}")
        if zero_component and prior != "mixture":
            raise BadInputError("a zero component (", Option("zero_component"), ") needs the mixture prior (",
                                Option("prior", "mixture"), ")")
        self.model, self.plan, self.strength, self.prior = model, plan, float(strength), prior
        self.warmup_steps, self.update_every = int(warmup_steps), max(1, int(update_every))
        self.zero_component, self.normalize = zero_component, normalize
        self.steps = 0
        self._last_penalty = 0.0
        self._group = _distributed_group(distributed)
        self._tensors = [self._track(tp) for tp in plan.clustered()]
        self._mixture = Mixture(self._tensors, zero_component, self._group) if prior == "mixture" else None

    def _track(self, tp: TensorPlan) -> TiedTensor:
        p = live_parameter(self.model, tp.name)
        rows = p.shape[0] if p.ndim else 1
        centers = tp.centers_tensor().to(p.device)
        row_group = tp.grain.group_of_rows(rows).to(p.device)
        if self._group.active:
            t = TiedTensor(tp, p, row_group, centers, torch.empty(0, dtype=torch.int64), self._group.rows(rows),
                        1.0 if is_sharded(p) else float(self._group.world))
            check_shard(t)
            with torch.no_grad():
                t.ids = t.local_group() * t.k + t.local_labels(t.local_rows()).reshape(-1)
            return t
        if is_sharded(p):
            raise UnsupportedModelError(f"`{tp.name}` is an FSDP shard, but SoftTie was made with "
                                        "distributed=False; leave it at None")
        labels = nearest_labels(p.detach(), centers, tp.grain)
        t = TiedTensor(tp, p, row_group, centers, labels)
        t.ids = t.element_group() * t.k + labels.reshape(-1)
        return t

    def _rebind(self, model: nn.Module) -> None:
        """Read the weights from `model` from now on: the same parameters unsharded (same names and
        shapes, e.g. after an FSDP run copied into the original module)."""
        for t in self._tensors:
            p = live_parameter(model, t.plan.name)
            if tuple(p.shape) != tuple(t.param.shape):
                raise BadInputError(f"`{t.plan.name}` has shape {tuple(p.shape)} in the new model, "
                                    f"{tuple(t.param.shape)} in the trained one")
            t.param = p
            if self._group.active:
                t.scale = float(self._group.world)
        self.model = model

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
        if self._group.active:
            return self._distributed_penalty(lam)
        if self._mixture is not None:
            total = sum(self._mixture.neg_log_prob(t, self.normalize) for t in self._tensors)
        else:
            total = sum(_pairwise(t.param.reshape(-1), t.ids, t.groups * t.k, self.normalize) / 2
                        for t in self._tensors)
        out = lam * total if self._tensors else torch.zeros(())
        self._last_penalty = float(out.detach())
        return out

    def _distributed_penalty(self, lam: float) -> torch.Tensor:
        """The owned rows' penalty (times `scale`) with the all-reduced statistics; its value is the
        global penalty, its gradients add up over ranks to a single process's."""
        if not self._tensors:
            self._last_penalty = 0.0
            return torch.zeros(())
        w = [t.local_rows().reshape(-1) for t in self._tensors]
        if self._mixture is not None:
            local = [self._mixture.local_terms(t, wt) for t, wt in zip(self._tensors, w)]
            stats = self._group.all_reduce_(torch.cat([s for _, s in local]))
            terms = self._mixture.terms_from(self._tensors, [n for n, _ in local], stats, self.normalize)
        else:
            stats = self._group.all_reduce_(torch.cat([_moments(wt.detach(), t.ids, t.groups * t.k)
                                                       for t, wt in zip(self._tensors, w)]))
            terms = _pairwise_terms(self._tensors, w, stats, self.normalize)
        grad = lam * sum(term for term, _ in terms)
        value = lam * sum(v for _, v in terms)
        self._last_penalty = float(value)
        return grad + (value - grad.detach())

    @torch.no_grad()
    def step(self) -> None:
        """Call after `optimizer.step()`: advances the warm-up; every `update_every` steps (pairwise)
        each weight moves to its nearest centre's cluster and the centres become the cluster means."""
        self.steps += 1
        if self._mixture is None and self.steps % self.update_every == 0:
            self._reestimate_all()
        if self._mixture is not None:
            self._mixture.clamp_(min(1.0, self.steps / self.warmup_steps) if self.warmup_steps > 0 else 0.0)

    def _reestimate_all(self) -> None:
        if not self._group.active:
            for t in self._tensors:
                _reestimate(t)
            return
        sums = []
        for t in self._tensors:  # assignments are local; the sums and counts are all-reduced
            w = t.local_rows().detach()
            t.ids = t.local_group() * t.k + t.local_labels(w).reshape(-1)
            sums.extend(cluster_sums(w.reshape(-1), t.ids, t.groups * t.k))
        reduced = self._group.all_reduce_(torch.cat(sums)).split([s.numel() for s in sums])
        for t, s, n in zip(self._tensors, reduced[0::2], reduced[1::2]):
            _move_centers(t, s, n)

    @property
    def last_penalty(self) -> float:
        """The value of the last `penalty()` (over all ranks)."""
        return self._last_penalty

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """`distance`: mean |w - its centre| over all tied weights; `penalty`: the last penalty value."""
        total, count = 0.0, 0
        for t in self._tensors:
            if self._group.active:
                centers, labels = self._local_targets(t)
                w = t.local_rows().detach()
                flat_c = centers.to(w.dtype)[t.local_group(), labels.reshape(-1)]
            else:
                centers, labels = self._targets(t)
                w = t.param.detach()
                flat_c = centers.to(w.dtype)[t.element_group(), labels.reshape(-1)]
            total += float((w.reshape(-1) - flat_c).abs().sum())
            count += w.numel()
        if self._group.active:
            total, count = self._group.all_reduce_(torch.tensor([total, count], dtype=torch.float64)).tolist()
        return {"distance": total / max(count, 1), "penalty": self._last_penalty,
                "strength": self.current_strength}

    @torch.no_grad()
    def centers(self) -> dict[str, torch.Tensor]:
        """Name -> the shared values [groups, K] each tensor would merge to now."""
        return {t.plan.name: self._targets(t)[0] for t in self._tensors}

    def _targets(self, t: TiedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._mixture is not None:
            return self._mixture.means(t).detach(), self._mixture.responsible(t)
        w = t.param.detach()
        labels = nearest_labels(w, t.centers, t.plan.grain)
        return t.centers, labels

    def _local_targets(self, t: TiedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = t.local_rows().detach()
        if self._mixture is not None:
            return self._mixture.means(t).detach(), self._mixture.responsible_of(t, w.reshape(-1))
        return t.centers, t.local_labels(w)

    @torch.no_grad()
    def finalize(self, model: nn.Module | None = None) -> Codebooks:
        """Hard-merge the model (`merge_`) to the current centres; returns the codebooks.

        Pairwise: weights go to their nearest centre, then the centres become the cluster means.
        Mixture: weights go to their most responsible component's mean.

        Args:
            model: merge this module instead (the same parameters, unsharded: after FSDP training,
                the original module with the trained weights copied in, see
                `compress.distributed.copy_unsharded_`). Distributed runs merge on every rank with
                rank 0's centres and assignments.
        """
        if model is not None:
            self._rebind(model)
        for t in self._tensors:
            if is_sharded(t.param):
                raise UnsupportedModelError(f"`{t.plan.name}` is an FSDP shard: finalize needs the unsharded "
                                            "model; copy the weights into it (copy_unsharded_) and pass model=")
        if self._mixture is None:
            self._reestimate_all()
        centers, labels = {}, {}
        for t in self._tensors:
            c, lab = self._targets(t)
            centers[t.plan.name] = self._group.broadcast_(c.detach().clone())
            labels[t.plan.name] = self._group.broadcast_(lab.clone())
        return merge_(self.model, self.plan, centers=centers, labels=labels)


def _pairwise(w: torch.Tensor, ids: torch.Tensor, clusters: int, normalize: bool) -> torch.Tensor:
    """sum over clusters of sum_{i<j} (w_i - w_j)^2 (divided by the cluster size when `normalize`)."""
    counts = torch.bincount(ids, minlength=clusters).to(w.dtype)
    sums = torch.zeros(clusters, dtype=w.dtype, device=w.device).index_add(0, ids, w)
    means = sums / counts.clamp(min=1)
    d = w - means[ids]
    return (d * d).sum() if normalize else (counts[ids] * d * d).sum()


def _reestimate(t: TiedTensor) -> None:
    """One Lloyd step from the current weights: nearest-centre assignment, then cluster means.
    A cluster left empty keeps its old centre."""
    w = t.param.detach()
    labels = nearest_labels(w, t.centers, t.plan.grain)
    t.ids = t.element_group() * t.k + labels.reshape(-1)
    sums, counts = cluster_sums(w.reshape(-1), t.ids, t.groups * t.k)
    _move_centers(t, sums, counts)


def _move_centers(t: TiedTensor, sums: torch.Tensor, counts: torch.Tensor) -> None:
    flat = t.centers.reshape(-1).clone()
    filled = counts > 0
    flat[filled] = sums[filled] / counts[filled]
    t.centers = flat.reshape(t.groups, t.k)


def _moments(w: torch.Tensor, ids: torch.Tensor, clusters: int) -> torch.Tensor:
    """Per-cluster [sum of w, sum of w^2, count] (float64, flat [3 * clusters]): all-reduced, they give
    every cluster's global mean and the global pairwise penalty."""
    w64 = w.to(torch.float64)
    zeros = torch.zeros(clusters, dtype=torch.float64, device=w.device)
    counts = torch.bincount(ids, minlength=clusters).to(torch.float64)
    return torch.cat([zeros.index_add(0, ids, w64), zeros.index_add(0, ids, w64 * w64), counts])


def _pairwise_terms(tensors: list[TiedTensor], w: list[torch.Tensor], stats: torch.Tensor, normalize: bool
                    ) -> list[tuple[torch.Tensor, float]]:
    """(owned rows' term for the gradients, global value) per tensor, from the all-reduced moments.

    The gradient through the cluster means is zero (the deviations from a mean sum to 0), so the
    means can be constants: d/dw_i = (w_i - mean_c), times n_c without `normalize`."""
    out, at = [], 0
    for t, wt in zip(tensors, w):
        n_clusters = t.groups * t.k
        s1, s2, n = stats[at:at + 3 * n_clusters].split(n_clusters)
        at += 3 * n_clusters
        means = s1 / n.clamp(min=1)
        sq = (s2 - s1 * means).clamp(min=0)  # sum over the cluster of (w - mean)^2
        d = wt - means.to(wt.dtype)[t.ids]
        term = (d * d).sum() if normalize else (n.to(wt.dtype)[t.ids] * d * d).sum()
        value = float(sq.sum() if normalize else (n * sq).sum())
        out.append((t.scale * term / 2, value / 2))
    return out


def _distributed_group(enabled: bool | None) -> distributed.Group:
    """The ranks SoftTie shares statistics with: the initialized process group unless `enabled` is False."""
    return distributed.Group() if enabled is False else distributed.current()


