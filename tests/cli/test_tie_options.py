"""`compress tie` options of issue 11: `--input-shape` (models without example inputs), `--strict` (exit 1
when an export does not keep a tied tensor compact), the ONNX-in check, and a quiet exporter."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from cli.main import cli
from tests.helpers import ROOT
from tests.helpers.models import TwoLayer


def _run(*args: str):
    return CliRunner().invoke(cli, ["tie", *args], catch_exceptions=False)


@pytest.fixture
def pickled_module(tmp_path) -> Path:
    """A whole pickled nn.Module (no example inputs in the file)."""
    torch.manual_seed(0)
    path = tmp_path / "net.pt"
    torch.save(TwoLayer(48, 64, 4), path)
    return path


@pytest.mark.slow
def test_input_shape_gives_a_pickled_module_an_onnx_export(pickled_module, tmp_path):
    out = tmp_path / "out"
    result = _run(str(pickled_module), "--trust-pickle", "--input-shape", "1x48", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["net.onnx", "net.plan.json", "net.report.json",
                                                     "net.safetensors", "net.tied.pt2"]
    report = json.loads((out / "net.report.json").read_text())
    assert [v["passed"] for v in report["verification"]] == [True, True]
    assert not [n for n in report["notes"] if "ONNX" in n or "dense" in n]  # only notes on how it was assigned


def test_without_example_inputs_the_note_names_the_option(pickled_module, tmp_path):
    result = _run(str(pickled_module), "--trust-pickle", "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out" / "net.onnx").exists()
    output = " ".join(result.output.split())
    assert "note: no ONNX written: " in output
    assert "net.pt has no example inputs to trace it with; give them with --input-shape (e.g. '1x3x224x224', " \
           "'int64:1x128') or --data" in output


@pytest.mark.slow
def test_a_trusted_torchscript_file_gets_an_onnx_export_from_input_shapes(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3)).eval()
    torch.jit.save(torch.jit.script(model), tmp_path / "conv.pt")
    out = tmp_path / "out"
    result = _run(str(tmp_path / "conv.pt"), "--trust-pickle", "--input-shape", "1x3x8x8", "-o", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "conv.report.json").read_text())
    assert [v["passed"] for v in report["verification"]] == [True, True]
    [onnx_report] = [e for e in report["exports"] if e["format"] == "onnx"]
    assert {t["name"]: t["storage"] for t in onnx_report["tensors"]}["3.weight"] == "codebook"


class SpecialFunction(nn.Module):
    """A model the TorchScript-based ONNX exporter refuses (it has no `aten::special_erfcx`)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(48, 48)

    def forward(self, x):
        return torch.special.erfcx(self.fc(x))


