"""`assign_`: error-compensated assignment, vector codebooks, outliers and the bit budget, on small models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import BadInputError
from compress.tying import TieConfig, analyze, assign_, batches_of, merge_
from compress.tying.gptq import assign_compensated, assign_nearest, take
from tests.helpers.models import ConvNormNet


class Correlated(nn.Module):
    """Three Linear layers fed with strongly correlated inputs (where compensation pays most)."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, 96), nn.Linear(96, 64), nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _inputs(n: int, d: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(99)) / d ** 0.5
    return torch.randn(n, 8, generator=g) @ torch.randn(8, d, generator=torch.Generator().manual_seed(7)) \
        + 0.1 * torch.randn(n, d, generator=g) @ mix


def _model() -> Correlated:
    torch.manual_seed(0)
    return Correlated().eval()


def _output_error(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.mse_loss(a(x), b(x)))


def _tied_bits(codebooks) -> float:
    return sum(8 * cb.packed_bytes() for cb in codebooks.tensors.values()) / sum(
        cb.numel for cb in codebooks.tensors.values())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_compensated_assignment_has_lower_output_error_than_nearest_with_the_same_codebook(bits):
    reference, calib, held_out = _model(), _inputs(512), _inputs(512, seed=1)
    cfg = TieConfig(bits=bits, method="compensated", min_elements=0)
    compensated = copy.deepcopy(reference)
    result = assign_(compensated, analyze(compensated, cfg), cfg, batches_of(calib))
    assert set(result.tensors.values()) == {"compensated"} and result.passes == 1
    nearest = copy.deepcopy(reference)  # the very same shared values, every weight to the nearest one
    merge_(nearest, analyze(nearest, cfg), centers={n: cb.codebook for n, cb in result.codebooks.tensors.items()})
    for name, cb in result.codebooks.tensors.items():
        assert cb.decode().unique().numel() <= 2 ** bits
        assert torch.equal(cb.codebook, dict(nearest.named_parameters())[name.replace(
            "weight", "parametrizations.weight.original")])
    assert _output_error(reference, compensated, held_out) < 0.8 * _output_error(reference, nearest, held_out)


def test_the_kernel_beats_nearest_on_the_layer_output_it_minimizes():
    torch.manual_seed(0)
    w, x = torch.randn(16, 32, dtype=torch.float64), _inputs(400, 32).double()
    tables = torch.linspace(-2, 2, 8, dtype=torch.float64).expand(16, 8).unsqueeze(-1)
    near, comp = assign_nearest(w, tables), assign_compensated(w, x.T @ x / len(x), tables)
    error = lambda a: float(((take(tables, a.labels) - w) @ x.T).square().mean())
    assert error(comp) < 0.5 * error(near)
    assert comp.labels.max() < 8 and comp.labels.shape == (16, 32)


def test_convolutions_are_observed_through_their_patches():
    torch.manual_seed(0)
    reference, x = ConvNormNet().eval(), torch.randn(64, 512)
    cfg = TieConfig(bits=2, method="compensated")
    compensated = copy.deepcopy(reference)
    result = assign_(compensated, analyze(compensated, cfg), cfg, batches_of(x, 16))
    assert result.tensors == {"conv.weight": "compensated", "head.weight": "compensated"}
    nearest = copy.deepcopy(reference)
    merge_(nearest, analyze(nearest, cfg), centers={n: cb.codebook for n, cb in result.codebooks.tensors.items()})
    assert _output_error(reference, compensated, x) < _output_error(reference, nearest, x)


class Reused(nn.Module):
    """`shared` runs twice per forward pass: its inputs cannot be one H, so it is assigned to the nearest value."""

    def __init__(self):
        super().__init__()
        self.shared, self.head = nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(torch.relu(self.shared(x))))


def test_weights_whose_inputs_cannot_be_observed_get_the_nearest_value_and_say_why():
    model = Reused().eval()
    cfg = TieConfig(bits=3, method="compensated", min_elements=0)
    result = assign_(model, analyze(model, cfg), cfg, batches_of(torch.randn(64, 64)))
    assert result.tensors == {"shared.weight": "nearest: used 2 times in one forward pass",
                              "head.weight": "compensated"}


