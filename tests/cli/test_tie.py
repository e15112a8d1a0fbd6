"""`compress tie` through click's CliRunner, and the `tie()` pipeline it calls."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compress.io import Loaded, load, load_data
from compress.pipeline import tie
from compress.tying import FinetuneConfig, TieConfig, TiePlan
from tests.helpers import SAMPLES
from tests.helpers.models import TiedCopies, TwoLayer, digits_like, save_data, save_pt2, trained_two_layer


def _run(*args: str):
    return CliRunner().invoke(cli, ["tie", *args], catch_exceptions=False)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def _tiny_files(tmp_path_factory) -> tuple[bytes, bytes]:
    folder = tmp_path_factory.mktemp("tiny")
    model, data = trained_two_layer()
    pt2 = save_pt2(model, data.calib_inputs[:4], folder / "tiny.pt2")
    dat = save_data(folder / "tiny_data.pt", data.calib_inputs, data.calib_targets, data.test_inputs,
                    data.test_targets)
    return pt2.read_bytes(), dat.read_bytes()


@pytest.fixture
def tiny(_tiny_files, tmp_path) -> tuple[Path, Path]:
    """A briefly trained two-layer model as .pt2 and a data file with targets, in this test's folder."""
    (tmp_path / "tiny.pt2").write_bytes(_tiny_files[0])
    (tmp_path / "tiny_data.pt").write_bytes(_tiny_files[1])
    return tmp_path / "tiny.pt2", tmp_path / "tiny_data.pt"


def test_tie_writes_model_plan_report_and_verified_exports_and_prints_tables(tiny, tmp_path):
    pt2, _ = tiny
    before = _sha(pt2)
    out = tmp_path / "out"
    result = _run(str(pt2), "-o", str(out), "--bits", "2")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["tiny.onnx", "tiny.plan.json", "tiny.report.json",
                                                     "tiny.safetensors", "tiny.tied.pt2"]
    assert "files written" in result.output and "✓" in result.output
    assert _sha(pt2) == before
    for row in ("before", "after", "size", "bits per weight", "output mean cosine"):
        assert row in result.output
    report = json.loads((out / "tiny.report.json").read_text())
    assert report["version"] == 1 and report["input"]["sha256"] == before
    assert report["outputs"]["dynamic_batch"] is True
    assert report["size"]["after_bytes"] < report["size"]["before_bytes"]
    assert {t["name"]: t.get("k") for t in report["tensors"]}["fc1.weight"] == 4
    # the written model runs at any batch size and holds codebooks, not the dense weight
    assert [v["passed"] for v in report["verification"]] == [True, True]
    assert report["outputs"]["exports"] == ["tiny.onnx", "tiny.safetensors"]
    merged = load(out / "tiny.tied.pt2")
    assert "fc1.parametrizations.weight.original" in merged.tensors and "fc1.weight" not in merged.tensors
    assert merged.module(torch.randn(9, 48)).shape == (9, 4)
    assert merged.module.fc1.parametrizations.weight.original.numel() == 4
    TiePlan.load(out / "tiny.plan.json")


