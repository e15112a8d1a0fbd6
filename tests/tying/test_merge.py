"""merge_: codebook storage, at most K values per group, tensor-level ties, export."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from compress.codebook import CodebookParametrization
from compress.granularity import Granularity
from compress.tying import TieConfig, analyze, merge_, nearest_labels
from tests.helpers.models import SharedHead, TiedCopies, TwoLayer

GRANULARITIES = [("tensor", None), ("channel", None), ("group", 5), ("group", 32)]


def _row_groups(rows: int, granularity: str, group_size: int | None) -> list[torch.Tensor]:
    if granularity == "tensor":
        return [torch.arange(rows)]
    size = 1 if granularity == "channel" else group_size
    return [torch.arange(s, min(s + size, rows)) for s in range(0, rows, size)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES, ids=lambda v: str(v))
@pytest.mark.parametrize("bits", [1, 3])
def test_merged_groups_have_at_most_k_values_in_the_weight_dtype(bits, granularity, group_size, dtype):
    model = TwoLayer().to(dtype)
    plan = analyze(model, TieConfig(bits=bits, granularity=granularity, group_size=group_size))
    codebooks = merge_(model, plan)
    k = 2 ** bits
    w = model.fc1.weight
    assert w.dtype == dtype
    for rows in _row_groups(w.shape[0], granularity, group_size):
        assert w[rows].unique().numel() <= k
    if granularity == "tensor":
        assert w.unique().numel() <= k
    cb = codebooks.tensors["fc1.weight"]
    assert cb.codebook.dtype == dtype and cb.indices.dtype == torch.uint8
    assert cb.codebook.shape == (len(_row_groups(32, granularity, group_size)), k)
    assert torch.equal(cb.decode(), w.detach())


def test_state_dict_holds_codebook_and_index_not_the_dense_weight():
    model = TwoLayer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_(model, analyze(model, TieConfig(bits=4)))
    sd = model.state_dict()
    assert "fc1.weight" not in sd
    assert sd["fc1.parametrizations.weight.original"].shape == (1, 16)
    assert sd["fc1.parametrizations.weight.0.index"].dtype == torch.uint8
    assert sd["fc1.parametrizations.weight.0.index"].shape == (32, 48)
    # left alone: bit for bit
    for name in ("fc1.bias", "fc2.weight", "fc2.bias"):
        assert torch.equal(sd[name], before[name])


def test_excluded_tensors_are_untouched():
    model = TwoLayer()
    before = model.fc1.weight.detach().clone()
    codebooks = merge_(model, analyze(model, TieConfig(bits=2, exclude=["fc1.*"], min_elements=0)))
    assert list(codebooks.tensors) == ["fc2.weight"]
    assert torch.equal(model.fc1.weight, before) and isinstance(model.fc1.weight, nn.Parameter)


def test_merge_moves_each_weight_to_its_nearest_centre():
    model = TwoLayer()
    w = model.fc1.weight.detach().clone()
    plan = analyze(model, TieConfig(bits=2))
    merge_(model, plan)
    c = plan.tensor("fc1.weight").centers_tensor(torch.float32)[0]
    assert torch.equal(model.fc1.weight, c[(w[..., None] - c).abs().argmin(-1)])


def test_merge_takes_new_centres_and_labels():
    model = TwoLayer()
    plan = analyze(model, TieConfig(bits=1))
    centers = {"fc1.weight": torch.tensor([[-0.5, 0.5]])}
    codebooks = merge_(model, plan, centers=centers)
    assert set(model.fc1.weight.unique().tolist()) <= {-0.5, 0.5}
    assert torch.equal(codebooks.tensors["fc1.weight"].codebook, centers["fc1.weight"])


def test_nearest_labels_with_unsorted_centres_and_ties_to_the_lower_value():
    w = torch.tensor([[0.0, 1.0, 2.0, 1.5]])
    labels = nearest_labels(w, torch.tensor([[2.0, 1.0, 0.0]]), Granularity("tensor"))
    assert labels.tolist() == [[2, 1, 0, 1]]


def test_equal_and_transposed_copies_become_one_parameter():
    model = TiedCopies()
    x = torch.randn(5, 48)
    plan = analyze(model, TieConfig(bits=3))
    codebooks = merge_(model, plan)
    assert list(codebooks.tensors) == ["a.weight"]
    assert {n: (a.target, a.transpose) for n, a in codebooks.aliases.items()} == {
        "b.weight": ("a.weight", False), "c.weight": ("a.weight", True)}
    assert model.b.parametrizations.weight.original is model.a.parametrizations.weight.original
    assert model.c.parametrizations.weight.original is model.a.parametrizations.weight.original
    assert torch.equal(model.b.weight, model.a.weight) and torch.equal(model.c.weight, model.a.weight.t())
    assert len(list(model.parameters())) == 1
    # one codebook, one index buffer: the model computes with the merged values
    expected = model.c.weight @ (2 * model.a.weight @ x.t())
    torch.testing.assert_close(model(x), expected.t())


def test_a_shared_parameter_stays_shared_after_merge():
    model = SharedHead()
    codebooks = merge_(model, analyze(model, TieConfig(bits=2)))
    assert codebooks.aliases["head.weight"].target == "emb.weight"
    assert model.head.parametrizations.weight.original is model.emb.parametrizations.weight.original
    assert torch.equal(model.head.weight, model.emb.weight) and model.emb.weight.unique().numel() <= 4


def _roundtrip(program):
    buf = io.BytesIO()
    torch.export.save(program, buf)
    buf.seek(0)
    return torch.export.load(buf)


@pytest.mark.parametrize("make", [TwoLayer, TiedCopies], ids=["codebooks", "ties"])
def test_merged_model_exports_with_torch_export(make):
    model = make()
    plan = analyze(model, TieConfig(bits=2, granularity="channel"))
    merge_(model, plan)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = _roundtrip(torch.export.export(model, (torch.randn(4, 48),), dynamic_shapes=({0: batch},)))
    names = set(program.state_dict) | set(program.constants)
    assert not names & ({t.name for t in plan.clustered()} | {t.name for t in plan.ties})
    assert any(n.endswith("parametrizations.weight.original") for n in names)
    x = torch.randn(7, 48)
    torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)


def test_merge_on_an_exported_program_module():
    program = torch.export.export(TwoLayer().eval(), (torch.randn(2, 48),))
    module = program.module()
    x = torch.randn(2, 48)
    plan = analyze(module, TieConfig(bits=2), program=program)
    merge_(module, plan)
    assert module.fc1.weight.unique().numel() <= 4
    assert isinstance(module.fc1.parametrizations.weight[0], CodebookParametrization)
    assert module(x).shape == (2, 4)


def test_merge_refuses_a_plan_for_another_model():
    plan = analyze(TwoLayer(d_in=48), TieConfig(bits=2))
    with pytest.raises(Exception, match=r"`fc1.weight` has shape \(32, 40\), the plan says \(32, 48\)"):
        merge_(TwoLayer(d_in=40), plan)
    with pytest.raises(Exception, match="the model has no parameter `fc1.weight`"):
        merge_(nn.Sequential(nn.Linear(2, 2)), plan)
