"""Issue 14, row by row: hostile files never run code, hang, explode or trace back.

Each test builds its file, runs it through the slots the campaign used (audit, tie, export, verify,
`--data`, the Python API) and asserts the exit code, the one `error:` line, that nothing ran or was
written, and that no traceback appeared. Rows about time or memory are also run in a real process
(`measured_cli`) with its wall time and peak resident memory asserted: a `python -m cli` that
refuses a file peaks near 250 MB (the torch import), so the ceiling is `_PEAK_MB`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper, numpy_helper
from safetensors.torch import save_file

from cli.main import cli
from compress import BadInputError, UnsafePickleError
from compress.io import load, load_codebook_safetensors, load_data
from compress.sandbox import RunBudget
from compress.verify import verify
from tests.helpers import ROOT
from tests.helpers.hostile_rows import (
    ENV,
    GOOD_RECIPE,
    codebook_file,
    colliding_keys_pickle,
    colliding_keys_torch_zip,
    elf_weight,
    expanded_data,
    expanded_state_dict,
    measured_cli,
    onnx_constant_of_shape,
    onnx_custom_function,
    onnx_empty_huge_dims,
    onnx_loop,
    pt2_with_big_member,
    pt2_with_deflated_member,
    pt2_with_expression,
    pt2_with_zero_strides,
    torchscript_looping_on_load,
    torchscript_writing_on_load,
)
from tests.helpers.io_files import TinyMLP, export_pt2, external_tensor, onnx_matmul_model, save_state_dict
from tests.helpers.models import save_data


class Wide(torch.nn.Module):
    """x [batch, 8] -> [batch, 3], with one layer big enough to be clustered (1,280 weights)."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 160)
        self.fc2 = torch.nn.Linear(160, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


_PEAK_MB = 600  # a refusing `python -m cli` peaks near 250 MB; the rows used to take 2.6-16 GB
_SECONDS = 30  # start-up is 2-8 s on a shared 2-core machine; the rows used to take 50 s to forever


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A clean `.pt2`, its `compress tie` output (merged .pt2 and .onnx) and a clean data file."""
    root = tmp_path_factory.mktemp("rows")
    model = export_pt2(root / "clean.pt2", Wide())
    made = CliRunner().invoke(cli, ["tie", str(model), "-o", str(root / "tied"), "--bits", "2", "--no-safetensors"])
    assert made.exit_code == 0, made.output
    x = torch.randn(16, 8)
    data = save_data(root / "data.pt", x, None, x, None)
    return {"root": root, "model": model, "merged": root / "tied" / "clean.tied.pt2",
            "onnx": root / "tied" / "clean.onnx", "data": data}


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _refused(result, *texts: str, code: int = 2) -> str:
    """Exit `code`, exactly one `error:` line on stderr containing every text, no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in texts:
        assert text in lines[0], lines[0]
    return lines[0]


def _bounded(run, *texts: str, code: int = 2) -> None:
    """A real process: exit `code`, one `error:` line, within `_SECONDS` and `_PEAK_MB`."""
    assert run.code == code, (run.code, run.stderr[-2000:])
    assert "Traceback" not in run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for text in texts:
        assert text in lines[0], lines[0]
    assert run.seconds < _SECONDS and run.peak_mb < _PEAK_MB, (run.seconds, run.peak_mb)


def _slots(w: dict, path: Path, out: Path) -> dict[str, list]:
    """The commands that read a model file first, with `path` in that slot."""
    return {"audit": ["audit", path],
            "tie": ["tie", path, "-o", out],
            "export": ["export", path, "--onnx", out / "m.onnx", "--safetensors", out / "m.safetensors"],
            "verify --reference": ["verify", w["onnx"], "--reference", path, "--runs", "1"]}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- row 1: TorchScript whose __setstate__ writes a file ---------------------------------------------------

@pytest.mark.slow
def test_row01_torchscript_code_never_runs_without_consent(world, tmp_path):
    sentinel = tmp_path / "written_by_setstate"
    path = torchscript_writing_on_load(tmp_path, sentinel)
    before = _sha(path)
    for command, args in _slots(world, path, tmp_path / "out").items():
        _refused(_cli(*args), str(path), "__setstate__", "pass --trust-pickle only for files you trust")
        assert not sentinel.exists(), command
        assert not (tmp_path / "out").exists(), command
    with pytest.raises(UnsafePickleError, match="__setstate__.*trust_pickle=True"):
        load(path)
    assert not sentinel.exists() and _sha(path) == before
    load(path, trust_pickle=True)  # the consent: torch.jit.load runs the method, so the fixture is live
    assert sentinel.exists()


# --- row 2: TorchScript whose __setstate__ never returns -----------------------------------------------------

@pytest.mark.slow
def test_row02_torchscript_endless_setstate_is_refused_unrun(tmp_path):
    path = torchscript_looping_on_load(tmp_path)
    _bounded(measured_cli("audit", path), str(path), "__setstate__", "--trust-pickle")


# --- row 3: a pickle dict of keys that all hash alike ------------------------------------------------------

@pytest.mark.slow
def test_row03_colliding_dict_keys_are_refused_in_linear_time(world, tmp_path):
    raw = tmp_path / "colliding.pkl"
    raw.write_bytes(colliding_keys_pickle())
    zipped = colliding_keys_torch_zip(tmp_path)
    text = "the pickle holds 33 different values with one hash"
    for path in (raw, zipped):
        started = time.perf_counter()
        with pytest.raises(BadInputError, match=text):
            load(path)
        with pytest.raises(BadInputError, match=text):
            load_data(path)
        assert time.perf_counter() - started < 5
    _bounded(measured_cli("audit", zipped), str(zipped), text)
    _refused(_cli("tie", world["model"], "-o", tmp_path / "out", "--data", raw), str(raw), text)
    assert not (tmp_path / "out").exists()


# --- row 4: .pt2 size expressions that grow when evaluated ---------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("expr", ["2**(s77 - s77 + 10**18)", "((((((2**64)**64)**64)**64)**64)**64)",
                                  "LShift(1, 10**18)", "Float('1.5', precision=1000000000)"])