def test_tie_with_data_fine_tunes_and_reports_accuracy(tiny, tmp_path):
    pt2, dat = tiny
    out = tmp_path / "out"
    result = _run(str(pt2), "-o", str(out), "--bits", "1", "--data", str(dat), "--epochs", "2", "--method", "nearest",
                  "--json", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report == json.loads((out / "tiny.report.json").read_text())
    assert report["finetune"]["mode"] == "cross-entropy"
    assert report["options"]["finetune"]["epochs"] == 2
    assert report["data"]["sha256"] == _sha(dat)
    assert report["quality"]["accuracy_after"] >= report["quality"]["accuracy_before"] - 10


def test_tie_json_to_stdout(tiny, tmp_path):
    pt2, _ = tiny
    result = _run(str(pt2), "-o", str(tmp_path / "o"), "--json", "-")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["outputs"]["model"] == "tiny.tied.pt2"


@pytest.mark.slow
def test_existing_outputs_need_force(tiny, tmp_path):
    pt2, _ = tiny
    out = tmp_path / "out"
    assert _run(str(pt2), "-o", str(out)).exit_code == 0
    again = _run(str(pt2), "-o", str(out))
    assert again.exit_code == 2
    assert f"{out / 'tiny.tied.pt2'} already exists; pass --force to overwrite it" in again.output
    assert _run(str(pt2), "-o", str(out), "--force").exit_code == 0


def test_default_output_folder_is_compressed_in_the_working_directory(tiny, tmp_path, monkeypatch):
    pt2, _ = tiny
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert _run(str(pt2)).exit_code == 0
    assert (work / "compressed" / "tiny.tied.pt2").is_file()
    assert sorted(p.name for p in pt2.parent.iterdir()) == ["tiny.pt2", "tiny_data.pt", "work"]


def test_state_dict_input_gives_a_state_dict_of_codebooks(tmp_path):
    sd = TwoLayer().state_dict()
    torch.save(sd, tmp_path / "weights.pt")
    out = tmp_path / "out"
    result = _run(str(tmp_path / "weights.pt"), "-o", str(out), "--bits", "3")
    assert result.exit_code == 0, result.output
    merged = torch.load(out / "weights.tied.pt", weights_only=True)
    assert merged["fc1.parametrizations.weight.original"].shape == (1, 8)
    assert merged["fc1.parametrizations.weight.0.index"].dtype == torch.uint8
    assert torch.equal(merged["fc1.bias"], sd["fc1.bias"])
    assert json.loads((out / "weights.report.json").read_text())["outputs"]["format"] == "state_dict"


def test_tied_copies_are_written_once(tmp_path):
    pt2 = save_pt2(TiedCopies(), torch.randn(3, 48), tmp_path / "copies.pt2")
    result = tie(load(pt2), out_dir=tmp_path / "out")
    report = result.report
    actions = {t.name: t.action for t in report.tensors}
    assert actions == {"a.weight": "cluster", "b.weight": "alias", "c.weight": "alias"}
    # three 32x48 fp32 copies become one 4-bit index and a 16-value codebook
    assert report.size.after_bytes == 32 * 48 // 2 + 16 * 4
    written = load(result.model_path).module
    x = torch.randn(5, 48)
    torch.testing.assert_close(written(x), result.model(x), rtol=0, atol=0)


def test_a_module_without_example_inputs_borrows_them_from_the_data(tmp_path):
    model, data = trained_two_layer()
    loaded = Loaded(tmp_path / "net.pt", "module", dict(model.state_dict()), module=model)
    result = tie(loaded, TieConfig(bits=2), data=data, finetune=FinetuneConfig(epochs=0, codebook_epochs=0),
                 out_dir=tmp_path / "out")
    assert result.model_path.name == "net.tied.pt2" and result.report.outputs.dynamic_batch is True
    assert load(result.model_path).module(torch.randn(5, 48)).shape == (5, 4)
    assert result.report.quality.accuracy_after is not None


# --- the bundled sample -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not (SAMPLES / "digits_mlp.pt2").exists(), reason="samples not built")
def test_sample_mlp_default_four_bits_keeps_accuracy(tmp_path):
    out = tmp_path / "out"
    result = _run(str(SAMPLES / "digits_mlp.pt2"), "-o", str(out), "--data", str(SAMPLES / "digits_data.pt"),
                  "--epochs", "0")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["digits_mlp.onnx", "digits_mlp.plan.json",
                                                      "digits_mlp.report.json", "digits_mlp.safetensors",
                                                      "digits_mlp.tied.pt2"]
    assert "accuracy" in result.output and "97.41%" in result.output
    report = json.loads((out / "digits_mlp.report.json").read_text())
    q = report["quality"]
    assert q["accuracy_before"] - q["accuracy_after"] <= 0.5
    assert report["size"]["tied_bits_per_weight"] < 4.1
    assert all(t["distinct_values"] <= 16 for t in report["tensors"] if t["action"] == "cluster")


@pytest.mark.skipif(not (SAMPLES / "digits_mlp.pt2").exists(), reason="samples not built")
def test_tie_library_call_on_the_sample_leaves_the_input_untouched(tmp_path):
    loaded = load(SAMPLES / "digits_mlp.pt2")
    data = load_data(SAMPLES / "digits_data.pt")
    weight = loaded.module.fc1.weight.detach().clone()
    result = tie(loaded, data=data, out_dir=tmp_path, finetune=FinetuneConfig(epochs=0, codebook_epochs=0))
    assert torch.equal(loaded.module.fc1.weight, weight)
    assert result.model.fc1.weight.unique().numel() <= 16
    assert [p.name for p in result.paths] == ["digits_mlp.tied.pt2", "digits_mlp.plan.json", "digits_mlp.report.json",
                                              "digits_mlp.onnx", "digits_mlp.safetensors"]


# --- bad input: one line, exit 2, nothing written ---------------------------------------------------

def _nan_model(tmp_path: Path) -> Path:
    model = TwoLayer()
    with torch.no_grad():
        model.fc1.weight[2, :5] = float("nan")
    return save_pt2(model, torch.randn(2, 48), tmp_path / "nan.pt2")


def _int_only(tmp_path: Path) -> Path:
    torch.save({"ids": torch.arange(10), "mask": torch.ones(4, dtype=torch.bool)}, tmp_path / "ints.pt")
    return tmp_path / "ints.pt"


def _bad_config(tmp_path: Path) -> Path:
    (tmp_path / "tie.json").write_text('{"bits": 2, "by_nam": {}}')
    return tmp_path / "tie.json"


def _wrong_data(tmp_path: Path) -> Path:
    x, y = digits_like(n=20, d_in=30)
    return save_data(tmp_path / "wrong.pt", x, y, x, y)


BAD = {
    "bits-9": (lambda t, m: [m, "--bits", "9"], "error: command line: bits must be between 1 and 8, got 9"),
    "bits-0": (lambda t, m: [m, "--bits", "0"], "error: command line: bits must be between 1 and 8, got 0"),
    "k-above-size": (lambda t, m: [m, "--bits", "8", "--include", "fc2.bias"],
                     ("error: `fc2.bias` has 4 elements, fewer than K=256 (8 bits); use fewer bits or pass "
                     "--exclude fc2.bias")),
    "nan": (lambda t, m: [str(_nan_model(t))],
            "error: `fc1.weight` has 5 NaN/Inf values; clean the checkpoint or pass --exclude fc1.weight"),
    "no-float": (lambda t, m: [str(_int_only(t))],
                 "error: the model has no floating-point parameters; there is nothing to tie"),
    "data-shape": (lambda t, m: [m, "--data", str(_wrong_data(t))],
                   ("error: {tmp}/wrong.pt: calib_inputs have shape [20, 30], the model expects ['batch', 48] "
                   "(its example input is [4, 48])")),
    "config-key": (lambda t, m: [m, "--config", str(_bad_config(t))],
                   ("error: {tmp}/tie.json: unknown key 'by_nam'; known keys: bits, budget, by_name, by_type, dim, "
                   "exclude, granularity, group_size, importance, include, method, min_elements, outliers, "
                   "tie_tensors, tie_tolerance, tolerance, version")),
    "bits-and-tolerance": (lambda t, m: [m, "--bits", "2", "--tolerance", "0.1"],
                           "error: give --bits or --tolerance, not both"),
    "epochs-without-data": (lambda t, m: [m, "--epochs", "3"],
                            "error: fine-tuning (--epochs) needs calibration data (--data)"),
    "budget-0.5": (lambda t, m: [m, "--budget", "0.5"],
                   ("error: command line: --budget 0.5 must be between 1 and 8 bits per weight (the average over "
                    "the tied weights, codebooks counted)")),
    "dim-3": (lambda t, m: [m, "--dim", "3"], "error: command line: --dim 3 must be 1, 2 or 4 (weights per shared vector)"),
    "outliers-120%": (lambda t, m: [m, "--outliers", "120%"],
                      ("error: command line: --outliers 120% must be a share of the weights from 0% to below 100% "
                       "(e.g. 0.5%)")),
    "outliers-word": (lambda t, m: [m, "--outliers", "some"], "error: --outliers some is not a percentage (e.g. 0.5%)"),
    "budget-below-codebooks": (lambda t, m: [m, "--budget", "1", "--method", "nearest"],
                               ("error: the budget of 1 bits per weight is below the smallest storage these tensors "
                                "allow (1.042 bits per weight with the fewest bits each may take, codebooks counted); "
                                "raise --budget")),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tiny, tmp_path):
    pt2, _ = tiny
    before = _sha(pt2)
    make_args, message = BAD[case]
    out = tmp_path / "out"
    result = _run(*make_args(tmp_path, str(pt2)), "-o", str(out))
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == message.format(tmp=tmp_path)
    assert not out.exists() or list(out.iterdir()) == []
    assert _sha(pt2) == before


# --- the quality options --------------------------------------------------------------------------

def test_data_makes_the_default_error_compensated_then_refined_and_says_so(tiny, tmp_path):
    pt2, dat = tiny
    out = tmp_path / "out"
    result = _run(str(pt2), "-o", str(out), "--bits", "2", "--data", str(dat), "--epochs", "2")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "tiny.report.json").read_text())
    path = report["quality_path"]
    assert path["assignment"]["method"] == "compensated"
    assert path["assignment"]["tensors"] == {"fc1.weight": "compensated"}
    assert path["refine"]["epochs"] == 2 and path["refine"]["mode"] == "cross-entropy"
    assert any(n.startswith("planned: error-compensated assignment of 1 of 1 tensors") for n in report["notes"])
    assert [v["passed"] for v in report["verification"]] == [True, True]
    assert TiePlan.load(out / "tiny.plan.json").tensor("fc1.weight").method == "compensated"


