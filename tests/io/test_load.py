"""`compress.io.load` / `load_data`: every format loads bit-exactly; bad files fail with one clear line."""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file, save_model

from compress import BadInputError, CompressError, UnsafePickleError, UnsupportedModelError
from compress.io import DataSplits, Loaded, find_aliases, load, load_data
from compress.io._errors import library_call
from tests.helpers.io_files import (
    TiedEmbeddingHead,
    TinyMLP,
    export_pt2,
    external_tensor,
    onnx_matmul_model,
    safetensors_bytes,
    save_state_dict,
)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact: same dtype, shape and bytes."""
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.detach().reshape(-1).contiguous().view(torch.uint8)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw(a), raw(b))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model() -> TinyMLP:
    torch.manual_seed(1)
    return TinyMLP().eval()


@pytest.fixture(scope="module")
def pt2_file(tmp_path_factory, model) -> Path:
    return export_pt2(tmp_path_factory.mktemp("pt2") / "tiny.pt2", model)


# --- formats ---------------------------------------------------------------------------------------

def test_state_dict_pt_loads_bit_exact(tmp_path, model):
    path = save_state_dict(tmp_path / "model.pt", model)
    loaded = load(path)
    assert loaded.kind == "state_dict" and loaded.module is None and loaded.aliases == {}
    assert set(loaded.tensors) == set(model.state_dict())
    for name, t in model.state_dict().items():
        assert _same(loaded.tensors[name], t), name
    assert loaded.sha256 == _sha(path)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_state_dict_loads(tmp_path, model, wrapper):
    path = tmp_path / "ckpt.pth"
    torch.save({wrapper: model.state_dict(), "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    loaded = load(path)
    assert loaded.kind == "state_dict"
    assert all(_same(loaded.tensors[k], v) for k, v in model.state_dict().items())


def test_legacy_torch_save_format_loads(tmp_path, model):
    path = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    loaded = load(path)
    assert loaded.kind == "state_dict"
    assert all(_same(loaded.tensors[k], v) for k, v in model.state_dict().items())


def test_tied_embedding_head_state_dict_has_alias(tmp_path):
    model = TiedEmbeddingHead()
    path = save_state_dict(tmp_path / "tied.pt", model)
    loaded = load(path)
    assert loaded.aliases == {"head.weight": "emb.weight"}
    assert _same(loaded.tensors["head.weight"], model.emb.weight.detach())


def test_find_aliases_ignores_copies_and_other_views():
    w = torch.randn(4, 3)
    named = [("a", w), ("b", w.clone()), ("c", w), ("t", w.t()), ("row", w[1])]
    assert find_aliases(named) == {"c": "a"}


def test_pt2_loads_program_module_and_example_inputs(pt2_file, model):
    loaded = load(pt2_file)
    assert loaded.kind == "pt2" and loaded.program is not None
    expected = {**model.state_dict(), "offset": model.offset}
    assert set(loaded.tensors) == set(expected)
    for name, t in expected.items():
        assert _same(loaded.tensors[name].detach(), t), name
    assert [list(t.shape) for t in loaded.example_inputs] == [[4, 8]]
    for batch in (1, 4, 7):  # exported with a Dim batch: any batch size runs
        x = torch.randn(batch, 8)
        torch.testing.assert_close(loaded.module(x), model(x), rtol=0, atol=1e-6)


def test_pt2_tied_weights_have_alias(tmp_path):
    model = TiedEmbeddingHead().eval()
    program = torch.export.export(model, (torch.tensor([[1, 2, 3]]),))
    torch.export.save(program, str(tmp_path / "tied.pt2"))
    loaded = load(tmp_path / "tied.pt2")
    assert loaded.aliases == {"head.weight": "emb.weight"}


class _OddNamesTrainMode(torch.nn.Module):
    """Legit features the .pt2 string checks must not refuse: ModuleDict keys with '-', BatchNorm buffer
    updates (train mode), string op arguments (einsum, rounding_mode), keyword inputs, nested outputs."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleDict({"conv-1": torch.nn.Linear(4, 4), "head_2": torch.nn.Linear(4, 2)})
        self.bn = torch.nn.BatchNorm1d(4)

    def forward(self, x, *, scale: float = 1.0):
        y = self.bn(self.blocks["conv-1"](x))
        z = torch.div(torch.einsum("bi,bj->bij", y, y).sum(-1), 3, rounding_mode="floor")
        return {"logits": self.blocks["head_2"](z) * scale, "aux": (y.view(y.shape[0], 2, 2), x.shape[0])}


