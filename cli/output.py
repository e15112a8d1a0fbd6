"""What the commands print: consoles sized for terminals and logs, JSON to a file or stdout, and the
shared renderings of export reports and verification results.

Names come from files (tensor names in a safetensors header, paths, ONNX node names), so nothing is
printed as it came: control, format and separator characters (an escape that clears the screen, a
newline that forges a table row or a second `error:` line, a bidi override that reorders text) are
written as escapes (`\\x1b`, `\\n`, `\\u202e`) in every table, note and error line (`printable`),
and rich markup is off, so `[red]` in a name is text.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import click

from compress.atomic import write_text_atomic

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """`text` with every character that is not printable written as an escape.

    >>> printable("fc1.weight\x1b[2J\\n\u202eok")
    'fc1.weight\\\\x1b[2J\\\\n\\\\u202eok'
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(c: str) -> str:
    code = ord(c)
    return _NAMED.get(c) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
                             else f"\\U{code:08x}")


def echo(text: str, *, err: bool = False, nl: bool = True) -> None:
    """`click.echo` of one line of text, made printable."""
    click.echo(printable(text), err=err, nl=nl)


def escaped(record: Any) -> Any:
    """A copy of a result record whose strings are all printable (for renderings that are not rich's,
    such as markdown)."""
    return type(record).from_dict(_escape_strings(record.to_dict()))


def _escape_strings(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {(printable(k) if isinstance(k, str) else k): _escape_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_strings(v) for v in value]
    return value


def console(stderr: bool = False):
    """A rich console that escapes what it prints (`printable`); a pipe or a CI log gets a wide table
    rather than rich's 80-column default."""
    from rich.console import Console

    class _Printable(Console):
        def render_str(self, text: str, **kw):
            return super().render_str(printable(text), **kw)

    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return _Printable(width=160 if wide else None, soft_wrap=False, stderr=stderr, markup=False)


def emit(text: str, json_path: str | None, show, *, force: bool, inputs: list[Path]) -> None:
    """Tables (`show(console)`) on stdout, or on stderr when stdout carries the JSON (`--json -`);
    then the JSON file when one was asked for."""
    to_stdout = json_path == "-"
    show(console(stderr=to_stdout))
    if to_stdout:
        click.echo(text, nl=not text.endswith("\n"))
    elif json_path:
        write_text_atomic(json_path, text, force=force, inputs=inputs)
        echo(f"wrote {json_path}", err=True)


def with_flags(text: str) -> str:
    """Library text names a parameter as `name`: shown as this command's flag (`--name`) where it has one."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return text
    flags = {opt[2:].replace("-", "_"): opt for p in ctx.command.params for opt in getattr(p, "opts", [])
             if opt.startswith("--")}
    return re.sub(r"`([a-z_]+)`", lambda m: flags.get(m[1], m[0]), text)


def print_export(out, report) -> None:
    """An export report's table, its notes and a one-line summary."""
    out.print(report.to_table())
    lost = {loss.text(Path(report.path).name) for loss in report.losses()}
    for note in report.notes:
        out.print(f"{'warning' if note in lost else 'note'}: {with_flags(note)}", soft_wrap=True)
    which = "the independent bound" if report.independent_bound is not None else "the bound"
    ratios = (f" ({report.ratio_to_dense:.3f}x dense, {report.vs_bound:.3f}x {which})"
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
