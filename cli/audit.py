"""`compress audit PATH`: where a model's bytes are and how much parameter sharing could save."""

from __future__ import annotations

from pathlib import Path

import click

from compress.atomic import check_output
from compress.auditing import AuditConfig, audit
from compress.errors import BadInputError
from compress.io import is_safetensors_checkpoint, load, open_checkpoint

from . import options
from .output import echo, emit, escaped


@click.command("audit")
@click.argument("path", type=click.Path(path_type=Path))
@options.tolerance
@options.tie_tolerance
@options.json_out
@options.markdown
@options.plot
@options.top
@options.trust_pickle
@options.force
def command(path: Path, tolerance: float | None, tie_tolerance: float | None, json_path: str | None, markdown: bool,
            plot_path: Path | None, top: int, trust_pickle: bool, force: bool) -> None:
    """Audit the model at PATH: sizes, unique values, merge errors, duplicated tensors and rows."""
    if json_path == "-" and markdown:
        raise BadInputError("--json - and --markdown both write to stdout; choose one")
    cfg = AuditConfig.from_dict({k: v for k, v in (("tolerance", tolerance), ("tie_tolerance", tie_tolerance))
                                 if v is not None}, source="command line")
    for out in (json_path if json_path != "-" else None, plot_path):
        if out:  # refuse before the (possibly long) audit, not after it
            check_output(Path(out), force=force, inputs=[path])
    # safetensors are read through a memory map opened per tensor, so memory stays flat with size
    loaded = open_checkpoint(path) if is_safetensors_checkpoint(path) else load(path, trust_pickle=trust_pickle)
    for note in loaded.notes:  # e.g. TorchScript code that was not run
        echo(f"note: {note}", err=True)
    report = audit(loaded, cfg)
    shown = top or None

    def show(out):
        if markdown:
            click.echo(escaped(report).to_markdown(shown))  # names from the file, control characters escaped
        elif json_path != "-":
            out.print(report.to_table(shown))

    if json_path == "-":
        click.echo(report.to_json(), nl=False)
    else:
        emit(report.to_json(), json_path, show, force=force, inputs=[path])
    if plot_path:
        from compress.plot import plot_audit

        plot_audit(report, loaded.tensors, plot_path, force=force, inputs=[path])
        echo(f"wrote {plot_path}", err=True)
