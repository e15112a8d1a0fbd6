"""Outputs are written atomically, never over an input, never over a file without --force; a killed,
interrupted or disk-full run leaves the earlier outputs as they were; exit codes are as documented.

Every command is run through click's CliRunner on small files. The interruption tests run
`python -m cli tie` in real processes on a 1024x1024 layer and stop them at chosen moments (SIGKILL
while it exports and while it writes its temporary files, SIGINT while it exports), fill a real
tmpfs, and simulate a crash between the renames in-process. A full disk is also simulated for every
command by making the atomic writer's fsync fail with ENOSPC.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner, Result
from torch import nn

from cli.main import cli
from compress import atomic as _atomic
from compress.atomic import TMP_PREFIX
from compress.export import load_safetensors
from compress.io import load
from compress.pipeline import tie
from compress.tying import TieConfig
from tests.helpers import ROOT
from tests.helpers.models import save_data, save_pt2, trained_two_layer

TIE_OUTPUTS = ("tied.pt2", "plan.json", "report.json", "onnx", "safetensors")


def _cli(*args) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted(folder.iterdir()) if p.is_file()}


@dataclass
class Files:
    """A small model, its data, its `compress tie` outputs (merged .pt2, ONNX, safetensors), in `folder`."""

    folder: Path
    model: Path
    data: Path
    merged: Path
    onnx: Path
    safetensors: Path


@pytest.fixture(scope="module")
def _made(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("made")
    model, splits = trained_two_layer(steps=5)
    save_pt2(model, splits.calib_inputs[:4], folder / "m.pt2")
    save_data(folder / "data.pt", splits.calib_inputs, splits.calib_targets, splits.test_inputs,
              splits.test_targets)
    result = _cli("tie", folder / "m.pt2", "-o", folder, "--bits", "2")
    assert result.exit_code == 0, result.output
    for name in ("m.plan.json", "m.report.json"):
        (folder / name).unlink()
    return folder


@pytest.fixture
def files(_made, tmp_path) -> Files:
    """Fresh copies in this test's own `inputs/` folder (so a write next to an input would show)."""
    folder = tmp_path / "inputs"
    shutil.copytree(_made, folder)
    return Files(folder, folder / "m.pt2", folder / "data.pt", folder / "m.tied.pt2", folder / "m.onnx",
                 folder / "m.safetensors")


# command -> (argv writing into `out`, the files it writes there)
def _commands(f: Files, out: Path) -> dict[str, tuple[list, list[str]]]:
    return {
        "audit": (["audit", f.model, "--json", out / "a.json", "--plot", out / "a.png"], ["a.json", "a.png"]),
        "tie": (["tie", f.model, "-o", out, "--data", f.data, "--epochs", "0", "--json", out / "t.json"],
                [f"m.{s}" for s in TIE_OUTPUTS] + ["t.json"]),
        "export": (["export", f.merged, "--onnx", out / "e.onnx", "--safetensors", out / "e.safetensors",
                    "--json", out / "e.json"], ["e.onnx", "e.safetensors", "e.json"]),
        "verify": (["verify", f.onnx, "--reference", f.merged, "--data", f.data, "--runs", "1",
                    "--json", out / "v.json"], ["v.json"]),
    }


# --- atomic outputs, inputs untouched -------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("command", ["audit", "tie", "export", "verify"])
def test_every_output_is_renamed_into_place_and_inputs_are_untouched(files, tmp_path, monkeypatch, command):
    out = tmp_path / "out"
    args, written = _commands(files, out)[command]
    renames: list[tuple[Path, Path]] = []
    replace = os.replace

    def _recording_replace(src, dst, **kw):
        renames.append((Path(src), Path(dst)))
        return replace(src, dst, **kw)

    monkeypatch.setattr(os, "replace", _recording_replace)
    inputs = _hashes(files.folder)
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(written)  # no temporary file left behind
    for name in written:
        src = next(s for s, d in reversed(renames) if d == out / name)  # the rename that made it
        assert src.parent == out and src.name.startswith(TMP_PREFIX), (name, src)
    assert _hashes(files.folder) == inputs  # inputs byte-identical, nothing written next to them


# --- --force and the inputs -----------------------------------------------------------------------

# (command, the output that already exists)
EXISTING = [("audit", "a.json"), ("audit", "a.png"), ("tie", "m.safetensors"), ("tie", "m.onnx"),
            ("export", "e.onnx"), ("export", "e.safetensors"), ("export", "e.json"), ("verify", "v.json")]