def test_row04_growing_pt2_expressions_are_refused_unevaluated(tmp_path, expr):
    path = pt2_with_expression(tmp_path, expr, "expr.pt2")
    started = time.perf_counter()
    with pytest.raises(BadInputError, match="would grow without bound when evaluated"):
        load(path)
    assert time.perf_counter() - started < 5
    if "**" in expr and "s77" in expr or expr.startswith("(((("):  # the campaign's two, in a real process
        _bounded(measured_cli("audit", path), str(path), "symbolic expression", "would grow without bound")


# --- row 5: zero strides that inflate a tiny storage ------------------------------------------------------

def test_row05_views_larger_than_their_storage_are_refused_before_use(world, tmp_path):
    state = expanded_state_dict(tmp_path)
    assert state.stat().st_size < 4096
    inflate = "(strides [0, 0] repeat its elements); refused: save it with .contiguous() or .clone()"
    for args in _slots(world, state, tmp_path / "out").values():
        _refused(_cli(*args), str(state), "tensor 'w' has shape [1048576, 4096]", inflate)
    with pytest.raises(BadInputError, match="tensor 'w' has shape"):
        load(state)
    pt2 = pt2_with_zero_strides(tmp_path)
    _refused(_cli("audit", pt2), "tensor 'fc1.weight' has shape [1048576, 4096]", "over a storage of 48", inflate)
    for dtype in (torch.float32, torch.int64):
        data = expanded_data(tmp_path, dtype)
        for args in (["tie", world["model"], "-o", tmp_path / "out", "--data", data],
                     ["verify", world["onnx"], "--reference", world["merged"], "--data", data, "--runs", "1"]):
            _refused(_cli(*args), str(data), "tensor 'calib_inputs' has shape [262144, 4096]", inflate)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_row05_in_a_real_process_memory_stays_flat(tmp_path):
    path = expanded_state_dict(tmp_path)
    _bounded(measured_cli("audit", path), "strides [0, 0] repeat its elements")


# --- row 6: a zip member that expands far past the file -------------------------------------------------------

def test_row06_zip_members_are_bounded_by_the_file_size(tmp_path):
    path = pt2_with_big_member(tmp_path)  # declares 1.2 GiB in a 15 KB file
    _refused(_cli("audit", path), str(path), "the zip entries expand to 1,258,", "refused as a zip bomb")


