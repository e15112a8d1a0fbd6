"""The errors `compress` raises for problems the user can fix.

Every message names the file or tensor and says what to do. The CLI prints the message on one line
and exits with `exit_code`; a traceback is shown only with `--debug`.
"""


class CompressError(Exception):
    """Base class: a problem with the user's input or request (exit code 2)."""

    exit_code = 2


class BadInputError(CompressError):
    """A file is missing, empty, truncated, corrupt, hostile or does not fit the model."""


class UnsafePickleError(BadInputError):
    """Loading the file would unpickle code; refused unless the user passes --trust-pickle."""


class UnsupportedModelError(CompressError):
    """The model is valid but uses something this toolkit cannot handle."""


class VerificationError(CompressError):
    """The exported model disagrees with the reference beyond the tolerance (exit code 1)."""

    exit_code = 1
