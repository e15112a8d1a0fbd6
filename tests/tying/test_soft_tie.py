"""SoftTie penalties (pairwise and mixture), its step/finalize, and the built-in fine-tuning loop."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import BadInputError
from compress.execution import loss_mode
from compress.tying import FinetuneConfig, TieConfig, analyze, finetune_
from compress.tying.soft_tie import SoftTie, _pairwise
from tests.helpers.models import TwoLayer, trained_two_layer


def _explicit_pairwise(w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    total = w.new_zeros(())
    for i, j in itertools.combinations(range(len(w)), 2):
        if ids[i] == ids[j]:
            total = total + (w[i] - w[j]) ** 2
    return total


def test_pairwise_penalty_in_o_n_equals_the_explicit_pairwise_sum_and_gradient():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(23, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 4, (23,), generator=gen)
    lam = 0.7
    fast = lam / 2 * _pairwise(w, ids, 4, normalize=False)
    slow = lam / 2 * _explicit_pairwise(w, ids)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)
    (grad,) = torch.autograd.grad(fast, w)
    # each pair pulls exactly as lambda * (w_i - w_j)
    expected = torch.stack([lam * sum((w[i] - w[j]) for j in range(23) if ids[j] == ids[i]) for i in range(23)])
    torch.testing.assert_close(grad, expected.detach(), rtol=0, atol=1e-10)


def test_normalized_pairwise_pull_is_lambda_times_distance_to_the_cluster_mean():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(40, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 3, (40,), generator=gen)
    (grad,) = torch.autograd.grad(2.0 / 2 * _pairwise(w, ids, 3, normalize=True), w)
    means = torch.stack([w[ids == c].mean() for c in range(3)])
    torch.testing.assert_close(grad, 2.0 * (w - means[ids]).detach(), rtol=0, atol=1e-12)


def test_soft_tie_penalty_on_a_model_matches_its_clusters():
    model = TwoLayer().double()
    plan = analyze(model, TieConfig(bits=2))
    st = SoftTie(model, plan, strength=0.5, normalize=False)
    labels = plan.tensor("fc1.weight").labels.reshape(-1)
    w = model.fc1.weight.reshape(-1)
    expected = 0.5 / 2 * sum(len(w[labels == c]) * ((w[labels == c] - w[labels == c].mean()) ** 2).sum()
                             for c in range(4))
    torch.testing.assert_close(st.penalty(), expected, rtol=1e-12, atol=0)


def test_strength_warms_up_linearly():
    model = TwoLayer()
    st = SoftTie(model, analyze(model, TieConfig(bits=2)), strength=2.0, warmup_steps=4)
    seen = []
    for _ in range(6):
        seen.append(st.current_strength)
        st.step()
    assert seen == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert float(SoftTie(model, analyze(model, TieConfig(bits=2)), warmup_steps=4).penalty().detach()) == 0.0


def test_step_reassigns_weights_and_moves_centres_to_cluster_means():
    model = TwoLayer()
    plan = analyze(model, TieConfig(bits=2))
    st = SoftTie(model, plan, update_every=2)
    with torch.no_grad():
        model.fc1.weight.add_(0.05)
    st.step()
    torch.testing.assert_close(st.centers()["fc1.weight"], plan.tensor("fc1.weight").centers_tensor())
    st.step()
    old = plan.tensor("fc1.weight").centers_tensor()[0]
    w = model.fc1.weight.detach().double()
    labels = (w[..., None] - old).abs().argmin(-1)  # one Lloyd step: assign to the old centres, then mean
    c = st.centers()["fc1.weight"][0]
    for j in range(4):
        torch.testing.assert_close(c[j], w[labels == j].mean(), rtol=1e-12, atol=1e-12)


def test_soft_tying_in_a_user_loop_pulls_weights_to_the_centres_and_finalize_merges():
    model, data = trained_two_layer()
    plan = analyze(model, TieConfig(bits=2))
    st = SoftTie(model, plan, strength=1.0, warmup_steps=20, update_every=5)
    opt = torch.optim.Adam([*model.parameters(), *st.parameters()], lr=1e-2)
    start = st.stats()["distance"]
    for _ in range(60):
        loss = F.cross_entropy(model(data.calib_inputs), data.calib_targets) + st.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        st.step()
    stats = st.stats()
    assert stats["distance"] < start / 5 and stats["penalty"] > 0
    codebooks = st.finalize()
    assert model.fc1.weight.unique().numel() <= 4
    assert list(codebooks.tensors) == ["fc1.weight"]


def test_mixture_penalty_has_finite_gradients_that_pull_towards_the_means():
    model = TwoLayer()
    plan = analyze(model, TieConfig(bits=2))
    st = SoftTie(model, plan, prior="mixture", strength=1.0)
    assert len(st.parameters()) == 3
    penalty = st.penalty()
    params = [model.fc1.weight, *st.parameters()]
    grads = torch.autograd.grad(penalty, params)
    assert all(torch.isfinite(g).all() for g in grads)
    means = st.centers()["fc1.weight"][0]
    w = model.fc1.weight.detach()
    nearest = means[(w[..., None] - means).abs().argmin(-1)]
    # the gradient points away from the nearest mean, so a descent step moves towards it
    agree = (grads[0] * (w - nearest) > 0).float().mean()
    assert agree > 0.95


def test_mixture_training_and_finalize_merge_to_the_mixture_means():
    model, data = trained_two_layer()
    plan = analyze(model, TieConfig(bits=2))
    st = SoftTie(model, plan, prior="mixture", strength=1e-2, zero_component=True)
    opt = torch.optim.Adam([*model.parameters(), *st.parameters()], lr=1e-3)
    for _ in range(20):
        loss = F.cross_entropy(model(data.calib_inputs), data.calib_targets) + st.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        st.step()
    means = st.centers()["fc1.weight"][0]
    assert means[0] == 0.0
    st.finalize()
    values = model.fc1.weight.unique()
    assert values.numel() <= 4
    assert all(bool((means == v).any()) for v in values)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prior": "laplace"}, "unknown prior 'laplace'; use one of pairwise, mixture"),
    ({"strength": -1.0}, "strength must be a finite number >= 0, got -1.0"),
    ({"zero_component": True}, "a zero component (`zero_component`) needs the mixture prior (prior='mixture')"),
])
def test_soft_tie_refuses_bad_settings(kwargs, message):
    model = TwoLayer()
    with pytest.raises(BadInputError) as e:
        SoftTie(model, analyze(model, TieConfig(bits=2)), **kwargs)
    assert str(e.value) == message


# --- the built-in loop ------------------------------------------------------------------------------

_FAST = {"epochs": 2, "codebook_epochs": 1, "batch_size": 16, "progress": False}


def test_finetune_is_reproducible_bit_for_bit():
    states = []
    for _ in range(2):
        model, data = trained_two_layer()
        plan = analyze(model, TieConfig(bits=2))
        result = finetune_(model, plan, data, FinetuneConfig(**_FAST, seed=3))
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert result.mode == "cross-entropy" and result.steps == 2 * 6
    assert [h["phase"] for h in result.history] == ["soft tying", "soft tying", "codebooks"]


def test_finetune_with_another_seed_differs():
    out = []
    for seed in (0, 1):
        model, data = trained_two_layer()
        finetune_(model, analyze(model, TieConfig(bits=2)), data, FinetuneConfig(**_FAST, seed=seed))
        out.append(model.fc1.parametrizations.weight.original.detach().clone())
    assert not torch.equal(out[0], out[1])


def test_finetune_merges_and_keeps_the_model_working():
    model, data = trained_two_layer()
    acc = lambda m: float((m(data.test_inputs).argmax(1) == data.test_targets).float().mean())
    before = acc(model)
    plan = analyze(model, TieConfig(bits=1))
    result = finetune_(model, plan, data, FinetuneConfig(epochs=4, batch_size=16, progress=False))
    assert model.fc1.weight.unique().numel() <= 2
    assert acc(model) >= before - 0.05
    # the codebooks returned are the tuned ones the model holds
    torch.testing.assert_close(result.codebooks.tensors["fc1.weight"].decode(), model.fc1.weight.detach())


def test_finetune_distils_when_there_are_no_targets():
    model, data = trained_two_layer()
    data.calib_targets = None
    reference = TwoLayer()
    reference.load_state_dict(model.state_dict())
    result = finetune_(model, analyze(model, TieConfig(bits=2)), data, FinetuneConfig(**_FAST), original=reference)
    assert result.mode == "distillation"
    cos = F.cosine_similarity(model(data.test_inputs), reference(data.test_inputs), dim=1).mean()
    assert cos > 0.95


def test_finetune_with_the_mixture_prior():
    model, data = trained_two_layer()
    cfg = FinetuneConfig(**_FAST, prior="mixture", strength=1e-2, zero_component=True)
    finetune_(model, analyze(model, TieConfig(bits=2)), data, cfg)
    assert model.fc1.weight.unique().numel() <= 4


def test_loss_mode():
    x = torch.zeros(4, 6)
    assert loss_mode(torch.zeros(4, 6), x, torch.zeros(4, dtype=torch.long)) == "reconstruction"
    assert loss_mode(torch.zeros(4, 3), x, torch.zeros(4, dtype=torch.long)) == "cross-entropy"
    assert loss_mode(torch.zeros(4, 3), x, None) == "distillation"
    assert loss_mode(torch.zeros(4, 3), x, torch.zeros(4, 3)) == "distillation"


@pytest.mark.parametrize(("config", "message"), [
    ({"epochs": -1}, "fine-tuning: epochs must be >= 0, got -1"),
    ({"prior": "cauchy"}, "fine-tuning: prior must be one of pairwise, mixture, got 'cauchy'"),
    ({"lr": 0.0}, "fine-tuning: lr must be a positive number, got 0.0"),
    ({"epoch": 3}, ("fine-tuning config: unknown key 'epoch'; known keys: batch_size, codebook_epochs, epochs, fsdp, lr, "
                   "min_steps, prior, progress, seed, strength, update_every, version, warmup, zero_component")),
])
def test_finetune_config_errors(config, message):
    with pytest.raises(BadInputError) as e:
        FinetuneConfig.from_dict(config)
    assert str(e.value) == message


def test_finetune_config_round_trip():
    cfg = FinetuneConfig(epochs=3, prior="mixture", zero_component=True, strength=0.1)
    assert FinetuneConfig.from_dict(cfg.to_dict()) == cfg


class _Dropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(48, 32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def test_finetune_seeds_dropout_and_restores_eval_mode():
    _, data = trained_two_layer()
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = _Dropout().eval()
        finetune_(model, analyze(model, TieConfig(bits=2)), data, FinetuneConfig(**_FAST))
        assert not model.training
        states.append(model.fc1.parametrizations.weight.original.detach().clone())
    assert torch.equal(states[0], states[1])
