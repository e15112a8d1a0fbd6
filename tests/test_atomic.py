"""Outputs are written atomically: a failed or interrupted write leaves every target as it was."""

from __future__ import annotations

import os
import stat

import pytest

from compress.atomic import TMP_PREFIX, atomic_outputs, write_bytes_atomic
from compress.errors import BadInputError


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_files_appear_together_after_success(tmp_path):
    a, b = tmp_path / "model.onnx", tmp_path / "model.onnx.data"
    with atomic_outputs([a, b]) as (ta, tb):
        ta.write_bytes(b"graph")
        tb.write_bytes(b"weights")
        assert not a.exists() and not b.exists()
    assert a.read_bytes() == b"graph" and b.read_bytes() == b"weights"
    assert _leftovers(tmp_path) == []


def test_failure_leaves_old_outputs_intact_and_no_temporaries(tmp_path):
    a = tmp_path / "out.bin"
    a.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_outputs([a], force=True) as (ta,):
        ta.write_bytes(b"half")
        raise RuntimeError("disk on fire")
    assert a.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_existing_output_needs_force(tmp_path):
    a = tmp_path / "out.bin"
    a.write_bytes(b"old")
    with pytest.raises(BadInputError, match=r"out\.bin already exists; pass force=True"):
        write_bytes_atomic(a, b"new")
    write_bytes_atomic(a, b"new", force=True)
    assert a.read_bytes() == b"new"


def test_output_equal_to_input_is_refused_even_with_force(tmp_path):
    a = tmp_path / "model.pt2"
    a.write_bytes(b"input")
    with pytest.raises(BadInputError, match="would overwrite the input"):
        write_bytes_atomic(a, b"x", force=True, inputs=[a])
    link = tmp_path / "alias.pt2"
    os.link(a, link)
    with pytest.raises(BadInputError, match="would overwrite the input"):
        write_bytes_atomic(link, b"x", force=True, inputs=[a])
    assert a.read_bytes() == b"input"


def test_overwrite_keeps_existing_permissions(tmp_path):
    a = tmp_path / "out.bin"
    a.write_bytes(b"old")
    os.chmod(a, 0o640)
    write_bytes_atomic(a, b"new", force=True)
    assert stat.S_IMODE(a.stat().st_mode) == 0o640


def test_new_file_gets_umask_default_not_0600(tmp_path):
    a = tmp_path / "new.bin"
    old = os.umask(0o022)
    try:
        write_bytes_atomic(a, b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(a.stat().st_mode) == 0o644
