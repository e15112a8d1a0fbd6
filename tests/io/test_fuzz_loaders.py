"""Fuzz every loader with mutated valid files: the only exception allowed out of `load` is CompressError.

Mutations are byte flips, truncation, insertion, deletion and overwrites driven by `st.binary`, on
real small files of each format. Raw mutations of a zip mostly die at the CRC check, so `.pt` and
`.pt2` are also fuzzed entry by entry (one entry's bytes mutated, the zip rebuilt with valid CRCs)
to reach the JSON, pickle and torch.export layers behind it. A file that still loads must also
yield every tensor.

Structured fuzzers then aim at what a byte flip rarely reaches: tensor views (shape, strides,
offset) over storages of any recorded size, written into a `torch.save` pickle, a TorchScript
`data.pkl` and a `.pt2` weight's `tensor_meta` (a loaded tensor must fit in its storage and cost no
more than the file holds; the same files go to `load_data`), and codebook-safetensors recipes and
aliases of every type and size (a decoded file never holds more values than its packed bits).
About 2,700 cases by default, the same ones every run; COMPRESS_FUZZ_EXAMPLES=N runs about N fresh
random cases (a failure prints the blob that reproduces it).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import signal
import sys
import zipfile
from datetime import timedelta
from pathlib import Path

import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file

from compress import CompressError
from compress.io import load, load_codebook_safetensors, load_data
from tests.helpers.hostile_rows import GOOD_RECIPE, codebook_file
from tests.helpers.io_files import (
    TinyMLP,
    edit_json_entry,
    export_pt2,
    onnx_matmul_model,
    rewrite_zip,
    save_state_dict,
)

_TOTAL = int(os.environ.get("COMPRESS_FUZZ_EXAMPLES", "2100"))
_FIXED = "COMPRESS_FUZZ_EXAMPLES" not in os.environ
_SHARES = {"pt2_raw": 0.12, "pt2_entries": 0.14, "pt_raw": 0.12, "pt_entries": 0.12,
           "safetensors": 0.25, "onnx": 0.25, "pt_views": 0.1, "script_views": 0.05, "pt2_views": 0.04,
           "recipes": 0.1}
_DEADLINE = timedelta(seconds=10)  # hypothesis fails a case slower than this (after it ends)...
_TIMEOUT_S = 30  # ...and the watchdog interrupts one that would never end
_COUNTS: dict[str, int] = {}


def _examples(name: str) -> int:
    return max(10, round(_TOTAL * _SHARES[name]))


def _settings(name: str):
    return settings(max_examples=_examples(name), deadline=_DEADLINE, derandomize=_FIXED, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    total = sum(_COUNTS.values())
    print(f"\nfuzzed {total} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(_COUNTS.items())))


@contextlib.contextmanager
def _watchdog(seconds: int):
    """Fail (not hang) if one case runs longer than `seconds`."""
    def _alarm(*_):
        raise TimeoutError(f"a single fuzz case ran longer than {seconds} s")
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- seeds ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("seeds")
    torch.manual_seed(0)
    save_file({"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int16), "h": torch.randn(2).half()},
              str(d / "m.safetensors"), metadata={"format": "pt"})
    inits = [numpy_helper.from_array(torch.randn(4, 3).numpy(), "w"),
             helper.make_tensor("u4", TensorProto.UINT4, [5], [1, 2, 3, 4, 5]),
             helper.make_tensor("f16", TensorProto.FLOAT16, [2], [1.0, 2.0])]
    onnx.save(onnx_matmul_model(inits), str(d / "m.onnx"))
    return {"pt2": export_pt2(d / "m.pt2").read_bytes(), "pt": save_state_dict(d / "m.pt").read_bytes(),
            "safetensors": (d / "m.safetensors").read_bytes(), "onnx": (d / "m.onnx").read_bytes()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# --- mutations -----------------------------------------------------------------------------------------

@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """1-3 mutations of `seed`: flip, truncate, insert, delete or overwrite, with st.binary payloads."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite", "header"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "header":  # most structure lives in the first and last bytes
            end = len(data)
            pos = draw(st.sampled_from([0, 1, 4, 7, 8, 9, 12, 16, 30, max(end - 22, 0), max(end - 1, 0)]))
        if kind == "flip" and data:
            data[pos % len(data)] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            data = data[:pos]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        else:
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[pos:pos + len(chunk)] = chunk
    return bytes(data)


