"""Fuzz every loader with mutated valid files: the only exception allowed out of `load` is CompressError.

Mutations are byte flips, truncation, insertion, deletion and overwrites driven by `st.binary`, on
real small files of each format. Raw mutations of a zip mostly die at the CRC check, so `.pt` and
`.pt2` are also fuzzed entry by entry (one entry's bytes mutated, the zip rebuilt with valid CRCs)
to reach the JSON, pickle and torch.export layers behind it. A file that still loads must also
yield every tensor. About 2,100 cases by default, the same ones every run; COMPRESS_FUZZ_EXAMPLES=N
runs about N fresh random cases (a failure prints the blob that reproduces it).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
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
from compress.io import load
from tests.helpers.io_files import export_pt2, onnx_matmul_model, save_state_dict

_TOTAL = int(os.environ.get("COMPRESS_FUZZ_EXAMPLES", "2100"))
_FIXED = "COMPRESS_FUZZ_EXAMPLES" not in os.environ
_SHARES = {"pt2_raw": 0.12, "pt2_entries": 0.14, "pt_raw": 0.12, "pt_entries": 0.12,
           "safetensors": 0.25, "onnx": 0.25}
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
