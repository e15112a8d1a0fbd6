"""Regression tests, one per known trick: a hostile file is refused and its payload never runs.

Every payload would create a sentinel file under `<root>/pwned/`; each test asserts it never
appears. Liveness tests prove the fixtures are real: the same payloads DO run through plain
`pickle.loads` / unguarded `torch.export.load`, so a refusal here is what stops them.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compress import BadInputError, CompressError, UnsafePickleError
from compress.io import load
from compress.io.safety.pt2 import check_program, guarded_serde
from compress.io.safety.pt2_policy import check_guard, check_name, check_sym_expr
from tests.helpers.io_files import (
    PAYLOAD_KINDS,
    TinyMLP,
    edit_json_entry,
    export_pt2,
    external_tensor,
    hostile_files,
    hostile_ids,
    onnx_matmul_model,
    payload_bytes,
    replace_entry,
    rewrite_zip,
    safetensors_bytes,
    save_state_dict,
    sentinel_dir,
    sentinels,
)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("hostile")
    return root, hostile_files(root)


@pytest.fixture(scope="module")
def clean_pt2(tmp_path_factory) -> Path:
    return export_pt2(tmp_path_factory.mktemp("clean") / "clean.pt2")


def _refused(path: Path, root: Path, sentinel: str, error=UnsafePickleError) -> str:
    """Load must fail with `error`, mention trust_pickle and the file, and run nothing."""
    with pytest.raises(error) as info:
        load(path)
    message = str(info.value)
    assert "trust_pickle=True" in message and str(path) in message and "\n" not in message
    assert not (sentinel_dir(root) / sentinel).exists()
    assert sentinels(root) == []
    return message


# --- the payloads are live ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_payload_runs_when_unpickled_plainly(tmp_path, kind):
    pickle.loads(payload_bytes(kind, sentinel_dir(tmp_path) / kind))
    assert sentinels(tmp_path) == [kind]


@pytest.mark.parametrize("fid", ["pt2_sample_inputs-os_system", "pt2_constant-builtins_exec",
                                 "pt2_opaque_constant-os_system"])
def test_unguarded_torch_export_load_runs_the_payload(tmp_path, fid):
    """torch 2.13's own loader runs these (fallback to weights_only=False, use_pickle, pickle.loads)."""
    files = hostile_files(tmp_path)
    with contextlib.suppress(Exception):  # the payload runs before torch fails on its result
        torch.export.load(str(files[fid]))
    assert sentinels(tmp_path) == [fid]


# --- every hostile pickle file is refused ---------------------------------------------------------

def test_catalogue_ids_match_the_files(hostile):
    assert sorted(hostile[1]) == sorted(hostile_ids())


@pytest.mark.parametrize("fid", hostile_ids())
def test_hostile_pickle_file_refused(hostile, fid):
    root, files = hostile
    error = BadInputError if fid.startswith("zip_odd_flags") else UnsafePickleError
    message = _refused(files[fid], root, fid, error)
    if fid.startswith("pt2_"):
        assert "entry '" in message  # names the archive entry
    if fid.startswith("zip_odd_flags"):
        assert "unsupported flag bits 0x0001" in message and "does not change this" in message


@pytest.mark.parametrize("fid", ["pt2_sample_inputs-os_system", "pt2_constant-builtins_exec",
                                 "pt2_opaque_constant-os_system", "pt2_sample_inputs_zipped-os_system"])
def test_guard_alone_blocks_torch_export_load(hostile, fid):
    """Defense in depth: even without the entry pre-check, torch.export.load under the guard runs nothing."""
    root, files = hostile
    with pytest.raises(UnsafePickleError, match="trust_pickle=True"), guarded_serde(files[fid]):
        torch.export.load(str(files[fid]))
    assert sentinels(root) == []