def test_without_data_the_example_inputs_calibrate_with_a_note(tiny, tmp_path):
    pt2, _ = tiny
    result = _run(str(pt2), "-o", str(tmp_path / "out"), "--bits", "2")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "tiny.report.json").read_text())
    assert report["quality_path"]["assignment"]["calibration"] == "the model's 4 example inputs"
    assert "note: no --data: the error-compensated assignment used the model's 4 example inputs" in " ".join(
        result.output.split())


def test_method_nearest_keeps_the_plain_merge(tiny, tmp_path):
    pt2, _ = tiny
    result = _run(str(pt2), "-o", str(tmp_path / "out"), "--bits", "2", "--method", "nearest")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "tiny.report.json").read_text())
    assert "quality_path" not in report


@pytest.mark.slow
def test_vectors_outliers_and_a_budget_export_and_verify(tiny, tmp_path):
    pt2, dat = tiny
    out = tmp_path / "out"
    result = _run(str(pt2), "-o", str(out), "--budget", "2.5", "--dim", "2", "--outliers", "0.5%", "--data", str(dat),
                  "--epochs", "0")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "tiny.report.json").read_text())
    row = {t["name"]: t for t in report["tensors"]}["fc1.weight"]
    assert row["dim"] == 2 and row["outliers"] == round(0.005 * 32 * 48) and row["bits_per_weight"] <= 2.5
    allocation = report["quality_path"]["assignment"]["allocation"]
    assert allocation["budget"] == 2.5 and allocation["bits_per_weight"] <= 2.5
    assert [v["passed"] for v in report["verification"]] == [True, True]


