"""Property: any merged model reads back bit for bit from its safetensors and ONNX files.

Hypothesis draws a conv + two-linear model of random small shapes and, per layer, bits 1..8 and a
granularity (tensor / channel / group of random size); the real pipeline (`analyze`, `merge_`)
merges it. Then:

- `load_safetensors` returns exactly the merged values (same dtype, same bits);
- the ONNX file's codebook and index initializers, decoded here with numpy alone (independently of
  the exporter's code), are exactly `codebook.decode()`;
- onnxruntime's output equals the merged torch model's within 1e-5.

An ONNX export costs about half a second whatever the model's size, so the ONNX property runs 12
models (36 merged tensors) and the safetensors property 50 (150 tensors).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper
from torch import nn

from compress.codebook import GRANULARITIES, TensorCodebook
from compress.export import export_onnx, export_safetensors, load_safetensors
from compress.tying import TieConfig, analyze, merge_

SIDE = 4  # input images are SIDE x SIDE
SETTINGS = {"deadline": None, "derandomize": True, "database": None,
            "suppress_health_check": [HealthCheck.too_slow]}


LAYERS = ("conv", "fc1", "fc2")


class ConvMlp(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, hidden: int, n_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)
        self.fc1 = nn.Linear(c_out * SIDE * SIDE, hidden)
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


@st.composite
def _settings(draw, rows: int, numel: int) -> dict:
    """bits (K never above the tensor's size) and a granularity for one weight with `rows` output rows."""
    bits = draw(st.integers(1, min(8, int(math.log2(numel)))))
    granularity = draw(st.sampled_from(GRANULARITIES))
    group_size = draw(st.integers(1, rows)) if granularity == "group" else None
    return {"bits": bits, "granularity": granularity, "group_size": group_size}


@st.composite
def merged_models(draw) -> tuple[ConvMlp, dict, torch.Tensor]:
    """A merged ConvMlp of random shapes and settings, its codebooks and an input batch."""
    c_in, c_out, kernel = draw(st.integers(1, 4)), draw(st.integers(2, 8)), draw(st.sampled_from([1, 3]))
    hidden, n_out = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = ConvMlp(c_in, c_out, kernel, hidden, n_out).eval()
    by_name = {}
    for layer in LAYERS:
        w = getattr(model, layer).weight
        by_name[f"{layer}.weight"] = draw(_settings(w.shape[0], w.numel()))
    codebooks = merge_(model, analyze(model, TieConfig(bits=8, min_elements=1, by_name=by_name)))
    assert sorted(codebooks.tensors) == [f"{layer}.weight" for layer in LAYERS]
    return model, codebooks, torch.rand(3, c_in, SIDE, SIDE)


def _merged_values(model: ConvMlp) -> dict[str, torch.Tensor]:
    return {f"{layer}.{attr}": getattr(getattr(model, layer), attr).detach()
            for layer in LAYERS for attr in ("weight", "bias")}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@settings(max_examples=50, **SETTINGS)
@given(merged_models())
def test_safetensors_reads_back_the_merged_values_bit_for_bit(case):
    model, codebooks, _ = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.safetensors"
        export_safetensors(model, codebooks, path)
        loaded = load_safetensors(path)
    expected = _merged_values(model)
    assert sorted(loaded) == sorted(expected)
    for name, value in expected.items():
        assert _same_bits(loaded[name], value), name


# --- an ONNX reader written from the format description alone --------------------------------------

def _lsb0_unpack(data: bytes, bits: int, n: int) -> np.ndarray:
    """Element i takes stream bits i*bits .. i*bits+bits-1, least significant first; stream bit j is
    bit j % 8 of byte j // 8 (the packing of ONNX UINT2/UINT4 and of compress's packed uint8)."""
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: n * bits]
    return (stream.reshape(n, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)


def _onnx_indices(index: TensorProto, cb: TensorCodebook) -> np.ndarray:
    n = cb.numel
    if index.data_type in (TensorProto.UINT2, TensorProto.UINT4):
        assert list(index.dims) == list(cb.shape)
        return _lsb0_unpack(index.raw_data, 2 if index.data_type == TensorProto.UINT2 else 4, n)
    raw = numpy_helper.to_array(index)
    if list(index.dims) == list(cb.shape):  # a native integer type: one index per element
        assert index.data_type in (TensorProto.UINT8, TensorProto.UINT16)
        return raw.reshape(-1).astype(np.int64)
    assert index.data_type == TensorProto.UINT8  # packed at the codebook's bit width
    return _lsb0_unpack(raw.tobytes(), cb.bits, n)


def _numpy_decode(codebook: TensorProto, index: TensorProto, cb: TensorCodebook) -> np.ndarray:
    table = numpy_helper.to_array(codebook).reshape(-1)
    idx = _onnx_indices(index, cb).reshape(cb.shape[0], -1)
    rows = np.arange(cb.shape[0])
    group = {"tensor": rows * 0, "channel": rows, "group": rows // (cb.group_size or 1)}[cb.granularity]
    return table[idx + group[:, None] * cb.k].reshape(cb.shape)


@pytest.mark.slow
@settings(max_examples=12, **SETTINGS)
@given(merged_models())
def test_onnx_stores_exactly_the_codebooks_and_runs_like_the_merged_model(case):
    model, codebooks, x = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.onnx"
        report = export_onnx(model, codebooks, path, x)
        proto = onnx.load(str(path))
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {proto.graph.input[0].name: x.numpy()})[0]
    inits = {t.name: t for t in proto.graph.initializer}
    for name, cb in codebooks.tensors.items():
        assert report.entry(name).storage == "codebook", report.entry(name).note
        decoded = _numpy_decode(inits[f"{name}.codebook"], inits[f"{name}.index"], cb)
        assert np.array_equal(decoded.view(np.uint32), cb.decode().numpy().view(np.uint32)), name
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
