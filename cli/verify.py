"""`compress verify MODEL.onnx --reference MODEL`: run the export in onnxruntime and compare outputs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from compress._atomic import check_output, write_text_atomic
from compress.errors import BadInputError, VerificationError
from compress.io import load, load_data
from compress.runtime import resolve_provider
from compress.verify import verify, verify_safetensors

from . import options


@click.command("verify")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), required=True,
              help="The merged PyTorch model the file was exported from (.pt2).")
@click.option("--original", type=click.Path(path_type=Path), default=None,
              help="Also compare with the model before compression (max abs, cosine, top-1 agreement).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Run on this data file's test inputs (default: the reference's example inputs).")
@click.option("--provider", default="cpu", show_default=True,
              help="onnxruntime provider: cpu, cuda or a full name such as CUDAExecutionProvider.")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Absolute tolerance.")
@click.option("--rtol", type=float, default=1e-4, show_default=True, help="Relative tolerance.")
@click.option("--keep-compressed", is_flag=True,
              help="Check with onnxruntime's constant folding off (weights stay compressed in memory).")
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True, help="Runs for the median latency.")
@options.json_out
@options.trust_pickle
@options.force
def command(model: Path, reference: Path, original: Path | None, data: Path | None, provider: str, atol: float,
            rtol: float, keep_compressed: bool, runs: int, json_path: str | None, trust_pickle: bool,
            force: bool) -> None:
    """Verify MODEL (.onnx or .safetensors) against the merged reference; exit 1 if outputs differ."""
    if json_path and json_path != "-":
        check_output(Path(json_path), force=force, inputs=[model, reference])
    ref = load(reference, trust_pickle=trust_pickle)
    if model.suffix.lower() == ".safetensors":
        result = verify_safetensors(model, ref.module if ref.module is not None else ref.tensors)
    else:
        resolve_provider(provider)  # an unavailable provider fails before any model runs
        if ref.module is None:
            raise BadInputError(f"{reference}: not a runnable model ({ref.kind}); give the merged .pt2")
        splits = load_data(data) if data else None
        inputs = splits.test_inputs if splits else ref.example_inputs
        if inputs is None:
            raise BadInputError(f"{reference} has no example inputs; pass --data FILE")
        base = load(original, trust_pickle=trust_pickle).module if original else None
        result = verify(model, ref.module, inputs, provider=provider, atol=atol, rtol=rtol, original=base,
                        runs=runs, keep_compressed=keep_compressed,
                        targets=splits.test_targets if splits else None)
    _print(result, err=json_path == "-")
    if json_path:
        text = json.dumps(result.to_dict(), indent=2)
        if json_path == "-":
            click.echo(text)
        else:
            write_text_atomic(json_path, text, force=force, inputs=[model, reference])
    if not result.passed:
        bad = sum(not c.ok for c in result.checks)
        raise VerificationError(f"{model}: {bad} of {len(result.checks)} outputs differ from {reference} beyond "
                                f"the tolerance; the files are kept for inspection")


def _print(result, err: bool) -> None:
    from rich.console import Console

    # with `--json -` stdout carries the JSON alone; the lines and tables go to stderr
    for line in result.lines():
        click.echo(line, err=err)
    for note in result.notes:
        click.echo(f"note: {note}", err=err)
    if result.original or result.runtime:
        Console(width=160, soft_wrap=False, stderr=err).print(result.to_table(checks=False))
