"""`compress tie MODEL`: cluster the weights into shared values (optionally soft-tying while
fine-tuning on --data), merge them, and write the merged model, the plan and a report."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from compress._atomic import check_output, write_text_atomic
from compress._units import format_iec
from compress.codebook import GRANULARITIES
from compress.errors import BadInputError, VerificationError
from compress.finetune import FinetuneConfig
from compress.plan import TieConfig, json_text
from compress.runtime import resolve_provider
from compress.soft_tie import PRIORS
from compress.tie import DEFAULT_OUT_DIR, tie

from . import options


@click.command("tie")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT_DIR,
              show_default=True, help="Folder for <stem>.tied.pt2, .plan.json, .report.json, .onnx and .safetensors.")
@click.option("--bits", type=int, default=None,
              help="Index bits per weight, 1..8 (K = 2**bits shared values); default 4. Flags set the global "
                   "values: by_type/by_name overrides in --config still apply on top.")
@click.option("--tolerance", type=float, default=None,
              help="Instead of --bits: the fewest shared values keeping every weight within this distance.")
@click.option("--granularity", type=click.Choice(GRANULARITIES), default=None,
              help="One codebook per tensor (default), per output channel, or per group of channels.")
@click.option("--group-size", type=int, default=None, help="Channels per codebook for --granularity group.")
@click.option("--data", "data_path", type=click.Path(path_type=Path), default=None,
              help="Data file (calib/test inputs, optional targets): enables fine-tuning and accuracy.")
@click.option("--epochs", type=int, default=None,
              help=f"Soft-tying epochs with --data (default: enough for {FinetuneConfig.min_steps} steps, at "
                   "least 3; 0: post-training clustering only).")
@click.option("--strength", type=float, default=None,
              help=f"Soft-tying strength lambda (default {FinetuneConfig.strength}): the pull on each weight is "
                   "about lambda * (w - its centre), whatever the tensor's size.")
@click.option("--prior", type=click.Choice(PRIORS), default="pairwise", show_default=True,
              help="Soft-tying prior: pairwise pull to the cluster mean, or a learned Gaussian mixture.")
@click.option("--zero-component", is_flag=True, help="Mixture prior: fix one shared value at 0 (pruning).")
@click.option("--importance", is_flag=True,
              help="Weight the clustering by each weight's mean squared gradient on --data.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave parameters matching GLOB alone (repeatable).")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Tie parameters matching GLOB even if the defaults skip them (bias, norm, small).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="tie.json: defaults, by_type and by_name overrides; flags given here win over it.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for batch order and sampling.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Fine-tune with N processes on this machine (re-runs this command under torchrun; each "
                   "takes 1/N of every batch). For several machines run torchrun yourself (README: Scaling out).")
@click.option("--fsdp", is_flag=True,
              help="Under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of "
                   "replicating them (DDP), for models whose training state does not fit one process.")
@click.option("--no-onnx", is_flag=True, help="Do not write <stem>.onnx.")
@click.option("--no-safetensors", is_flag=True, help="Do not write <stem>.safetensors.")
@click.option("--no-verify", is_flag=True, help="Do not run the exports in onnxruntime / load them back.")
@click.option("--provider", default="cpu", show_default=True,
              help="onnxruntime provider for verification: cpu, cuda or a full name.")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Verification absolute tolerance.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes clustering a safetensors checkpoint in parallel (default: all cores that fit "
                   "in memory).")
@click.option("--stream", is_flag=True,
              help="Tie a .safetensors file tensor by tensor (always on for *.safetensors.index.json).")
@options.force
@options.trust_pickle
@options.json_out
def command(model: Path, out_dir: Path, bits: int | None, tolerance: float | None, granularity: str | None,
            group_size: int | None, data_path: Path | None, epochs: int | None, strength: float | None,
            prior: str, zero_component: bool, importance: bool, exclude: tuple[str, ...],
            include: tuple[str, ...], config_path: Path | None, seed: int, nproc: int, fsdp: bool, no_onnx: bool,
            no_safetensors: bool, no_verify: bool, provider: str, atol: float, workers: int | None, stream: bool,
            force: bool, trust_pickle: bool, json_path: str | None) -> None:
    """Tie the weights of MODEL into shared values; write the merged model, plan, report and exports.

    MODEL is a .pt2 (recommended), a state_dict .pt, a .safetensors checkpoint (sharded too: give its
    .index.json) or an .onnx file (clustered post-training, written back as codebook ONNX).
    """
    from compress import distributed
    from compress.io import load, load_data
    from compress.tie import ExportOptions

    cfg = _config(config_path, bits=bits, tolerance=tolerance, granularity=granularity, group_size=group_size,
                  importance=importance, exclude=exclude, include=include)
    if epochs is not None and data_path is None and epochs > 0:
        raise BadInputError("--epochs needs --data FILE (fine-tuning trains on it)")
    finetune = FinetuneConfig(epochs=epochs,
                              strength=FinetuneConfig.strength if strength is None else strength,
                              prior=prior, zero_component=zero_component, seed=seed, fsdp=fsdp,
                              codebook_epochs=0 if epochs == 0 else FinetuneConfig.codebook_epochs)
    if json_path and json_path != "-":
        check_output(Path(json_path), force=force, inputs=[model] + ([data_path] if data_path else []))
    if nproc > 1 and not distributed.under_launcher():
        if data_path is None:
            raise BadInputError("--nproc runs the fine-tuning in several processes; it needs --data FILE")
        ctx = click.get_current_context()
        ctx.exit(distributed.relaunch(_without_nproc(ctx.meta["compress.argv"]), nproc))
    if not no_verify and not no_onnx:
        resolve_provider(provider)  # an unavailable provider fails before any work
    if data_path is None and _is_onnx(model):
        return _tie_onnx(model, out_dir, cfg, force, json_path)
    if data_path is None and _streams(model, stream):
        return _tie_checkpoint(model, out_dir, cfg, workers, force, json_path)
    loaded = load(model, trust_pickle=trust_pickle)
    data = load_data(data_path) if data_path is not None else None
    export = ExportOptions(onnx=not no_onnx, safetensors=not no_safetensors, verify=not no_verify,
                           provider=provider, atol=atol)
    result = tie(loaded, cfg, data=data, finetune=finetune if data is not None else None, out_dir=out_dir,
                 force=force, data_path=data_path, export=export)
    if not distributed.is_main():  # rank 0 prints and writes
        return
    _emit(json_text(result.report), json_path, force, model,
          lambda console: _print_tie(console, result))
    if result.verified is False:
        raise VerificationError(f"{model}: an export differs from the merged model beyond the tolerance "
                                f"(see the table above); the files in {out_dir} are kept for inspection")


def _emit(text: str, json_path: str | None, force: bool, model: Path, show) -> None:
    """Tables on stdout (or stderr when stdout carries the JSON), then the JSON file if asked."""
    err = json_path == "-"
    show(_console(stderr=err))
    if err:
        click.echo(text, nl=False)
    elif json_path:
        write_text_atomic(json_path, text, force=force, inputs=[model])
        click.echo(f"wrote {json_path}", err=True)


def _print_tie(console, result) -> None:
    from rich.table import Table

    console.print(result.to_table())
    files = Table(title="files written")
    for col, justify in (("file", "left"), ("bytes", "right"), ("IEC", "right"), ("vs bound", "right")):
        files.add_column(col, justify=justify)
    bound = {f: e.ratio_to_bound for e in result.exports for f in e.files}
    for p in result.paths:
        size = Path(p).stat().st_size
        ratio = bound.get(str(p))
        files.add_row(str(p), f"{size:,}", format_iec(size), "" if ratio is None else f"{ratio:.3f}x")
    console.print(files)
    for note in result.report.get("notes", []):
        console.print(f"note: {note}")
    for v in result.verification:
        console.print(f"verify {v.path} ({v.mode}{', ' + v.provider if v.provider else ''}):")
        for line in v.lines():
            console.print(f"  {line}")
        for o in v.original:
            top1 = "" if o.top1_agreement is None else f", top-1 agreement {o.top1_agreement:.2%}"
            console.print(f"  vs original {o.name}: max abs {o.max_abs:.3g}, mean cosine {o.mean_cosine:.6f}{top1}")


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


def _is_onnx(path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


def _streams(path: Path, stream: bool) -> bool:
    from compress.stream import is_safetensors_checkpoint

    return is_safetensors_checkpoint(path) and (stream or path.name.endswith(".index.json"))


def _tie_onnx(model: Path, out_dir: Path, cfg: TieConfig, force: bool, json_path: str | None) -> None:
    """An ONNX file without its PyTorch model: cluster its initializers, write codebook ONNX."""
    import json

    from compress.export import tie_onnx

    if cfg.bits is None:
        raise BadInputError(f"{model}: ONNX files are tied by --bits (not --tolerance)")
    out = Path(out_dir) / (model.name[: -len(model.suffix)] + ".tied.onnx")
    report = tie_onnx(model, out, bits=cfg.bits, granularity=cfg.granularity, group_size=cfg.group_size,
                      exclude=tuple(cfg.exclude), force=force)

    def show(console):
        console.print(report.to_table())
        for note in report.notes:
            console.print(f"note: {note}")
        click.echo(f"wrote {', '.join(report.files)}: {report.file_bytes:,} bytes "
                   f"({report.ratio_to_dense:.3f}x dense, {report.ratio_to_bound:.3f}x the bound)", err=True)

    _emit(json.dumps(report.to_dict(), indent=2), json_path, force, model, show)


def _tie_checkpoint(model: Path, out_dir: Path, cfg: TieConfig, workers: int | None, force: bool,
                    json_path: str | None) -> None:
    """A (sharded) safetensors checkpoint, tensor by tensor through memory maps, into sharded outputs."""
    from compress.stream import INDEX_NAME, output_dir_for, tie_checkpoint

    result = tie_checkpoint(model, output_dir_for(model, out_dir), cfg, workers=workers, force=force)

    def show(console):
        console.print(result.to_table())
        click.echo(f"wrote {result.out_dir}/{INDEX_NAME} and {len(result.shards)} shards", err=True)

    _emit(json_text(result.to_dict()), json_path, force, model, show)


def _config(path: Path | None, **flags) -> TieConfig:
    """The config file's values (or the defaults) with the flags given on the command line on top."""
    base = TieConfig.load(path).to_dict() if path is not None else TieConfig().to_dict()
    if flags["bits"] is not None and flags["tolerance"] is not None:
        raise BadInputError("give --bits or --tolerance, not both")
    if flags["bits"] is not None:
        base.update(bits=flags["bits"], tolerance=None)
    if flags["tolerance"] is not None:
        base.update(tolerance=flags["tolerance"], bits=None)
    for key in ("granularity", "group_size"):
        if flags[key] is not None:
            base[key] = flags[key]
    if flags["importance"]:
        base["importance"] = True
    base["exclude"] = [*base["exclude"], *flags["exclude"]]
    base["include"] = [*base["include"], *flags["include"]]
    return TieConfig.from_dict(base, source=str(path) if path else "command line")


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(width=160 if wide else None, soft_wrap=False, stderr=stderr)
