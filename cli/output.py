"""What the commands print: consoles sized for terminals and logs, JSON to a file or stdout, and the
shared renderings of export reports and verification results."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from compress.atomic import write_text_atomic


def console(stderr: bool = False):
    """A rich console; a pipe or a CI log gets a wide table rather than rich's 80-column default."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(width=160 if wide else None, soft_wrap=False, stderr=stderr)


def emit(text: str, json_path: str | None, show, *, force: bool, inputs: list[Path]) -> None:
    """Tables (`show(console)`) on stdout, or on stderr when stdout carries the JSON (`--json -`);
    then the JSON file when one was asked for."""
    to_stdout = json_path == "-"
    show(console(stderr=to_stdout))
    if to_stdout:
        click.echo(text, nl=not text.endswith("\n"))
    elif json_path:
        write_text_atomic(json_path, text, force=force, inputs=inputs)
        click.echo(f"wrote {json_path}", err=True)


def print_export(out, report) -> None:
    """An export report's table, its notes and a one-line summary."""
    out.print(report.to_table())
    for note in report.notes:
        out.print(f"note: {note}", soft_wrap=True)
    ratios = (f" ({report.ratio_to_dense:.3f}x dense, {report.ratio_to_bound:.3f}x the bound)"
              if report.dense_reference_bytes else "")
    out.print(f"wrote {', '.join(report.files)}: {report.file_bytes:,} bytes{ratios}", soft_wrap=True)


def print_verification(out, v, *, header: bool = True) -> None:
    """One ✓/✗ line per output, then how far the result is from the original model."""
    if header:
        out.print(f"verify {v.path} ({v.mode}{', ' + v.provider if v.provider else ''}):")
    pad = "  " if header else ""
    for line in v.lines():
        out.print(f"{pad}{line}")
    for note in v.notes:
        out.print(f"{pad}note: {note}")
    for o in v.original:
        top1 = "" if o.top1_agreement is None else f", top-1 agreement {o.top1_agreement:.2%}"
        out.print(f"{pad}vs original {o.name}: max abs {o.max_abs:.3g}, mean cosine {o.mean_cosine:.6f}{top1}")