def _entry_mutation(seed: bytes, data) -> bytes:
    """Mutate one entry of a zip and rebuild it with valid CRCs."""
    with zipfile.ZipFile(io.BytesIO(seed)) as zi:
        infos = zi.infolist()
        target = data.draw(st.sampled_from([i.filename for i in infos]), label="entry")
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as zo:
            for info in infos:
                payload = zi.read(info.filename)
                if info.filename == target:
                    payload = data.draw(mutated(payload) if payload else st.binary(), label="bytes")
                zo.writestr(zipfile.ZipInfo(info.filename, date_time=info.date_time), payload)
    return out.getvalue()


def _check(workdir: Path, name: str, suffix: str, content: bytes) -> None:
    """Load the bytes; success must give readable tensors, failure must be a CompressError."""
    _COUNTS[name] = _COUNTS.get(name, 0) + 1
    path = workdir / f"case{suffix}"
    path.write_bytes(content)
    with _watchdog(_TIMEOUT_S):
        try:
            loaded = load(path)
            for key in loaded.tensors:
                assert isinstance(loaded.tensors[key], torch.Tensor)
        except CompressError as e:
            assert str(e) and "\n" not in str(e), f"error message is not one line: {e!r}"


# --- one test per loader -------------------------------------------------------------------------------

@pytest.mark.slow
def test_fuzz_pt2_raw_bytes(seeds, workdir):
    @_settings("pt2_raw")
    @given(st.data())
    def run(data):
        _check(workdir, "pt2_raw", ".pt2", data.draw(mutated(seeds["pt2"])))
    run()


@pytest.mark.slow
def test_fuzz_pt2_entries(seeds, workdir):
    @_settings("pt2_entries")
    @given(st.data())
    def run(data):
        _check(workdir, "pt2_entries", ".pt2", _entry_mutation(seeds["pt2"], data))
    run()


def test_fuzz_pt_raw_bytes(seeds, workdir):
    @_settings("pt_raw")
    @given(st.data())
    def run(data):
        _check(workdir, "pt_raw", ".pt", data.draw(mutated(seeds["pt"])))
    run()


def test_fuzz_pt_entries(seeds, workdir):
    @_settings("pt_entries")
    @given(st.data())
    def run(data):
        _check(workdir, "pt_entries", ".pt", _entry_mutation(seeds["pt"], data))
    run()


def test_fuzz_safetensors(seeds, workdir):
    @_settings("safetensors")
    @given(st.data())
    def run(data):
        _check(workdir, "safetensors", ".safetensors", data.draw(mutated(seeds["safetensors"])))
    run()


def test_fuzz_onnx(seeds, workdir):
    @_settings("onnx")
    @given(st.data())
    def run(data):
        _check(workdir, "onnx", ".onnx", data.draw(mutated(seeds["onnx"])))
    run()


def test_fuzz_safetensors_header_json(seeds, workdir):
    """Structured mutations of the header JSON itself (valid JSON, wrong contents)."""
    header = json.loads(seeds["safetensors"][8:8 + int.from_bytes(seeds["safetensors"][:8], "little")])
    body = seeds["safetensors"][8 + int.from_bytes(seeds["safetensors"][:8], "little"):]
    values = st.one_of(st.integers(-2, 1 << 70), st.text(max_size=6), st.none(), st.booleans(),
                       st.lists(st.integers(-3, 1 << 66), max_size=4))

    @settings(max_examples=_examples("safetensors") // 2, deadline=_DEADLINE, derandomize=_FIXED,
              database=None, suppress_health_check=list(HealthCheck), print_blob=True)
    @given(st.sampled_from(sorted(k for k in header if k != "__metadata__")),
           st.sampled_from(["dtype", "shape", "data_offsets", "extra"]), values)
    def run(name, field, value):
        h = json.loads(json.dumps(header))
        h[name][field] = value
        raw = json.dumps(h).encode()
        _check(workdir, "safetensors_json", ".safetensors", len(raw).to_bytes(8, "little") + raw + body)
    run()


