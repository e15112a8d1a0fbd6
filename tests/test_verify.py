"""verify / verify_safetensors / make_session and the `compress export` and `compress verify` commands."""

from __future__ import annotations

import copy
import json
import shutil

import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compress.auditing.onnx import audit_onnx
from compress.errors import BadInputError, CompressError
from compress.export import ExportReport, export_onnx, export_safetensors
from compress.runtime import make_session, session_options
from compress.verify import VerifyResult, verify, verify_safetensors
from tests.helpers.export_models import MLP, merged, quantize_


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A merged 4-bit MLP, the model before merging, and the ONNX file (exported once for the module)."""
    torch.manual_seed(0)
    original = MLP().eval()
    model = MLP().eval()
    model.load_state_dict(original.state_dict())
    cbs = quantize_(model, 4)
    folder = tmp_path_factory.mktemp("verify")
    report = export_onnx(model, cbs, folder / "mlp.onnx", torch.rand(2, 64), external_data=True)
    return model, original, cbs, folder / "mlp.onnx", report


def test_verify_passes_and_compares_with_the_original(exported):
    model, original, _, path, _ = exported
    result = verify(path, model, torch.rand(32, 64), original=original, measure_runtime=False)
    assert result.passed and result.batch == 32
    (check,) = result.checks
    assert check.ok and check.max_abs <= 1e-5 and check.shape == [32, 10]
    assert result.lines()[0].startswith("✓ ") and "[32, 10]" in result.lines()[0]
    (vs,) = result.original
    assert 0.9 < vs.mean_cosine <= 1.0 and vs.top1_agreement is not None and vs.max_abs > 0


def test_verify_fails_when_the_reference_differs(exported):
    model, _, _, path, _ = exported
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc2.parametrizations.weight.original.mul_(1.01)
    result = verify(path, other, torch.rand(8, 64), measure_runtime=False)
    assert not result.passed
    assert result.lines()[0].startswith("✗ ")


def test_keep_compressed_session_keeps_the_decode(exported, tmp_path):
    model, _, _, path, _ = exported
    x = torch.rand(4, 64)
    result = verify(path, model, x, keep_compressed=True, measure_runtime=False)
    assert result.passed and result.mode == "keep_compressed"
    opts = session_options(keep_compressed=True)
    assert opts.get_session_config_entry("optimization.disable_specified_optimizers") == "ConstantFolding"
    assert not opts.enable_mem_pattern  # one block planned per run would hold every decoded weight
    for keep in (True, False):
        opts = session_options(keep_compressed=keep)
        opts.optimized_model_filepath = str(tmp_path / f"optimized-{keep}.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(opts.optimized_model_filepath, load_external_data=False)
        # compressed: still decoded at run time; default: folded into dense weights at load
        assert bool(audit_onnx(optimized).decoded) is keep


def test_runtime_is_measured_in_both_modes(exported):
    model, _, _, path, _ = exported
    result = verify(path, model, torch.rand(4, 64), runs=3)
    assert [r.mode for r in result.runtime] == ["default", "keep_compressed"]
    for r in result.runtime:
        assert r.load_s > 0 and r.latency_ms > 0 and r.peak_mb >= r.rss_mb - 1e-6 and r.runs == 3


def test_unavailable_provider_names_the_package_and_what_is_available(exported):
    path = exported[3]
    with pytest.raises(CompressError, match=r"CUDAExecutionProvider is not available .* onnxruntime-gpu .* "
                                            r"available providers: .*CPUExecutionProvider"):
        make_session(path, "cuda")
    with pytest.raises(CompressError, match="FooExecutionProvider is not available"):
        make_session(path, "FooExecutionProvider")


def test_inputs_that_do_not_fit_name_the_input_and_shapes(exported):
    model, _, _, path, _ = exported
    with pytest.raises(BadInputError, match=r"input `x` expects shape \[\w+, 64\] .* got \[5, 32\]"):
        verify(path, model, torch.rand(5, 32), measure_runtime=False)
    with pytest.raises(BadInputError, match=r"the model takes 1 inputs \(x\), got 2"):
        verify(path, model, (torch.rand(5, 64), torch.rand(5, 64)), measure_runtime=False)


def test_external_data_outside_the_folder_or_missing_is_refused(exported, tmp_path):
    path = exported[3]
    proto = onnx.load(str(path), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../stolen.data"
    (tmp_path / "inner").mkdir()
    onnx.save(proto, str(tmp_path / "inner" / "evil.onnx"))
    shutil.copy(path.with_name("mlp.onnx.data"), tmp_path / "stolen.data")
    with pytest.raises(BadInputError, match="escapes the model's folder; refused"):
        make_session(tmp_path / "inner" / "evil.onnx")
    shutil.copy(path, tmp_path / "alone.onnx")
    with pytest.raises(BadInputError, match="the data file is missing"):
        make_session(tmp_path / "alone.onnx")


def test_results_round_trip_through_json(exported):
    model, original, _, path, report = exported
    result = verify(path, model, torch.rand(4, 64), original=original, runs=2)
    again = VerifyResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result and again.passed
    same = ExportReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert same == report and same.bound_bytes == report.bound_bytes


def test_verify_safetensors_is_bit_exact(tmp_path):
    model, cbs, _ = merged("tied_ae", 3, "channel")
    export_safetensors(model, cbs, tmp_path / "m.safetensors")
    good = verify_safetensors(tmp_path / "m.safetensors", model)
    assert good.passed and {c.name for c in good.checks} == {"enc.weight", "enc.bias", "dec_bias"}
    with torch.no_grad():
        model.dec_bias[0] += 1e-7
    bad = verify_safetensors(tmp_path / "m.safetensors", model)
    assert not bad.passed and [c.name for c in bad.checks if not c.ok] == ["dec_bias"]


# --- the commands -------------------------------------------------------------------------------------

def save_pt2(model, x, path):
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """A merged .pt2, another merged .pt2 that computes something else, and the exports of the first."""
    folder = tmp_path_factory.mktemp("cli")
    model, _, x = merged("tied_ae", 4)
    save_pt2(model, x, folder / "tied.pt2")
    other, _, _ = merged("tied_ae", 4)
    with torch.no_grad():
        other.enc.parametrizations.weight.original.mul_(1.5)
    save_pt2(other, x, folder / "other.pt2")
    torch.save({"version": 1, "calib_inputs": torch.rand(8, 64), "test_inputs": torch.rand(40, 64)},
               folder / "data.pt")
    result = CliRunner().invoke(cli, ["export", str(folder / "tied.pt2"), "--onnx", str(folder / "out" / "t.onnx"),
                                      "--safetensors", str(folder / "out" / "t.safetensors"),
                                      "--json", str(folder / "out" / "export.json")])
    assert result.exit_code == 0, result.output
    return folder, result


def test_export_command_writes_both_files_and_the_report(cli_files):
    folder, result = cli_files
    assert "wrote" in result.output and "enc.weight" in result.output
    reports = json.loads((folder / "out" / "export.json").read_text())
    assert reports["onnx"]["tensors"][0]["name"] == "enc.weight"
    assert reports["onnx"]["tensors"][0]["index_type"] == "UINT4"
    assert reports["safetensors"]["tensors"][0]["storage"] == "codebook"


def test_verify_command_exit_codes(cli_files):
    folder, _ = cli_files
    onnx_file, st_file = str(folder / "out" / "t.onnx"), str(folder / "out" / "t.safetensors")
    runner = CliRunner()
    ok = runner.invoke(cli, ["verify", onnx_file, "--reference", str(folder / "tied.pt2"), "--runs", "2",
                             "--data", str(folder / "data.pt"), "--original", str(folder / "other.pt2")])
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("✓ ") and "[40, 64]" in ok.output
    assert "keep_compressed" in ok.output and "mean cosine" in ok.output
    st = runner.invoke(cli, ["verify", st_file, "--reference", str(folder / "tied.pt2"), "--json", "-"])
    assert st.exit_code == 0, st.output
    assert json.loads(st.stdout)["passed"] is True
    bad = runner.invoke(cli, ["verify", onnx_file, "--reference", str(folder / "other.pt2"), "--runs", "2"])
    assert bad.exit_code == 1
    assert "✗ " in bad.output and "outputs differ from" in bad.output and "files are kept" in bad.output
    assert (folder / "out" / "t.onnx").exists()
    gpu = runner.invoke(cli, ["verify", onnx_file, "--reference", str(folder / "tied.pt2"), "--provider", "cuda"])
    assert gpu.exit_code == 2
    assert "onnxruntime-gpu" in gpu.output and "CPUExecutionProvider" in gpu.output


def test_export_command_refuses_a_model_that_is_not_merged(tmp_path):
    save_pt2(MLP().eval(), torch.rand(2, 64), tmp_path / "dense.pt2")
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "dense.pt2"), "--onnx", str(tmp_path / "d.onnx")])
    assert result.exit_code == 2
    assert "no merged (codebook) tensors; run `compress tie" in result.output
    assert not (tmp_path / "d.onnx").exists()


def test_sample_model_through_merge_export_and_verify(samples_dir, tmp_path):
    sample, data = samples_dir / "digits_mlp.pt2", samples_dir / "digits_data.pt"
    if not sample.exists() or not data.exists():
        pytest.skip(f"{sample.name} / {data.name} not built (python samples/train.py)")
    from compress.io import load, load_data
    from compress.tying import TieConfig, analyze, merge_

    original, loaded = load(sample).module, load(sample)
    cbs = merge_(loaded.module, analyze(loaded.module, TieConfig(bits=4)))
    report = export_onnx(loaded.module, cbs, tmp_path / "mlp.onnx", loaded.example_inputs)
    assert {e.name for e in report.tensors if e.storage == "codebook"} == set(cbs.tensors) != set()
    splits = load_data(data)
    result = verify(tmp_path / "mlp.onnx", loaded.module, splits.test_inputs, original=original,
                    targets=splits.test_targets, measure_runtime=False)
    assert result.passed
    assert result.original[0].top1_agreement >= 0.97