class Depthwise(nn.Module):
    """A depthwise convolution (groups = channels) before a pointwise one."""

    def __init__(self):
        super().__init__()
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.pointwise = nn.Conv2d(32, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(torch.relu(self.depthwise(x)))


def test_grouped_convolutions_get_the_nearest_value_and_say_why():
    model = Depthwise().eval()
    cfg = TieConfig(bits=3, method="compensated", min_elements=0)
    result = assign_(model, analyze(model, cfg), cfg, batches_of(torch.randn(8, 32, 6, 6), 4))
    assert result.tensors == {"depthwise.weight": "nearest: read by `conv2d with groups > 1 or padding by name`, "
                                                  "not by a linear or convolution call",
                              "pointwise.weight": "compensated"}
    assert all(cb.indices.unique().numel() <= 8 for cb in result.codebooks.tensors.values())


class Branchy(nn.Module):
    """Takes one of two paths depending on the batch: the lockstep run cannot meet, passes are used."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if float(x[:, 0].mean()) > 0:
            h = self.b(torch.relu(h))
        return self.head(h)


def test_batches_that_take_different_paths_fall_back_to_passes():
    model = Branchy().eval()
    x = torch.randn(64, 64)
    x[:32, 0], x[32:, 0] = 5.0, -5.0
    cfg = TieConfig(bits=3, method="compensated", min_elements=0)
    result = assign_(model, analyze(model, cfg), cfg, batches_of(x, 32))
    assert set(result.tensors.values()) == {"compensated"} and result.passes == 3
    assert "took different paths" in result.notes[0]


@pytest.mark.parametrize("dim", [2, 4])
def test_vector_codebooks_share_runs_of_dim_weights(dim):
    model = _model()
    cfg = TieConfig(bits=2, dim=dim, method="compensated", min_elements=0)
    result = assign_(model, analyze(model, cfg), cfg, batches_of(_inputs(256)))
    cb = result.codebooks.tensors["fc1.weight"]
    assert (cb.dim, cb.k, cb.bits, tuple(cb.codebook.shape)) == (dim, 4 ** dim, 2 * dim, (1, 4 ** dim, dim))
    runs = model.fc1.weight.detach().reshape(-1, dim)
    assert torch.unique(runs, dim=0).shape[0] <= 4 ** dim
    assert cb.indices.shape == (96, 64 // dim)


def test_a_tensor_whose_last_axis_does_not_divide_by_dim_is_left_scalar_with_a_note():
    model = nn.Sequential(nn.Linear(63, 32), nn.ReLU(), nn.Linear(32, 8))
    cfg = TieConfig(bits=2, dim=2, min_elements=0)
    result = assign_(model, analyze(model, cfg), cfg, batches_of(torch.randn(128, 63)))
    assert result.codebooks.tensors["0.weight"].dim == 1 and result.codebooks.tensors["2.weight"].dim == 2
    assert result.notes == ["`0.weight` left scalar: its last axis (63) does not divide by dim 2"]


@pytest.mark.parametrize("method", ["nearest", "compensated"])
def test_outliers_keep_that_share_of_the_weights_exactly(method):
    reference = _model()
    model = copy.deepcopy(reference)
    cfg = TieConfig(bits=2, outliers=0.01, method=method, min_elements=0)
    result = assign_(model, analyze(model, cfg), cfg, batches_of(_inputs(256)))
    cb = result.codebooks.tensors["fc1.weight"]
    assert cb.outlier_count == pytest.approx(0.01 * cb.numel, abs=1)
    dense = cb.decode().reshape(-1)
    assert torch.equal(dense[cb.outlier_index.long()], cb.outlier_value)
    if method == "nearest":  # the worst fitted weights, kept as they were
        assert torch.equal(cb.outlier_value, reference.fc1.weight.detach().reshape(-1)[cb.outlier_index.long()])
    assert cb.packed_bytes() == cb.index_count * 2 // 8 + 4 * 4 + cb.outlier_count * 8


@pytest.mark.parametrize("budget", [2.0, 2.5, 3.0, 3.6])
@pytest.mark.parametrize("dim", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_the_budget_is_never_exceeded_and_spent_where_it_matters(budget, dim):
    model = _model()
    cfg = TieConfig(budget=budget, dim=dim, method="compensated", min_elements=0, outliers=0.002)
    result = assign_(model, analyze(model, cfg), cfg, batches_of(_inputs(256)))
    assert _tied_bits(result.codebooks) <= budget
    assert result.allocation.bits_per_weight == pytest.approx(_tied_bits(result.codebooks))
    assert {n: cb.bits // cb.dim for n, cb in result.codebooks.tensors.items()} == result.allocation.bits
    assert set(result.allocation.errors) == set(result.allocation.bits)


def test_a_budget_below_what_any_codebook_costs_is_refused():
    model = _model()
    cfg = TieConfig(budget=1.0, min_elements=0)
    with pytest.raises(BadInputError, match=r"the budget of 1 bits per weight is below the smallest storage"):
        assign_(model, analyze(model, cfg), cfg, batches_of(_inputs(64)))


@pytest.mark.parametrize(("values", "message"), [
    ({"budget": 0.5}, ("config: budget=0.5 must be between 1 and 8 bits per weight (the average over the tied "
                       "weights, codebooks counted)")),
    ({"dim": 3}, "config: dim=3 must be 1, 2 or 4 (weights per shared vector)"),
    ({"outliers": 1.2}, "config: outliers='120%' must be a share of the weights from 0% to below 100% (e.g. 0.5%)"),
    ({"method": "exact"}, "config: method='exact' is not one of auto, nearest, compensated"),
    ({"dim": 4, "bits": 4}, "config: dim=4 with 4 bits needs 16-bit indices; at most 8: use bits=2 or fewer"),
], ids=["budget", "dim", "outliers", "method", "dim-bits"])
def test_bad_quality_settings_name_the_setting(values, message):
    with pytest.raises(BadInputError) as e:
        TieConfig(**values)
    assert str(e.value) == message


def test_compensated_without_calibration_inputs_is_refused():
    model = _model()
    cfg = TieConfig(method="compensated", min_elements=0)
    with pytest.raises(BadInputError, match="needs calibration inputs"):
        assign_(model, analyze(model, cfg), cfg, None)


def test_the_plan_records_what_was_done():
    model = _model()
    cfg = TieConfig(bits=2, dim=2, outliers=0.01, method="compensated", min_elements=0)
    plan = analyze(model, cfg)
    assign_(model, plan, cfg, batches_of(_inputs(128)))
    tp = plan.tensor("fc2.weight")
    assert (tp.method, tp.dim, tp.k, tp.outliers) == ("compensated", 2, 16, round(0.01 * 64 * 96))
    again = type(plan).from_dict(plan.to_dict())
    assert again.tensor("fc2.weight").centers == tp.centers
