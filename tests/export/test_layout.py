"""What the graph does to a decoded weight stays on its indices: layout ops (an LSTM's gate reordering, a
transposed or concatenated weight) run on the flat index, per-channel codebooks included; BatchNorm after a
decoded convolution becomes a per-channel scale after the decode; the decode builder is the only source of
decode nodes."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compress.auditing.onnx import audit_onnx
from compress.export import export_onnx
from tests.helpers.export_models import quantize_


def ort_vs_torch(model: nn.Module, path, *inputs: torch.Tensor) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})[0]
    with torch.no_grad():
        want = model(*inputs).numpy()
    return float(np.abs(got - want).max() / np.abs(want).max())


def reorderings_on_indices(proto: onnx.ModelProto) -> set[str]:
    """The reordering ops (Transpose, Slice, ...) run between the stored indices and the codebook lookups."""
    from compress.export._decode import DECODE_NODE

    producer = {o: n for n in proto.graph.node for o in n.output}
    ops, stack = set(), [n.input[1] for n in proto.graph.node if n.name.startswith(DECODE_NODE)]
    while stack:
        node = producer.get(stack.pop())
        if node is not None:
            ops.add(node.op_type)
            stack.extend(node.input)
    return ops & {"Transpose", "Slice", "Expand", "Tile", "Split"}


class Recurrent(nn.Module):
    def __init__(self, cell=nn.LSTM):
        super().__init__()
        self.emb = nn.Embedding(50, 24)
        self.rnn = cell(24, 40, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(80, 50)

    def forward(self, ids):
        return self.head(self.rnn(self.emb(ids))[0])


# every granularity once, each cell once (an export of a 2-layer bidirectional RNN takes a few seconds)
CASES = [(nn.LSTM, "tensor", None), (nn.LSTM, "group", 7), (nn.GRU, "channel", None)]


@pytest.mark.slow
@pytest.mark.parametrize(("cell", "granularity", "group_size"), CASES, ids=["lstm-tensor", "lstm-group", "gru-channel"])
def test_recurrent_gate_reordering_runs_on_the_indices(tmp_path, cell, granularity, group_size):
    torch.manual_seed(0)
    model = Recurrent(cell).eval()
    cbs = quantize_(model, 4, granularity, group_size)
    ids = torch.randint(0, 50, (3, 6))
    report = export_onnx(model, cbs, tmp_path / "m.onnx", ids)
    assert ort_vs_torch(model, tmp_path / "m.onnx", ids) <= 1e-5
    assert report.losses() == []
    storage = audit_onnx(onnx.load(str(tmp_path / "m.onnx")))
    for name, cb in cbs.tensors.items():  # each index stored once, 4 bits, in the layout the graph reads
        index = storage.of(f"{name}.index")
        assert (index.storage, index.bits, index.bytes) == ("index", 4.0, math.ceil(cb.numel / 2))
        rows, cols = cb.shape[0], math.prod(cb.shape[1:])  # a looked-up embedding: uint8 rows of packed indices
        row_lookup = name == "emb.weight"
        assert index.dtype == ("uint8" if row_lookup else "uint4")
        assert math.prod(index.shape) == (rows * cols // 2 if row_lookup else cb.numel)
    if granularity == "tensor":  # the gates were reordered in the stored indices: no reordering runs on them
        assert reorderings_on_indices(onnx.load(str(tmp_path / "m.onnx"))) == set()
    assert "Slice, Concat" in report.entry("rnn.weight_ih_l0").note  # the gates, reordered on the indices
    largest_dense = max(math.prod(i.shape) for i in storage.initializers if i.storage == "dense")
    assert largest_dense < min(cb.numel for cb in cbs.tensors.values())


class ConvBN(nn.Module):
    def __init__(self, transpose: bool):
        super().__init__()
        conv = nn.ConvTranspose2d if transpose else nn.Conv2d
        self.a, self.bn_a = conv(8, 32, 3, bias=False), nn.BatchNorm2d(32)
        self.b, self.bn_b = conv(32, 16, 3), nn.BatchNorm2d(16)
        with torch.no_grad():
            for bn in (self.bn_a, self.bn_b):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 2)
                bn.bias.uniform_(-1, 1)

    def forward(self, x):
        return self.bn_b(self.b(torch.relu(self.bn_a(self.a(x)))))


@pytest.mark.slow
@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "conv_transpose"])
def test_batchnorm_after_a_decoded_convolution_is_a_scale_after_the_decode(tmp_path, transpose):
    model = ConvBN(transpose).eval()
    cbs = quantize_(model, 4, names=["a.weight", "b.weight"])
    x = torch.rand(2, 8, 9, 9)
    report = export_onnx(model, cbs, tmp_path / "m.onnx", x)
    assert ort_vs_torch(model, tmp_path / "m.onnx", x) <= 1e-5
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert "BatchNorm folded into a per-channel scale after the decode" in report.entry("a.weight").note
    storage = audit_onnx(onnx.load(str(tmp_path / "m.onnx")))
    dense = {i.name: i.shape for i in storage.initializers if i.storage == "dense"}
    assert all(math.prod(shape) <= 32 for shape in dense.values()), dense  # vectors of the channel count


@pytest.mark.slow
def test_weights_concatenated_from_two_codebooks_gather_from_both(tmp_path):
    class Stacked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(32, 48, bias=False), nn.Linear(32, 40, bias=False)

        def forward(self, x):
            return x @ torch.cat([self.a.weight, self.b.weight.flip(0)]).t()

    model = Stacked().eval()
    cbs = quantize_(model, 3, "channel")
    x = torch.rand(4, 32)
    export_onnx(model, cbs, tmp_path / "m.onnx", x)
    assert ort_vs_torch(model, tmp_path / "m.onnx", x) <= 1e-5
    storage = audit_onnx(onnx.load(str(tmp_path / "m.onnx")))
    [decoded] = [d for d in storage.decoded if len(d.codebooks) == 2]
    assert decoded.codebooks == ["a.weight.codebook", "b.weight.codebook"] and decoded.k == (48 + 40) * 8


@pytest.mark.slow
def test_every_decode_node_comes_from_the_decode_builder(tmp_path, monkeypatch):
    """One place builds decodes (`_decode.Decoder`): the graph's Gathers from codebooks are all its own."""
    from compress.export import _decode

    built = []
    gather = _decode.Decoder.gather

    def recording(table, index, out):
        built.append(out)
        return gather(table, index, out)

    monkeypatch.setattr(_decode.Decoder, "gather", staticmethod(recording))
    torch.manual_seed(0)
    model = Recurrent().eval()
    cbs = quantize_(model, 4)
    export_onnx(model, cbs, tmp_path / "m.onnx", torch.randint(0, 50, (2, 5)))
    proto = onnx.load(str(tmp_path / "m.onnx"))
    producer = {o: n for n in proto.graph.node for o in n.output}
    decoders = [producer[d.value].name for d in audit_onnx(proto).decoded]  # rewritten later, names kept
    assert sorted(n.removeprefix(f"{_decode.DECODE_NODE}:").split("|")[0] for n in decoders) == sorted(built)


def test_the_onnx_audit_tells_dense_from_decoded_in_any_file(tmp_path):
    """A plain fp32 export: every weight dense, nothing decoded; shape constants are constants."""
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    torch.onnx.export(model, (torch.rand(2, 16),), str(tmp_path / "fp32.onnx"), dynamo=True, verbose=False)
    storage = audit_onnx(onnx.load(str(tmp_path / "fp32.onnx")))
    assert storage.decoded == [] and storage.codebook_bytes == storage.index_bytes == 0
    assert {i.name: i.storage for i in storage.initializers if i.dtype == "float32"} == {
        "0.weight": "dense", "0.bias": "dense", "2.weight": "dense", "2.bias": "dense"}
    assert storage.dense_bytes == (16 * 8 + 8 + 8 * 4 + 4) * 4
    assert all(i.storage == "constant" for i in storage.initializers if i.dtype == "int64")
