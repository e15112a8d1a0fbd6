"""`compress tie` (being built)."""

import click

from compress.errors import CompressError


@click.command("tie")
def command() -> None:
    """Not built yet."""
    raise CompressError("`compress tie` is not built yet")
