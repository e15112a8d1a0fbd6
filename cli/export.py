"""`compress export MODEL --onnx OUT [--safetensors OUT]`: write a merged model with codebook storage."""

from __future__ import annotations

import json
from pathlib import Path

import click

from compress.atomic import all_or_nothing, check_output
from compress.pipeline import export_file

from . import options
from .output import emit, print_export


@click.command("export")
@click.argument("model", type=click.Path(path_type=Path))
@options.onnx_out
@options.safetensors_out
@options.ort_out
@options.codebook_dtype
@options.no_dedup
@options.json_out
@options.trust_pickle
@options.force
def command(model: Path, onnx_path: Path | None, st_path: Path | None, ort_path: Path | None, codebook_dtype: str,
            no_dedup: bool, json_path: str | None, trust_pickle: bool, force: bool) -> None:
    """Export the merged MODEL (from `compress tie`) to ONNX, safetensors and/or ORT format with codebook storage.

    MODEL may also be a codebook ONNX file (from `compress tie`), converted with --ort.
    """
    if json_path and json_path != "-":
        check_output(Path(json_path), force=force, inputs=[model])
    with all_or_nothing():  # the exports and the JSON report appear together or not at all
        reports = export_file(model, onnx=onnx_path, safetensors=st_path, ort=ort_path,
                              codebook_dtype=codebook_dtype, dedup=not no_dedup, trust_pickle=trust_pickle,
                              force=force)

        def show(out):
            for report in reports.values():
                print_export(out, report)

        emit(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=2), json_path, show, force=force,
             inputs=[model])
