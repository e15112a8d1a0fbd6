"""safetensors export: bit-exact round trip, re-tied aliases, packed indices near the bound, metadata any
reader can open, and clear errors for files it cannot rebuild."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compress.errors import BadInputError
from compress.export import codebooks_from_state_dict, export_safetensors, load_safetensors
from compress.packing import unpack_bits
from compress.verify import effective_tensors, verify_safetensors
from tests.helpers.export_models import Wide, declared_tie, merged, quantize_


def assert_bit_exact(loaded: dict, model: nn.Module) -> None:
    want = effective_tensors(model)
    assert set(want) <= set(loaded)
    for name, ref in want.items():
        got = loaded[name]
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        assert torch.equal(got.contiguous().view(torch.uint8), ref.contiguous().view(torch.uint8)), name


CASES = [("mlp", 1, "tensor"), ("conv", 3, "channel"), ("tied_ae", 5, "tensor"), ("gru_like", 8, "group"),
         ("tied_emb_head", 2, "tensor"), ("mlp", 9, "channel")]


@pytest.mark.parametrize(("kind", "bits", "granularity"), CASES, ids=[f"{k}-{b}bit-{g}" for k, b, g in CASES])
def test_round_trip_is_bit_exact(tmp_path, kind, bits, granularity):
    model, cbs, _ = merged(kind, bits, granularity, group_size=5 if granularity == "group" else None)
    report = export_safetensors(model, cbs, tmp_path / "m.safetensors")
    loaded = load_safetensors(tmp_path / "m.safetensors")
    assert_bit_exact(loaded, model)
    for name, cb in cbs.tensors.items():
        entry = report.entry(name)
        assert entry.storage == "codebook" and entry.bits == bits
        assert entry.actual_bytes == math.ceil(cb.numel * bits / 8) + cb.codebook.numel() * 4


def test_any_reader_opens_it_and_metadata_says_how_to_rebuild(tmp_path):
    model, cbs, _ = merged("mlp", 3, "channel")
    export_safetensors(model, cbs, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="np") as f:
        meta = f.metadata()
        recipe = json.loads(meta["compress.tensors"])["fc1.weight"]
        assert meta["compress.format_version"] == "1"
        assert recipe == {"codebook": "fc1.weight.codebook", "indices": "fc1.weight.indices", "bits": 3, "k": 8,
                          "packing": "lsb0", "shape": [48, 64], "dtype": "float32", "granularity": "channel",
                          "group_size": None}
        packed = f.get_tensor("fc1.weight.indices")
        assert packed.dtype == np.uint8 and packed.shape == (math.ceil(48 * 64 * 3 / 8),)
        indices = unpack_bits(packed, 3, 48 * 64).reshape(48, 64)
        assert np.array_equal(indices, cbs.tensors["fc1.weight"].indices.numpy())
        assert set(f.keys()) == {"fc1.weight.codebook", "fc1.weight.indices", "fc2.weight.codebook",
                                 "fc2.weight.indices", "fc1.bias", "fc2.bias"}


def test_declared_alias_is_stored_once_and_re_tied(tmp_path):
    model, cbs, _ = declared_tie(bits=4)
    report = export_safetensors(model, cbs, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert "head.weight" not in set(f.keys())
    loaded = load_safetensors(tmp_path / "m.safetensors")
    assert loaded["head.weight"] is loaded["emb.weight"]
    assert report.entry("head.weight").storage == "alias"
    assert_bit_exact(loaded, model)


def test_transposed_tie_from_merge_loads_as_a_view(tmp_path):
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
    export_safetensors(model, cbs, tmp_path / "m.safetensors")
    loaded = load_safetensors(tmp_path / "m.safetensors")
    assert loaded["dec.weight"].shape == (64, 48)
    assert loaded["dec.weight"].data_ptr() == loaded["enc.weight"].data_ptr()  # a view, not a copy
    assert torch.equal(loaded["dec.weight"], model.dec.weight)
    # a saved .pt2 keeps no parametrization objects; its graph still records the Transpose step
    torch.export.save(torch.export.export(model, (torch.rand(2, 64),)), tmp_path / "m.pt2")
    module = torch.export.load(tmp_path / "m.pt2").module()
    recovered = codebooks_from_state_dict(module)
    assert recovered.aliases["dec.weight"].transpose
    export_safetensors(module, recovered, tmp_path / "pt2.safetensors")
    assert torch.equal(load_safetensors(tmp_path / "pt2.safetensors")["dec.weight"], model.dec.weight)
    assert verify_safetensors(tmp_path / "pt2.safetensors", module).passed


def test_alias_with_other_values_is_kept_dense(tmp_path):
    model, cbs, _ = declared_tie(bits=4)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    report = export_safetensors(model, cbs, tmp_path / "m.safetensors")
    assert report.entry("head.weight").storage == "dense"
    assert "holds other values" in report.entry("head.weight").note
    assert torch.equal(load_safetensors(tmp_path / "m.safetensors")["head.weight"], model.head.weight)


def test_shared_dense_parameters_are_stored_once(tmp_path):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.b.weight = self.a.weight

    model = Shared()
    export_safetensors(model, quantize_(model, 2, names=[]), tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["a.bias", "a.weight", "b.bias"]
    loaded = load_safetensors(tmp_path / "m.safetensors")
    assert loaded["b.weight"] is loaded["a.weight"]


def test_big_layer_file_is_near_its_bound(tmp_path):
    model = Wide(256, 1024)
    cbs = quantize_(model, 4)
    report = export_safetensors(model, cbs, tmp_path / "m.safetensors")
    bound = 256 * 1024 * 4 // 8 + 16 * 4 + 1024 * 4
    size = (tmp_path / "m.safetensors").stat().st_size
    assert size == report.file_bytes and size <= 1.01 * bound
    assert size <= 0.13 * (256 * 1024 * 4)


def test_state_dict_input_matches_module_input(tmp_path):
    model, cbs, _ = merged("conv", 4)
    export_safetensors(model.state_dict(), cbs, tmp_path / "sd.safetensors")
    export_safetensors(model, cbs, tmp_path / "m.safetensors")
    a, b = load_safetensors(tmp_path / "sd.safetensors"), load_safetensors(tmp_path / "m.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- refusals ---------------------------------------------------------------------------------------

def test_plain_safetensors_file_is_refused_with_advice(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(BadInputError, match="no codebook metadata; the file was not written by compress's safetensors export"):
        load_safetensors(tmp_path / "plain.safetensors")


def test_future_format_version_is_refused(tmp_path):
    model, cbs, _ = merged("mlp", 4)
    export_safetensors(model, cbs, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in list(f.keys())}
        meta = {**f.metadata(), "compress.format_version": "99"}
    save_file(tensors, str(tmp_path / "v99.safetensors"), metadata=meta)
    with pytest.raises(BadInputError, match="format version '99' is not supported"):
        load_safetensors(tmp_path / "v99.safetensors")


def test_truncated_indices_are_reported(tmp_path):
    model, cbs, _ = merged("mlp", 4)
    export_safetensors(model, cbs, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in list(f.keys())}
        meta = f.metadata()
    tensors["fc1.weight.indices"] = tensors["fc1.weight.indices"][:-1].clone()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(BadInputError, match=r"`fc1.weight` needs 1536 packed index bytes \(U8\), the file has \[1535\]"):
        load_safetensors(tmp_path / "bad.safetensors")


def test_missing_file_and_existing_output(tmp_path):
    with pytest.raises(BadInputError, match="no such file"):
        load_safetensors(tmp_path / "nope.safetensors")
    model, cbs, _ = merged("mlp", 4)
    (tmp_path / "m.safetensors").write_bytes(b"keep")
    with pytest.raises(BadInputError, match="already exists; pass force=True"):
        export_safetensors(model, cbs, tmp_path / "m.safetensors")
    assert (tmp_path / "m.safetensors").read_bytes() == b"keep"


@pytest.mark.parametrize("group_size", [64, 63])
def test_a_group_size_the_codebook_shape_cannot_tell_comes_from_the_model(tmp_path, group_size):
    # 1,000 rows in 16 groups fit group sizes 63 to 66: the parametrization (or a program's row
    # offsets) says which one was used; decoding with another would read rows from the wrong codebook
    from compress.tying import TieConfig, analyze, merge_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 1000, bias=False))
    cfg = TieConfig(bits=3, granularity="group", group_size=group_size, min_elements=0)
    codebooks = merge_(model, analyze(model, cfg))
    cb = codebooks_from_state_dict(model).tensors["0.weight"]
    assert (cb.granularity, cb.group_size, cb.codebook.shape[0]) == ("group", group_size, 16)
    program = torch.export.export(model, (torch.randn(2, 32),))
    assert codebooks_from_state_dict(program).tensors["0.weight"].group_size == group_size
    export_safetensors(model, codebooks, tmp_path / "m.safetensors")
    assert verify_safetensors(tmp_path / "m.safetensors", model).passed
