"""Odd but legal models through `compress tie` and `compress audit`.

- float16, bfloat16 and float64 weights are tied and keep their dtype: in the codebooks, in the
  written merged model, in the safetensors and ONNX exports;
- integer and bool tensors, zero-size tensors and a one-weight tensor are left alone (and the
  report says why) unless a glob asks for them, and then the answer is exact or a clear refusal;
- NaN/Inf weights are refused by `tie` with the tensor's name and count, and reported by `audit`;
- one parameter used by three modules stays one parameter (one codebook) after the merge.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto
from safetensors import safe_open
from torch import nn

from cli.main import cli
from compress.export import load_safetensors
from compress.io import load
from compress.pipeline import ExportOptions, tie
from compress.tying import TieConfig
from tests.helpers.models import save_pt2


def _cli(*args: str):
    return CliRunner().invoke(cli, list(args))


def _rows(report: dict) -> dict[str, dict]:
    return {t["name"]: t for t in report["tensors"]}


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(48, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


# --- float16, bfloat16, float64 -------------------------------------------------------------------

def _assert_tied_in_dtype(result, dtype: torch.dtype, bits: int) -> None:
    cb = result.codebooks.tensors["fc1.weight"]
    assert cb.codebook.dtype == dtype and cb.k == 2 ** bits
    assert result.model.fc1.weight.dtype == dtype
    assert result.model.fc1.weight.unique().numel() <= 2 ** bits
    assert _rows(result.report.to_dict())["fc1.weight"]["dtype"] == str(dtype).removeprefix("torch.")
    written = load(result.model_path).tensors
    assert written["fc1.parametrizations.weight.original"].dtype == dtype
    assert written["fc1.bias"].dtype == dtype and written["fc2.weight"].dtype == dtype
    st = result.model_path.with_name(result.model_path.name.split(".tied.")[0] + ".safetensors")
    with safe_open(str(st), framework="pt") as f:
        assert f.get_tensor("fc1.weight.codebook").dtype == dtype
    assert torch.equal(load_safetensors(st)["fc1.weight"], result.model.fc1.weight.detach())


DTYPES = [torch.float16, torch.float64,
          torch.bfloat16]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_low_and_high_precision_graph_models_are_tied_in_their_dtype(tmp_path, dtype):
    pt2 = save_pt2(Mlp().to(dtype), torch.randn(4, 48, dtype=dtype), tmp_path / "m.pt2")
    result = tie(load(pt2), TieConfig(bits=3), out_dir=tmp_path / "out")
    _assert_tied_in_dtype(result, dtype, bits=3)
    assert result.verified is True
    graph = onnx.load(str(tmp_path / "out" / "m.onnx")).graph  # the export computes in the model's dtype
    assert graph.output[0].type.tensor_type.elem_type == {torch.float16: TensorProto.FLOAT16,
                                                          torch.bfloat16: TensorProto.BFLOAT16,
                                                          torch.float64: TensorProto.DOUBLE}[dtype]
    if dtype == torch.bfloat16:  # onnxruntime's CPU provider has no bfloat16 kernels: said, not skipped silently
        assert any("no bfloat16 kernels" in n for n in result.report.notes)


def test_bfloat16_graph_model_is_tied_when_the_onnx_export_is_skipped(tmp_path):
    pt2 = save_pt2(Mlp().to(torch.bfloat16), torch.randn(4, 48, dtype=torch.bfloat16), tmp_path / "m.pt2")
    result = tie(load(pt2), TieConfig(bits=3), out_dir=tmp_path / "out", export=ExportOptions(onnx=False))
    _assert_tied_in_dtype(result, torch.bfloat16, bits=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64],
                         ids=lambda d: str(d).removeprefix("torch."))
def test_state_dicts_in_any_float_dtype_are_tied_and_audited(tmp_path, dtype):
    torch.save(Mlp().to(dtype).state_dict(), tmp_path / "m.pt")
    result = tie(load(tmp_path / "m.pt"), TieConfig(bits=2), out_dir=tmp_path / "out")
    _assert_tied_in_dtype(result, dtype, bits=2)
    audited = _cli("audit", str(tmp_path / "m.pt"), "--json", "-")
    assert audited.exit_code == 0, audited.output
    rows = _rows(json.loads(audited.stdout))
    assert rows["fc1.weight"]["dtype"] == str(dtype).removeprefix("torch.")
    assert rows["fc1.weight"]["bytes"] == 48 * 32 * dtype.itemsize


# --- integer, bool, zero-size and one-weight tensors ---------------------------------------------

class OddButLegal(nn.Module):
    """A normal layer next to a zero-size layer, a one-weight parameter and integer / bool buffers."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(48, 32)
        self.empty = nn.Linear(48, 0)
        self.scale = nn.Parameter(torch.tensor([[1.5]]))
        self.register_buffer("steps", torch.tensor(7))
        self.register_buffer("mask", torch.arange(32) % 3 != 0)

    def forward(self, x):
        h = self.fc(x) * self.scale * self.mask
        return torch.cat([h, self.empty(x)], 1) + self.steps


