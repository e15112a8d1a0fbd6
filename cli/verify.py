"""`compress verify` (being built)."""

import click

from compress.errors import CompressError


@click.command("verify")
def command() -> None:
    """Not built yet."""
    raise CompressError("`compress verify` is not built yet")