def test_legit_program_features_load(tmp_path):
    model = _OddNamesTrainMode().train()
    program = torch.export.export(model, (torch.randn(3, 4),), {"scale": 2.0})
    torch.export.save(program, str(tmp_path / "odd.pt2"))
    loaded = load(tmp_path / "odd.pt2")
    assert "blocks.conv-1.weight" in loaded.tensors and "bn.running_mean" in loaded.tensors


def test_reexported_program_with_provenance_loads(tmp_path, pt2_file):
    """Re-exporting a loaded program's module records `from_node` provenance (JSON in the metadata)."""
    loaded = load(pt2_file)
    program = torch.export.export(loaded.module, loaded.example_inputs)
    assert any("from_node" in n.meta for n in program.graph.nodes)
    torch.export.save(program, str(tmp_path / "again.pt2"))
    assert load(tmp_path / "again.pt2").kind == "pt2"


def test_bundled_samples_load(samples_dir):
    samples = sorted(samples_dir.glob("*.pt2"))
    if not samples:
        pytest.skip("no bundled samples in this checkout")
    for path in samples:
        loaded = load(path)
        out = loaded.module(*loaded.example_inputs)
        assert out.shape[0] == loaded.example_inputs[0].shape[0]
        assert path.name in loaded.describe() and "runnable module" in loaded.describe()


def test_torchscript_weights_load_without_running_it_and_the_module_with_trust(tmp_path, model):
    """TorchScript is code: without trust its weights are read (state_dict names, bit exact), nothing runs."""
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(model, torch.randn(2, 8)), str(path))
    loaded = load(path)
    assert loaded.kind == "torchscript" and loaded.module is None
    assert list(loaded.tensors) == list(torch.jit.load(str(path)).state_dict())
    for name, t in model.state_dict().items():
        assert _same(loaded.tensors[name], t), name
    assert "TorchScript, which is code" in loaded.notes[0] and "was not run" in loaded.notes[0]
    with pytest.raises(UnsafePickleError, match=r"verify runs the model, but it is TorchScript code \(3 classes"
                                                r".*pass trust_pickle=True only for files you trust"):
        loaded.require_module("verify")
    trusted = load(path, trust_pickle=True)
    x = torch.randn(3, 8)
    torch.testing.assert_close(trusted.module(x), model(x), rtol=0, atol=1e-6)


_MIXED = {
    "f32": torch.randn(3, 4),
    "bf16": torch.randn(5).to(torch.bfloat16),
    "f16": torch.randn(2, 2).half(),
    "i8": torch.randint(-128, 127, (7,), dtype=torch.int8),
    "u8": torch.randint(0, 255, (2, 3), dtype=torch.uint8),
    "i64": torch.arange(4),
    "b": torch.tensor([True, False, True]),
    "empty": torch.zeros(0, 3),
    "scalar": torch.tensor(2.5),
}


