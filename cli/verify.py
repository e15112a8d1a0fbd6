"""`compress verify MODEL.onnx --reference MODEL`: run the export in onnxruntime and compare outputs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from compress.atomic import check_output
from compress.errors import BadInputError, VerificationError
from compress.io import load, load_data
from compress.runtime import resolve_provider
from compress.verify import verify, verify_safetensors

from . import options
from .output import emit


@click.command("verify")
@click.argument("model", type=click.Path(path_type=Path))
@options.reference
@options.original
@options.data
@options.provider
@options.atol
@options.rtol
@options.keep_compressed
@options.runs
@options.json_out
@options.trust_pickle
@options.force
def command(model: Path, reference: Path, original: Path | None, data_path: Path | None, provider: str,
            atol: float, rtol: float, keep_compressed: bool, runs: int, json_path: str | None, trust_pickle: bool,
            force: bool) -> None:
    """Verify MODEL (.onnx or .safetensors) against the merged reference; exit 1 if outputs differ."""
    if json_path and json_path != "-":
        check_output(Path(json_path), force=force, inputs=[model, reference])
    ref = load(reference, trust_pickle=trust_pickle)
    if model.suffix.lower() == ".safetensors":
        result = verify_safetensors(model, ref.module if ref.module is not None else ref.tensors)
    else:
        resolve_provider(provider)  # an unavailable provider fails before any model runs
        ref.require_module("verify --reference")
        splits = load_data(data_path) if data_path else None
        inputs = splits.test_inputs if splits else ref.example_inputs
        if inputs is None:
            raise BadInputError(f"{reference} has no example inputs; pass --data FILE")
        base = load(original, trust_pickle=trust_pickle).require_module("verify --original") if original else None
        result = verify(model, ref.module, inputs, provider=provider, atol=atol, rtol=rtol, original=base,
                        runs=runs, keep_compressed=keep_compressed,
                        targets=splits.test_targets if splits else None)

    def show(out):
        for line in result.lines():
            out.print(line)
        for note in result.notes:
            out.print(f"note: {note}")
        if result.original or result.runtime:
            out.print(result.to_table(checks=False))

    emit(json.dumps(result.to_dict(), indent=2), json_path, show, force=force, inputs=[model, reference])
    if not result.passed:
        bad = sum(not c.ok for c in result.checks)
        raise VerificationError(f"{model}: {bad} of {len(result.checks)} outputs differ from {reference} beyond "
                                f"the tolerance; the files are kept for inspection")
