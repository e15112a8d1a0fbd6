"""`compress export MODEL --onnx OUT [--safetensors OUT]`: write a merged model with codebook storage."""

from __future__ import annotations

import json
from pathlib import Path

import click

from compress.atomic import all_or_nothing, check_output
from compress.errors import BadInputError
from compress.export import export_onnx, export_safetensors
from compress.io import load
from compress.state import codebooks_from_state_dict

from . import options
from .output import emit, print_export


@click.command("export")
@click.argument("model", type=click.Path(path_type=Path))
@options.onnx_out
@options.safetensors_out
@options.codebook_dtype
@options.no_dedup
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
    if onnx_path and (loaded.module is None or not loaded.example_inputs):
        raise BadInputError(f"{model}: ONNX export needs a runnable model with example inputs "
                            f"(a .pt2 from `compress tie`); this is a {loaded.kind} file")
    reports = {}
    with all_or_nothing():  # the files appear together or not at all (a full disk on the second one)
        if onnx_path:
            program = loaded.program if loaded.program is not None else loaded.module
            reports["onnx"] = export_onnx(program, codebooks, onnx_path, loaded.example_inputs,
                                          codebook_dtype=codebook_dtype, dedup=not no_dedup, force=force)
        if st_path:
            reports["safetensors"] = export_safetensors(source, codebooks, st_path, force=force)

        def show(out):
            for report in reports.values():
                print_export(out, report)

        emit(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=2), json_path, show, force=force,
             inputs=[model])