@pytest.mark.slow
def test_row06_a_real_deflated_member_is_refused_before_it_is_read(tmp_path):
    path = pt2_with_deflated_member(tmp_path)  # 192 MiB of JSON at ~260:1, under the per-entry ratio cap
    _bounded(measured_cli("audit", path), str(path), "the zip entries expand to 201,", "refused as a zip bomb")


# --- row 7: codebook safetensors with a bad recipe --------------------------------------------------------

_BAD_RECIPES = {
    "bits 0, huge shape": ({"w": {**GOOD_RECIPE, "bits": 0, "shape": [3 * 2**27]}}, None,
                           "bits 0 and k 4 do not fit"),
    "tensors a list": ([GOOD_RECIPE], None, "must be JSON objects"),
    "missing shape": ({"w": {k: v for k, v in GOOD_RECIPE.items() if k != "shape"}}, None, "missing 'shape'"),
    "string shape": ({"w": {**GOOD_RECIPE, "shape": "3,4"}}, None, "'shape' must be a list"),
    "string dims": ({"w": {**GOOD_RECIPE, "shape": ["3", "4"]}}, None, "'shape[0]' must be an integer"),
    "unknown granularity": ({"w": {**GOOD_RECIPE, "granularity": "block"}}, None, "unknown granularity 'block'"),
    "group of 0": ({"w": {**GOOD_RECIPE, "granularity": "group", "group_size": 0}}, None, "needs a group_size >= 1"),
    "codebook absent": ({"w": {**GOOD_RECIPE, "codebook": "nope"}}, None, "names 'nope', which the file does not"),
    "huge shape": ({"w": {**GOOD_RECIPE, "shape": [2**40, 2**40]}}, None, "packed index bytes"),
    "wrong codebook dtype": ({"w": {**GOOD_RECIPE, "dtype": "float16"}}, None, "needs a float16 codebook"),
    "aliases a list": ({"w": GOOD_RECIPE}, [["a", "w"]], "must be JSON objects"),
    "alias without transpose": ({"w": GOOD_RECIPE}, {"a": {"target": "w"}}, "must be {\"target\": name"),
    "alias of nothing": ({"w": GOOD_RECIPE}, {"a": {"target": "zz", "transpose": False}}, "point to tensors"),
}


@pytest.mark.parametrize("case", sorted(_BAD_RECIPES))
def test_row07_codebook_recipes_are_checked_before_any_tensor_is_built(world, tmp_path, case):
    recipes, aliases, text = _BAD_RECIPES[case]
    path = codebook_file(tmp_path / "bad.safetensors", recipes, aliases)
    with pytest.raises(BadInputError, match=None) as info:
        load_codebook_safetensors(path)
    assert str(path) in str(info.value) and text in str(info.value)
    _refused(_cli("verify", path, "--reference", world["merged"]), str(path), text)


@pytest.mark.slow
def test_row07_a_large_legitimate_decode_costs_little_beyond_the_tensor(world, tmp_path):
    n = 1 << 26  # 256 MiB decoded; decoding all indices at once took 8 bytes per index bit on top (512 MiB)
    packed = torch.zeros((n + 7) // 8, dtype=torch.uint8)
    path = codebook_file(tmp_path / "big.safetensors", {"w": {**GOOD_RECIPE, "bits": 1, "k": 2, "shape": [n]}},
                         tensors={"w.codebook": torch.tensor([[0.5, 1.5]]), "w.indices": packed})
    run = measured_cli("verify", path, "--reference", world["merged"])
    assert run.code == 1 and "Traceback" not in run.stderr  # decoded, then compared: the names differ
    assert run.peak_mb < _PEAK_MB + 256, run.peak_mb


# --- row 8: tensors that are not dense CPU real tensors ----------------------------------------------------

_ODD_TENSORS = {
    "meta": (lambda: torch.empty(3, 3, device="meta"), "tensor 'w' is a meta tensor"),
    "sparse": (lambda: torch.sparse_coo_tensor(torch.tensor([[0], [1]]), torch.tensor([1.0]), (2, 2)),
               "holds a sparse tensor"),
    "sparse out of bounds": (lambda: torch.sparse_coo_tensor(torch.tensor([[0, 5], [0, 7]]), torch.tensor([1.0, 2.0]),
                                                             (2, 2), check_invariants=False), "holds a sparse tensor"),
    "qint8": (lambda: torch.quantize_per_tensor(torch.randn(3, 3), 0.1, 0, torch.qint8),
              "tensor 'w' is quantized (qint8)"),
    "nested": (lambda: torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]), "tensor 'w' is a nested tensor"),
    "complex": (lambda: torch.randn(3, dtype=torch.complex64), "tensor 'w' is complex (complex64)"),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", sorted(_ODD_TENSORS))