@pytest.fixture(scope="module")
def odd_pt2(tmp_path_factory) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "Initializing zero-element tensors is a no-op"
        model = OddButLegal()
    return save_pt2(model, torch.randn(3, 48), tmp_path_factory.mktemp("odd") / "odd.pt2")


@pytest.fixture(scope="module")
def odd_tied(odd_pt2, tmp_path_factory):
    return tie(load(odd_pt2), TieConfig(bits=2), out_dir=tmp_path_factory.mktemp("odd_out"))


def test_odd_tensors_are_left_alone_and_the_report_says_why(odd_tied):
    rows = _rows(odd_tied.report.to_dict())
    assert {n: (r["action"], r["reason"]) for n, r in rows.items() if n != "fc.weight"} == {
        "fc.bias": ("keep", "bias"),
        "empty.weight": ("keep", "empty (0 elements)"),
        "empty.bias": ("keep", "empty (0 elements)"),
        "scale": ("keep", "small (< 1024 elements)"),
    }
    assert rows["fc.weight"]["action"] == "cluster" and rows["fc.weight"]["distinct_values"] <= 4
    assert odd_tied.verified is True


def test_odd_tensors_are_written_unchanged(odd_pt2, odd_tied):
    before, after = load(odd_pt2).tensors, load(odd_tied.model_path).tensors
    for name in ("empty.weight", "empty.bias", "scale", "steps", "mask"):
        assert after[name].dtype == before[name].dtype and torch.equal(after[name], before[name]), name
    assert after["empty.weight"].shape == (0, 48)
    x = torch.randn(5, 48)
    assert torch.equal(load(odd_tied.model_path).module(x), odd_tied.model(x))


def test_odd_tensors_are_noted_by_audit(odd_pt2):
    result = _cli("audit", str(odd_pt2), "--json", "-")
    assert result.exit_code == 0, result.output
    notes = {t["name"]: t["note"] for t in json.loads(result.stdout)["tensors"]}
    assert notes["empty.weight"] == "empty" and notes["steps"] == "left alone: integer"
    assert notes["mask"] == "left alone: bool"


def test_integer_and_bool_weights_of_a_state_dict_are_kept_and_reported(tmp_path):
    counts, mask = torch.randint(0, 9, (64, 64)), torch.rand(64, 64) > 0.5
    torch.save({"fc.weight": torch.randn(64, 64), "counts.weight": counts, "mask.weight": mask},
               tmp_path / "m.pt")
    result = _cli("tie", str(tmp_path / "m.pt"), "-o", str(tmp_path / "out"), "--bits", "2", "--include", "*")
    assert result.exit_code == 0, result.output
    rows = _rows(json.loads((tmp_path / "out" / "m.report.json").read_text()))
    said = {n: (rows[n]["action"], rows[n]["reason"]) for n in ("counts.weight", "mask.weight")}
    assert said == {"counts.weight": ("keep", "int64 dtype (not floating point)"),
                    "mask.weight": ("keep", "bool dtype (not floating point)")}
    merged = torch.load(tmp_path / "out" / "m.tied.pt", weights_only=True)
    assert merged["counts.weight"].dtype == torch.int64 and torch.equal(merged["counts.weight"], counts)
    assert merged["mask.weight"].dtype == torch.bool and torch.equal(merged["mask.weight"], mask)
    exported = load_safetensors(tmp_path / "out" / "m.safetensors")
    assert torch.equal(exported["counts.weight"], counts) and torch.equal(exported["mask.weight"], mask)


def test_a_zero_size_tensor_named_by_a_glob_is_still_left_alone(tmp_path):
    torch.save({"fc.weight": torch.randn(64, 64), "empty.weight": torch.empty(0, 64)}, tmp_path / "m.pt")
    result = tie(load(tmp_path / "m.pt"), TieConfig(bits=3, include=["*"]), out_dir=tmp_path / "out")
    assert _rows(result.report.to_dict())["empty.weight"]["reason"] == "empty (0 elements)"
    assert torch.load(result.model_path, weights_only=True)["empty.weight"].shape == (0, 64)


def test_a_one_weight_tensor_named_by_a_glob_needs_fewer_values_than_it_has(odd_pt2, tmp_path):
    refused = _cli("tie", str(odd_pt2), "-o", str(tmp_path / "a"), "--bits", "1", "--include", "scale")
    assert refused.exit_code == 2
    assert refused.stderr == ("error: `scale` has 1 elements, fewer than K=2 (1 bits); use fewer bits or pass "
                              "--exclude scale\n")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    # by tolerance it becomes one shared value: itself, exactly
    result = tie(load(odd_pt2), TieConfig(bits=None, tolerance=0.01, include=["scale"]), out_dir=tmp_path / "b")
    cb = result.codebooks.tensors["scale"]
    assert cb.k == 1 and cb.decode().tolist() == [[1.5]]