def test_guard_restores_torch(hostile):
    from torch._export.serde import serialize
    from torch.export.pt2_archive import _package

    before = (_package.torch, _package.pickle, serialize.deserialize_torch_artifact, serialize.sympy)
    with pytest.raises(UnsafePickleError), guarded_serde(hostile[1]["pt2_constant-os_system"]):
        torch.export.load(str(hostile[1]["pt2_constant-os_system"]))
    assert (_package.torch, _package.pickle, serialize.deserialize_torch_artifact, serialize.sympy) == before


def test_polyglot_pickle_with_zip_tail_refused(tmp_path):
    sd = save_state_dict(tmp_path / "sd.pt").read_bytes()
    path = tmp_path / "polyglot.pt"
    path.write_bytes(payload_bytes("os_system", sentinel_dir(tmp_path) / "poly") + sd)
    _refused(path, tmp_path, "poly")


# --- pickled modules need trust ---------------------------------------------------------------------

def test_pickled_module_refused_without_trust_and_loads_with_it(tmp_path):
    model = TinyMLP().eval()
    path = tmp_path / "whole_model.pt"
    torch.save(model, path)
    with pytest.raises(UnsafePickleError) as info:
        load(path)
    message = str(info.value)
    assert "TinyMLP" in message and "a pickle runs code from the file" in message
    assert "pass trust_pickle=True only for files you trust" in message
    loaded = load(path, trust_pickle=True)
    assert loaded.kind == "module" and set(loaded.tensors) == set(model.state_dict())
    x = torch.randn(2, 8)
    torch.testing.assert_close(loaded.module(x), model(x), rtol=0, atol=0)


# --- .pt2 tricks without pickles: strings torch turns into code -------------------------------------

def _inject(clean: Path, dst: Path, edit) -> Path:
    return edit_json_entry(clean, dst, "models/model.json", edit)


def _placeholder(sentinel: Path):
    evil = f"x=__import__('os').system('touch {sentinel}')"

    def edit(obj):
        text = json.dumps(obj).replace('"x"', json.dumps(evil))
        obj.clear()
        obj.update(json.loads(text))
    return edit


def _sympy(sentinel: Path):
    def edit(obj):
        text = json.dumps(obj)
        start = text.index("Symbol(")
        end = text.index(")", start) + 1
        text = text.replace(text[start:end], f"__import__('os').system('touch {sentinel}')")
        obj.clear()
        obj.update(json.loads(text))
    return edit


def _guards(sentinel: Path):
    def edit(obj):
        obj["guards_code"] = [f"__import__('os').system('touch {sentinel}') == 0"]
    return edit


def _param_name(sentinel: Path):
    evil = (f'weight") if 0 else getattr(__import__("os"), "system")("touch {sentinel}") if 0 else '
            'getattr(self, "w')

    def edit(obj):
        text = json.dumps(obj).replace('"fc1.weight"', json.dumps("fc1." + evil))
        obj.clear()
        obj.update(json.loads(text))
    return edit


_INJECTIONS = {"placeholder_name": _placeholder, "sympy_expr_str": _sympy, "guards_code": _guards,
               "parameter_name": _param_name}


def _run_unguarded(path: Path) -> None:
    with contextlib.suppress(Exception):  # only whether the payload ran matters
        torch.export.load(str(path)).module()(torch.randn(2, 8))


@pytest.mark.parametrize("trick", ["placeholder_name", "sympy_expr_str", "guards_code"])
def test_pt2_string_injection_is_live_in_plain_torch(tmp_path, clean_pt2, trick):
    path = _inject(clean_pt2, tmp_path / f"{trick}.pt2", _INJECTIONS[trick](sentinel_dir(tmp_path) / trick))
    sentinel_dir(tmp_path).mkdir()
    _run_unguarded(path)
    assert sentinels(tmp_path) == [trick]


@pytest.mark.parametrize("trick", sorted(_INJECTIONS))
def test_pt2_string_injection_refused(tmp_path, clean_pt2, trick):
    sentinel_dir(tmp_path).mkdir()
    path = _inject(clean_pt2, tmp_path / f"{trick}.pt2", _INJECTIONS[trick](sentinel_dir(tmp_path) / trick))
    message = _refused(path, tmp_path, trick)
    assert "could run code when loaded" in message


