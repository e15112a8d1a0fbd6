"""The committed sample models and data in samples/: they load, run any batch size, reach the
numbers samples/README.md states, share parameters where they claim to, and can be retrained."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import SAMPLES

CLASSIFIERS = ["digits_mlp", "digits_cnn", "digits_gru"]
ALL = CLASSIFIERS + ["digits_autoencoder"]
DATA_KEYS = {"version", "calib_inputs", "calib_targets", "test_inputs", "test_targets"}


def _load_train_script():
    # samples/ is not a package: load train.py by path (registered so its dataclasses resolve).
    spec = importlib.util.spec_from_file_location("_samples_train", SAMPLES / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


train = _load_train_script()


@pytest.fixture(scope="module")
def data() -> dict:
    return torch.load(SAMPLES / "digits_data.pt", weights_only=True)


@pytest.fixture(scope="module")
def stated() -> dict[str, float]:
    """The held-out accuracy (%) or MSE that samples/README.md states for each sample."""
    row = re.compile(r"^\| `(\w+)\.pt2` \| [\d,]+ \| (MSE )?([\d.]+)%? \|", re.MULTILINE)
    rows = row.findall((SAMPLES / "README.md").read_text())
    return {name: float(value) for name, _, value in rows}


@pytest.fixture(scope="module")
def programs() -> dict[str, torch.export.ExportedProgram]:
    return {name: torch.export.load(SAMPLES / f"{name}.pt2") for name in ALL}


def test_readme_states_every_committed_sample(stated):
    assert sorted(stated) == sorted(p.stem for p in SAMPLES.glob("*.pt2")) == sorted(ALL)


@pytest.mark.parametrize("name", ALL)
def test_program_runs_batch_1_and_7(programs, data, name):
    program = programs[name]
    (example,), _ = program.example_inputs
    assert example.dtype == torch.float32 and example.shape[1:] == (64,)
    model = program.module()
    x = data["test_inputs"][:7]
    with torch.no_grad():
        full = model(x)
        one = model(x[:1])
    assert full.shape == (7, 64 if name == "digits_autoencoder" else 10)
    torch.testing.assert_close(one, full[:1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_reaches_stated_accuracy(programs, data, stated, name):
    acc = train.accuracy(programs[name].module(), data["test_inputs"], data["test_targets"])
    assert abs(acc - stated[name]) <= 0.1, f"{name}: {acc:.2f}% on the test split; README: {stated[name]}%"
    assert acc >= {"digits_mlp": 96.5, "digits_cnn": 97.0, "digits_gru": 96.5}[name]


def test_autoencoder_reaches_stated_mse(programs, data, stated):
    mse = train.reconstruction_mse(programs["digits_autoencoder"].module(), data["test_inputs"])
    assert mse == pytest.approx(stated["digits_autoencoder"], abs=1e-5)
    mean_image = data["calib_inputs"].mean(0).expand_as(data["test_inputs"])
    assert mse < 0.1 * F.mse_loss(mean_image, data["test_inputs"]).item()


def test_autoencoder_has_one_weight_matrix_shared_by_encoder_and_decoder(programs, data):
    program = programs["digits_autoencoder"]
    assert set(program.graph_signature.parameters) == {"encoder.weight", "encoder.bias", "decoder_bias"}
    params = dict(program.module().named_parameters())
    assert [n for n, p in params.items() if p.dim() == 2] == ["encoder.weight"]
    w, b, db = params["encoder.weight"], params["encoder.bias"], params["decoder_bias"]
    assert w.shape == (32, 64)
    x = data["test_inputs"][:16]
    with torch.no_grad():
        by_hand = torch.sigmoid(F.linear(torch.sigmoid(F.linear(x, w, b)), w.t(), db))
        torch.testing.assert_close(program.module()(x), by_hand, rtol=0, atol=1e-6)


def test_gru_uses_one_weight_set_for_all_8_rows(programs):
    program = programs["digits_gru"]
    assert set(program.graph_signature.parameters) == {
        "cell.weight_ih", "cell.weight_hh", "cell.bias_ih", "cell.bias_hh", "fc.weight", "fc.bias"}
    cells = [n for n in program.graph.nodes if n.target is torch.ops.aten.gru_cell.default]
    assert len(cells) == 8
    assert len({tuple(a.name for a in n.args[2:]) for n in cells}) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_program_exports_to_onnx_and_matches_in_onnxruntime(programs, name):
    assert train.onnx_max_error(programs[name], batches=(1, 7)) <= 1e-4


def test_data_file_has_documented_keys_shapes_and_dtypes(data):
    assert set(data) == DATA_KEYS and data["version"] == 1
    for split, n in (("calib", 1257), ("test", 540)):
        inputs, targets = data[f"{split}_inputs"], data[f"{split}_targets"]
        assert inputs.dtype == torch.float32 and inputs.shape == (n, 64)
        assert targets.dtype == torch.int64 and targets.shape == (n,)
        assert 0 <= inputs.min() and inputs.max() <= 1
        assert set(targets.tolist()) == set(range(10))


def test_data_file_is_a_disjoint_split_of_the_digits(data):
    calib, test = train.split_indices()
    assert set(calib.tolist()).isdisjoint(test.tolist())
    assert sorted(calib.tolist() + test.tolist()) == list(range(1797))
    fresh = train.load_digits_splits()
    for key in DATA_KEYS - {"version"}:
        assert torch.equal(data[key], fresh[key]), f"{key} is not the split split_indices() describes"


def test_retraining_the_mlp_reaches_stated_accuracy(data, stated):
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    model, acc = train.train_mlp(seed=0, data=data)
    assert abs(acc - stated["digits_mlp"]) <= 0.5
    assert acc == train.accuracy(model, data["test_inputs"], data["test_targets"])
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, det)


def test_update_readme_rewrites_only_the_results_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin -->\nold\n<!-- results:end -->\noutro\n")
    result = train.SampleResult("digits_mlp", 50610, 97.4074, 1.0, 2048, 3e-6)
    train.update_readme([result], readme)
    text = readme.read_text()
    assert text.startswith("intro\n<!-- results:begin -->\n| file |")
    assert text.endswith("<!-- results:end -->\noutro\n")
    assert "| `digits_mlp.pt2` | 50,610 | 97.41% | 2 KiB | 3.0e-06 |" in text and "old" not in text


def test_update_readme_refuses_a_readme_without_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(RuntimeError, match="no '<!-- results:begin -->'"):
        train.update_readme([], readme)
    assert readme.read_text() == "no markers here\n"