# --- tensor views over storages of any size ------------------------------------------------------------

_DIMS = st.sampled_from([0, 1, 2, 3, 7, 2**20, 2**40, 2**62])
_STRIDES = st.sampled_from([0, 1, 2, 3, 5, 2**20, 2**40])
_VIEWS = st.fixed_dictionaries({
    "numel": st.integers(0, 24),  # the storage the pickle declares
    "record": st.integers(0, 120),  # the bytes the archive actually holds for it
    "offset": st.sampled_from([0, 1, 3, 2**40]),
    "shape": st.lists(_DIMS, max_size=3),
    "stride": st.lists(_STRIDES, max_size=3)})


class _Storage:
    def __init__(self, numel: int):
        self.numel = numel


class _View:
    """Pickles as `_rebuild_tensor_v2` over a persistent storage, with any shape, strides and offset."""

    def __init__(self, v: dict):
        self.v = v

    def __reduce__(self):
        import collections

        return (torch._utils._rebuild_tensor_v2,
                (_Storage(self.v["numel"]), self.v["offset"], tuple(self.v["shape"]), tuple(self.v["stride"]), False,
                 collections.OrderedDict()))


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel)
        return None


def _pickled(obj) -> bytes:
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _check_view(workdir: Path, name: str, suffix: str, content: bytes, size: int) -> None:
    """Like `_check`, and a tensor that loads fits in what the file holds (no view inflates its storage)."""
    _COUNTS[name] = _COUNTS.get(name, 0) + 1
    path = workdir / f"case{suffix}"
    path.write_bytes(content)
    with _watchdog(_TIMEOUT_S):
        for reader in (load, load_data):
            try:
                result = reader(path)
            except CompressError as e:
                assert str(e) and "\n" not in str(e), f"error message is not one line: {e!r}"
                continue
            tensors = result.tensors if reader is load else {"calib_inputs": result.calib_inputs}
            for t in (tensors[k] for k in tensors):
                assert t.numel() * t.element_size() <= size, (t.shape, t.stride(), size)
                t.clone()


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("templates")
    torch.save({"w": torch.zeros(3)}, d / "state.pt")
    torch.jit.save(torch.jit.trace(TinyMLP().eval(), torch.randn(2, 8)), str(d / "script.pt"))
    return {"state": d / "state.pt", "script": d / "script.pt", "pt2": export_pt2(d / "m.pt2")}


def test_fuzz_tensor_views_in_a_torch_save_pickle(templates, workdir):
    @_settings("pt_views")
    @given(_VIEWS)
    def run(v):
        data = {"calib_inputs": _View(v), "test_inputs": _View(v)}
        out = workdir / "views.pt"
        rewrite_zip(templates["state"], out, lambda n, d: _pickled(data) if n.endswith("/data.pkl")
                    else bytes(v["record"]) if n.endswith("/data/0") else d)
        _check_view(workdir, "pt_views", ".pt", out.read_bytes(), v["record"])
    run()


def _script_pickle(v: dict) -> bytes:
    """A TorchScript `data.pkl`: an object of class `__torch__.Root` (NEWOBJ + BUILD) holding one tensor."""
    import types

    module = types.ModuleType("__torch__")
    root = type("Root", (), {"__module__": "__torch__", "__qualname__": "Root"})
    module.Root = root
    obj = root.__new__(root)
    obj.__dict__.update({"w": _View(v), "training": False})
    sys.modules["__torch__"] = module  # only while pickling, so pickle finds the class by name
    try:
        return _pickled(obj)
    finally:
        del sys.modules["__torch__"]


def test_fuzz_tensor_views_in_a_torchscript_archive(templates, workdir):
    @_settings("script_views")
    @given(_VIEWS)
    def run(v):
        out = workdir / "views_script.pt"
        rewrite_zip(templates["script"], out, lambda n, d: _script_pickle(v) if n.endswith("/data.pkl")
                    else bytes(v["record"]) if n.endswith("/data/0") else d)
        _check_view(workdir, "script_views", ".pt", out.read_bytes(), v["record"])
    run()