@pytest.mark.parametrize("trick", ["placeholder_name", "sympy_expr_str"])
def test_guard_alone_blocks_string_injection(tmp_path, clean_pt2, trick):
    sentinel_dir(tmp_path).mkdir()
    path = _inject(clean_pt2, tmp_path / f"{trick}.pt2", _INJECTIONS[trick](sentinel_dir(tmp_path) / trick))
    with pytest.raises(UnsafePickleError, match="could run code"), guarded_serde(path):
        torch.export.load(str(path))
    assert sentinels(tmp_path) == []


def test_graph_calling_python_function_refused(clean_pt2):
    program = torch.export.load(str(clean_pt2))
    node = next(n for n in program.graph.nodes if n.op == "call_function")
    node.target = os.system
    expected = r"calls posix\.system, which is not a built-in torch operator"
    with pytest.raises(UnsafePickleError, match=expected):
        check_program(program, clean_pt2)


def test_graph_calling_file_operator_refused(clean_pt2):
    program = torch.export.load(str(clean_pt2))
    node = next(n for n in program.graph.nodes if n.op == "call_function")
    node.target = torch.ops.aten.from_file.default
    with pytest.raises(UnsafePickleError, match="calls aten::from_file"):
        check_program(program, clean_pt2)


def test_injected_code_loads_with_trust(tmp_path, clean_pt2):
    """trust_pickle means the user vouches for the file: the checks step aside (here a harmless guard)."""
    path = _inject(clean_pt2, tmp_path / "odd_guard.pt2",
                   lambda obj: obj.__setitem__("guards_code", ["len('abc') == 3"]))
    with pytest.raises(UnsafePickleError):
        load(path)
    assert load(path, trust_pickle=True).kind == "pt2"


# --- native code and foreign entries in archives ------------------------------------------------------

@pytest.mark.parametrize("name,data,text", [
    ("extra/libevil.so", b"\x7fELF\x02\x01\x01" + b"\0" * 64, "is native code (a shared library)"),
    ("extra/readme.txt", b"\x7fELF\x02\x01\x01" + b"\0" * 64, "is native code (executable magic bytes)"),
    ("extra/tool.dll", b"MZ" + b"\0" * 64, "is native code (a shared library)"),
    ("data/aotinductor/model/model.wrapper.so", b"\0" * 16, "native code"),
    ("data/aotinductor/model/model.cpp", b"int main(){}", "is AOTInductor compiled code"),
    ("code/__torch__.py", b"import os", "unexpected entry"),
], ids=["so_suffix", "elf_magic", "dll", "aoti_so", "aoti_dir", "python_code"])
def test_pt2_with_native_or_foreign_code_refused(tmp_path, clean_pt2, name, data, text):
    path = rewrite_zip(clean_pt2, tmp_path / "bundled.pt2", lambda n, old: old, add={name: data})
    with pytest.raises(BadInputError, match=re.escape(text)):
        load(path)


def test_pe_detection_needs_the_pe_header(tmp_path, clean_pt2):
    pe = bytearray(b"MZ" + b"\0" * 200)
    pe[0x3C:0x40] = (128).to_bytes(4, "little")
    pe[128:132] = b"PE\0\0"
    path = rewrite_zip(clean_pt2, tmp_path / "pe.pt2", lambda n, old: old, add={"extra/notes.bin": bytes(pe)})
    with pytest.raises(BadInputError, match="executable magic bytes"):
        load(path)
    benign = rewrite_zip(clean_pt2, tmp_path / "mz.pt2", lambda n, old: old,
                         add={"extra/data.bin": b"MZ" + b"\1" * 200})
    assert load(benign).kind == "pt2"


def test_torch_save_zip_with_so_refused(tmp_path):
    path = rewrite_zip(save_state_dict(tmp_path / "sd.pt"), tmp_path / "with_so.pt", lambda n, old: old,
                       add={"libx.so": b"\x7fELF"})
    with pytest.raises(BadInputError, match="native code"):
        load(path)