# --- inputs without a PyTorch graph ----------------------------------------------------------------

def test_tie_on_an_onnx_file_writes_codebook_onnx_that_still_runs(tmp_path):
    import numpy as np
    import onnxruntime as ort

    model = TwoLayer().eval()
    x = torch.randn(5, 48)
    src = tmp_path / "two.onnx"
    torch.onnx.export(model, (x,), str(src), dynamo=True, external_data=False,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    result = _run(str(src), "-o", str(tmp_path / "out"), "--bits", "4")
    assert result.exit_code == 0, result.output
    tied = tmp_path / "out" / "two.tied.onnx"
    assert tied.stat().st_size < 0.5 * src.stat().st_size
    feed = {ort.InferenceSession(str(src)).get_inputs()[0].name: x.numpy()}
    a = ort.InferenceSession(str(src)).run(None, feed)[0]
    b = ort.InferenceSession(str(tied)).run(None, feed)[0]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.mean() > 0.99 and cos.min() > 0.97  # 4-bit post-training on an untrained model


def test_tie_on_a_sharded_checkpoint_streams_into_sharded_outputs(tmp_path):
    from safetensors.torch import save_file

    from compress.export.sharded import INDEX_NAME
    from compress.io import load_codebook_checkpoint as load_sharded

    folder = tmp_path / "ckpt"
    folder.mkdir()
    shards = {"a.safetensors": {"l1.weight": torch.randn(64, 48)},
              "b.safetensors": {"l2.weight": torch.randn(32, 64), "l2.bias": torch.randn(32)}}
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: f for f, t in shards.items() for k in t}}))
    result = _run(str(index), "-o", str(tmp_path / "out"), "--bits", "2", "--workers", "1")
    assert result.exit_code == 0, result.output
    out_index = next((tmp_path / "out").rglob(INDEX_NAME))
    merged = load_sharded(out_index)
    assert merged["l1.weight"].unique().numel() <= 4 and merged["l2.weight"].unique().numel() <= 4
    assert torch.equal(merged["l2.bias"], shards["b.safetensors"]["l2.bias"])


def test_quality_options_on_a_streamed_checkpoint_are_refused_not_ignored(tmp_path):
    from safetensors.torch import save_file

    save_file({"l.weight": torch.randn(64, 64)}, str(tmp_path / "m.safetensors"))
    result = _run(str(tmp_path / "m.safetensors"), "--stream", "--dim", "2", "--outliers", "1%",
                  "-o", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "error: a streamed checkpoint is tied tensor by tensor with nearest assignment; --dim 2, --outliers need "
        "the whole model in memory (a .pt2, or a .safetensors file without streaming)")
