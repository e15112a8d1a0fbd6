"""ONNX export with codebook storage: exact decode in onnxruntime, narrow index types, ties stored once,
deduplication, size against the bound, and refusals."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from compress.codebook import Alias, Codebooks
from compress.errors import BadInputError
from compress.export import codebooks_from_state_dict, export_onnx
from compress.packing import pack_bits, packed_size, unpack_bits
from tests.helpers.export_models import Wide, declared_tie, merged, quantize_

INDEX_TYPE = {1: TensorProto.UINT2, 2: TensorProto.UINT2, 3: TensorProto.UINT4, 4: TensorProto.UINT4,
              8: TensorProto.UINT8}


def run_onnx(path, *inputs) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})


def initializers(path) -> dict[str, TensorProto]:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


def max_error(model, path, x) -> float:
    with torch.no_grad():
        want = model(x).numpy()
    return float(np.abs(run_onnx(path, x)[0] - want).max())


# Every model kind and every bit width, without exporting all 25 pairs (an export takes 1-2 s).
CASES = [("mlp", 1), ("mlp", 2), ("mlp", 8), ("conv", 3), ("tied_ae", 4), ("gru_like", 2),
         ("tied_emb_head", 1), ("tied_emb_head", 4)]
TIED = {"tied_ae": "enc.weight", "tied_emb_head": "emb.weight"}


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "bits"), CASES, ids=[f"{k}-{b}bit" for k, b in CASES])
def test_export_matches_merged_model(tmp_path, kind, bits):
    model, cbs, x = merged(kind, bits)
    path = tmp_path / "m.onnx"
    report = export_onnx(model, cbs, path, x)
    onnx.checker.check_model(str(path), full_check=True)
    assert max_error(model, path, x) <= 1e-4
    assert max_error(model, path, torch.cat([x, x, x])) <= 1e-4  # the batch dimension is dynamic
    inits = initializers(path)
    for name, cb in cbs.tensors.items():
        entry = report.entry(name)
        assert entry.storage == "codebook"
        index = inits[f"{name}.index"]
        assert index.data_type == INDEX_TYPE[bits], entry.index_type
        assert list(index.dims) == list(cb.shape)
        assert numpy_helper.to_array(inits[f"{name}.codebook"]).size == cb.codebook.numel()
    # no dense copy of any merged weight is left: float initializers are the biases only
    dense = [t for t in inits.values() if t.data_type == TensorProto.FLOAT and not t.name.endswith(".codebook")]
    assert all(math.prod(t.dims) < min(cb.numel for cb in cbs.tensors.values()) for t in dense)
    assert report.file_bytes == path.stat().st_size
    if kind in TIED:  # one parameter used twice (once transposed): one codebook, one index
        stored = [n for n in inits if n.startswith(TIED[kind])]
        assert sorted(stored) == [f"{TIED[kind]}.codebook", f"{TIED[kind]}.index"]


def test_declared_alias_reads_its_target(tmp_path):
    model, cbs, x = declared_tie(bits=4)
    report = export_onnx(model, cbs, tmp_path / "m.onnx", x)
    assert max_error(model, tmp_path / "m.onnx", x) <= 1e-4
    inits = initializers(tmp_path / "m.onnx")
    assert not any(t.data_type == TensorProto.FLOAT and math.prod(t.dims) == 96 * 24 for t in inits.values())
    assert report.entry("head.weight").storage == "alias"


def test_merge_pipeline_transposed_tie(tmp_path):
    """A tie found by `analyze` and made by `merge_` (dec.weight = enc.weight.t()) exports as one tensor."""
    from compress.tying import TieConfig, analyze, merge_

    class TwoWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = nn.Linear(64, 48), nn.Linear(48, 64)
            with torch.no_grad():
                self.dec.weight.copy_(self.enc.weight.t())

        def forward(self, x):
            return self.dec(torch.relu(self.enc(x)))

    model = TwoWeights().eval()
    cbs = merge_(model, analyze(model, TieConfig(bits=4)))
    assert cbs.aliases["dec.weight"].transpose
    x = torch.rand(4, 64)
    export_onnx(model, cbs, tmp_path / "m.onnx", x)
    assert max_error(model, tmp_path / "m.onnx", x) <= 1e-4
    floats = [t for t in initializers(tmp_path / "m.onnx").values() if math.prod(t.dims) == 48 * 64]
    assert [t.name for t in floats] == ["enc.weight.index"]


def test_pt2_round_trip_without_codebooks_file(tmp_path):
    """A merged .pt2 loses the parametrization objects; the codebooks are recovered from its names."""
    model, cbs, x = merged("conv", 4, "channel")
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2")
    recovered = codebooks_from_state_dict(loaded.module())
    assert sorted(recovered.tensors) == sorted(cbs.tensors)
    for name, cb in cbs.tensors.items():
        assert recovered.tensors[name].granularity == "channel"
        assert torch.equal(recovered.tensors[name].decode(), cb.decode())
    report = export_onnx(loaded, recovered, tmp_path / "m.onnx", (x,))
    assert all(report.entry(n).storage == "codebook" for n in cbs.tensors)
    assert max_error(model, tmp_path / "m.onnx", torch.cat([x, x])) <= 1e-4


def test_group_granularity_recovery_checks_consistency():
    state = {"fc.parametrizations.weight.original": torch.zeros(3, 4),
             "fc.parametrizations.weight.0.index": torch.zeros(10, 2, dtype=torch.uint8)}
    assert codebooks_from_state_dict(state).tensors["fc.weight"].group_size == 4
    state["fc.parametrizations.weight.original"] = torch.zeros(7, 4)  # 7 groups of 10 rows: impossible
    with pytest.raises(BadInputError, match="does not fit 10 output channels"):
        codebooks_from_state_dict(state)


# --- size against the bound ------------------------------------------------------------------------

def independent_bound(model: nn.Module, cbs: Codebooks, codebook_bytes: int = 4) -> int:
    """ceil(n * bits / 8) + codebook bytes per merged tensor, plus every dense parameter."""
    merged_bytes = sum(packed_size(cb.numel, cb.bits) + cb.codebook.numel() * codebook_bytes
                       for cb in cbs.tensors.values())
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if ".parametrizations." not in n)
    return merged_bytes + dense


WIDE = [(1, "packed1", "tensor", None), (3, "packed3", "channel", None), (5, "packed5", "group", 100)]


@pytest.mark.parametrize(("bits", "label", "granularity", "group_size"), WIDE,
                         ids=[f"{b}bit-{lab}-{g}" for b, lab, g, _ in WIDE])
@pytest.mark.slow
def test_big_layer_file_is_near_its_bound(tmp_path, bits, label, granularity, group_size):
    torch.manual_seed(1)
    model = Wide(253, 999).eval()  # 252,747 weights: not a multiple of 8, so the unpack slices
    cbs = quantize_(model, bits, granularity, group_size)
    x = torch.rand(3, 253)
    report = export_onnx(model, cbs, tmp_path / "m.onnx", x)
    assert report.entry("fc.weight").index_type == label
    assert max_error(model, tmp_path / "m.onnx", x) <= 1e-4
    bound = independent_bound(model, cbs)
    graph = 3000  # the nodes of one linear layer and its decode
    assert report.file_bytes <= 1.01 * bound + graph, (report.file_bytes, bound)
    assert report.bound_bytes <= 1.01 * bound + graph


@pytest.mark.slow
def test_four_bit_file_is_an_eighth_of_fp32(tmp_path):
    torch.manual_seed(2)
    model = Wide(256, 1024).eval()
    x = torch.rand(2, 256)
    torch.onnx.export(model, (x,), str(tmp_path / "fp32.onnx"), dynamo=True, external_data=False, verbose=False)
    cbs = quantize_(model, 4)
    report = export_onnx(model, cbs, tmp_path / "q.onnx", x)
    fp32 = (tmp_path / "fp32.onnx").stat().st_size
    assert report.file_bytes <= 0.135 * fp32, report.file_bytes / fp32
    assert report.file_bytes <= 1.02 * independent_bound(model, cbs)


def test_float16_codebook_adds_a_cast(tmp_path):
    model, cbs, x = merged("mlp", 4)
    report = export_onnx(model, cbs, tmp_path / "m.onnx", x, codebook_dtype="float16")
    inits = initializers(tmp_path / "m.onnx")
    assert inits["fc1.weight.codebook"].data_type == TensorProto.FLOAT16
    assert "float16" in report.entry("fc1.weight").note
    rounded = {n: cb.codebook.half().float() for n, cb in cbs.tensors.items()}
    for name, cb in cbs.tensors.items():
        cb.codebook = rounded[name]
    with torch.no_grad():
        for name, cb in cbs.tensors.items():
            module = model.get_submodule(name.rpartition(".")[0])
            module.parametrizations.weight.original.copy_(cb.codebook)
    assert max_error(model, tmp_path / "m.onnx", x) <= 1e-5


# --- deduplication -----------------------------------------------------------------------------------

class TwinHeads(nn.Module):
    """Two dense layers with identical weights (not tied: separate parameters), one transposed copy."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 32, bias=False), nn.Linear(64, 32, bias=False)
        self.c = nn.Linear(32, 64, bias=False)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)
            self.c.weight.copy_(self.a.weight.t())

    def forward(self, x):
        return self.c(self.a(x) + self.b(x))


