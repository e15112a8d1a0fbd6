"""Every hostile file, given to every command in every file slot, is refused and runs nothing.

The payloads of `hostile_files()` would each create a sentinel file if they ever ran. Each command
(`audit`, `tie`, `export`, `verify`) gets each file as its model, and `tie`/`verify` also as
`--data`, `--reference` and `--original`. The contract, checked for every pair through click's
CliRunner (and once in a real process):

- exit code 2, one line on stderr starting `error: ` and naming the file, no traceback;
- where the command could load the file with `--trust-pickle`, the message names that option; where
  it never unpickles that slot (a data file, the ONNX/safetensors file `verify` checks), it does not
  offer an option that would not help;
- no sentinel appears, no output is written and the hostile file is unchanged.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from tests.helpers import ROOT
from tests.helpers.io_files import hostile_files, hostile_ids, payload_bytes, sentinel_dir, sentinels
from tests.helpers.models import save_data, save_pt2, trained_two_layer


@dataclass
class World:
    """Hostile files and the clean files that the other slots of each command need."""

    root: Path
    hostile: dict[str, Path]
    model: Path  # a clean .pt2
    data: Path  # a clean data file
    merged: Path  # `compress tie` output for `model`
    onnx: Path  # its ONNX export


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("cli_security")
    model, splits = trained_two_layer(steps=5)
    pt2 = save_pt2(model, splits.calib_inputs[:4], root / "clean.pt2")
    data = save_data(root / "data.pt", splits.calib_inputs, splits.calib_targets, splits.test_inputs,
                     splits.test_targets)
    made = CliRunner().invoke(cli, ["tie", str(pt2), "-o", str(root / "tied"), "--bits", "2"])
    assert made.exit_code == 0, made.output
    tied = root / "tied"
    return World(root, hostile_files(root), pt2, data, tied / "clean.tied.pt2", tied / "clean.onnx")


# command id -> argv with the hostile file `h` in that slot, writing (if it ever did) into `out`
def _commands(w: World, h: str, out: Path) -> dict[str, list[str]]:
    return {
        "audit": ["audit", h, "--json", str(out / "audit.json")],
        "tie": ["tie", h, "-o", str(out)],
        "tie --data": ["tie", str(w.model), "-o", str(out), "--data", h],
        "export": ["export", h, "--onnx", str(out / "m.onnx"), "--safetensors", str(out / "m.safetensors")],
        "verify MODEL": ["verify", h, "--reference", str(w.merged), "--runs", "1", "--json", str(out / "v.json")],
        "verify --reference": ["verify", str(w.onnx), "--reference", h, "--runs", "1"],
        "verify --original": ["verify", str(w.onnx), "--reference", str(w.merged), "--original", h,
                              "--runs", "1"],
        "verify --data": ["verify", str(w.onnx), "--reference", str(w.merged), "--data", h, "--runs", "1"],
    }


# Slots that read the hostile file first take the whole catalogue (a refusal costs milliseconds);
# slots that first load a clean model take one file per trick family.
FIRST_READ = ["audit", "tie", "export", "verify --reference", "verify --original"]
READ_AFTER_A_MODEL = ["tie --data", "verify MODEL", "verify --data"]
FAMILIES = ["pickle-os_system-p0", "pickle-runpy_run_path-p5", "torch_zip-builtins_exec",
            "pt2_sample_inputs-os_system", "pt2_constant-nested_pickle_loads",
            "pt2_sample_inputs_zipped-os_system",
            "pt2_opaque_constant-os_system", "wrong_extension-onnx", "wrong_extension-safetensors",
            "zip_odd_flags-os_system"]
CASES = ([(c, f) for c in FIRST_READ for f in hostile_ids()]
         + [(c, f) for c in READ_AFTER_A_MODEL for f in FAMILIES])


def _honours_trust(command: str, fid: str) -> bool:
    """Whether `--trust-pickle` would let this slot load the file (so the message should name it)."""
    if command in ("tie --data", "verify --data", "verify MODEL"):
        return False  # data files and the checked export are never unpickled
    # `tie x.onnx` clusters the ONNX file directly, never through the pickle loader
    return not (command == "tie" and fid == "wrong_extension-onnx")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _invoke(args: list[str]):
    return CliRunner().invoke(cli, args)


def _assert_refused(result, path: Path, out: Path, root: Path) -> str:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # a user error, not a crash
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(path) in lines[0]
    assert sentinels(root) == []
    assert not out.exists() or sorted(out.iterdir()) == []
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(("command", "fid"), CASES, ids=[f"{c}-{f}" for c, f in CASES])
def test_hostile_file_is_refused_in_every_slot_of_every_command(world, command, fid, tmp_path):
    path = world.hostile[fid]
    before = _sha(path)
    out = tmp_path / "out"
    result = _invoke(_commands(world, str(path), out)[command])
    message = _assert_refused(result, path, out, world.root)
    offer = "pass --trust-pickle only for files you trust"
    if fid.startswith("zip_odd_flags"):
        assert "--trust-pickle does not change this" in message
    elif _honours_trust(command, fid):
        assert offer in message
    else:
        assert "--trust-pickle" not in message
        if command in ("tie --data", "verify --data"):
            # a pickle is refused by the unpickler; a .pt2 archive is not a data file at all
            assert ("refused to unpickle" in message and "a data file must be a plain dict of tensors" in message
                    or "a .pt2 program, not a data file" in message)
    assert _sha(path) == before


@pytest.mark.parametrize("fid", FAMILIES[:-1])  # (the odd-flags zip is refused whatever the options)
@pytest.mark.parametrize("command", READ_AFTER_A_MODEL)
def test_trust_pickle_covers_only_the_model_never_data_or_the_checked_export(world, command, fid, tmp_path):
    path = world.hostile[fid]
    out = tmp_path / "out"
    result = _invoke([*_commands(world, str(path), out)[command], "--trust-pickle"])
    message = _assert_refused(result, path, out, world.root)
    assert "--trust-pickle" not in message


def test_the_payloads_are_live_through_the_cli(tmp_path):
    """With --trust-pickle (the user's consent) the same payload does run: the refusal is what protects."""
    path = tmp_path / "live.pt"
    path.write_bytes(payload_bytes("os_system", sentinel_dir(tmp_path) / "live"))
    result = _invoke(["audit", str(path), "--trust-pickle"])
    assert result.exit_code == 2  # the unpickled object is not a model
    assert sentinels(tmp_path) == ["live"]


@pytest.mark.slow
def test_a_real_process_prints_one_line_and_exits_2(world, tmp_path):
    path = world.hostile["pt2_constant-builtins_exec"]
    proc = subprocess.run([sys.executable, "-m", "cli", "tie", str(path), "-o", str(tmp_path / "out")],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [(
        f"error: {path}: entry '_clean/data/constants/tensor_0': refused to unpickle (it needs __builtin__.exec): "
        "a pickle runs code from the file; pass --trust-pickle only for files you trust")]
    assert sentinels(world.root) == [] and not (tmp_path / "out").exists()