def test_row08_odd_tensors_are_refused_by_name_and_kind(world, tmp_path, kind):
    make, text = _ODD_TENSORS[kind]
    path = tmp_path / f"{kind}.pt"
    torch.save({"w": make(), "b": torch.zeros(2)}, path)
    for args in _slots(world, path, tmp_path / "out").values():
        _refused(_cli(*args), str(path), text)
    with pytest.raises(BadInputError, match=text.replace("(", r"\(").replace(")", r"\)")):
        load(path)
    data = tmp_path / f"{kind}_data.pt"
    torch.save({"calib_inputs": make(), "test_inputs": torch.zeros(2, 8)}, data)
    with pytest.raises(BadInputError):
        load_data(data)
    assert not (tmp_path / "out").exists()


# --- row 9: ONNX dims with no data behind them; a custom-domain function -----------------------------------

def test_row09_onnx_dims_and_custom_functions(world, tmp_path):
    path = onnx_empty_huge_dims(tmp_path / "dims.onnx")
    text = "initializer 'w' is empty but has dims [0, 4611686018427387904]"
    for args in (["audit", path], ["tie", path, "-o", tmp_path / "out"],
                 ["verify", path, "--reference", world["merged"], "--runs", "1"]):
        _refused(_cli(*args), str(path), text)
    custom = onnx_custom_function(tmp_path / "custom.onnx")
    tied = _cli("tie", custom, "-o", tmp_path / "out")
    assert tied.exit_code == 0, tied.output  # clustered post-training (its one weight is too small: kept)
    assert onnx.load(str(tmp_path / "out" / "custom.tied.onnx")).functions[0].domain == "custom.dom"
    with pytest.raises(BadInputError, match="custom.onnx: onnxruntime could not load the model"):
        verify(custom, torch.nn.Linear(4, 3), torch.randn(2, 4), measure_runtime=False)


# --- row 10: verify --data with the wrong input dtype ---------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.float64])
def test_row10_verify_data_of_another_dtype_is_a_clear_error(world, tmp_path, dtype):
    x = (torch.rand(8, 8) * 10).to(dtype)
    data = save_data(tmp_path / "data.pt", x, None, x, None)
    name = str(dtype).removeprefix("torch.")
    _refused(_cli("verify", world["onnx"], "--reference", world["merged"], "--data", data, "--runs", "1"),
             "input `x` is float32 [", f"the data gives {name} [8, 8]; save the inputs as float32")


# --- row 11: outputs that cannot be written ---------------------------------------------------------------

def _no_partial_outputs(out: Path) -> None:
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left == [], left