@pytest.mark.slow
def test_dedup_stores_identical_initializers_once(tmp_path):
    model = TwinHeads().eval()
    x = torch.rand(3, 64)
    on = export_onnx(model, Codebooks(), tmp_path / "on.onnx", x)
    off = export_onnx(model, Codebooks(), tmp_path / "off.onnx", x, dedup=False)
    weight_bytes = 64 * 32 * 4
    assert on.dedup_count == 2 and on.dedup_saved_bytes == 2 * weight_bytes
    assert off.dedup_count == 0 and off.file_bytes - on.file_bytes >= 2 * weight_bytes - 200
    for path in (tmp_path / "on.onnx", tmp_path / "off.onnx"):
        assert max_error(model, path, x) <= 1e-5
    floats = [t for t in initializers(tmp_path / "on.onnx").values() if t.data_type == TensorProto.FLOAT]
    assert len(floats) == 1


def test_declared_dense_tie_is_stored_once_even_without_dedup(tmp_path):
    model = TwinHeads().eval()
    cbs = Codebooks(aliases={"c.weight": Alias("c.weight", "a.weight", transpose=True),
                             "b.weight": Alias("b.weight", "a.weight")})
    x = torch.rand(3, 64)
    report = export_onnx(model, cbs, tmp_path / "m.onnx", x, dedup=False)
    assert report.dedup_count == 0
    assert [t.name for t in initializers(tmp_path / "m.onnx").values()] == ["a.weight"]
    assert max_error(model, tmp_path / "m.onnx", x) <= 1e-5


