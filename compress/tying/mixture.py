"""The Gaussian-mixture prior of soft tying (Ullrich et al. 2017, soft weight-sharing).

Each codebook group has a mixture with learned means, log-variances and mixing logits; the penalty
is -lambda * sum_w log sum_k pi_k N(w; mu_k, sigma_k^2). See `soft_tie` for how it is scaled and
sharpened, and how its statistics are all-reduced under torch.distributed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import distributed
from .tracked import TiedTensor, cluster_sums

SHARPEN = math.log(1e-4)  # the variance cap shrinks by this factor over the warm-up
# Components start at a quarter of their cluster's variance: a mixture whose variances are as wide as
# the clusters has its maximum likelihood with the means merged (deterministic annealing's critical
# temperature is twice the cluster variance), which sent both 1-bit means of the digits CNN's head to 0.
_START = math.log(0.25)


class Mixture:
    """Gaussian-mixture prior per codebook group: means, log-variances, mixing logits as parameters."""

    def __init__(self, tensors: list[TiedTensor], zero_component: bool, group: distributed.Group | None = None):
        self.zero = zero_component
        self.group = group or distributed.Group()
        self.mu: dict[str, nn.Parameter] = {}
        self.log_var: dict[str, nn.Parameter] = {}
        self.logits: dict[str, nn.Parameter] = {}
        self.log_var0: dict[str, float] = {}  # log of the starting mean variance: scale and cap
        for t in tensors:
            self._init(t)

    def _init(self, t: TiedTensor) -> None:
        name, c = t.plan.name, t.centers.clone()
        if self.zero:
            # the centre nearest 0 becomes the fixed zero component (index 0)
            nearest = c.abs().argmin(dim=1)
            keep = torch.ones_like(c, dtype=torch.bool).scatter_(1, nearest[:, None], False)
            c = torch.cat([torch.zeros(c.shape[0], 1, dtype=c.dtype), c[keep].reshape(c.shape[0], -1)], dim=1)
        groups, k = c.shape
        if self.group.active:
            counts, sq, spread = self._init_stats(t, c)
        else:
            w = t.param.detach().reshape(-1).to(torch.float64)
            labels = _argmin_distance(w, c, t.element_group())
            ids = t.element_group() * k + labels
            _, counts = cluster_sums(w, ids, groups * k)
            sq = torch.zeros(groups * k, dtype=torch.float64).index_add(0, ids, (w - c.reshape(-1)[ids]) ** 2)
            spread = max(float(w.var()) if w.numel() > 1 else 1.0, 1e-12)
        var = torch.where(counts > 1, sq / counts.clamp(min=1), torch.full_like(sq, spread / k ** 2))
        var = var.clamp(min=spread * 1e-4)
        dtype = t.param.dtype
        self.log_var0[name] = math.log(float(var.mean())) + _START
        self.mu[name] = nn.Parameter((c[:, 1:] if self.zero else c).to(dtype).clone())
        self.log_var[name] = nn.Parameter((var.log() + _START).reshape(groups, k).to(dtype))
        self.logits[name] = nn.Parameter(((counts + 1) / (counts + 1).sum()).log().reshape(groups, k).to(dtype))

    def _init_stats(self, t: TiedTensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Per-component counts and squared distances, and the weights' variance, over all ranks."""
        w = t.local_rows().detach().reshape(-1).to(torch.float64)
        g = t.local_group()
        groups, k = c.shape
        ids = g * k + _argmin_distance(w, c, g)
        zeros = torch.zeros(groups * k, dtype=torch.float64)
        moments = torch.tensor([w.numel(), float(w.sum()), float((w * w).sum())], dtype=torch.float64)
        reduced = self.group.all_reduce_(torch.cat([
            torch.bincount(ids, minlength=groups * k).to(torch.float64),
            zeros.index_add(0, ids, (w - c.reshape(-1)[ids]) ** 2), moments]))
        counts, sq, (n, s1, s2) = reduced[:groups * k], reduced[groups * k:2 * groups * k], reduced[-3:].tolist()
        var = (s2 - s1 * s1 / n) / (n - 1) if n > 1 else 1.0
        return counts, sq, max(var, 1e-12)

    def parameters(self) -> list[nn.Parameter]:
        return [*self.mu.values(), *self.log_var.values(), *self.logits.values()]

    def means(self, t: TiedTensor) -> torch.Tensor:
        mu = self.mu[t.plan.name]
        if self.zero:
            mu = torch.cat([torch.zeros(mu.shape[0], 1, dtype=mu.dtype, device=mu.device), mu], dim=1)
        return mu

    def _log_joint(self, t: TiedTensor) -> torch.Tensor:
        """log pi_k + log N(w; mu_k, sigma_k^2) for every weight and component [numel, K]."""
        name = t.plan.name
        g = t.element_group()
        mu, log_var = self.means(t)[g], self.log_var[name][g]
        log_pi = torch.log_softmax(self.logits[name], dim=1)[g]
        w = t.param.reshape(-1, 1)
        return log_pi - 0.5 * (math.log(2 * math.pi) + log_var + (w - mu) ** 2 / log_var.exp())

    def neg_log_prob(self, t: TiedTensor, normalize: bool) -> torch.Tensor:
        nll = -torch.logsumexp(self._log_joint(t), dim=1).sum()
        return nll * math.exp(self.log_var0[t.plan.name]) if normalize else nll

    @torch.no_grad()
    def responsible(self, t: TiedTensor) -> torch.Tensor:
        """Most responsible component of every weight, with the weight's shape."""
        return self._log_joint(t).argmax(dim=1).reshape(t.param.shape)

    # --- distributed: owned rows and all-reduced moments ------------------------------------------

    def _log_joint_of(self, t: TiedTensor, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """`_log_joint` for the flat weights `w` of codebook rows `g`, the prior held constant."""
        name = t.plan.name
        mu, log_var = self.means(t).detach()[g], self.log_var[name].detach()[g]
        log_pi = torch.log_softmax(self.logits[name].detach(), dim=1)[g]
        w = w.reshape(-1, 1)
        return log_pi - 0.5 * (math.log(2 * math.pi) + log_var + (w - mu) ** 2 / log_var.exp())

    @torch.no_grad()
    def responsible_of(self, t: TiedTensor, w: torch.Tensor) -> torch.Tensor:
        """Most responsible component of each owned weight (flat `w`)."""
        return self._log_joint_of(t, w, t.local_group()).argmax(dim=1)

    def local_terms(self, t: TiedTensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(owned weights' negative log-likelihood, with gradients to the weights only; the moments
        [sum gamma, sum gamma (w - mu), sum gamma (w - mu)^2 per component, the NLL] to all-reduce)."""
        g = t.local_group()
        joint = self._log_joint_of(t, w, g)
        lse = torch.logsumexp(joint, dim=1)
        with torch.no_grad():
            gamma = (joint - lse[:, None]).exp().to(torch.float64)
            k = joint.shape[1]
            ids = (g[:, None] * k + torch.arange(k)).reshape(-1)
            dev = (w.detach().to(torch.float64)[:, None] - self.means(t).detach().to(torch.float64)[g]).reshape(-1)
            zeros = torch.zeros(t.groups * k, dtype=torch.float64)
            gamma = gamma.reshape(-1)
            moments = torch.cat([zeros.index_add(0, ids, gamma), zeros.index_add(0, ids, gamma * dev),
                                 zeros.index_add(0, ids, gamma * dev * dev),
                                 (-lse.detach().to(torch.float64).sum()).reshape(1)])
        return -lse.sum(), moments

    def terms_from(self, tensors: list[TiedTensor], nll: list[torch.Tensor], stats: torch.Tensor, normalize: bool
                   ) -> list[tuple[torch.Tensor, float]]:
        """(gradient term, global value) per tensor: the owned weights' NLL times `scale`, plus the EM
        surrogate Q(theta) - Q(theta).detach() (value 0) whose gradient is the global NLL's."""
        out, at = [], 0
        for t, local in zip(tensors, nll):
            name, n = t.plan.name, t.groups * t.k
            s0, s1, s2 = (x.reshape(t.groups, t.k) for x in stats[at:at + 3 * n].split(n))
            value = float(stats[at + 3 * n])
            at += 3 * n + 1
            mu = self.means(t).to(torch.float64)
            delta = mu - mu.detach()  # 0, with mu's gradient: the moments are about the current means
            log_var = self.log_var[name].to(torch.float64)
            log_pi = torch.log_softmax(self.logits[name].to(torch.float64), dim=1)
            q = -(s0 * (log_pi - 0.5 * log_var)
                  - 0.5 * (-log_var).exp() * (s2 - 2 * delta * s1 + delta * delta * s0)).sum()
            scale = math.exp(self.log_var0[name]) if normalize else 1.0
            term = scale * (t.scale * local + (q - q.detach()).to(local.dtype))
            out.append((term, scale * value))
        return out

    @torch.no_grad()
    def clamp_(self, progress: float) -> None:
        """Cap each log-variance: the initial mean variance, shrunk 10^4-fold as `progress` goes 0 -> 1."""
        for name, lv in self.log_var.items():
            top = self.log_var0[name] + progress * SHARPEN
            lv.clamp_(min=top + SHARPEN, max=top)


def _argmin_distance(w: torch.Tensor, centers: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    return (w[:, None] - centers[group]).abs().argmin(dim=1)