def test_row11_write_errors_are_one_line_and_leave_nothing(world, tmp_path, monkeypatch):
    import tempfile

    from safetensors import SafetensorError

    # no permission to create the temporary file (as root a read-only folder does not refuse, so it is simulated)
    out = tmp_path / "o1"
    out.mkdir()
    real_mkstemp = tempfile.mkstemp

    def denied(*a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", kw.get("dir"))
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    _refused(_cli("export", world["merged"], "--onnx", out / "m.onnx"), f"{out}: permission denied; nothing was written")
    monkeypatch.setattr(tempfile, "mkstemp", real_mkstemp)
    _no_partial_outputs(out)

    # the disk fills while the second file of a pair is written: the first is removed again
    import safetensors.torch

    def full(*a, **kw):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "o2"
    _refused(_cli("export", world["merged"], "--onnx", out / "m.onnx", "--safetensors", out / "m.safetensors"),
             f"{out}: no space left on device; nothing was written")
    _no_partial_outputs(out)
    monkeypatch.undo()

    # `tie --stream` whose output folder is a dangling symlink, or a symlink to an empty folder
    ckpt = tmp_path / "ckpt.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(ckpt))
    for target in (tmp_path / "missing", tmp_path / "empty"):
        out = tmp_path / f"o-{target.name}"
        out.mkdir()
        if target.name == "empty":
            target.mkdir()
        (out / "ckpt.tied").symlink_to(target)
        _refused(_cli("tie", ckpt, "--stream", "-o", out, "--force"), "ckpt.tied is a symbolic link")
        assert sorted(p.name for p in out.iterdir()) == ["ckpt.tied"]
        assert not target.exists() or list(target.iterdir()) == []


@pytest.mark.slow
def test_row11_a_real_read_only_folder(world, tmp_path):
    """A real EACCES: as root (who writes anywhere) the command runs as `nobody` through setpriv."""
    import shutil
    import tempfile

    as_nobody = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: a read-only folder does not refuse root")
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        probe = subprocess.run([*as_nobody, sys.executable, "-c", "import cli, torch"], check=False, cwd=ROOT,
                               env=ENV, capture_output=True, text=True, timeout=120)
        if probe.returncode != 0:  # e.g. a checkout or venv inside a folder only root may enter (mktemp -d)
            pytest.skip(f"`nobody` cannot import the toolkit from {ROOT}: {probe.stderr.strip().splitlines()[-1]}")
    shared = Path(tempfile.mkdtemp())  # readable by `nobody`, unlike pytest's folders
    try:
        shared.chmod(0o755)
        model = Path(shutil.copy(world["merged"], shared / "m.pt2"))
        model.chmod(0o644)
        out = shared / "ro"
        out.mkdir(mode=0o555)
        out.chmod(0o555)
        proc = subprocess.run([*as_nobody, sys.executable, "-m", "cli", "export", str(model), "--onnx",
                               str(out / "m.onnx")], check=False, cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines() == [f"error: {out}: permission denied; nothing was written"]
        assert list(out.iterdir()) == []
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.slow
def test_row11_a_real_file_size_limit(world, tmp_path):
    """`ulimit -f` (EFBIG) during `export --onnx --safetensors`: one line, exit 2, neither file left."""
    import resource

    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "cli", "export", str(world["merged"]), "--onnx", str(out / "m.onnx"),
                           "--safetensors", str(out / "m.safetensors")], check=False, cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048)))
    assert proc.returncode == 2, proc.stderr
    expected = f"error: {out}: file too large: a file-size limit (ulimit -f?); nothing was written"
    assert proc.stderr.splitlines() == [expected]
    _no_partial_outputs(out)


_FULL_DISK_DRIVER = r"""
import json, os, subprocess, sys
mnt, model = sys.argv[1:]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", mnt], check=True)
proc = subprocess.run([sys.executable, "-m", "cli", "export", model, "--onnx", mnt + "/m.onnx", "--safetensors",
                       mnt + "/m.safetensors"], capture_output=True, text=True)
print(json.dumps({"rc": proc.returncode, "stderr": proc.stderr, "files": sorted(os.listdir(mnt))}))
"""


