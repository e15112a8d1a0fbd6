"""ORT format: the converted file keeps codebooks and indices (no dense weights), loads in onnxruntime and
computes what the ONNX file computes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from cli.main import cli
from compress.errors import BadInputError
from compress.export.ort import export_ort
from compress.io import load, load_data
from compress.pipeline import ExportOptions, export_file, tie
from compress.tying import TieConfig
from tests.helpers import SAMPLES


@pytest.fixture(scope="module")
def tied_cnn(tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn")
    result = tie(load(SAMPLES / "digits_cnn.pt2"), TieConfig(bits=4), out_dir=out,
                 export=ExportOptions(safetensors=False, verify=False))
    return result, out / "digits_cnn.onnx"


def _run(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_the_ort_file_runs_like_the_onnx_file_and_stays_compressed(tied_cnn, tmp_path):
    _, onnx_path = tied_cnn
    report = export_ort(onnx_path, tmp_path / "cnn.ort")
    x = load_data(SAMPLES / "digits_data.pt").test_inputs[:32].numpy()
    want = _run(onnx_path, x)
    assert np.abs(_run(tmp_path / "cnn.ort", x) - want).max() <= 1e-5 * np.abs(want).max()
    weights = 9_930 * 4  # the CNN's fp32 parameters: a dense .ort could not be smaller than them
    assert report.file_bytes == (tmp_path / "cnn.ort").stat().st_size < weights
    assert report.notes and all("packed uint8" in n and "no 4-bit type" in n for n in report.notes)


def test_export_file_converts_a_merged_program_or_a_codebook_onnx(tied_cnn, tmp_path):
    result, onnx_path = tied_cnn
    from_pt2 = export_file(result.model_path, ort=tmp_path / "a.ort")
    assert list(from_pt2) == ["ort"] and (tmp_path / "a.ort").exists()
    from_onnx = export_file(onnx_path, ort=tmp_path / "b.ort")
    assert from_onnx["ort"].file_bytes == (tmp_path / "b.ort").stat().st_size
    with pytest.raises(BadInputError, match="an ONNX file can only be converted to ORT format"):
        export_file(onnx_path, onnx=tmp_path / "c.onnx")


def test_cli_export_ort_writes_the_file_and_names_the_fallback(tied_cnn, tmp_path):
    _, onnx_path = tied_cnn
    result = CliRunner().invoke(cli, ["export", str(onnx_path), "--ort", str(tmp_path / "m.ort")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.ort").exists() and "no 4-bit type" in result.output
    again = CliRunner().invoke(cli, ["export", str(onnx_path), "--ort", str(tmp_path / "m.ort")])
    assert again.exit_code == 2 and "already exists; pass --force" in again.output
