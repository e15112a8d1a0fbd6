"""`compress tie MODEL`: cluster the weights into shared values (optionally soft-tying while
fine-tuning on --data), merge them, and write the merged model, the plan, a report and the exports."""

from __future__ import annotations

from pathlib import Path

import click

from compress.atomic import check_output
from compress.errors import BadInputError, VerificationError
from compress.pipeline import ExportOptions, OnnxTieResult, StreamResult, route, tie_file
from compress.pipeline.inputs import parse_input_shapes
from compress.runtime import resolve_provider
from compress.tying import FinetuneConfig, TieConfig, distributed
from compress.units import format_iec

from . import options
from .output import emit, print_export, print_verification, with_flags


@click.command("tie")
@click.argument("model", type=click.Path(path_type=Path))
@options.out_dir
@options.bits
@options.tolerance
@options.granularity
@options.group_size
@options.data
@options.epochs
@options.strength
@options.prior
@options.zero_component
@options.importance
@options.method
@options.dim
@options.outliers
@options.budget
@options.exclude
@options.include
@options.config
@options.seed
@options.nproc
@options.fsdp
@options.no_onnx
@options.no_safetensors
@options.no_verify
@options.provider
@options.atol
@options.workers
@options.stream
@options.input_shape
@options.strict
@options.force
@options.trust_pickle
@options.json_out
def command(model: Path, out_dir: Path, bits: int | None, tolerance: float | None, granularity: str | None,
            group_size: int | None, data_path: Path | None, epochs: int | None, strength: float | None,
            prior: str, zero_component: bool, importance: bool, method: str | None, dim: int | None,
            outliers: float | None, budget: float | None, exclude: tuple[str, ...],
            include: tuple[str, ...], config_path: Path | None, seed: int, nproc: int, fsdp: bool, no_onnx: bool,
            no_safetensors: bool, no_verify: bool, provider: str, atol: float, workers: int | None, stream: bool,
            input_shapes: tuple[str, ...], strict: bool, force: bool, trust_pickle: bool, json_path: str | None) -> None:
    """Tie the weights of MODEL into shared values; write the merged model, plan, report and exports.

    MODEL is a .pt2 (recommended), a state_dict .pt, a .safetensors checkpoint (sharded too: give its
    .index.json) or an .onnx file (clustered post-training, written back as codebook ONNX and checked
    against the input in onnxruntime). A TorchScript file or pickled module gets an ONNX export when
    --input-shape (or --data) gives its example inputs.
    """
    specs = parse_input_shapes(input_shapes)  # a bad spec fails before any work
    cfg = TieConfig.layered(config_path, source="command line", bits=bits, tolerance=tolerance, granularity=granularity,
                            group_size=group_size, importance=importance, exclude=exclude, include=include,
                            method=method, dim=dim, outliers=outliers, budget=budget)
    finetune = FinetuneConfig(epochs=epochs, strength=FinetuneConfig.strength if strength is None else strength,
                              prior=prior, zero_component=zero_component, seed=seed, fsdp=fsdp,
                              codebook_epochs=0 if epochs == 0 else FinetuneConfig.codebook_epochs)
    inputs = [model] + ([data_path] if data_path else [])
    if json_path and json_path != "-":
        check_output(Path(json_path), force=force, inputs=inputs)
    if nproc > 1 and not distributed.under_launcher():
        if data_path is None:
            raise BadInputError("--nproc runs the fine-tuning in several processes; it needs --data FILE")
        ctx = click.get_current_context()
        ctx.exit(distributed.relaunch(_without_nproc(ctx.meta["compress.argv"]), nproc, module="cli"))
    if not no_verify and not no_onnx and route(model, data=data_path, stream=stream) in ("model", "onnx"):
        resolve_provider(provider)  # an unavailable provider fails before any work
    result = tie_file(model, cfg, out_dir=out_dir, data=data_path, finetune=finetune,
                      export=ExportOptions(onnx=not no_onnx, safetensors=not no_safetensors, verify=not no_verify,
                                           provider=provider, atol=atol, strict=strict),
                      workers=workers, stream=stream, trust_pickle=trust_pickle, force=force,
                      input_shapes=[str(s) for s in specs])
    if isinstance(result, OnnxTieResult):
        emit(result.to_json(), json_path, lambda out: _print_onnx_tie(out, result), force=force, inputs=inputs)
        _fail_unverified(result.verified, model, out_dir)
        return
    if isinstance(result, StreamResult):
        emit(result.to_json(), json_path, lambda out: _print_stream(out, result), force=force, inputs=inputs)
        return
    if not distributed.is_main():  # rank 0 prints and writes
        return
    emit(result.report.to_json(), json_path, lambda out: _print_tie(out, result), force=force, inputs=inputs)
    _fail_unverified(result.verified, model, out_dir)


def _fail_unverified(verified: bool | None, model: Path, out_dir: Path) -> None:
    if verified is False:
        raise VerificationError(f"{model}: an export differs from the merged model beyond the tolerance "
                                f"(see the table above); the files in {out_dir} are kept for inspection")


def _print_onnx_tie(out, result) -> None:
    print_export(out, result.export)
    if result.verification is not None:
        print_verification(out, result.verification)


def _print_tie(out, result) -> None:
    from rich.table import Table

    out.print(result.to_table())
    files = Table(title="files written")
    for col, justify in (("file", "left"), ("bytes", "right"), ("IEC", "right"), ("vs bound", "right")):
        files.add_column(col, justify=justify)
    bound = {f: e.vs_bound for e in result.exports for f in e.files}
    for p in result.paths:
        size = Path(p).stat().st_size
        ratio = bound.get(str(p))
        files.add_row(str(p), f"{size:,}", format_iec(size), "" if ratio is None else f"{ratio:.3f}x")
    out.print(files)
    lost = {loss.text(Path(e.path).name) for e in result.exports for loss in e.losses()}
    for note in result.report.notes:
        out.print(f"{'warning' if note in lost else 'note'}: {with_flags(note)}")
    for v in result.verification:
        print_verification(out, v)


def _print_stream(out, result: StreamResult) -> None:
    out.print(result.to_table())
    click.echo(f"wrote {result.out_dir}/{result.index} and {len(result.shards)} shards", err=True)


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line minus `--nproc N` (torchrun would take `--nproc` for its own `--nproc-per-node`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