@pytest.mark.parametrize(("command", "existing"), EXISTING, ids=[f"{c}-{e}" for c, e in EXISTING])
def test_an_existing_output_is_not_overwritten_without_force(files, tmp_path, command, existing):
    out = tmp_path / "out"
    out.mkdir()
    (out / existing).write_bytes(b"earlier output")
    args, _ = _commands(files, out)[command]
    result = _cli(*args)
    assert result.exit_code == 2
    assert result.stderr == f"error: {out / existing} already exists; pass --force to overwrite it\n"
    assert [p.name for p in out.iterdir()] == [existing]  # refused before anything was written
    assert (out / existing).read_bytes() == b"earlier output"


def test_force_replaces_an_existing_output(files, tmp_path):
    (tmp_path / "a.json").write_bytes(b"earlier output")
    result = _cli("audit", files.model, "--json", tmp_path / "a.json", "--force")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "a.json").read_text())["path"] == str(files.model)


def _same_as_input(f: Files) -> tuple[list, Path]:
    """Ways to name an input as an output: case -> (argv, the output path given)."""
    link = f.folder / "link.json"
    link.symlink_to(f.model)
    st = f.folder / "w.safetensors"
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.randn(64, 64)}, str(st))
    return {
        "audit --json MODEL": (["audit", f.model, "--json", f.model], f.model),
        "audit --json symlink-to-MODEL": (["audit", f.model, "--json", link], link),
        "tie --json MODEL": (["tie", f.model, "-o", f.folder / "o", "--json", f.model], f.model),
        "tie X.safetensors -o its folder": (["tie", st, "-o", f.folder], st),  # writes <stem>.safetensors
        "export --safetensors MODEL": (["export", f.merged, "--safetensors", f.merged], f.merged),
        "export --onnx MODEL": (["export", f.merged, "--onnx", f.merged], f.merged),
        "verify --json MODEL": (["verify", f.onnx, "--reference", f.merged, "--json", f.onnx], f.onnx),
        "verify --json REFERENCE": (["verify", f.onnx, "--reference", f.merged, "--json", f.merged], f.merged),
    }


SAME = ["audit --json MODEL", "audit --json symlink-to-MODEL", "tie --json MODEL",
        "tie X.safetensors -o its folder", "export --safetensors MODEL", "export --onnx MODEL",
        "verify --json MODEL", "verify --json REFERENCE"]


@pytest.mark.parametrize("case", SAME)
def test_an_output_that_is_an_input_is_refused_even_with_force(files, case):
    args, output = _same_as_input(files)[case]
    before = _hashes(files.folder)
    result = _cli(*args, "--force")
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {output}: output would overwrite the input; choose another output path\n"
    assert _hashes(files.folder) == before
    assert not (files.folder / "o").exists()


# --- a full disk ----------------------------------------------------------------------------------

def _disk_full(path) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.slow
@pytest.mark.parametrize("command", ["audit", "export", "verify", "tie"])
def test_a_full_disk_is_a_clear_error_and_leaves_earlier_outputs(files, tmp_path, monkeypatch, command):
    """The disk fills while the outputs are flushed: exit 2, one line, earlier outputs as they were."""
    out = tmp_path / "out"
    args, written = _commands(files, out)[command]
    out.mkdir()
    for name in written:
        (out / name).write_bytes(b"earlier " + name.encode())
    seeded = _hashes(out)
    monkeypatch.setattr(_atomic, "fsync", _disk_full)
    result = _cli(*args, "--force")
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].endswith(": no space left on device; nothing was written")
    assert _hashes(out) == seeded and sorted(p.name for p in out.iterdir()) == sorted(seeded)


def test_a_full_disk_during_tie_names_the_output_folder(files, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(_atomic, "fsync", _disk_full)
    result = _cli("tie", files.model, "-o", out)
    assert result.stderr == f"error: {out}: no space left on device; nothing was written\n"


# --- interrupted runs of `compress tie` in a real process ------------------------------------------
#
# Four real runs of `python -m cli tie` start together (each costs seconds of start-up and export):
# two are killed with SIGKILL at chosen moments, one gets SIGINT, one writes to a full tmpfs.
# The output folder of each holds the earlier outputs of the same names when it starts. (A poll
# cannot catch the few milliseconds between the renames: `test_a_crash_between_the_renames...` does.)

@dataclass
class Run:
    """One `compress tie` process: where it wrote, when it is stopped, and how it ended."""

    out: Path
    moment: str | None = None  # stop it when this happens (see MOMENTS); None: let it finish
    sig: int = signal.SIGKILL
    proc: subprocess.Popen | None = None
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""


def _temporary(out: Path, want_dir: bool) -> bool:
    for p in out.iterdir():
        if p.name.startswith(TMP_PREFIX) and p.is_dir() == want_dir:
            return True
    return False


MOMENTS: dict[str, Callable[[Path], bool]] = {
    "exporting": lambda out: _temporary(out, want_dir=True),  # its export/verify folder appeared
    "writing": lambda out: _temporary(out, want_dir=False),  # its temporary outputs appeared
}

_ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}

