"""Vector codebooks and outliers in every storage form: ONNX (standard ops, onnxruntime within 1e-4 of the
merged model), safetensors (the recipe in the metadata), the merged state_dict and torch.export."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from torch import nn

from compress.codebook import TensorCodebook
from compress.export import codebooks_from_state_dict, export_onnx, export_safetensors
from compress.io import load_codebook_safetensors
from compress.tying import TieConfig, analyze, assign_, batches_of


class Net(nn.Module):
    """A 4x4 convolution (last axis 4: vectors of 2 or 4 fit), a Linear of 64 inputs and a small head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 4, padding=2)
        self.fc = nn.Linear(16 * 9 * 9, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x.reshape(-1, 1, 8, 8))).flatten(1)
        return self.head(torch.relu(self.fc(h)))


CASES = [(2, 0.0, "compensated"), (4, 0.0, "nearest"), (1, 0.01, "compensated"), (2, 0.005, "nearest")]


def _merged(dim: int, outliers: float, method: str):
    torch.manual_seed(0)
    model, x = Net().eval(), torch.rand(96, 64)
    cfg = TieConfig(bits=2, dim=dim, outliers=outliers, method=method, min_elements=0, granularity="group",
                    group_size=4)
    result = assign_(model, analyze(model, cfg), cfg, batches_of(x, 32))
    return model, result.codebooks, x


def _run_onnx(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.slow
@pytest.mark.parametrize(("dim", "outliers", "method"), CASES, ids=[f"dim{d}-out{o}-{m}" for d, o, m in CASES])
def test_vector_and_outlier_exports_round_trip_through_onnxruntime(tmp_path, dim, outliers, method):
    model, codebooks, x = _merged(dim, outliers, method)
    assert all(cb.dim == dim for cb in codebooks.tensors.values())
    assert all(bool(cb.outlier_count) == (outliers > 0) for cb in codebooks.tensors.values())
    path = tmp_path / "m.onnx"
    report = export_onnx(model, codebooks, path, x[:4])
    onnx.checker.check_model(str(path), full_check=True)
    with torch.no_grad():
        want = model(x).numpy()
    assert float(np.abs(_run_onnx(path, x) - want).max()) <= 1e-4
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Gather" in ops and ("ScatterElements" in ops) == (outliers > 0)
    for name in codebooks.tensors:
        entry = report.entry(name)
        assert entry.storage == "codebook" and entry.actual_bytes <= entry.bound_bytes
    dense = sum(p.numel() * 4 for p in Net().parameters())
    assert path.stat().st_size < 0.5 * dense

    # a merged program (a tied .pt2) exports to the same decode: nothing dense, nothing lost
    program = torch.export.export(model, (x[:4],))
    again = export_onnx(program, codebooks, tmp_path / "p.onnx", x[:4])
    assert again.losses() == [] and all(again.entry(n).storage == "codebook" for n in codebooks.tensors)
    assert float(np.abs(_run_onnx(tmp_path / "p.onnx", x) - want).max()) <= 1e-4


@pytest.mark.parametrize(("dim", "outliers", "method"), [
    pytest.param(*c, id=f"dim{c[0]}-out{c[1]}-{c[2]}", marks=[pytest.mark.slow] if i else []) for i, c in enumerate(CASES)])
def test_safetensors_state_dict_and_codebook_records_give_back_the_merged_values(tmp_path, dim, outliers, method):
    model, codebooks, x = _merged(dim, outliers, method)
    path = tmp_path / "m.safetensors"
    export_safetensors(model, codebooks, path)
    tensors = load_codebook_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    recipes = json.loads(meta["compress.tensors"])
    assert meta["compress.format_version"] == "2"
    recovered = codebooks_from_state_dict(model.state_dict())
    for name, cb in codebooks.tensors.items():
        assert torch.equal(tensors[name], cb.decode()) and torch.equal(cb.decode(), dict(model.named_parameters(
        ))[name.replace("weight", "parametrizations.weight.original")].new_tensor(0) + _weight(model, name))
        assert recipes[name].get("dim", 1) == dim and recipes[name].get("outliers", 0) == cb.outlier_count
        again = recovered.tensors[name]
        assert (again.dim, again.shape, again.outlier_count) == (dim, cb.shape, cb.outlier_count)
        assert torch.equal(again.decode(), cb.decode())
        assert torch.equal(TensorCodebook.from_dict(cb.to_dict()).decode(), cb.decode())
    program = torch.export.export(model, (x[:4],))
    with torch.no_grad():
        assert torch.equal(program.module()(x[:4]), model(x[:4]))


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    module, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module), attr).detach()


def test_scalar_files_are_written_exactly_as_before(tmp_path):
    torch.manual_seed(0)
    model, x = Net().eval(), torch.rand(32, 64)
    cfg = TieConfig(bits=3, method="nearest", min_elements=0)
    result = assign_(model, analyze(model, cfg), cfg, batches_of(x))
    path = tmp_path / "m.safetensors"
    export_safetensors(model, result.codebooks, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert not [k for k in f.keys() if "outlier" in k]  # noqa: SIM118 - safe_open has no __iter__
    assert meta["compress.format_version"] == "1"
    assert all(set(r) == {"codebook", "indices", "bits", "k", "packing", "shape", "dtype", "granularity",
                          "group_size"} for r in json.loads(meta["compress.tensors"]).values())
    assert all("dim" not in cb.to_dict() for cb in result.codebooks.tensors.values())