@pytest.mark.slow
def test_fuzz_tensor_meta_in_a_pt2(templates, workdir):
    @_settings("pt2_views")
    @given(_VIEWS)
    def run(v):
        def edit(cfg):
            meta = cfg["config"]["fc1.weight"]["tensor_meta"]
            meta["sizes"] = [{"as_int": d} for d in v["shape"]]
            meta["strides"] = [{"as_int": d} for d in v["stride"]]
            meta["storage_offset"] = {"as_int": v["offset"]}
        out = workdir / "views.pt2"
        edit_json_entry(templates["pt2"], workdir / "views_cfg.pt2", "model_weights_config.json", edit)
        rewrite_zip(workdir / "views_cfg.pt2", out,
                    lambda n, d: bytes(v["record"]) if n.endswith("data/weights/weight_0") else d)
        _check_view(workdir, "pt2_views", ".pt2", out.read_bytes(), out.stat().st_size)
    run()


# --- codebook-safetensors recipes ---------------------------------------------------------------------------

_ANY = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**70), st.text(max_size=6),
                 st.lists(st.integers(-2, 2**40), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_FIELD_VALUES = {
    "bits": st.one_of(st.integers(-1, 17), _ANY), "k": st.one_of(st.integers(0, 70000), _ANY),
    "shape": st.one_of(st.lists(st.sampled_from([0, 1, 3, 4, 12, 2**20, 2**40]), max_size=3), _ANY),
    "granularity": st.one_of(st.sampled_from(["tensor", "channel", "group", "block"]), _ANY),
    "group_size": st.one_of(st.none(), st.integers(-1, 5), _ANY), "codebook": st.sampled_from(["w.codebook", "w.indices", "x"]),
    "indices": st.sampled_from(["w.indices", "w.codebook", "x"]), "packing": st.sampled_from(["lsb0", "msb0"]),
    "dtype": st.sampled_from(["float32", "float16", "int8", "Tensor", "_C"]),
}


@st.composite
def _recipes(draw):
    recipe = dict(GOOD_RECIPE)
    for key in draw(st.lists(st.sampled_from(sorted(_FIELD_VALUES)), max_size=4, unique=True)):
        recipe[key] = draw(_FIELD_VALUES[key])
    if draw(st.booleans()):
        recipe.pop(draw(st.sampled_from(sorted(recipe))))
    if draw(st.integers(0, 9)) == 0:
        recipe["extra"] = 1
    recipes = draw(st.sampled_from(["dict", "list", "value"]))
    recipes = {"w": recipe} if recipes == "dict" else [recipe] if recipes == "list" else draw(_ANY)
    aliases = draw(st.one_of(st.none(), st.dictionaries(st.sampled_from(["a", "w"]), st.one_of(
        st.fixed_dictionaries({"target": st.sampled_from(["w", "a", "zz"]), "transpose": st.booleans()}), _ANY),
        max_size=2), _ANY))
    groups, k, n = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(0, 8))
    tensors = {"w.codebook": torch.randn(groups, k).to(draw(st.sampled_from([torch.float32, torch.float16]))),
               "w.indices": torch.randint(0, 256, (n,), dtype=torch.uint8)}
    return recipes, aliases, tensors


def test_fuzz_codebook_recipes(workdir):
    @_settings("recipes")
    @given(_recipes())
    def run(case):
        recipes, aliases, tensors = case
        _COUNTS["recipes"] = _COUNTS.get("recipes", 0) + 1
        path = codebook_file(workdir / "recipe.safetensors", recipes, aliases, tensors)
        with _watchdog(_TIMEOUT_S):
            try:
                out = load_codebook_safetensors(path)
            except CompressError as e:
                assert str(e) and "\n" not in str(e), f"error message is not one line: {e!r}"
                return
        packed_bits = 8 * tensors["w.indices"].numel()
        assert sum(t.numel() for t in out.values()) <= 2 * packed_bits + 2 * tensors["w.codebook"].numel() + 8
    run()
