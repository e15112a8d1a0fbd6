"""`compress audit` (being built)."""

import click

from compress.errors import CompressError


@click.command("audit")
def command() -> None:
    """Not built yet."""
    raise CompressError("`compress audit` is not built yet")
