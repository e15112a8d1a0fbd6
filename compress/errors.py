"""The errors `compress` raises for problems the user can fix.

Every message names the file or tensor and says what to do. Where the fix is a parameter, the
message holds an `Option` rather than text: `str(error)` names the Python parameter
(`exclude=['fc1.weight']`), and the command line renders the same error with its flag
(`--exclude fc1.weight`), so the library never spells a flag. The CLI prints the message on one
line and exits with `exit_code`; a traceback is shown only with `--debug`.

    >>> e = BadInputError("`fc1.weight` has 3 NaN values; clean it or pass ", Option("exclude", "fc1.weight", many=True))
    >>> str(e)
    "`fc1.weight` has 3 NaN values; clean it or pass exclude=['fc1.weight']"
    >>> e.render(lambda o: o.flag())
    '`fc1.weight` has 3 NaN values; clean it or pass --exclude fc1.weight'
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass

_UNSET = object()


@dataclass(frozen=True)
class Option:
    """A parameter named in a message: `name` is the Python parameter; `value` what to set it to.

    Without a value the option is only mentioned (`group_size` / `--group-size`); `True` is a flag
    to turn on; `many` marks a list parameter given one item (`exclude=['x']` / `--exclude x`).
    """

    name: str
    value: object = _UNSET
    many: bool = False

    def python(self) -> str:
        """How a Python caller writes it: `name=value`, or `name` when only mentioned."""
        if self.value is _UNSET:
            return f"`{self.name}`"
        return f"{self.name}={[self.value]!r}" if self.many else f"{self.name}={self.value!r}"

    def flag(self, flags: dict[str, str] | None = None) -> str:
        """How the command line writes it: `--name value` (`flags` maps names that differ)."""
        text = (flags or {}).get(self.name, "--" + self.name.replace("_", "-"))
        if self.value is _UNSET or self.value is True:
            return text
        return f"{text} {shlex.quote(str(self.value))}"


class CompressError(Exception):
    """Base class: a problem with the user's input or request (exit code 2).

    Build it from text and `Option`s; `render(flag)` writes the options another way (the CLI's flags).
    """

    exit_code = 2

    def __init__(self, *parts: str | Option):
        self.parts = parts
        super().__init__(self.render())

    def render(self, option: Callable[[Option], str] | None = None) -> str:
        """The message with every `Option` written by `option` (default: as a Python parameter)."""
        return "".join(p if isinstance(p, str) else (option(p) if option else p.python())
                       for p in self.parts)

    def __str__(self) -> str:
        return self.render()


class BadInputError(CompressError):
    """A file is missing, empty, truncated, corrupt, hostile or does not fit the model."""


class UnsafePickleError(BadInputError):
    """Loading the file would unpickle code; refused unless the user trusts the file (`trust_pickle`)."""


class UnsupportedModelError(CompressError):
    """The model is valid but uses something this toolkit cannot handle."""


class VerificationError(CompressError):
    """The exported model disagrees with the reference beyond the tolerance (exit code 1)."""

    exit_code = 1


TRUST = Option("trust_pickle", True)