# --- NaN and Inf ----------------------------------------------------------------------------------

@pytest.fixture
def nan_checkpoint(tmp_path) -> Path:
    bad = torch.randn(64, 64)
    bad[3, 4], bad[5, 5], bad[6, 6] = float("nan"), float("inf"), float("-inf")
    torch.save({"bad.weight": bad, "good.weight": torch.randn(64, 64)}, tmp_path / "nan.pt")
    return tmp_path / "nan.pt"


def test_nan_and_inf_weights_are_refused_with_the_tensor_and_count(nan_checkpoint, tmp_path):
    out = tmp_path / "out"
    result = _cli("tie", str(nan_checkpoint), "-o", str(out))
    assert result.exit_code == 2
    assert result.stderr == ("error: `bad.weight` has 3 NaN/Inf values; clean the checkpoint or pass "
                             "--exclude bad.weight\n")
    assert not out.exists() or not any(out.iterdir())


def test_excluding_the_nan_tensor_ties_the_rest_and_keeps_it_bit_for_bit(nan_checkpoint, tmp_path):
    result = _cli("tie", str(nan_checkpoint), "-o", str(tmp_path / "out"), "--exclude", "bad.weight")
    assert result.exit_code == 0, result.output
    merged = torch.load(tmp_path / "out" / "nan.tied.pt", weights_only=True)
    original = torch.load(nan_checkpoint, weights_only=True)["bad.weight"]
    assert torch.equal(merged["bad.weight"].view(torch.int32), original.view(torch.int32))
    assert "good.parametrizations.weight.original" in merged


def test_audit_reports_nan_and_inf_instead_of_failing(nan_checkpoint):
    result = _cli("audit", str(nan_checkpoint), "--json", "-")
    assert result.exit_code == 0, result.output
    row = _rows(json.loads(result.stdout))["bad.weight"]
    assert row["nonfinite"] == 3 and row["note"] == "left alone: 1 NaN, 2 Inf" and row["mergeable"] is False


# --- one parameter, three modules -----------------------------------------------------------------

class SharedThreeWays(nn.Module):
    """One weight matrix used by three layers (as in weight-tied recurrent or looped models)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(48, 48), nn.Linear(48, 48), nn.Linear(48, 48)
        self.b.weight = self.a.weight
        self.c.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.fixture(scope="module")
def shared_pt2(tmp_path_factory) -> Path:
    return save_pt2(SharedThreeWays(), torch.randn(3, 48), tmp_path_factory.mktemp("shared") / "shared.pt2")


def test_loading_keeps_a_parameter_shared_three_ways_one_object(shared_pt2):
    module = load(shared_pt2).module
    assert module.a.weight is module.b.weight is module.c.weight


@pytest.mark.slow
@pytest.mark.parametrize("tie_tensors", [True, False], ids=["value-ties-on", "value-ties-off"])
def test_a_parameter_shared_three_ways_stays_one_after_the_merge(shared_pt2, tmp_path, tie_tensors):
    result = tie(load(shared_pt2), TieConfig(bits=2, tie_tensors=tie_tensors), out_dir=tmp_path)
    assert list(result.codebooks.tensors) == ["a.weight"]
    aliases = {n: a.target for n, a in result.codebooks.aliases.items()}
    assert aliases == {"b.weight": "a.weight", "c.weight": "a.weight"}
    rows = _rows(result.report.to_dict())
    assert rows["b.weight"]["reason"] == rows["c.weight"]["reason"] == "the same parameter object as `a.weight`"
    m = result.model
    chains = [getattr(m, n).parametrizations.weight for n in "abc"]
    assert chains[0].original is chains[1].original is chains[2].original
    # the written model stores it once, and the reloaded module uses one parameter for all three
    written = load(result.model_path).module
    originals = {id(getattr(written, n).parametrizations.weight.original) for n in "abc"}
    assert len(originals) == 1
    x = torch.randn(4, 48)
    assert torch.equal(written(x), m(x))
    with safe_open(str(tmp_path / "shared.safetensors"), framework="pt") as f:
        stored = [k for k in f.keys() if k.endswith(".codebook")]  # noqa: SIM118 (a safe_open handle)
    assert stored == ["a.weight.codebook"]
    inits = onnx.load(str(tmp_path / "shared.onnx")).graph.initializer
    assert [t.name for t in inits if t.name.endswith(".codebook")] == ["a.weight.codebook"]
    assert result.verified is True
