"""Every option of the command line, defined once; commands stack the ones they take.

`FLAGS` maps a library parameter to its flag where the two are not spelled alike, so an error that
names a parameter (`compress.errors.Option`) is shown with the flag the user types.
"""

from __future__ import annotations

from pathlib import Path

import click

from compress.errors import BadInputError, Option
from compress.granularity import KINDS
from compress.tying import METHODS, PRIORS, FinetuneConfig

FLAGS = {"path": "PATH", "data": "--data", "onnx": "--onnx", "safetensors": "--safetensors", "ort": "--ort", "out_dir": "--out-dir", "config": "--config",
         "reference": "--reference", "original": "--original"}


def flag(option) -> str:
    """How the command line writes a parameter named in an error."""
    return option.flag(FLAGS)


def _path(**kw):
    return click.Path(path_type=Path, **kw)


# --- shared by several commands -------------------------------------------------------------------

trust_pickle = click.option(
    "--trust-pickle", is_flag=True,
    help="Allow loading pickled code from the model file. Only for files you trust: a pickle runs code.")
json_out = click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
                        help="Also write the result as JSON to this file ('-' for stdout).")
force = click.option("--force", is_flag=True, help="Overwrite existing output files.")
data = click.option("--data", "data_path", type=_path(), default=None,
                    help="Data file (calib/test inputs, optional targets): fine-tuning, accuracy, test inputs.")
provider = click.option("--provider", default="cpu", show_default=True,
                        help="onnxruntime provider: cpu, cuda or a full name such as CUDAExecutionProvider.")
atol = click.option("--atol", type=float, default=1e-4, show_default=True,
                    help="Absolute tolerance of the onnxruntime-vs-torch check.")
rtol = click.option("--rtol", type=float, default=1e-4, show_default=True,
                    help="Relative tolerance of the onnxruntime-vs-torch check.")
tolerance = click.option("--tolerance", type=float, default=None,
                         help="Absolute distance within which a weight may share a value. tie: the fewest shared "
                              "values keeping every weight within it (instead of --bits); audit: values within it "
                              "count as one group (default 1e-3).")
tie_tolerance = click.option("--tie-tolerance", type=float, default=None,
                             help="Relative error ||a - b|| / max(||a||, ||b||) under which two tensors count as "
                                  "copies (default: tie 0, exact only; audit 1e-3).")

# --- tie ------------------------------------------------------------------------------------------

out_dir = click.option("-o", "--out-dir", type=_path(file_okay=False), default=Path("compressed"),
                       show_default=True,
                       help="Folder for <stem>.tied.pt2, .plan.json, .report.json, .onnx and .safetensors.")
bits = click.option("--bits", type=int, default=None,
                    help="Index bits per weight, 1..8 (K = 2**bits shared values); default 4. Flags set the "
                         "global values: by_type/by_name overrides in --config still apply on top.")
granularity = click.option("--granularity", type=click.Choice([*KINDS, "auto"]), default=None,
                           help="One codebook per tensor, per output channel, per group of channels, or auto "
                                "(default): for matrices of >= 65,536 weights the smallest groups of 16, 32, 64, ... "
                                "channels whose codebooks cost < 0.1 bits per weight more, else per tensor.")
group_size = click.option("--group-size", type=int, default=None, help="Channels per codebook for --granularity group.")
epochs = click.option("--epochs", type=int, default=None,
                      help=f"Soft-tying epochs with --data (default: enough for {FinetuneConfig.min_steps} steps, "
                           "at least 3; 0: post-training clustering only).")
strength = click.option("--strength", type=float, default=None,
                        help=f"Soft-tying strength lambda (default {FinetuneConfig.strength}): the pull on each "
                             "weight is about lambda * (w - its centre), whatever the tensor's size.")
prior = click.option("--prior", type=click.Choice(PRIORS), default="pairwise", show_default=True,
                     help="Soft-tying prior: pairwise pull to the cluster mean, or a learned Gaussian mixture.")
zero_component = click.option("--zero-component", is_flag=True,
                              help="Mixture prior: fix one shared value at 0 (pruning).")
importance = click.option("--importance", is_flag=True,
                          help="Weight the clustering by each weight's mean squared gradient on --data.")
exclude = click.option("--exclude", multiple=True, metavar="GLOB",
                       help="Leave parameters matching GLOB alone (repeatable).")
include = click.option("--include", multiple=True, metavar="GLOB",
                       help="Tie parameters matching GLOB even if the defaults skip them (bias, norm, small).")
config = click.option("--config", "config_path", type=_path(dir_okay=False), default=None,
                      help="tie.json: defaults, by_type and by_name overrides; flags given here win over it.")
seed = click.option("--seed", type=int, default=0, show_default=True, help="Seed for batch order and sampling.")
nproc = click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Fine-tune with N processes on this machine (re-runs this command under torchrun; each "
                          "takes 1/N of every batch). For several machines run torchrun yourself (README).")
