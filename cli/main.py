"""`compress` command group. Each command lives in its own module and calls one library function.

User errors (`CompressError`) are caught here, once: one line on stderr, with the parameters the
error names written as this command line's flags, and the error's exit code (2 for bad input, 1 for
failed verification). `--debug` re-raises them with a traceback. Everything printed from a file
(names in errors, tables and notes) has its control characters escaped (`output.printable`).

Ctrl-C never shows a traceback: while the libraries are imported (seconds, with torch) a handler
ends the process at once (nothing can have been written yet); during a command the outputs in
progress are removed, and the exit code says what is on disk: 130 when nothing was written, 3
when some outputs were already complete (the `interrupted:` line names them), 0 when the command
had finished.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

INTERRUPTED_NOTHING_WRITTEN = 130
INTERRUPTED_AFTER_WRITING = 3


def _interrupted_while_starting(_signum, _frame) -> None:
    os.write(2, b"interrupted: no output was written\n")
    os._exit(INTERRUPTED_NOTHING_WRITTEN)


_received: list[int] = []  # Ctrl-Cs seen by `main`'s handler (a library may turn one into another error)


def _interrupt(_signum, _frame) -> None:
    _received.append(1)
    raise KeyboardInterrupt


try:  # only the main thread may set a handler; an import from another thread keeps Python's own
    _previous_handler = signal.signal(signal.SIGINT, _interrupted_while_starting)
except ValueError:
    _previous_handler = None
try:
    import click

    from compress.atomic import cleanup_pending, written
    from compress.errors import CompressError

    from . import audit, export, options, tie, verify
    from .output import printable
finally:
    if _previous_handler is not None:
        signal.signal(signal.SIGINT, _previous_handler)


class _Group(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["compress.argv"] = list(args)  # as typed: `tie --nproc N` re-launches it under torchrun
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        before = len(written())  # outputs of earlier commands in this process (tests run many) do not count
        try:
            result = super().invoke(ctx)
            ctx.meta["compress.finished"] = True
            return result
        except CompressError as e:
            if _received:  # the interrupt surfaced as an error (say, of an import it cut short)
                ctx.exit(interrupted(since=before))
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {printable(e.render(options.flag))}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            ctx.exit(interrupted(finished=bool(ctx.meta.get("compress.finished")), since=before))
        except Exception:
            if not _received:
                raise
            ctx.exit(interrupted(since=before))


def interrupted(*, finished: bool = False, since: int = 0) -> int:
    """Say what an interrupt left on disk (temporary files are removed); return the exit code."""
    cleanup_pending()
    done = written()[since:]
    if finished:
        click.echo("interrupted after the command finished: every output was written", err=True)
        return 0
    if not done:
        click.echo("interrupted: no output was written", err=True)
        return INTERRUPTED_NOTHING_WRITTEN
    names = ", ".join(printable(str(p)) for p in done)
    click.echo(f"interrupted: {names} {'was' if len(done) == 1 else 'were'} written and "
               f"{'is' if len(done) == 1 else 'are'} complete; nothing else was written", err=True)
    return INTERRUPTED_AFTER_WRITING


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
    finished = False
    try:
        signal.signal(signal.SIGINT, _interrupt)
        code = cli.main(obj={}, standalone_mode=False)
        finished = True
    except click.exceptions.Abort:  # click turns a Ctrl-C outside a command (while parsing) into Abort
        code = interrupted()
    except click.ClickException as e:  # bad usage: click's usage line and the error
        e.show()
        code = e.exit_code
    except click.exceptions.Exit as e:
        code = e.exit_code
    except KeyboardInterrupt:
        code = interrupted(finished=finished)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # done: an interrupt now would only cut the exit short
    code = code if isinstance(code, int) else 0
    if _received:
        # CPython marks an interrupt that passed through `exec`'d code (torch.fx runs its generated code so) as
        # unhandled even once caught, and would end by re-raising SIGINT: leave with the code chosen here
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