@pytest.mark.parametrize("trick", ["duplicate_name", "dotdot_name", "two_roots", "zip_bomb"])
def test_zip_structure_tricks_refused(tmp_path, trick):
    src = save_state_dict(tmp_path / "sd.pt")
    path = tmp_path / f"{trick}.pt"
    with zipfile.ZipFile(src) as zi:
        root = zi.namelist()[0].split("/")[0]
        entries = [(i.filename, zi.read(i.filename)) for i in zi.infolist()]
    warns = pytest.warns(UserWarning) if trick == "duplicate_name" else contextlib.nullcontext()
    with warns, zipfile.ZipFile(path, "w") as zo:
        for name, data in entries:
            zo.writestr(name, data)
        if trick == "duplicate_name":
            zo.writestr(f"{root}/data.pkl", payload_bytes("os_system", sentinel_dir(tmp_path) / trick))
        elif trick == "dotdot_name":
            zo.writestr(f"{root}/../evil.pkl", b"x")
        elif trick == "two_roots":
            zo.writestr("other/data.pkl", b"x")
        else:
            zeros = b"\0" * (8 << 20)
            zo.writestr(zipfile.ZipInfo(f"{root}/zeros"), zeros, compress_type=zipfile.ZIP_DEFLATED)
    text = {"duplicate_name": "appears twice", "dotdot_name": "escapes the archive",
            "two_roots": "not under one root folder", "zip_bomb": "zip bomb"}[trick]
    with pytest.raises(BadInputError, match=text):
        load(path)
    assert sentinels(tmp_path) == []


# --- TorchScript ---------------------------------------------------------------------------------------

class _ReadsFile(torch.nn.Module):
    def forward(self, x):
        return x + torch.from_file("/etc/hostname", True, 4).sum()


def test_torchscript_code_is_never_run_without_trust(tmp_path):
    """A method calling a file operator is code: the weights load, the code does not run, running it is refused."""
    path = tmp_path / "reads_file.pt"
    torch.jit.save(torch.jit.script(_ReadsFile()), str(path))
    loaded = load(path)
    assert loaded.module is None and dict(loaded.tensors) == {}
    with pytest.raises(UnsafePickleError, match=r"runs the model, but it is TorchScript code.*trust_pickle=True"):
        loaded.require_module("export")


def test_torchscript_hostile_data_pkl_runs_nothing(tmp_path):
    src = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.trace(TinyMLP().eval(), torch.randn(2, 8)), str(src))
    path = replace_entry(src, tmp_path / "ts_evil.pt", "/data.pkl",
                         payload_bytes("os_system", sentinel_dir(tmp_path) / "ts"))
    with pytest.raises(UnsafePickleError, match=r"refused to unpickle \(it needs posix.system\); TorchScript is code"):
        load(path)
    assert sentinels(tmp_path) == []


# --- ONNX external data -----------------------------------------------------------------------------------

def _onnx_with_external(folder: Path, entries: list[tuple[str, str]], dims=(4, 3)) -> Path:
    model_dir = folder / "model"
    model_dir.mkdir(exist_ok=True)
    path = model_dir / "m.onnx"
    onnx.save(onnx_matmul_model([external_tensor("w", list(dims), entries)]), str(path))
    return path


def _secret(folder: Path) -> Path:
    secret = folder / "secret.bin"
    secret.write_bytes(b"\x01" * 48)
    return secret


