"""`compress tie MODEL`: cluster the weights into shared values (optionally soft-tying while
fine-tuning on --data), merge them, and write the merged model, the plan and a report."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from compress._atomic import check_output, write_text_atomic
from compress.codebook import GRANULARITIES
from compress.errors import BadInputError
from compress.finetune import FinetuneConfig
from compress.plan import TieConfig, json_text
from compress.soft_tie import PRIORS
from compress.tie import DEFAULT_OUT_DIR, tie

from . import options


@click.command("tie")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT_DIR,
              show_default=True, help="Folder for <stem>.tied.pt2, <stem>.plan.json and <stem>.report.json.")
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
@options.force
@options.trust_pickle
@options.json_out
def command(model: Path, out_dir: Path, bits: int | None, tolerance: float | None, granularity: str | None,
            group_size: int | None, data_path: Path | None, epochs: int | None, strength: float | None,
            prior: str, zero_component: bool, importance: bool, exclude: tuple[str, ...],
            include: tuple[str, ...], config_path: Path | None, seed: int, force: bool, trust_pickle: bool,
            json_path: str | None) -> None:
    """Tie the weights of MODEL into shared values; write the merged model, plan and report to --out-dir."""
    from compress.io import load, load_data

    cfg = _config(config_path, bits=bits, tolerance=tolerance, granularity=granularity, group_size=group_size,
                  importance=importance, exclude=exclude, include=include)
    if epochs is not None and data_path is None and epochs > 0:
        raise BadInputError("--epochs needs --data FILE (fine-tuning trains on it)")
    finetune = FinetuneConfig(epochs=epochs,
                              strength=FinetuneConfig.strength if strength is None else strength,
                              prior=prior, zero_component=zero_component, seed=seed,
                              codebook_epochs=0 if epochs == 0 else FinetuneConfig.codebook_epochs)
    if json_path and json_path != "-":
        check_output(Path(json_path), force=force, inputs=[model] + ([data_path] if data_path else []))
    loaded = load(model, trust_pickle=trust_pickle)
    data = load_data(data_path) if data_path is not None else None
    result = tie(loaded, cfg, data=data, finetune=finetune if data is not None else None, out_dir=out_dir,
                 force=force, data_path=data_path)
    text = json_text(result.report)
    if json_path == "-":
        click.echo(text, nl=False)
    else:
        _console().print(result.to_table())
        for p in result.paths:
            click.echo(f"wrote {p}", err=True)
    if json_path and json_path != "-":
        write_text_atomic(json_path, text, force=force, inputs=[model])
        click.echo(f"wrote {json_path}", err=True)


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


def _console():
    from rich.console import Console

    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=160 if wide else None, soft_wrap=False)
