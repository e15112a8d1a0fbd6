"""`compress audit PATH`: where a model's bytes are and how much parameter sharing could save."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from compress._atomic import check_output, write_text_atomic
from compress.audit import AuditConfig, audit
from compress.errors import BadInputError
from compress.io import load

from . import options


@click.command("audit")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--tolerance", type=float, default=AuditConfig.tolerance, show_default=True,
              help="Values within this of a shared value count as one (absolute); tensors within it "
                   "(relative error) count as duplicates.")
@options.json_out
@click.option("--markdown", is_flag=True,
              help="Print markdown tables (for CI summaries) instead of the table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write histograms of the largest tensors with their 4-bit shared values to this PNG.")
@click.option("--top", type=click.IntRange(min=0), default=25, show_default=True,
              help="Rows shown per list (0 shows all).")
@options.trust_pickle
@options.force
def command(path: Path, tolerance: float, json_path: str | None, markdown: bool, plot_path: Path | None,
            top: int, trust_pickle: bool, force: bool) -> None:
    """Audit the model at PATH: sizes, unique values, merge errors, duplicated tensors and rows."""
    if json_path == "-" and markdown:
        raise BadInputError("--json - and --markdown both write to stdout; choose one")
    cfg = AuditConfig(tolerance=tolerance)
    for out in (json_path if json_path != "-" else None, plot_path):
        if out:  # refuse before the (possibly long) audit, not after it
            check_output(Path(out), force=force, inputs=[path])
    from compress.stream import is_safetensors_checkpoint, open_checkpoint

    # safetensors are read through a memory map opened per tensor, so memory stays flat with size
    loaded = open_checkpoint(path) if is_safetensors_checkpoint(path) else load(path, trust_pickle=trust_pickle)
    report = audit(loaded, cfg)
    shown = top or None
    if json_path == "-":
        click.echo(report.to_json(), nl=False)
    elif markdown:
        click.echo(report.to_markdown(shown))
    else:
        _console().print(report.to_table(shown))
    if json_path and json_path != "-":
        write_text_atomic(json_path, report.to_json(), force=force, inputs=[path])
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        from compress.plot import plot_audit

        plot_audit(report, loaded.tensors, plot_path, force=force, inputs=[path])
        click.echo(f"wrote {plot_path}", err=True)


def _console():
    from rich.console import Console

    # a pipe or a CI log gets a wide table rather than rich's 80-column default
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=160 if wide else None, soft_wrap=False)
