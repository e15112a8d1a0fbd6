"""Running a stranger's model in a child process, within a time and memory budget.

An ONNX file is a program for onnxruntime: a `Loop` may run 2**62 times, a 538-byte
`ConstantOfShape` may fill 3.6 GB. `run_limited` runs a command in a child process, polls its
resident memory, and stops it (and says so, as a `BadInputError`) when it outlives `seconds` or
grows past `memory_bytes`. `RunBudget.for_model` sizes a budget from what the model legitimately
declares: its file and external data, and the inputs it is given.

    >>> import sys
    >>> r = run_limited([sys.executable, "-c", "print(input())"], "hi", RunBudget(10, 1 << 30), "echo")
    >>> r.stdout.strip()
    'hi'
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInputError
from .records import Record

_POLL_S = 0.01


@dataclass
class RunBudget(Record):
    """How long (`seconds`) and how much resident memory (`memory_bytes`) one run may take."""

    seconds: float
    memory_bytes: int

    _what = "run budget"

    BASE_SECONDS = 60.0
    BYTES_PER_SECOND = 20e6  # on top of the base: a minute plus a second per 20 MB of model and inputs
    BASE_MEMORY = 512 << 20
    MEMORY_FACTOR = 16  # a 4-bit codebook model decodes to 8x its file; activations and inputs

    @classmethod
    def for_model(cls, declared_bytes: int) -> RunBudget:
        """The default budget for a model whose file, external data and inputs add up to `declared_bytes`.

        >>> RunBudget.for_model(10 << 20).memory_bytes >> 20
        672
        """
        return cls(cls.BASE_SECONDS + declared_bytes / cls.BYTES_PER_SECOND,
                   cls.BASE_MEMORY + cls.MEMORY_FACTOR * declared_bytes)


def run_limited(args: list[str], stdin: str, budget: RunBudget, what: str,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `args` (feeding `stdin`), killing it when it exceeds `budget`; `what` names it in the error."""
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    started = time.monotonic()
    peak = 0
    pending: str | None = stdin
    try:
        while True:
            try:
                out, err = proc.communicate(pending, timeout=_POLL_S)
                break
            except subprocess.TimeoutExpired:
                pending = None
            peak = max(peak, _resident(proc.pid))
            if peak > budget.memory_bytes:
                raise BadInputError(f"{what} used more than {budget.memory_bytes >> 20} MiB of memory and was "
                                    "stopped (the budget is sized from the model's files and inputs)")
            if time.monotonic() - started > budget.seconds:
                raise BadInputError(f"{what} ran longer than {budget.seconds:.0f} s and was stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _resident(pid: int) -> int:
    """Resident bytes of a process (0 where /proc is not there to ask)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def package_dir() -> str:
    """The folder holding `compress`, for a child that imports single leaf modules of it."""
    return str(Path(__file__).resolve().parent)


__all__ = ["RunBudget", "package_dir", "run_limited"]