_ENOSPC_DRIVER = r"""
import hashlib, json, os, shutil, subprocess, sys
mnt, size, model, *seeds = sys.argv[1:]
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt], check=True)
out = os.path.join(mnt, "out")
os.mkdir(out)
for s in seeds:
    shutil.copy(s, out)
proc = subprocess.run([sys.executable, "-m", "cli", "tie", model, "-o", out, "--force"], capture_output=True,
                      text=True)
files = {n: hashlib.sha256(open(os.path.join(out, n), "rb").read()).hexdigest() for n in os.listdir(out)}
print(json.dumps({"rc": proc.returncode, "stderr": proc.stderr, "files": files}))
"""


def _seed(out: Path, earlier: dict[str, bytes]) -> None:
    out.mkdir(parents=True)
    for name, data in earlier.items():
        (out / name).write_bytes(data)


def _tmpfs_works(folder: Path) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=16k tmpfs '{folder}'"],
                               check=False, capture_output=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _start(args: list) -> subprocess.Popen:
    return subprocess.Popen([*map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_ENV)


def _drive(runs: dict[str, Run], timeout: float = 300) -> None:
    """Poll every run's folder; signal each at its moment; wait for all to end."""
    deadline = time.monotonic() + timeout
    try:
        waiting = {k: r for k, r in runs.items() if r.moment}
        while waiting and time.monotonic() < deadline:
            for key, r in list(waiting.items()):
                if MOMENTS[r.moment](r.out):
                    r.proc.send_signal(r.sig)
                    del waiting[key]
                elif r.proc.poll() is not None:
                    del waiting[key]  # ended before its moment: the test on it fails and says so
            time.sleep(0.001)
        for r in runs.values():
            r.stdout, r.stderr = r.proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            r.returncode = r.proc.returncode
    finally:
        for r in runs.values():
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()


@pytest.fixture(scope="module")
def tie_runs(tmp_path_factory) -> tuple[dict[str, Run], dict[str, bytes]]:
    """The four runs on a 1024x1024 layer (`big.pt2`); folders seeded with earlier `big.*` outputs."""
    root = tmp_path_factory.mktemp("runs")
    model = save_pt2(nn.Sequential(nn.Linear(1024, 1024)), torch.randn(2, 1024), root / "big.pt2")
    (root / "earlier").mkdir()
    small = save_pt2(nn.Sequential(nn.Linear(64, 32)), torch.randn(2, 64), root / "earlier" / "big.pt2")
    done = tie(load(small), TieConfig(bits=2, min_elements=1), out_dir=root / "earlier" / "out")
    earlier = {p.name: p.read_bytes() for p in done.paths}
    runs = {
        "kill-exporting": Run(root / "kill-exporting", "exporting"),
        "kill-writing": Run(root / "kill-writing", "writing"),
        "ctrl-c": Run(root / "ctrl-c", "exporting", signal.SIGINT),
    }
    for r in runs.values():
        _seed(r.out, earlier)
        r.proc = _start([sys.executable, "-m", "cli", "tie", model, "-o", r.out, "--force"])
    if _tmpfs_works(root / "mnt"):
        # a 64 KiB disk holding the earlier outputs: the 512x512 model's exports do not fit
        (root / "mid").mkdir()
        mid = save_pt2(nn.Sequential(nn.Linear(512, 512)), torch.randn(2, 512), root / "mid" / "big.pt2")
        runs["disk-full"] = Run(root / "mnt")
        seeds = sorted((root / "earlier" / "out").iterdir())
        runs["disk-full"].proc = _start(["unshare", "-rm", sys.executable, "-c", _ENOSPC_DRIVER, root / "mnt",
                                         "64k", mid, *seeds])
    _drive(runs)
    return runs, earlier


def _complete(path: Path) -> None:
    """Raise unless `path` is a whole, readable output of its kind."""
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".pt2":
        assert load(path).module is not None
    elif path.suffix == ".onnx":
        onnx.checker.check_model(str(path))
    elif path.suffix == ".safetensors":
        load_safetensors(path)


def _after_kill(tie_runs, key: str) -> set[str]:
    """Names of the targets that changed; each target is whole (earlier or new) and leftovers are temporary."""
    runs, earlier = tie_runs
    r = runs[key]
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    changed = set()
    for name, data in earlier.items():
        if (r.out / name).read_bytes() != data:
            _complete(r.out / name)
            changed.add(name)
    leftovers = {p.name for p in r.out.iterdir()} - set(earlier)
    assert all(n.startswith(TMP_PREFIX) for n in leftovers), leftovers
    return changed


@pytest.mark.slow
def test_killed_while_exporting_the_earlier_outputs_are_intact(tie_runs):
    assert _after_kill(tie_runs, "kill-exporting") == set()


@pytest.mark.slow
def test_killed_while_writing_every_target_is_whole(tie_runs):
    """Usually all are still the earlier files; a late kill may find renames done, the model last."""
    changed = _after_kill(tie_runs, "kill-writing")
    assert "big.tied.pt2" not in changed or changed == set(tie_runs[1])


class _Crash(BaseException):
    """Stands for the process dying: nothing in the toolkit catches it."""


@pytest.mark.slow
@pytest.mark.parametrize("renamed", [1, 4])
def test_a_crash_between_the_renames_never_leaves_a_new_model_with_earlier_companions(
        files, tmp_path, monkeypatch, renamed):
    """The model is renamed last, so a new model file means every companion is new and whole."""
    out = tmp_path / "out"
    args, _ = _commands(files, out)["tie"]
    targets = [f"m.{s}" for s in TIE_OUTPUTS]
    out.mkdir()
    for name in targets:
        (out / name).write_bytes(b"earlier")
    replace, done = os.replace, []

    def _dies_after_some_renames(src, dst, **kw):
        if Path(dst).parent == out and Path(dst).name in targets:
            if len(done) == renamed:
                raise _Crash
            done.append(Path(dst).name)
        return replace(src, dst, **kw)

    monkeypatch.setattr(os, "replace", _dies_after_some_renames)
    with pytest.raises(_Crash):
        _cli(*args[:-2], "--force")  # (without --json)
    changed = {n for n in targets if (out / n).read_bytes() != b"earlier"}
    assert changed == set(done) and len(changed) == renamed and "m.tied.pt2" not in changed
    for name in changed:
        _complete(out / name)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_with_exit_130_and_no_new_outputs(tie_runs):
    runs, earlier = tie_runs
    r = runs["ctrl-c"]
    assert r.returncode == 130, r.stderr
    assert r.stderr.splitlines()[-1] == "interrupted: no output was written"
    assert "Traceback" not in r.stderr
    assert {p.name: p.read_bytes() for p in r.out.iterdir()} == earlier  # and no temporary files left


@pytest.mark.slow
def test_a_real_full_disk_fails_cleanly_and_keeps_the_earlier_outputs(tie_runs):
    """On a 64 KiB tmpfs (a private mount namespace) holding earlier outputs, a bigger tie fails cleanly."""
    runs, earlier = tie_runs
    if "disk-full" not in runs:
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    r = runs["disk-full"]
    assert r.returncode == 0, r.stderr
    run = json.loads(r.stdout.splitlines()[-1])
    assert run["rc"] == 2
    lines = run["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].endswith(": no space left on device; nothing was written")
    assert run["files"] == {name: hashlib.sha256(data).hexdigest() for name, data in earlier.items()}


# --- exit codes as README.md documents them -------------------------------------------------------

def test_exit_0_on_success(files):
    result = _cli("audit", files.model)
    assert result.exit_code == 0 and result.stderr == ""


def test_exit_1_when_verification_fails_and_the_files_stay(files, tmp_path):
    other = tmp_path / "other"
    assert _cli("tie", files.model, "-o", other, "--bits", "1", "--no-onnx", "--no-safetensors").exit_code == 0
    result = _cli("verify", files.onnx, "--reference", other / "m.tied.pt2", "--runs", "1",
                  "--json", tmp_path / "v.json")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"error: {files.onnx}: 1 of 1 outputs differ from {other / 'm.tied.pt2'} beyond the tolerance; "
        "the files are kept for inspection")
    assert json.loads((tmp_path / "v.json").read_text())["passed"] is False


def test_exit_2_for_bad_input_and_bad_usage(files):
    bad = _cli("tie", files.model, "--bits", "9")
    assert bad.exit_code == 2
    assert bad.stderr == "error: command line: bits must be between 1 and 8, got 9\n"
    assert _cli("tie").exit_code == 2  # click's usage error: a missing MODEL
    nothing = _cli("export", files.merged)
    assert nothing.stderr == "error: nothing to write: give --onnx, --safetensors or --ort\n"


def test_exit_130_when_interrupted(files, tmp_path, monkeypatch):
    def _ctrl_c(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("cli.audit.audit", _ctrl_c)
    result = _cli("audit", files.model, "--json", tmp_path / "a.json")
    assert result.exit_code == 130
    assert result.stderr == "interrupted: no output was written\n"
    assert not (tmp_path / "a.json").exists()