fsdp = click.option("--fsdp", is_flag=True,
                    help="Under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of "
                         "replicating them (DDP), for models whose training state does not fit one process.")
no_onnx = click.option("--no-onnx", is_flag=True, help="Do not write <stem>.onnx.")
no_safetensors = click.option("--no-safetensors", is_flag=True, help="Do not write <stem>.safetensors.")
no_verify = click.option("--no-verify", is_flag=True, help="Do not run the exports in onnxruntime / load them back.")
workers = click.option("--workers", type=click.IntRange(min=1), default=None,
                       help="Processes clustering a safetensors checkpoint in parallel (default: all cores that "
                            "fit in memory).")
input_shape = click.option(
    "--input-shape", "input_shapes", multiple=True, metavar="[DTYPE:]DxDx...",
    help="Example input for a model that has none (TorchScript, pickled nn.Module, ONNX check), one per model "
         "input, dimension 0 the batch: 1x3x224x224, int64:1x128 (repeatable).")
strict = click.option("--strict", is_flag=True,
                      help="Exit 1 when an export stores a tied tensor dense or its indices wider than planned "
                           "(the files are kept).")
method = click.option("--method", type=click.Choice(METHODS), default=None,
                      help="How weights are assigned to the shared values: compensated (each assignment's output "
                           "error is passed on to the weights not yet assigned, from calibration inputs observed "
                           "layer by layer: --data, else the model's example inputs), nearest (each weight to its "
                           "nearest value, today's behaviour), or auto (default: compensated when there are inputs).")
dim = click.option("--dim", type=int, default=None,
                   help="1, 2 or 4: share runs of DIM consecutive weights (vector codebooks, K = 2**(bits*dim) "
                        "vectors, one index of bits*dim bits per run). Default 1.")


def _percent(ctx, param, value: str | None) -> float | None:
    if value is None:
        return None
    text = value.strip().removesuffix("%")
    try:
        share = float(text) / 100
    except ValueError:
        raise BadInputError(Option("outliers", value), " is not a percentage (e.g. 0.5%)") from None
    return share


outliers = click.option("--outliers", callback=_percent, default=None, metavar="PERCENT",
                        help="Keep this share of each tied tensor's weights exactly (e.g. 0.5%), the ones the "
                             "shared values fit worst, in a sparse side tensor counted in the bits per weight.")
budget = click.option("--budget", type=float, default=None, metavar="BITS",
                      help="Average bits per tied weight (codebooks, indices and outliers counted): bits per "
                           "tensor are chosen from the output error each tensor causes at each width; never "
                           "exceeded. The report lists the bits chosen.")
stream = click.option("--stream", is_flag=True,
                      help="Tie a .safetensors file tensor by tensor (always on for *.safetensors.index.json).")

# --- audit ----------------------------------------------------------------------------------------

markdown = click.option("--markdown", is_flag=True,
                        help="Print markdown tables (for CI summaries) instead of the table.")
plot = click.option("--plot", "plot_path", type=_path(dir_okay=False), default=None,
                    help="Also write histograms of the largest tensors with their 4-bit shared values to this PNG.")
top = click.option("--top", type=click.IntRange(min=0), default=25, show_default=True,
                   help="Rows shown per list (0 shows all).")

# --- export and verify ----------------------------------------------------------------------------

onnx_out = click.option("--onnx", "onnx_path", type=_path(dir_okay=False), default=None,
                        help="Write an ONNX model: codebooks + narrow indices decoded in-graph (Cast -> Gather).")
safetensors_out = click.option("--safetensors", "st_path", type=_path(dir_okay=False), default=None,
                               help="Write a safetensors file: codebooks + packed indices, the recipe in its metadata.")
ort_out = click.option("--ort", "ort_path", type=_path(dir_okay=False), default=None,
                       help="Write an ORT-format model (onnxruntime's mobile format) that keeps the codebooks: "
                            "converted with constant folding off; 4- and 2-bit indices stored as packed uint8.")
codebook_dtype = click.option("--codebook-dtype", type=click.Choice(["float32", "float16"]), default="float32",
                              show_default=True,
                              help="Codebook precision in the ONNX file (float16 adds a Cast and rounds the values).")
no_dedup = click.option("--no-dedup", is_flag=True, help="Keep identical initializers separate in the ONNX file.")
reference = click.option("--reference", type=_path(), required=True,
                         help="The merged PyTorch model the file was exported from (.pt2).")
original = click.option("--original", type=_path(), default=None,
                        help="Also compare with the model before compression (max abs, cosine, top-1 agreement).")
keep_compressed = click.option("--keep-compressed", is_flag=True,
                               help="Check with onnxruntime's constant folding off (weights stay compressed in memory).")
runs = click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True,
                    help="Runs for the median latency.")