@pytest.mark.slow
def test_row11_a_real_full_disk_under_the_second_file_of_a_pair(world, tmp_path):
    """On an 8 KiB tmpfs (a private mount namespace) the ONNX file fits, the pair does not: neither is left.

    (Measured by hand: `export --onnx` alone succeeds on the same 8 KiB tmpfs.)"""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        proc = subprocess.run(["unshare", "-rm", sys.executable, "-c", _FULL_DISK_DRIVER, str(mnt), str(world["merged"])],
                              check=False, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
    except FileNotFoundError:
        pytest.skip("no unshare here")
    if proc.returncode != 0 and "mount" in proc.stderr:
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    run = json.loads(proc.stdout.splitlines()[-1])
    assert run["rc"] == 2, run["stderr"]
    assert run["stderr"] == f"error: {mnt}: no space left on device; nothing was written\n"
    assert run["files"] == []
    assert world["onnx"].stat().st_size <= 8192 - 1024  # the ONNX file alone fits: it was written, then rolled back


# --- row 12: a stranger's ONNX that loops or allocates without bound -----------------------------------------

def test_row12_onnx_that_asks_for_too_much_is_refused_unrun(world, tmp_path):
    loop = onnx_loop(tmp_path / "loop.onnx")
    _refused(_cli("verify", loop, "--reference", world["merged"], "--runs", "1"), str(loop),
             "Loop node 'y' loops 4,611,686,018,427,387,904 times (more than 10,000,000); refused")
    fill = onnx_constant_of_shape(tmp_path / "fill.onnx")
    assert fill.stat().st_size < 600
    _refused(_cli("verify", fill, "--reference", world["merged"], "--runs", "1"), str(fill),
             "ConstantOfShape node 'big' would allocate 3,600,000,000 bytes")


@pytest.mark.slow
def test_row12_a_data_dependent_loop_is_stopped_by_the_time_budget(tmp_path):
    path = onnx_loop(tmp_path / "loop_n.onnx", trips=None)

    class Same(torch.nn.Module):
        def forward(self, x, n):
            return x + n
    started = time.perf_counter()
    with pytest.raises(BadInputError, match=r"running the model in onnxruntime ran longer than 3 s and was stopped"):
        verify(path, Same(), (torch.zeros(1), torch.tensor(2**62)), measure_runtime=False,
               budget=RunBudget(seconds=3, memory_bytes=1 << 30))
    assert time.perf_counter() - started < 15


@pytest.mark.slow
def test_row12_in_a_real_process(world, tmp_path):
    fill = onnx_constant_of_shape(tmp_path / "fill.onnx")
    _bounded(measured_cli("verify", fill, "--reference", world["merged"], "--runs", "1"), "would allocate")


# --- row 13: names with control characters ---------------------------------------------------------------

def test_row13_names_from_files_are_printed_escaped(tmp_path):
    path = tmp_path / "names.safetensors"
    names = {"clear\x1b[2J": "clear\\x1b[2J", "row\nerror: forged": "row\\nerror: forged", "bidi\u202eevil": "bidi\\u202eevil"}
    save_file({n: torch.randn(40, 40) for n in names}, str(path))
    result = _cli("audit", path, "--top", "0")
    assert result.exit_code == 0, result.output
    for raw, shown in names.items():
        assert raw not in result.output and shown in result.output
    assert "\x1b" not in result.output and "\u202e" not in result.output
    markdown = _cli("audit", path, "--markdown")
    assert markdown.exit_code == 0 and "\x1b" not in markdown.output and "row\\nerror: forged" in markdown.output
    missing = tmp_path / "gone\nerror: forged.pt"
    line = _refused(_cli("audit", missing), "gone\\nerror: forged.pt: file not found")
    assert "\n" not in line


# --- row 14: Ctrl-C ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_row14_ctrl_c_during_start_up_prints_one_line(tmp_path):
    run = measured_cli("audit", ROOT / "samples" / "digits_mlp.pt2", interrupt_after=0.3)
    assert run.code == 130 and run.stderr == "interrupted: no output was written\n", run.stderr
    assert run.stdout == ""


def test_row14_ctrl_c_after_the_outputs_were_written_says_so(world, tmp_path, monkeypatch):
    def interrupt(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr("cli.tie.emit", interrupt)  # the tables are printed after every file is in place
    out = tmp_path / "out"
    result = _cli("tie", world["model"], "-o", out, "--bits", "2", "--no-onnx")
    assert result.exit_code == 3, result.output
    written = ["clean.tied.pt2", "clean.plan.json", "clean.report.json", "clean.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == sorted(written)
    line, = result.stderr.splitlines()
    assert line.startswith("interrupted: ") and line.endswith("were written and are complete; nothing else was written")
    assert all(str(out / name) in line for name in written)
    json.loads((out / "clean.report.json").read_text())
    nothing = tmp_path / "nothing"
    monkeypatch.setattr("cli.tie.tie_file", interrupt)
    result = _cli("tie", world["model"], "-o", nothing)
    assert result.exit_code == 130 and result.stderr == "interrupted: no output was written\n"


# --- row 15: inputs whose squares overflow; a non-finite output is never a pass ----------------------------------

def test_row15_huge_inputs_are_refused_and_nan_never_verifies(world, tmp_path):
    x = torch.full((16, 8), 3e38)
    data = save_data(tmp_path / "huge.pt", x, None, x, None)
    _refused(_cli("tie", world["model"], "-o", tmp_path / "out", "--data", data), str(data),
             "calib_inputs has values up to 3e+38; values beyond 1.8e+19 overflow float32 arithmetic")
    assert not (tmp_path / "out").exists()

    class Square(torch.nn.Module):
        def forward(self, x):
            return x * x
    onnx_path = tmp_path / "square.onnx"
    torch.onnx.export(Square(), (torch.ones(2, 8),), str(onnx_path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}})
    result = verify(onnx_path, Square(), torch.full((2, 8), 3e38), measure_runtime=False, isolate=False)
    assert not result.passed and result.lines()[0].startswith("✗ y")
    assert result.notes == [("`y`: the ONNX output has 16 and the reference output has 16 NaN or infinite values; "
                             "a non-finite output fails the check")]


# --- row 16: the gaps --------------------------------------------------------------------------------------

def _secret_and_model(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\x01" * 48)
    return folder, folder / "m.onnx"


def test_row16_every_onnx_tensor_slot_is_checked(tmp_path):
    _, path = _secret_and_model(tmp_path)
    escaping = [("location", "../secret.bin")]
    sparse = helper.make_sparse_tensor(external_tensor("v", [1], escaping), helper.make_tensor("i", 7, [1], [0]), [4])
    model = onnx_matmul_model([numpy_helper.from_array(np.ones((4, 3), np.float32), "w")])
    model.graph.node.append(helper.make_node("Constant", [], ["c"], sparse_value=sparse))
    attr = helper.make_attribute("sparse_values", [sparse])
    model.graph.node[-1].attribute.append(attr)
    del model.graph.node[-1].attribute[0]
    onnx.save(model, str(path))
    with pytest.raises(BadInputError, match="escapes the model's folder"):
        load(path)
    model = onnx_matmul_model([numpy_helper.from_array(np.ones((4, 3), np.float32), "w")])
    info = model.training_info.add()
    info.initialization.CopyFrom(helper.make_graph([], "init", [], [], initializer=[external_tensor("t", [12], escaping)]))
    onnx.save(model, str(path))
    with pytest.raises(BadInputError, match="escapes the model's folder"):
        load(path)
    for location in ("x/_ORT_MEM_ADDR_/y", "_ORT_MEM_ADDR_"):
        onnx.save(onnx_matmul_model([external_tensor("w", [4, 3], [("location", location), ("offset", "4096"),
                                                                    ("length", "48")])]), str(path))
        with pytest.raises(BadInputError, match="onnxruntime's in-memory marker"):
            load(path)


def test_row16_hard_linked_shards_are_refused(tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_file({"a": torch.zeros(2)}, str(outside))
    folder = tmp_path / "model"
    folder.mkdir()
    os.link(outside, folder / "shard.safetensors")
    index = folder / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "shard.safetensors"}}))
    with pytest.raises(BadInputError, match="shard 'shard.safetensors' has 2 hard links; refused"):
        load(index)
    _refused(_cli("audit", index), "has 2 hard links")


