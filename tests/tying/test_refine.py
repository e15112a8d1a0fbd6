"""`refine_`: training through the merged model that can still move assignments."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.io import DataSplits
from compress.tying import RefineConfig, TieConfig, analyze, assign_, batches_of, refine_
from tests.helpers.models import TiedCopies, trained_two_layer


def _distance(model, reference, x) -> float:
    with torch.no_grad():
        return float(F.mse_loss(model(x), reference(x)))


@pytest.mark.slow
def test_refining_moves_assignments_and_lowers_the_loss_keeping_k_values():
    torch.manual_seed(0)
    reference, x = nn.Sequential(nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 16)).eval(), torch.randn(256, 48)
    model = copy.deepcopy(reference)
    data = DataSplits(x, None, x[:0], None, None)
    cfg = TieConfig(bits=2, method="compensated", min_elements=0)
    result = assign_(model, analyze(model, cfg), cfg, batches_of(x))
    before = _distance(model, reference, x)
    refined = refine_(model, result.codebooks, data, RefineConfig(epochs=8, lr=0.05),
                      original=reference)
    assert refined.mode == "distillation" and refined.epochs == 8 and refined.steps == 8 * 8
    assert _distance(model, reference, x) < 0.8 * before
    assert refined.moved > 0.01
    for name, cb in refined.codebooks.tensors.items():
        stored = dict(model.named_parameters())[name.replace("weight", "parametrizations.weight.original")]
        assert torch.equal(stored, cb.codebook) and model.get_submodule(name[:-7]).weight.unique().numel() <= 4


def test_without_epochs_it_stops_when_the_held_out_loss_stops_improving_and_keeps_the_best():
    model, data = trained_two_layer()
    cfg = TieConfig(bits=2, min_elements=0)
    result = assign_(model, analyze(model, cfg), cfg, batches_of(data.calib_inputs))
    refined = refine_(model, result.codebooks, data, RefineConfig(max_steps=60, holdout=0.25, lr=0.05))
    assert 1 <= refined.epochs <= 60 // 3 + 1 and 0 <= refined.kept_epoch <= refined.epochs
    held = [h["held_out"] for h in refined.history]
    assert refined.kept_epoch == 0 or held[refined.kept_epoch - 1] == min(held)


def test_tensors_another_name_aliases_keep_their_merge():
    torch.manual_seed(0)
    model, x = TiedCopies().eval(), torch.randn(64, 48)
    reference = copy.deepcopy(model)
    data = DataSplits(x, None, x[:0], None, None)
    cfg = TieConfig(bits=2, min_elements=0)
    result = assign_(model, analyze(model, cfg), cfg, batches_of(x))
    assert set(result.codebooks.aliases) == {"b.weight", "c.weight"}
    refined = refine_(model, result.codebooks, data, RefineConfig(epochs=2), original=reference)
    assert refined.stopped == "nothing to train: every merged tensor is shared with another name"
    assert torch.equal(refined.codebooks.tensors["a.weight"].indices, result.codebooks.tensors["a.weight"].indices)
    assert torch.equal(model.b.weight, model.a.weight) and torch.equal(model.c.weight, model.a.weight.t())
