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

from .errors import BadInputError, Option

TMP_PREFIX = ".compress-tmp-"
# Temporary files and folders this process has made and not yet renamed or removed: an interrupt
# (Ctrl-C) can land anywhere, even inside a `finally`, so the CLI's handler sweeps what is left.
_PENDING: set[Path] = set()
# Outputs this process has put in place, in order: after an interrupt the CLI says which are complete.
_WRITTEN: list[Path] = []


def written() -> list[Path]:
    """Every output this process has renamed into place so far (each is complete)."""
    return list(_WRITTEN)


def record_written(path: Path | str) -> None:
    """Note an output put in place by a rename outside `atomic_outputs` (a folder moved into place)."""
    _WRITTEN.append(Path(path))


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
    try:
        Path(parent).mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent))
    except OSError as e:
        raise write_error(parent, e) from e
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

    An operating-system error on the way (no permission, no space, a file-size limit, a parent that is
    not a folder) becomes one `BadInputError` naming the output, with nothing written.

    Example::

        with atomic_outputs(["out/model.onnx", "out/model.onnx.data"]) as (onnx_tmp, data_tmp):
            ...  # write both; they appear together, or not at all
    """
    targets = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        for t in targets:
            check_output(t, force=force, inputs=[Path(i) for i in inputs])
            t.parent.mkdir(parents=True, exist_ok=True)
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
            _put_in_place(tmp, t)
            _PENDING.discard(tmp)
        temps = []
    except OSError as e:
        raise write_error(targets[0].parent, e) from e
    finally:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            _PENDING.discard(tmp)


def write_error(where: Path | str, e: BaseException) -> BadInputError:
    """One line for an error the system (or a writer library) gave while writing into `where`."""
    code = getattr(e, "errno", None)
    text = str(e).strip()
    reason = _REASONS.get(code) or getattr(e, "strerror", None) or _reason_in(text) or text.splitlines()[0][:160]
    return BadInputError(f"{where}: {reason}; nothing was written")


def _reason_in(text: str) -> str | None:
    """The reason inside a writer library's message that wraps an OS error (`... (os error 28)`)."""
    for code, reason in _REASONS.items():
        if f"os error {code})" in text or os.strerror(code) in text:
            return reason
    return None


_REASONS = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file too large: a file-size limit (ulimit -f?)",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EROFS: "read-only file system", errno.EDQUOT: "disk quota exceeded",
            errno.ENOTDIR: "a parent of the path is not a folder", errno.EISDIR: "the path is a folder"}


# --- several outputs that appear together or not at all -----------------------------------------------

_GROUP: list[list[tuple[Path, Path | None]]] = []  # open `all_or_nothing` blocks: (output, backup of the old)


@contextlib.contextmanager
def all_or_nothing() -> Iterator[None]:
    """Outputs written inside the block stay only if the whole block succeeds.

    On any exception (a full disk on the second file, Ctrl-C) every output the block put in place is
    removed again and a file it replaced is restored, so a pair such as `x.onnx` + `x.safetensors`
    is never left half written.

    Example::

        with all_or_nothing():
            export_onnx(model, codebooks, "out/x.onnx", inputs)
            export_safetensors(model, codebooks, "out/x.safetensors")
    """
    placed: list[tuple[Path, Path | None]] = []
    _GROUP.append(placed)
    try:
        yield
    except BaseException:
        for target, backup in reversed(placed):
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, target)
                else:
                    target.unlink()
            with contextlib.suppress(ValueError):
                _WRITTEN.remove(target)
            if backup is not None:
                _PENDING.discard(backup)
        raise
    else:
        for _, backup in placed:
            if backup is not None:
                with contextlib.suppress(FileNotFoundError):
                    backup.unlink()
                _PENDING.discard(backup)
    finally:
        _GROUP.remove(placed)


def _put_in_place(tmp: Path, target: Path) -> None:
    backup = None
    if _GROUP and target.exists() and not target.is_dir():
        fd, name = tempfile.mkstemp(prefix=TMP_PREFIX + "old-", dir=target.parent)
        os.close(fd)
        backup = Path(name)
        _PENDING.add(backup)
        os.replace(target, backup)
    os.replace(tmp, target)
    if not any(parent in _PENDING for parent in target.parents):  # a staging folder's files are not outputs yet
        _WRITTEN.append(target)
    if _GROUP:
        _GROUP[-1].append((target, backup))


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