def test_row16_weights_may_start_with_executable_magic(tmp_path):
    """Tensor data is arbitrary bytes: a weight reading as `\\x7fELF` / `cafebabe` is a weight, not native code."""
    w = elf_weight()
    assert w.numpy().tobytes()[:4] == b"\x7fELF"
    state = tmp_path / "elf.pt"
    torch.save({"w": w}, state)
    assert torch.equal(load(state).tensors["w"], w)
    model = TinyMLP()
    with torch.no_grad():
        model.fc1.weight[0, :4] = w.reshape(-1)
    pt2 = export_pt2(tmp_path / "elf.pt2", model)
    assert torch.equal(load(pt2).tensors["fc1.weight"][0, :4], w.reshape(-1))
    script = tmp_path / "elf_script.pt"
    torch.jit.save(torch.jit.trace(model.eval(), torch.randn(2, 8)), str(script))
    assert torch.equal(load(script).tensors["fc1.weight"][0, :4], w.reshape(-1))
    native = save_state_dict(tmp_path / "native.pt")
    from tests.helpers.io_files import rewrite_zip
    rewrite_zip(native, tmp_path / "native_code.pt", lambda n, d: d, add={"lib.so": b"\x7fELF" + bytes(60)})
    with pytest.raises(BadInputError, match="is native code"):
        load(tmp_path / "native_code.pt")