def test_merged_weight_concatenated_with_a_dense_one_keeps_its_codebook(tmp_path):
    class Concat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 160), nn.Linear(64, 160)

        def forward(self, x):
            return x @ torch.cat([self.a.weight, self.b.weight]).t()

    model = Concat().eval()
    cbs = quantize_(model, 4, names=["a.weight"])
    x = torch.rand(3, 64)
    report = export_onnx(model, cbs, tmp_path / "m.onnx", x)
    assert max_error(model, tmp_path / "m.onnx", x) <= 1e-5
    assert report.entry("a.weight").storage == "codebook" and not report.losses()
    sizes = sorted(math.prod(t.dims) for t in initializers(tmp_path / "m.onnx").values()
                   if t.data_type == TensorProto.FLOAT)
    assert sizes[-1] == 160 * 64 and sizes[-2] < 160 * 64  # b.weight dense, a.weight only as a codebook


def test_a_merged_tensor_the_exporter_folds_away_is_counted_dense_with_the_bytes_lost(tmp_path):
    """A codebook for a plain parameter (no decode to trace) that the exporter folds into a constant."""
    class Concat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 24), nn.Linear(16, 24)

        def forward(self, x):
            return x @ torch.cat([self.a.weight, self.b.weight]).t()

    from tests.helpers.export_models import cluster

    model = Concat().eval()
    cb = cluster("a.weight", model.a.weight, 4)
    with torch.no_grad():
        model.a.weight.copy_(cb.decode())
    report = export_onnx(model, Codebooks(tensors={"a.weight": cb}), tmp_path / "m.onnx", torch.rand(3, 16))
    assert max_error(model, tmp_path / "m.onnx", torch.rand(3, 16)) <= 1e-5
    [loss] = report.losses()
    assert (loss.name, loss.kind) == ("a.weight", "dense")
    assert loss.bytes == 24 * 16 * 4 - (packed_size(24 * 16, 4) + 16 * 4)
    assert any(n.startswith("`a.weight` is stored dense, not as codebook + indices in m.onnx: 1,280 bytes more")
               for n in report.notes)


# --- files and refusals ------------------------------------------------------------------------------

def test_external_data_is_written_next_to_the_model(tmp_path):
    model, cbs, x = merged("mlp", 8)
    report = export_onnx(model, cbs, tmp_path / "m.onnx", x, external_data=True)
    data = tmp_path / "m.onnx.data"
    assert data.exists() and report.files == [str(tmp_path / "m.onnx"), str(data)]
    assert report.file_bytes == (tmp_path / "m.onnx").stat().st_size + data.stat().st_size
    locations = {e.value for t in onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {"m.onnx.data"}
    assert max_error(model, tmp_path / "m.onnx", x) <= 1e-4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".compress-tmp-")]


def test_refuses_to_overwrite_without_force(tmp_path):
    model, cbs, x = merged("mlp", 4)
    (tmp_path / "m.onnx").write_bytes(b"keep")
    with pytest.raises(BadInputError, match="already exists; pass force=True"):
        export_onnx(model, cbs, tmp_path / "m.onnx", x)
    assert (tmp_path / "m.onnx").read_bytes() == b"keep"
    export_onnx(model, cbs, tmp_path / "m.onnx", x, force=True)
    assert max_error(model, tmp_path / "m.onnx", x) <= 1e-4


def test_rejects_bad_codebooks_and_options(tmp_path):
    model, cbs, x = merged("mlp", 4)
    with pytest.raises(BadInputError, match="codebook dtype 'int8' is not supported"):
        export_onnx(model, cbs, tmp_path / "m.onnx", x, codebook_dtype="int8")
    cbs.tensors["fc1.weight"].indices[0, 0] = 16
    with pytest.raises(BadInputError, match=r"`fc1.weight`: indices must lie in 0..15"):
        export_onnx(model, cbs, tmp_path / "m.onnx", x)
    assert not (tmp_path / "m.onnx").exists()


# --- bit packing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 9, 12, 16])
def test_pack_round_trip(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 1 << bits, size=1001)
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_size(1001, bits)
    assert np.array_equal(unpack_bits(packed, bits, 1001), values)


def test_packing_order_is_lsb_first():
    assert pack_bits(np.array([1, 2, 3, 0]), 2).tolist() == [0b00_11_10_01]
    assert pack_bits(np.array([5, 3, 7]), 3).tolist() == [0b11_011_101, 0b1]
