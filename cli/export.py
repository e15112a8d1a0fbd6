"""`compress export` (being built)."""

import click

from compress.errors import CompressError


@click.command("export")
def command() -> None:
    """Not built yet."""
    raise CompressError("`compress export` is not built yet")