_EXTERNAL_CASES = [
    ("dotdot", [("location", "../secret.bin")], "escapes the model's folder"),
    ("nested_dotdot", [("location", "a/../../secret.bin")], "escapes the model's folder"),
    ("absolute", [("location", "{secret}")], "is absolute"),
    ("unknown_key", [("location", "w.bin"), ("basepath", "/")], "unknown external_data key 'basepath'"),
    ("repeated_key", [("location", "w.bin"), ("location", "../secret.bin")], "repeats external_data key"),
    ("negative_offset", [("location", "w.bin"), ("offset", "-4")],
     "offset '-4' is not a non-negative integer"),
    ("negative_length", [("location", "w.bin"), ("length", "-48")],
     "length '-48' is not a non-negative integer"),
    ("oversized_offset", [("location", "w.bin"), ("offset", "4096")], "reads bytes [4096"),
    ("oversized_length", [("location", "w.bin"), ("length", "1000000")], "reads bytes [0, 1000000)"),
    ("float_length", [("location", "w.bin"), ("length", "4.5")],
     "length '4.5' is not a non-negative integer"),
    ("wrong_length", [("location", "w.bin"), ("length", "8")], "needs 48 bytes but its external data has 8"),
    ("missing_file", [("location", "gone.bin")], "not found: the data file is missing"),
    ("no_location", [("offset", "0")], "has no location"),
]


@pytest.mark.parametrize("entries,text", [pytest.param(e, t, id=k) for k, e, t in _EXTERNAL_CASES])
def test_hostile_onnx_external_data_refused(tmp_path, entries, text):
    secret = _secret(tmp_path)
    entries = [(k, v.format(secret=secret)) for k, v in entries]
    path = _onnx_with_external(tmp_path, entries)
    (path.parent / "w.bin").write_bytes(b"\0" * 48)
    with pytest.raises(CompressError) as info:
        load(path)
    assert text in str(info.value) and str(path) in str(info.value)


def test_onnx_symlinked_file_escaping_refused(tmp_path):
    path = _onnx_with_external(tmp_path, [("location", "w.bin")])
    os.symlink(_secret(tmp_path), path.parent / "w.bin")
    with pytest.raises(BadInputError, match="resolves outside the model's folder"):
        load(path)


def test_onnx_symlinked_parent_folder_escaping_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(b"\0" * 48)
    path = _onnx_with_external(tmp_path, [("location", "sub/w.bin")])
    os.symlink(outside, path.parent / "sub")
    with pytest.raises(BadInputError, match="resolves outside the model's folder"):
        load(path)


def test_onnx_hardlinked_file_refused(tmp_path):
    path = _onnx_with_external(tmp_path, [("location", "w.bin")])
    os.link(_secret(tmp_path), path.parent / "w.bin")
    with pytest.raises(BadInputError, match="has 2 hard links"):
        load(path)


def test_onnx_inside_folder_paths_are_fine(tmp_path):
    path = _onnx_with_external(tmp_path, [("location", "a/../w.bin"), ("offset", "0"), ("length", "48")])
    (path.parent / "a").mkdir()
    w = torch.randn(4, 3)
    (path.parent / "w.bin").write_bytes(w.numpy().tobytes())
    assert torch.equal(load(path).tensors["w"], w)


def test_onnx_external_file_swapped_after_load_refused(tmp_path):
    path = _onnx_with_external(tmp_path, [("location", "w.bin")])
    (path.parent / "w.bin").write_bytes(b"\0" * 48)
    loaded = load(path)
    (path.parent / "w.bin").unlink()
    os.symlink(_secret(tmp_path), path.parent / "w.bin")
    with pytest.raises(BadInputError, match="resolves outside the model's folder"):
        loaded.tensors["w"]


@pytest.mark.parametrize("dims,raw,text", [
    ([1 << 40, 1 << 40], b"\0" * 16, "needs 4835703278458516698824704 bytes but its raw_data has 16"),
    ([-1, 4], b"\0" * 16, "has invalid dims [-1, 4]"),
    ([(1 << 63) - 1, 0], b"", "has invalid dims"),
], ids=["huge", "negative", "beyond_int62"])
def test_onnx_absurd_dims_refused(tmp_path, dims, raw, text):
    t = TensorProto(name="w", dims=dims, data_type=TensorProto.FLOAT, raw_data=raw)
    onnx.save(onnx_matmul_model([t]), str(tmp_path / "m.onnx"))
    with pytest.raises(BadInputError, match=text.replace("[", r"\[").replace("]", r"\]")):
        load(tmp_path / "m.onnx")


