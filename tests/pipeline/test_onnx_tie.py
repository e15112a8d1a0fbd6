"""`tie_onnx`: an ONNX file without its PyTorch model, clustered by the same core as every pipeline."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from compress.errors import BadInputError
from compress.granularity import Granularity
from compress.kmeans import kmeans_1d
from compress.packing import packed_size
from compress.pipeline import tie_onnx
from compress.tying import TieConfig


def run_onnx(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def kmeans_reconstruction(w: np.ndarray, k: int) -> np.ndarray:
    r = kmeans_1d(w.astype(np.float64), k)
    return np.asarray(r.centers)[np.asarray(r.labels)].reshape(w.shape).astype(np.float32)


def export_dense(model: nn.Module, x: torch.Tensor, path) -> None:
    torch.onnx.export(model.eval(), (x,), str(path), dynamo=True, external_data=False, verbose=False,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))


def test_weights_of_an_existing_model_are_clustered_and_others_left_dense_with_a_reason(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    x = torch.rand(5, 64)
    export_dense(model, x, tmp_path / "dense.onnx")
    result = tie_onnx(tmp_path / "dense.onnx", tmp_path / "tied.onnx", TieConfig(bits=4, exclude=["2.*"]))
    report = result.export
    onnx.checker.check_model(str(tmp_path / "tied.onnx"), full_check=True)
    assert report.entry("0.weight").storage == "codebook" and report.entry("0.weight").index_type == "UINT4"
    assert report.entry("2.weight").note == "left dense: excluded"
    assert report.entry("0.bias").note == "left dense: fewer than 1,024 elements"
    w0 = kmeans_reconstruction(model[0].weight.detach().numpy(), 16)
    with torch.no_grad():
        h = np.maximum(x.numpy() @ w0.T + model[0].bias.numpy(), 0)
        want = h @ model[2].weight.numpy().T + model[2].bias.numpy()
    assert np.abs(run_onnx(tmp_path / "tied.onnx", x) - want).max() <= 1e-4
    # checked in onnxruntime: exact against the merged input, and how far from the input itself
    assert result.verified and result.verification.checks[0].max_abs <= 1e-5
    [vs_input] = result.verification.original
    assert 0.99 < vs_input.mean_cosine < 1 and vs_input.top1_agreement is not None
    assert report.independent_bound.total == (packed_size(128 * 64, 4) + 16 * 4 + (128 + 128 * 10 + 10) * 4
                                              + report.independent_bound.graph_bytes)
    assert report.vs_bound <= 1.03


def test_a_grouped_weight_decodes_every_row_from_its_own_group(tmp_path):
    """9 rows in groups of 4: rows 0-3, 4-7 and 8 (a ceil(9/3)=3-row split would put rows 3, 6, 7 wrong)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 9)).eval()
    with torch.no_grad():  # each group of rows on its own scale, so a row decoded by another group is far off
        model[0].weight.mul_(torch.tensor([1.0] * 4 + [30.0] * 4 + [900.0]).unsqueeze(1))
    x = torch.rand(3, 128)
    export_dense(model, x, tmp_path / "rows9.onnx")
    result = tie_onnx(tmp_path / "rows9.onnx", tmp_path / "tied.onnx",
                      TieConfig(bits=4, granularity="group", group_size=4, min_elements=0))
    assert result.verified
    w = model[0].weight.detach()
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "tied.onnx")).graph.initializer}
    codebook = inits["0.weight.codebook"]
    assert codebook.size == Granularity.of("group", 4).groups(9) * 16  # stored flat
    got = run_onnx(tmp_path / "tied.onnx", torch.eye(128)) - model[0].bias.detach().numpy()
    rel = np.linalg.norm(got.T - w.numpy(), axis=1) / np.linalg.norm(w.numpy(), axis=1)
    assert rel.max() < 0.15, f"rows decoded from the wrong group: relative errors {np.round(rel, 3)}"


def test_the_tied_file_never_overwrites_its_input(tmp_path):
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                   [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "m.onnx"))
    with pytest.raises(BadInputError, match="overwrite the input"):
        tie_onnx(tmp_path / "m.onnx", tmp_path / "m.onnx", TieConfig(bits=4), force=True)
