"""analyze / TieConfig / TiePlan / registry: which tensors are tied, how, and why not."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from compress import registry
from compress.errors import BadInputError
from compress.tying import TieConfig, TiePlan, analyze, estimate_importance
from tests.helpers.models import ConvNormNet, Recurrent, SharedHead, TiedCopies, TwoLayer, trained_two_layer

# --- registry -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("module", "clustered", "left"), [
    (nn.Linear(4, 4), ["weight"], ["bias"]),
    (nn.Conv1d(2, 2, 3), ["weight"], ["bias"]),
    (nn.Conv2d(2, 2, 3), ["weight"], ["bias"]),
    (nn.Conv3d(2, 2, 3), ["weight"], ["bias"]),
    (nn.ConvTranspose2d(2, 2, 3), ["weight"], ["bias"]),
    (nn.Embedding(5, 3), ["weight"], []),
    (nn.Bilinear(2, 3, 4), ["weight"], ["bias"]),
    (nn.GRU(3, 4, num_layers=2, bidirectional=True),
     ["weight_ih_l0", "weight_hh_l1", "weight_ih_l1_reverse"], ["bias_ih_l0", "bias_hh_l1_reverse"]),
    (nn.LSTM(3, 4), ["weight_ih_l0", "weight_hh_l0"], ["bias_ih_l0"]),
    (nn.RNN(3, 4), ["weight_ih_l0"], ["bias_hh_l0"]),
    (nn.GRUCell(3, 4), ["weight_ih", "weight_hh"], ["bias_ih"]),
    (nn.LSTMCell(3, 4), ["weight_ih", "weight_hh"], ["bias_hh"]),
    (nn.MultiheadAttention(8, 2), ["in_proj_weight"], ["in_proj_bias"]),
    (nn.MultiheadAttention(8, 2).out_proj, ["weight"], ["bias"]),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None)
def test_registry_covers_builtin_layers(module, clustered, left):
    for name in clustered:
        assert registry.is_clusterable(module, name), name
    for name in left:
        assert not registry.is_clusterable(module, name), name


def test_registry_knows_qualified_names_and_norms():
    assert registry.clusterable_names("torch.nn.modules.linear.Linear") == ("weight",)
    assert registry.is_norm(nn.LayerNorm(4)) and registry.is_norm("torch.nn.modules.batchnorm.BatchNorm2d")
    assert not registry.is_norm(nn.Linear(2, 2))


class _LowRank(nn.Module):
    def __init__(self):
        super().__init__()
        self.u = nn.Parameter(torch.randn(64, 32))
        self.v = nn.Parameter(torch.randn(32, 64))
        self.scale = nn.Parameter(torch.randn(40, 40))


def test_register_adds_a_type_with_one_call():
    model = nn.Sequential(_LowRank())
    before = analyze(model, TieConfig(bits=2))
    assert before.tensor("0.u").reason == "_LowRank is not registered; not a >= 2-dim *weight"
    registry.register(_LowRank, ("u", "v"))
    try:
        plan = analyze(model, TieConfig(bits=2))
    finally:
        registry._CLUSTERABLE.pop(_LowRank)
    assert [t.name for t in plan.clustered()] == ["0.u", "0.v"]
    assert plan.tensor("0.u").reason == "_LowRank.u"
    assert plan.tensor("0.scale").reason == "not a registered weight of _LowRank"


def test_registry_covers_embedding_and_recurrent_layers_in_a_plan():
    plan = analyze(Recurrent(), TieConfig(bits=2, min_elements=0))
    clustered = {t.name for t in plan.clustered()}
    assert clustered == {"emb.weight", "gru.weight_ih_l0", "gru.weight_hh_l0", "gru.weight_ih_l1",
                         "gru.weight_hh_l1", "cell.weight_ih", "cell.weight_hh"}
    assert plan.tensor("gru.bias_ih_l1").reason == "bias"


# --- module types from an exported program --------------------------------------------------------

def _exported_conv_norm():
    model = ConvNormNet().eval()
    return torch.export.export(model, (torch.randn(2, 512),))


def test_pt2_module_types_are_recovered_from_the_graph():
    program = _exported_conv_norm()
    plan = analyze(program.module(), TieConfig(bits=2), program=program)
    assert plan.module_types == "graph"
    reasons = {t.name: t.reason for t in plan.tensors}
    assert reasons["conv.weight"] == "Conv2d.weight"
    assert reasons["norm.weight"] == "norm layer"
    assert reasons["head.weight"] == "Linear.weight"
    assert plan.tensor("conv.weight").module_type == "Conv2d"


def test_pt2_without_graph_falls_back_and_says_so():
    program = _exported_conv_norm()
    plan = analyze(program.module(), TieConfig(bits=2))
    assert plan.module_types == "fallback"
    assert plan.tensor("conv.weight").reason == "module type unknown; fallback rule: >= 2 dims and named *weight"
    # without types a 1-D norm weight is still left alone: it is not a >= 2-dim weight
    assert plan.tensor("norm.weight").action == "keep"


# --- what is left alone, and why --------------------------------------------------------------------

def test_reasons_for_leaving_tensors_alone():
    model = TwoLayer()
    model.register_parameter("steps", nn.Parameter(torch.arange(2000).reshape(40, 50), requires_grad=False))
    plan = analyze(model, TieConfig(bits=4, exclude=["fc9.*"]))
    reasons = {t.name: (t.action, t.reason) for t in plan.tensors}
    assert reasons == {
        "fc1.weight": ("cluster", "Linear.weight"),
        "fc1.bias": ("keep", "bias"),
        "fc2.weight": ("keep", "small (< 1024 elements)"),
        "fc2.bias": ("keep", "bias"),
        "steps": ("keep", "int64 dtype (not floating point)"),
    }


def test_exclude_wins_and_include_overrides_the_defaults():
    plan = analyze(TwoLayer(), TieConfig(bits=2, exclude=["fc1.*"], include=["fc2.*", "fc1.weight"]))
    assert plan.tensor("fc1.weight").reason == "excluded by 'fc1.*'"
    assert plan.tensor("fc2.weight").reason == "included by 'fc2.*'"
    assert plan.tensor("fc2.bias").action == "cluster"


def test_layered_overrides_by_type_then_by_name():
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(64, 64))
    model.add_module("fc2", nn.Linear(64, 64))
    model.add_module("fc3", nn.Linear(64, 64))
    cfg = TieConfig.from_dict({"bits": 4, "by_type": {"Linear": {"bits": 2}},
                               "by_name": {"fc2.*": {"bits": 3, "granularity": "channel"},
                                           "fc3.*": {"enabled": False}}})
    plan = analyze(model, cfg)
    assert (plan.tensor("fc1.weight").k, plan.tensor("fc1.weight").granularity) == (4, "tensor")
    assert (plan.tensor("fc2.weight").k, plan.tensor("fc2.weight").granularity) == (8, "channel")
    assert len(plan.tensor("fc2.weight").centers) == 64
    assert plan.tensor("fc3.weight").reason == "disabled by by_name 'fc3.*'"


def test_tolerance_gives_the_fewest_values_within_it():
    torch.manual_seed(0)
    model = TwoLayer()
    tol = 0.02
    plan = analyze(model, TieConfig(bits=None, tolerance=tol))
    tp = plan.tensor("fc1.weight")
    w = model.fc1.weight.detach().double().numpy().reshape(-1)
    span = w.max() - w.min()
    assert tp.max_error <= tol + 1e-12
    assert math.ceil(span / (2 * tol)) <= tp.k <= math.ceil(span / (2 * tol)) + 2
    assert tp.bits == math.ceil(math.log2(tp.k))


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_initial_centres_and_labels_reproduce_the_clustering_error(granularity):
    model = TwoLayer()
    plan = analyze(model, TieConfig(bits=2, granularity=granularity, group_size=5 if granularity == "group" else None))
    tp = plan.tensor("fc1.weight")
    groups = {"tensor": 1, "channel": 32, "group": 7}[granularity]
    assert np.array(tp.centers).shape == (groups, 4)
    rows = torch.arange(32) // (5 if granularity == "group" else 1) if granularity != "tensor" else torch.zeros(32).long()
    c = tp.centers_tensor()
    merged = c[rows[:, None], tp.labels.long()]
    err = (merged - model.fc1.weight.detach().double()).abs().max().item()
    assert err == pytest.approx(tp.max_error, abs=1e-12)


def test_importance_weighting_lowers_the_weighted_error():
    model, data = trained_two_layer()
    plain = analyze(model, TieConfig(bits=2)).tensor("fc1.weight")
    weighted = analyze(model, TieConfig(bits=2, importance=True),
                       importance=estimate_importance(model, data)).tensor("fc1.weight")

    imp = estimate_importance(model, data, ["fc1.weight"])["fc1.weight"]
    w = model.fc1.weight.detach().double()

    def weighted_sse(tp):
        c = tp.centers_tensor()[0]
        return float((imp * (c[tp.labels.long()] - w) ** 2).sum())

    assert bool((imp >= 0).all()) and float(imp.sum()) > 0
    assert weighted_sse(weighted) < weighted_sse(plain)
    assert weighted.centers != plain.centers


def test_importance_without_targets_uses_output_sensitivity():
    model, data = trained_two_layer()
    data.calib_targets = None
    from compress.tying.importance import estimate_importance

    imp = estimate_importance(model, data, ["fc1.weight"])["fc1.weight"]
    assert imp.shape == model.fc1.weight.shape and float(imp.sum()) > 0


# --- tensor-level ties ------------------------------------------------------------------------------

def test_equal_and_transposed_copies_become_aliases():
    plan = analyze(TiedCopies(), TieConfig(bits=2))
    ties = {(t.name, t.target, t.kind, t.transpose) for t in plan.ties}
    assert ties == {("b.weight", "a.weight", "exact", False), ("c.weight", "a.weight", "transposed", True)}
    assert plan.tensor("b.weight").action == "alias"
    assert plan.tensor("c.weight").reason == "transposed copy of `a.weight`"
    assert [t.name for t in plan.clustered()] == ["a.weight"]


def test_ties_can_be_switched_off():
    plan = analyze(TiedCopies(), TieConfig(bits=2, tie_tensors=False))
    assert plan.ties == [] and len(plan.clustered()) == 3


def test_a_shared_parameter_is_planned_once_and_recorded_as_shared():
    plan = analyze(SharedHead(), TieConfig(bits=2))
    assert [t.name for t in plan.clustered()] == ["emb.weight"]
    assert [(t.name, t.target, t.kind) for t in plan.ties] == [("head.weight", "emb.weight", "shared")]
    assert plan.tensor("head.weight").action == "alias"


# --- JSON ---------------------------------------------------------------------------------------------

def test_plan_json_round_trip(tmp_path):
    plan = analyze(TiedCopies(), TieConfig(bits=3, granularity="channel", by_name={"a.*": {"bits": 2}}))
    path = plan.save(tmp_path / "p.plan.json")
    back = TiePlan.load(path)
    assert back.to_dict() == plan.to_dict()
    assert torch.equal(back.tensor("a.weight").labels, plan.tensor("a.weight").labels)
    text = path.read_text()
    # readable: one codebook row per line, labels packed
    assert '"centers": [\n' in text and "base64" in text
    assert json.loads(text)["tensors"][0]["labels"]["bits"] == 2


def test_plan_json_without_labels_is_smaller_and_still_loads():
    plan = analyze(TwoLayer(), TieConfig(bits=4))
    small = TiePlan.from_dict(json.loads(plan.to_json(with_labels=False)))
    assert small.tensor("fc1.weight").labels is None
    assert small.tensor("fc1.weight").centers == plan.tensor("fc1.weight").centers


@pytest.mark.parametrize(("config", "message"), [
    ({"bitz": 4}, ("config: unknown key 'bitz'; known keys: bits, budget, by_name, by_type, dim, exclude, "
                  "granularity, group_size, importance, include, method, min_elements, outliers, tie_tensors, "
                  "tie_tolerance, tolerance, version")),
    ({"bits": "4"}, "config: 'bits' must be an integer or null, got \"4\""),
    ({"bits": True}, "config: 'bits' must be an integer or null, got true"),
    ({"exclude": "fc1.*"}, "config: 'exclude' must be a list, got \"fc1.*\""),
    ({"importance": 1}, "config: 'importance' must be true/false, got 1"),
    ({"by_name": {"fc1.*": {"bit": 2}}},
     "config: by_name['fc1.*']: unknown key 'bit'; known keys: bits, enabled, granularity, group_size, tolerance"),
    ({"by_type": {"Linear": {"granularity": 3}}}, "config: by_type['Linear']: 'granularity' must be a string, got 3"),
    ({"bits": 9}, "config: bits must be between 1 and 8, got 9"),
    ({"bits": 0}, "config: bits must be between 1 and 8, got 0"),
    ({"by_name": {"x": {"bits": 12}}}, "config: by_name['x']: bits must be between 1 and 8, got 12"),
    ({"granularity": "row"}, "config: granularity must be one of tensor, channel, group, auto, got 'row'"),
    ({"granularity": "group"}, "config: granularity 'group' needs a group size (`group_size`)"),
], ids=["unknown-key", "bits-string", "bits-bool", "exclude-string", "importance-int", "override-unknown",
        "override-type", "bits-9", "bits-0", "override-bits", "granularity", "group-no-size"])
def test_config_errors_name_the_key(config, message):
    with pytest.raises(BadInputError) as e:
        TieConfig.from_dict(config)
    assert str(e.value) == message


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "tie.json"
    path.write_text('{"bits": 2, "granularty": "channel"}')
    with pytest.raises(BadInputError, match=r"tie.json: unknown key 'granularty'"):
        TieConfig.load(path)


# --- bad models -------------------------------------------------------------------------------------

def test_nan_and_inf_weights_are_refused_with_the_count():
    model = TwoLayer()
    with torch.no_grad():
        model.fc1.weight[0, :3] = float("nan")
        model.fc1.weight[1, 0] = float("inf")
    with pytest.raises(BadInputError) as e:
        analyze(model, TieConfig())
    assert str(e.value) == "`fc1.weight` has 4 NaN/Inf values; clean the checkpoint or pass exclude=['fc1.weight']"
    assert analyze(model, TieConfig(exclude=["fc1.*"])).clustered() == []


def test_k_above_the_tensor_size_is_refused():
    with pytest.raises(BadInputError) as e:
        analyze(TwoLayer(), TieConfig(bits=8, include=["fc2.bias"]))
    assert str(e.value) == ("`fc2.bias` has 4 elements, fewer than K=256 (8 bits); use fewer bits or pass "
                            "exclude=['fc2.bias']")


def test_a_model_without_float_parameters_is_refused():
    model = nn.Module()
    model.register_parameter("ids", nn.Parameter(torch.arange(10), requires_grad=False))
    with pytest.raises(BadInputError, match="no floating-point parameters"):
        analyze(model, TieConfig())


def test_importance_needs_data():
    with pytest.raises(BadInputError, match=r"pass importance=estimate_importance\(model, data\)"):
        analyze(TwoLayer(), TieConfig(importance=True))