def test_onnx_absurd_input_dim_refused(tmp_path):
    model = onnx_matmul_model([numpy_helper.from_array(torch.randn(4, 3).numpy(), "w")])
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -5
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(BadInputError, match="graph input 'x' has an invalid dimension -5"):
        load(tmp_path / "m.onnx")


def test_onnx_attribute_tensor_external_data_is_validated(tmp_path):
    """Tensors inside node attributes are read by onnxruntime later: validated at load too."""
    t = external_tensor("c", [4], [("location", "../secret.bin")])
    node = helper.make_node("Constant", [], ["c"], value=t)
    model = onnx_matmul_model([numpy_helper.from_array(torch.randn(4, 3).numpy(), "w")])
    model.graph.node.insert(0, node)
    _secret(tmp_path)
    (tmp_path / "model").mkdir()
    onnx.save(model, str(tmp_path / "model" / "m.onnx"))
    with pytest.raises(BadInputError, match="escapes the model's folder"):
        load(tmp_path / "model" / "m.onnx")


# --- safetensors headers -----------------------------------------------------------------------------------

def _entry(dtype="F32", shape=(2,), start=0, end=8) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}


_ST_CASES = {
    "length_beyond_file": (safetensors_bytes({"a": _entry()}, b"\0" * 8, claimed_len=10_000),
                           "header length 10000 runs past the end"),
    "header_over_100MB": (safetensors_bytes({"a": _entry()}, b"\0" * 8, claimed_len=200 << 20),
                          "more than the 100 MB limit"),
    "overlapping": (safetensors_bytes({"a": _entry(), "b": _entry(start=4, end=12)}, b"\0" * 12), "overlaps"),
    "gapped": (safetensors_bytes({"a": _entry(), "b": _entry(start=12, end=20)}, b"\0" * 20),
               "gap of 4 bytes"),
    "out_of_range": (safetensors_bytes({"a": _entry(start=0, end=8)}, b"\0" * 4), "data region has 4 bytes"),
    "offsets_mismatch_shape": (safetensors_bytes({"a": _entry(shape=(3,))}, b"\0" * 8), "needs 12"),
    "shape_overflow": (safetensors_bytes({"a": _entry(shape=(1 << 32, 1 << 32, 1 << 32))}, b"\0" * 8),
                       "overflows the byte count"),
    "negative_shape": (safetensors_bytes({"a": _entry(shape=(-2,))}, b"\0" * 8), "invalid shape"),
    "bool_shape": (safetensors_bytes({"a": _entry(shape=(True, 2))}, b"\0" * 8), "invalid shape"),
    "duplicate_keys": (safetensors_bytes(b'{"a":' + json.dumps(_entry()).encode() + b',"a":'
                                         + json.dumps(_entry()).encode() + b"}", b"\0" * 8),
                       "duplicate key 'a'"),
    "nul_in_name": (safetensors_bytes({"a\x00b": _entry()}, b"\0" * 8), "contains NUL"),
    "trailing_bytes": (safetensors_bytes({"a": _entry()}, b"\0" * 12), "4 trailing bytes"),
    "invalid_json": (safetensors_bytes(b'{"a": {"dtype": "F32",', b""), "not valid JSON"),
    "invalid_utf8": (safetensors_bytes(b'{"\xff": 1}', b""), "not valid UTF-8"),
    "not_an_object": (safetensors_bytes(b"[1, 2]", b""), "is a JSON list, expected an object"),
    "unknown_dtype": (safetensors_bytes({"a": _entry(dtype="F128")}, b"\0" * 8), "unknown dtype 'F128'"),
    "extra_entry_key": (safetensors_bytes({"a": {**_entry(), "hook": "x"}}, b"\0" * 8),
                        "must have exactly dtype, shape and data_offsets"),
    "metadata_not_str": (safetensors_bytes({"__metadata__": {"a": 1}, "x": _entry()}, b"\0" * 8),
                         "__metadata__ must map strings to strings"),
    "nan_constant": (safetensors_bytes(b'{"a": NaN}', b""), "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(_ST_CASES))
def test_hostile_safetensors_header_refused(tmp_path, case):
    data, text = _ST_CASES[case]
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    with pytest.raises(CompressError) as info:
        load(path)
    assert text in str(info.value) and str(path) in str(info.value)


def test_sharded_index_escaping_folder_refused(tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(safetensors_bytes({"a": _entry()}, b"\0" * 8))
    (tmp_path / "model").mkdir()
    for shard, text in [("../outside.safetensors", "outside the index's folder"),
                        (str(outside), "outside the index's folder"),
                        ("link.safetensors", "resolves outside the index's folder")]:
        if shard == "link.safetensors":
            os.symlink(outside, tmp_path / "model" / shard)
        index = tmp_path / "model" / "m.safetensors.index.json"
        index.write_text(json.dumps({"weight_map": {"a": shard}}))
        with pytest.raises(BadInputError, match=text):
            load(index)


# --- the .pt2 string policy: accepts what torch writes, refuses code ----------------------------------------

_TORCH_EXPRS = [
    "Symbol('s77', positive=True, integer=True)",
    "Add(Mul(Integer(2), Symbol('s0', positive=True, integer=True)), Integer(1))",
    "FloorDiv(Symbol('s0', positive=True, integer=True), Integer(2))",
    "Equality(PythonMod(Symbol('s0', positive=True, integer=True), Integer(2)), Integer(0))",
    "Pow(Symbol('s0', positive=True, integer=True), Integer(2))",
    "Float('1.5', precision=53)",
    "Rational(1, 2)",
    "-int_oo",
    ("Piecewise(ExprCondPair(Symbol('s0', integer=True), StrictGreaterThan(Symbol('s0', integer=True), "
     "Integer(2))), ExprCondPair(Integer(1), true))"),
    "ceiling(Mul(Rational(1, 3), Symbol('s0', positive=True, integer=True)))",
    "2*s65",
]
_TORCH_GUARDS = ["(L['x'].size()[0] % 2) == 0", "(L['x'].size()[0] // 2) <= L['y'].size()[0]",
                 "2 <= L['x'].size()[0]", "L['x'].stride()[0] == Max(1, L['x'].size()[1])"]
_CODE = [
    "__import__('os').system('id')",
    "Symbol('s0').__class__",
    "Symbol(__import__('os').getcwd())",
    "Integer(1).func",
    "[c for c in ().__class__.__bases__]",
    "lambda: 1",
    "Function('f')(Symbol('x'))",
    "Float('1e5', precision=__import__('os').system('id'))",
    "Symbol('s0 + 1')",
    "f\"{1}\"",
]


@pytest.mark.parametrize("expr", _TORCH_EXPRS)
def test_policy_accepts_torch_expressions(expr):
    check_sym_expr(expr, "m.pt2")


@pytest.mark.parametrize("guard", _TORCH_GUARDS)
def test_policy_accepts_torch_guards(guard):
    check_guard(guard, "m.pt2")


@pytest.mark.parametrize("code", _CODE)
def test_policy_refuses_code_as_expression(code):
    with pytest.raises(UnsafePickleError, match="could run code when loaded"):
        check_sym_expr(code, "m.pt2")


@pytest.mark.parametrize("code", _CODE + ["L['x'].size.__self__", "L['x'].numpy()", "open('f').read() == ''",
                                          "L['x'].size()[0] == __import__('os').getpid()"])
def test_policy_refuses_code_as_guard(code):
    with pytest.raises(UnsafePickleError, match="could run code when loaded"):
        check_guard(code, "m.pt2")


@pytest.mark.parametrize("name,ok", [("fc1.weight", True), ("blocks.conv-1.bias", True), ("", True),
                                     ("x=1", False), ('a")', False), ("a b", False), ("a\nb", False),
                                     ("é", False)])
def test_policy_names(name, ok):
    if ok:
        check_name(name, "name", "m.pt2")
    else:
        with pytest.raises(UnsafePickleError):
            check_name(name, "name", "m.pt2")
