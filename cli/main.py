"""`compress` command group. Each command lives in its own module and calls one library function.

User errors (`CompressError`) are caught here, once: one line on stderr, with the parameters the
error names written as this command line's flags, and the error's exit code (2 for bad input, 1 for
failed verification). `--debug` re-raises them with a traceback.
"""

from __future__ import annotations

import logging
import sys

import click

from compress.atomic import cleanup_pending
from compress.errors import CompressError

from . import audit, export, options, tie, verify


class _Group(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["compress.argv"] = list(args)  # as typed: `tie --nproc N` re-launches it under torchrun
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CompressError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e.render(options.flag)}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            cleanup_pending()
            click.echo("interrupted: no output was written", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show a traceback for errors, and the exporters' own messages.")
@click.version_option(package_name="compress")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Make trained PyTorch models smaller by parameter sharing, and prove they still work."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if debug:  # the exporters' own log lines and warnings are shown too (they are quiet otherwise)
        logging.basicConfig(level=logging.INFO)
        logging.getLogger("compress").setLevel(logging.DEBUG)


for _module in (audit, tie, export, verify):
    cli.add_command(_module.command)


def main() -> None:
    sys.exit(cli(obj={}))


if __name__ == "__main__":
    main()
