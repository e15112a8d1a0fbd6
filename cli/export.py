"""`compress export MODEL --onnx OUT [--safetensors OUT]`: write a merged model with codebook storage."""

from __future__ import annotations

import json
from pathlib import Path

import click

from compress._atomic import check_output, write_text_atomic
from compress.errors import BadInputError
from compress.export import codebooks_from_state_dict, export_onnx, export_safetensors
from compress.io import load

from . import options


@click.command("export")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write an ONNX model: codebooks + narrow indices decoded in-graph (Cast -> Gather).")
@click.option("--safetensors", "st_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a safetensors file: codebooks + packed indices, the recipe in its metadata.")
@click.option("--codebook-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Codebook precision in the ONNX file (float16 adds a Cast and rounds the shared values).")
@click.option("--no-dedup", is_flag=True, help="Keep identical initializers separate in the ONNX file.")
@options.json_out
@options.trust_pickle
@options.force
def command(model: Path, onnx_path: Path | None, st_path: Path | None, codebook_dtype: str, no_dedup: bool,
            json_path: str | None, trust_pickle: bool, force: bool) -> None:
    """Export the merged MODEL (from `compress tie`) to ONNX and/or safetensors with deduplicated storage."""
    if onnx_path is None and st_path is None:
        raise BadInputError("nothing to write: give --onnx OUT and/or --safetensors OUT")
    for out in (onnx_path, st_path, json_path if json_path != "-" else None):
        if out:
            check_output(Path(out), force=force, inputs=[model])
    loaded = load(model, trust_pickle=trust_pickle)
    source = loaded.module if loaded.module is not None else loaded.tensors
    codebooks = codebooks_from_state_dict(source)
    if not codebooks.tensors:
        raise BadInputError(f"{model}: no merged (codebook) tensors; run `compress tie {model}` first")
    reports = {}
    if onnx_path:
        if loaded.module is None or not loaded.example_inputs:
            raise BadInputError(f"{model}: ONNX export needs a runnable model with example inputs "
                                f"(a .pt2 from `compress tie`); this is a {loaded.kind} file")
        program = loaded.program if loaded.program is not None else loaded.module
        reports["onnx"] = export_onnx(program, codebooks, onnx_path, loaded.example_inputs,
                                      codebook_dtype=codebook_dtype, dedup=not no_dedup, force=force)
    if st_path:
        reports["safetensors"] = export_safetensors(source, codebooks, st_path, force=force)
    _print(reports, err=json_path == "-")
    if json_path:
        text = json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=2)
        if json_path == "-":
            click.echo(text)
        else:
            write_text_atomic(json_path, text, force=force, inputs=[model])


def _print(reports: dict, err: bool) -> None:
    from rich.console import Console

    # with `--json -` stdout carries the JSON alone; the tables go to stderr
    console = Console(width=160, soft_wrap=False, stderr=err)
    for report in reports.values():
        console.print(report.to_table())
        for note in report.notes:
            console.print(f"note: {note}")
        click.echo(f"wrote {', '.join(report.files)}: {report.file_bytes:,} bytes "
                   f"({report.ratio_to_dense:.3f}x dense, {report.ratio_to_bound:.3f}x the bound)", err=err)