def test_safetensors_loads_lazily_bit_exact(tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file(_MIXED, str(path), metadata={"note": "hello"})
    loaded = load(path)
    assert loaded.kind == "safetensors" and not isinstance(loaded.tensors, dict)
    assert isinstance(loaded.tensors, Mapping) and len(loaded.tensors) == len(_MIXED)
    for name, t in _MIXED.items():
        assert _same(loaded.tensors[name], t), name
    assert loaded.tensors.spec("bf16") == (torch.bfloat16, (5,))


def test_safetensors_save_model_aliases(tmp_path):
    model = TiedEmbeddingHead()
    path = tmp_path / "tied.safetensors"
    save_model(model, str(path))
    loaded = load(path)
    assert len(loaded.aliases) == 1
    (dropped, kept), = loaded.aliases.items()
    assert {dropped, kept} == {"emb.weight", "head.weight"}
    assert _same(loaded.tensors[dropped], loaded.tensors[kept])
    assert _same(loaded.tensors[kept], model.emb.weight.detach())


def _write_sharded(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(folder / file))
        weight_map.update({n: file for n in part})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def test_sharded_safetensors_loads(tmp_path):
    index = _write_sharded(tmp_path, _MIXED)
    loaded = load(index)
    assert loaded.kind == "safetensors" and loaded.sha256 == _sha(index)
    for name, t in _MIXED.items():
        assert _same(loaded.tensors[name], t), name


def test_sharded_index_missing_tensor_in_shard(tmp_path):
    index = _write_sharded(tmp_path, _MIXED)
    obj = json.loads(index.read_text())
    obj["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(obj))
    with pytest.raises(BadInputError, match="tensor 'ghost' is listed in shard .* but not stored there"):
        load(index)


_onnx_model = onnx_matmul_model


def _onnx_inits() -> tuple[list, dict[str, torch.Tensor]]:
    w = torch.randn(4, 3)
    u4 = torch.tensor([1, 15, 0, 7, 3], dtype=torch.uint8)
    i4 = torch.tensor([-8, 7, -1, 0, 3], dtype=torch.int8)
    bf = torch.randn(6).to(torch.bfloat16)
    inits = [
        numpy_helper.from_array(w.numpy(), "w"),
        numpy_helper.from_array(np.arange(6, dtype=np.int64).reshape(2, 3), "i64"),
        helper.make_tensor("u4", TensorProto.UINT4, [5], u4.tolist()),
        helper.make_tensor("i4", TensorProto.INT4, [5], i4.tolist()),
        helper.make_tensor("bf", TensorProto.BFLOAT16, [6], bf.view(torch.uint16).numpy().tobytes(),
                           raw=True),
        helper.make_tensor("f16", TensorProto.FLOAT16, [2], np.array([1.5, -2], np.float16)),  # typed field
    ]
    expected = {"w": w, "i64": torch.arange(6).reshape(2, 3), "u4": u4, "i4": i4, "bf": bf,
                "f16": torch.tensor([1.5, -2], dtype=torch.float16)}
    return inits, expected


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external_data"])
def test_onnx_loads_bit_exact(tmp_path, external):
    inits, expected = _onnx_inits()
    model = _onnx_model(inits)
    path = tmp_path / "m.onnx"
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
        assert (tmp_path / "m.onnx.data").exists()
    else:
        onnx.save(model, str(path))
    loaded = load(path)
    assert loaded.kind == "onnx" and isinstance(loaded.onnx_model, onnx.ModelProto)
    assert not isinstance(loaded.tensors, dict) and set(loaded.tensors) == set(expected)
    for name, t in expected.items():
        assert _same(loaded.tensors[name], t), name
    assert loaded.sha256 == _sha(path)


def test_onnx_shared_external_region_is_an_alias(tmp_path):
    w = torch.randn(4, 3)
    (tmp_path / "w.bin").write_bytes(w.numpy().tobytes())
    entries = [("location", "w.bin"), ("offset", "0"), ("length", str(4 * 12))]
    inits = [external_tensor(name, [4, 3], entries) for name in ("w", "w_tied")]
    onnx.save(_onnx_model(inits), str(tmp_path / "m.onnx"))
    loaded = load(tmp_path / "m.onnx")
    assert loaded.aliases == {"w_tied": "w"}
    assert _same(loaded.tensors["w_tied"], w)


def test_onnx_unsupported_dtype_is_named(tmp_path):
    t = helper.make_tensor("names", TensorProto.STRING, [1], [b"a"])
    onnx.save(_onnx_model([t]), str(tmp_path / "s.onnx"))
    with pytest.raises(UnsupportedModelError, match="initializer 'names' has ONNX data type 8"):
        load(tmp_path / "s.onnx")


def test_describe_is_one_line(pt2_file, tmp_path, model):
    text = load(pt2_file).describe()
    assert "\n" not in text
    assert text.startswith("tiny.pt2: pt2, 6 tensors, 81 values (324 B)") and "example inputs [4, 8]" in text
    tied = load(save_state_dict(tmp_path / "tied.pt", TiedEmbeddingHead())).describe()
    assert "2 tensors, 60 values (240 B), 1 alias" in tied  # the alias is counted once


# --- nothing written, input untouched --------------------------------------------------------------

def _every_format(folder: Path, pt2_file: Path) -> list[Path]:
    folder.mkdir()
    pt2 = folder / "tiny.pt2"
    pt2.write_bytes(pt2_file.read_bytes())
    save_file(_MIXED, str(folder / "m.safetensors"))
    torch.jit.save(torch.jit.trace(TinyMLP().eval(), torch.randn(2, 8)), str(folder / "ts.pt"))
    inits, _ = _onnx_inits()
    onnx.save(_onnx_model(inits), str(folder / "m.onnx"), save_as_external_data=True,
              location="m.onnx.data", size_threshold=0)
    sd = save_state_dict(folder / "sd.pt")
    return [pt2, sd, folder / "m.safetensors", folder / "ts.pt", folder / "m.onnx"]


def test_load_writes_nothing_and_leaves_input_unchanged(tmp_path, pt2_file):
    paths = _every_format(tmp_path / "models", pt2_file)
    before = {p.name: _sha(p) for p in (tmp_path / "models").iterdir()}
    for path in paths:
        loaded = load(path)
        for name in loaded.tensors:  # read everything lazy too
            loaded.tensors[name]
    after = {p.name: _sha(p) for p in (tmp_path / "models").iterdir()}
    assert after == before


# --- bad input: one line naming the file and the problem -------------------------------------------

def _bad_cases(tmp: Path, pt2_file: Path) -> dict[str, tuple[Path, str]]:
    good_pt = save_state_dict(tmp / "good.pt")
    data = good_pt.read_bytes()
    pt2 = pt2_file.read_bytes()
    (tmp / "folder").mkdir()
    cases = {
        "missing": (tmp / "nope.pt", "file not found"),
        "empty": (tmp / "empty.pt", "file is empty"),
        "directory": (tmp / "folder", "is a folder, not a model file"),
        "truncated_pt": (tmp / "trunc.pt", "truncated or corrupt"),
        "truncated_pt2": (tmp / "trunc.pt2", "truncated or corrupt"),
        "flipped_byte_pt2": (tmp / "flip.pt2", "truncated or corrupt"),
        "text_file": (tmp / "notes.pt", "unrecognized model file"),
        "foreign_zip": (tmp / "foreign.pt", "not one torch writes"),
        "truncated_safetensors": (tmp / "t.safetensors", "runs past the end"),
        "garbage_onnx": (tmp / "g.onnx", "reading the ONNX protobuf failed"),
        "not_a_state_dict": (tmp / "list.pt", "holds a list, not a state_dict"),
    }
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp / "trunc.pt2").write_bytes(pt2[: len(pt2) - 100])
    flipped = bytearray(pt2)
    flipped[100] ^= 0xFF  # inside the first entry's data: CRC mismatch
    (tmp / "flip.pt2").write_bytes(bytes(flipped))
    (tmp / "notes.pt").write_text("just some notes\n")
    with zipfile.ZipFile(tmp / "foreign.pt", "w") as z:
        z.writestr("docs/readme.txt", "hello")
    st = safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    (tmp / "t.safetensors").write_bytes(st[:20])
    (tmp / "g.onnx").write_bytes(b"\x08\x07\x12\xff\xff\xff\xff\x0f garbage")
    torch.save([torch.ones(2)], tmp / "list.pt")
    return cases


CASES = ["missing", "empty", "directory", "truncated_pt", "truncated_pt2", "flipped_byte_pt2", "text_file",
         "foreign_zip", "truncated_safetensors", "garbage_onnx", "not_a_state_dict"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_error(tmp_path, pt2_file, case):
    path, text = _bad_cases(tmp_path, pt2_file)[case]
    with pytest.raises(BadInputError) as info:
        load(path)
    message = str(info.value)
    assert text in message and str(path) in message and "\n" not in message


def test_unrecognized_lists_supported_formats(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00\x01\x02 not a model")
    expected = r"unrecognized model file .*supported: \.pt2 .*\.safetensors.*\.onnx"
    with pytest.raises(BadInputError, match=expected):
        load(path)


def test_content_wins_over_extension(tmp_path, model):
    path = tmp_path / "actually_a_state_dict.onnx"
    torch.save(model.state_dict(), path)
    assert load(path).kind == "state_dict"
    st = tmp_path / "actually_safetensors.pt"
    save_file(_MIXED, str(st))
    assert load(st).kind == "safetensors"


def test_garbage_after_pickle_header_is_corrupt_not_unsafe(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x80\x02garbage that is not a pickle")
    with pytest.raises(BadInputError, match="not a valid pickle, the file is truncated or corrupt") as info:
        load(path)
    assert not isinstance(info.value, UnsafePickleError)


class _OddLibraryError(Exception):
    pass


@pytest.mark.parametrize("exc,text", [
    (zipfile.BadZipFile("bad"), "truncated or corrupt (BadZipFile: bad)"),
    (KeyError("k"), "(KeyError: 'k')"),
    (_OddLibraryError("surprise"), "(_OddLibraryError: surprise)"),
], ids=["known", "other_builtin", "unknown_type"])
def test_library_failures_name_file_and_keep_the_type(exc, text):
    with pytest.raises(BadInputError) as info, library_call("m.bin", "reading"):
        raise exc
    assert str(info.value).startswith("m.bin: reading failed") and text in str(info.value)


def test_library_call_lets_our_errors_through():
    with pytest.raises(UnsafePickleError, match="^mine$"), library_call("m.bin", "reading"):
        raise UnsafePickleError("mine")


# --- load_data -------------------------------------------------------------------------------------

def _data(tmp: Path, **override) -> Path:
    d = {"version": 1, "calib_inputs": torch.rand(10, 8), "calib_targets": torch.randint(0, 3, (10,)),
         "test_inputs": torch.rand(4, 8), "test_targets": torch.randint(0, 3, (4,))}
    d.update(override)
    d = {k: v for k, v in d.items() if v is not ...}
    path = tmp / "data.pt"
    torch.save(d, path)
    return path


def test_load_data_reads_splits(tmp_path):
    path = _data(tmp_path)
    raw = torch.load(path, weights_only=True)
    data = load_data(path)
    assert isinstance(data, DataSplits) and data.path == path
    assert torch.equal(data.calib_inputs, raw["calib_inputs"])
    assert torch.equal(data.test_targets, raw["test_targets"])


def test_load_data_inputs_only(tmp_path):
    data = load_data(_data(tmp_path, calib_targets=..., test_targets=...))
    assert data.calib_targets is None and data.test_targets is None


def test_load_data_bundled_sample(samples_dir):
    path = samples_dir / "digits_data.pt"
    if not path.exists():
        pytest.skip("no bundled data in this checkout")
    data = load_data(path)
    assert data.calib_inputs.shape[1] == 64 and data.calib_targets.shape[0] == data.calib_inputs.shape[0]


@pytest.mark.parametrize("override,text", [
    ({"calib_inputs": ...}, "missing 'calib_inputs'"),
    ({"extra": torch.ones(1)}, "unknown key 'extra'"),
    ({"calib_targets": torch.zeros(9, dtype=torch.long)}, "calib_targets has 9 rows but calib_inputs has 10"),
    ({"test_inputs": torch.ones(4, 8, dtype=torch.bool)}, "test_inputs has dtype torch.bool"),
    ({"test_inputs": torch.full((4, 8), float("nan"))}, "test_inputs has 32 NaN or infinite values"),
    ({"calib_inputs": torch.zeros(0, 8)}, "needs at least one sample"),
    ({"version": 2}, "data file version 2 is not supported"),
    ({"test_targets": [1, 2, 3, 4]}, "test_targets is a list, expected a tensor"),
], ids=["missing_key", "unknown_key", "length_mismatch", "bool_dtype", "nan", "no_rows", "version",
        "not_tensor"])
def test_load_data_rejects_bad_files(tmp_path, override, text):
    path = _data(tmp_path, **override)
    with pytest.raises(BadInputError, match=text.replace("(", r"\(").replace(")", r"\)")):
        load_data(path)


def test_load_data_refuses_pickles_and_non_torch_files(tmp_path):
    path = tmp_path / "data.pt"
    torch.save({"calib_inputs": torch.rand(3, 2), "test_inputs": torch.rand(3, 2), "cfg": object()}, path)
    with pytest.raises(UnsafePickleError, match="a data file must be a plain dict of tensors"):
        load_data(path)
    st = tmp_path / "data.safetensors"
    save_file({"calib_inputs": torch.rand(3, 2)}, str(st))
    with pytest.raises(BadInputError, match="not a torch.save file"):
        load_data(st)


def test_loaded_is_a_small_dataclass():
    fields = set(Loaded.__dataclass_fields__)
    assert fields == {"path", "kind", "tensors", "aliases", "module", "example_inputs", "program",
                      "onnx_model", "sha256", "notes", "untrusted_code"}
    assert issubclass(BadInputError, CompressError)
