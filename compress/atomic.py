"""Atomic outputs: write to temporary files in the target folder, then rename.

An interrupted run (SIGKILL, full disk, exception) leaves every target as it was: either the old
file or nothing. Several files written together (`model.onnx` + `model.onnx.data`) are renamed in
order with the first path last, so the presence of the main file implies its companions are complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import BadInputError, CompressError, Option

TMP_PREFIX = ".compress-tmp-"
# Temporary files and folders this process has made and not yet renamed or removed: an interrupt
# (Ctrl-C) can land anywhere, even inside a `finally`, so the CLI's handler sweeps what is left.
_PENDING: set[Path] = set()


def cleanup_pending() -> None:
    """Remove every temporary file or folder this process left behind (after an interrupt)."""
    for p in list(_PENDING):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        _PENDING.discard(p)


@contextlib.contextmanager
def staging_dir(parent: Path | str) -> Iterator[Path]:
    """A temporary folder inside `parent` (created when needed), removed on exit whatever happens."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent))
    _PENDING.add(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        _PENDING.discard(path)


def check_output(path: Path, *, force: bool, inputs: Sequence[Path] = ()) -> None:
    """Refuse to overwrite an input, or an existing file without `force`."""
    path = Path(path)
    for inp in inputs:
        inp = Path(inp)
        same = inp.exists() and path.exists() and os.path.samefile(inp, path)
        if same or path.resolve() == inp.resolve():
            raise BadInputError(f"{path}: output would overwrite the input; choose another output path")
    if path.exists() and not force:
        raise BadInputError(f"{path} already exists; pass ", Option("force", True), " to overwrite it")
    if path.is_dir():
        raise BadInputError(f"{path} is a folder; give a file path")


@contextlib.contextmanager
def atomic_outputs(paths: Sequence[Path | str], *, force: bool = False,
                   inputs: Sequence[Path | str] = ()) -> Iterator[list[Path]]:
    """Yield temporary paths to write; on success rename each onto its target, on failure delete them.

    Example::

        with atomic_outputs(["out/model.onnx", "out/model.onnx.data"]) as (onnx_tmp, data_tmp):
            ...  # write both; they appear together, or not at all
    """
    targets = [Path(p) for p in paths]
    for t in targets:
        check_output(t, force=force, inputs=[Path(i) for i in inputs])
        t.parent.mkdir(parents=True, exist_ok=True)
    temps: list[Path] = []
    try:
        for t in targets:
            fd, name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-" + t.name, dir=t.parent)
            os.close(fd)
            temps.append(Path(name))
            _PENDING.add(Path(name))
        yield temps
        for tmp, t in zip(temps, targets):
            fsync(tmp)
            _keep_mode(tmp, t)
        for tmp, t in reversed(list(zip(temps, targets))):
            os.replace(tmp, t)
            _PENDING.discard(tmp)
        temps = []
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise CompressError(f"{targets[0].parent}: no space left on device; nothing was written") from e
        raise
    finally:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            _PENDING.discard(tmp)


def write_bytes_atomic(path: Path | str, data: bytes, *, force: bool = False,
                       inputs: Sequence[Path | str] = ()) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    with atomic_outputs([path], force=force, inputs=inputs) as (tmp,):
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: Path | str, text: str, **kw) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), **kw)


def fsync(path: Path) -> None:
    """Flush a written file to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _keep_mode(tmp: Path, target: Path) -> None:
    # mkstemp creates 0600; an existing target keeps its mode, a new file gets the umask default.
    if target.exists():
        os.chmod(tmp, target.stat().st_mode & 0o7777)
    else:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