@pytest.mark.slow
def test_a_torchscript_file_the_exporter_refuses_gets_a_note_and_the_other_files(tmp_path):
    torch.jit.save(torch.jit.script(SpecialFunction().eval()), tmp_path / "special.pt")
    out = tmp_path / "out"
    result = _run(str(tmp_path / "special.pt"), "--trust-pickle", "--input-shape", "2x48", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["special.plan.json", "special.report.json",
                                                     "special.safetensors", "special.tied.pt"]
    output = " ".join(result.output.split())
    assert "note: no ONNX written: torch.onnx.export (TorchScript exporter) could not export the model: " in output
    assert "give the model as a .pt2 (torch.export.save) or a pickled nn.Module, or pass --no-onnx" in output


@pytest.mark.parametrize(("spec", "message"), [
    ("1x3xa", "input shape '1x3xa' is not [dtype:]D0xD1x... (e.g. 1x3x224x224 or int64:1x128); fix --input-shape 1x3xa"),
    ("int99:1x48", "input shape 'int99:1x48': unknown dtype 'int99'; use one of"),
    ("1x0", "input shape '1x0': every dimension must be at least 1"),
    ("1x47", ("the model fails on example inputs float32:1x47 (--input-shape): mat1 and mat2 shapes cannot be "
              "multiplied")),
    ("1x2x3x48x5", "the model fails on example inputs float32:1x2x3x48x5 (--input-shape)"),
], ids=["malformed", "dtype", "zero", "size", "rank"])
def test_bad_input_shape_is_one_line_and_exit_2(pickled_module, tmp_path, spec, message):
    result = _run(str(pickled_module), "--trust-pickle", "--input-shape", spec, "-o", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


# --- ONNX in: the check against the input, --strict ------------------------------------------------

def _old_opset_model(path: Path) -> Path:
    """An opset-7 model (MatMul, then a non-spatial BatchNorm) that cannot be converted to opset 21."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([2, 32, 1, 1], np.int64), "shape")]
    inits += [numpy_helper.from_array(np.full((32, 1, 1), v, np.float32), n) for n, v in zip("gbmv", (1, 0, 0, 1))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["h4"]),
             helper.make_node("BatchNormalization", ["h4", "g", "b", "m", "v"], ["y"], spatial=0)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32, 1, 1])],
                              inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=3), str(path))
    return path


def test_an_onnx_file_whose_indices_must_widen_warns_and_strict_exits_1(tmp_path):
    model = _old_opset_model(tmp_path / "old.onnx")
    result = _run(str(model), "-o", str(tmp_path / "a"))
    assert result.exit_code == 0, result.output
    warning = ("warning: `w` has its indices stored wider than their bits in old.tied.onnx: 1,024 bytes more than "
               "its compressed form")
    assert warning in " ".join(result.output.split())
    assert "✓" in result.output  # checked against the input in onnxruntime
    strict = _run(str(model), "-o", str(tmp_path / "b"), "--strict")
    assert strict.exit_code == 1
    [line] = strict.output.strip().splitlines()
    assert line.startswith("error: `w` has its indices stored wider than their bits in old.tied.onnx: 1,024 bytes")
    assert line.endswith("strict mode fails the run (the files in " + str(tmp_path / "b") + " are kept for inspection)")
    assert (tmp_path / "b" / "old.tied.onnx").exists()


@pytest.mark.slow
def test_a_tied_onnx_file_that_does_not_match_its_input_exits_1(tmp_path):
    """A graph whose output is random cannot match itself: the check in onnxruntime fails the run."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("RandomUniformLike", ["h"], ["r"]),
             helper.make_node("Add", ["h", "r"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(tmp_path / "r.onnx"))
    result = _run(str(tmp_path / "r.onnx"), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert "✗" in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.slow
def test_strict_passes_when_everything_stays_compact(pickled_module, tmp_path):
    result = _run(str(pickled_module), "--trust-pickle", "--input-shape", "2x48", "--strict", "-o", str(tmp_path))
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_audit_of_a_tied_onnx_file_shows_each_initializers_storage(pickled_module, tmp_path):
    assert _run(str(pickled_module), "--trust-pickle", "--input-shape", "2x48", "-o", str(tmp_path)).exit_code == 0
    result = CliRunner().invoke(cli, ["audit", str(tmp_path / "net.onnx"), "--markdown"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    storage = result.output.split("### ONNX storage")[1].split("### Tensors")[0]
    rows = {line.split("|")[1].strip(): line for line in storage.splitlines() if line.startswith("| `")}
    assert "| index, 4 bits |" in rows["`fc1.weight.index`"] and "| codebook |" in rows["`fc1.weight.codebook`"]
    assert "| dense |" in rows["`fc1.bias`"]


@pytest.mark.slow
def test_the_exporters_chatter_stays_off_the_terminal(tmp_path):
    """A fresh process (the exporter's one-time warnings included): only the toolkit's own lines."""
    torch.manual_seed(0)

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.rnn, self.head = nn.Embedding(100, 32), nn.LSTM(32, 32, bidirectional=True), nn.Linear(64, 100)

        def forward(self, ids):
            return self.head(self.rnn(self.emb(ids))[0])

    ids = torch.randint(0, 100, (2, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's own, in this process
        torch.export.save(torch.export.export(Recurrent().eval(), (ids,)), tmp_path / "rnn.pt2")
    done = subprocess.run([sys.executable, "-m", "cli", "tie", str(tmp_path / "rnn.pt2"), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    for chatter in ("Warning", "W1204", "torchvision", "Evaluation failed", "onnxscript", "[torch.onnx]"):
        assert chatter not in done.stdout + done.stderr, chatter
