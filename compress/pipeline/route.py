"""`tie_file(path, cfg)`: tie whatever file the user has, by what it is.

- an `.onnx` file: clustered post-training into `<out_dir>/<stem>.tied.onnx` (`tie_onnx`), checked in
  onnxruntime on the data's test inputs (or `input_shape` inputs, or random ones of its input types);
- a sharded `*.safetensors.index.json`, or a `.safetensors` file with `stream=True`: tensor by
  tensor through memory maps into `<out_dir>/<stem>.tied/` (`tie_checkpoint`);
- anything else `compress.io.load` reads (`.pt2`, state dict, TorchScript, `.safetensors`): in
  memory, with fine-tuning when data is given (`tie`).

Example::

    result = tie_file("samples/digits_mlp.pt2", TieConfig(bits=4), data="samples/digits_data.pt")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import BadInputError, Option
from ..io import is_safetensors_checkpoint, load, load_data
from ..tying import FinetuneConfig, TieConfig
from .assign import refuse_quality_options
from .checkpoint import StreamResult, output_dir_for, tie_checkpoint
from .exports import ExportOptions
from .inputs import check_example_inputs, example_inputs, parse_input_shapes
from .onnx import OnnxTieResult, tie_onnx
from .tie import DEFAULT_OUT_DIR, TieResult, tie


def tie_file(path: str | Path, cfg: TieConfig | None = None, *, out_dir: str | Path = DEFAULT_OUT_DIR,
             data: str | Path | None = None, finetune: FinetuneConfig | None = None,
             export: ExportOptions | None = None, workers: int | None = None, stream: bool = False,
             trust_pickle: bool = False, force: bool = False, input_shapes: Sequence[str] = ()
             ) -> TieResult | StreamResult | OnnxTieResult:
    """Tie the model file at `path` and write the results into `out_dir`; see the module docstring.

    Args:
        path: the model file (recognized by content).
        cfg: the `TieConfig` (default: 4 bits per tensor).
        out_dir: the output folder.
        data: a data file (`compress.io.load_data`): fine-tuning, importance and accuracy.
        finetune: how to fine-tune with `data` (default `FinetuneConfig()`).
        export: which files to export and how to verify them (in-memory path).
        workers: processes clustering a checkpoint in parallel (streamed path).
        stream: stream a single `.safetensors` file too.
        trust_pickle: allow loading pickled code (only for files the user trusts).
        force: overwrite existing outputs.
        input_shapes: example inputs for a model that carries none, one `[dtype:]D0xD1x...` per input
            (`compress.pipeline.inputs`): a TorchScript file or pickled module gets an ONNX export, an
            ONNX file is checked on them.
    """
    path = Path(path)
    cfg = cfg or TieConfig()
    if data is None and finetune is not None and (finetune.epochs or 0) > 0:
        raise BadInputError("fine-tuning (", Option("epochs"), ") needs calibration data (", Option("data"), ")")
    specs = parse_input_shapes(input_shapes)
    how = route(path, data=data, stream=stream)
    if how != "model":
        refuse_quality_options(cfg, "an ONNX file" if how == "onnx" else "a streamed checkpoint")
    if how == "checkpoint":
        if specs:
            raise BadInputError(f"{path}: a checkpoint of tensors is tied without running it; drop ",
                                Option("input_shape"))
        return tie_checkpoint(path, output_dir_for(path, out_dir), cfg, workers=workers, force=force)
    splits = load_data(data) if data is not None else None
    if how == "onnx":
        x = example_inputs(specs) if specs else (splits.test_inputs if splits is not None else None)
        return tie_onnx(path, Path(out_dir) / (path.name[: -len(path.suffix)] + ".tied.onnx"), cfg, force=force,
                        export=export, inputs=x)
    loaded = load(path, trust_pickle=trust_pickle)
    examples = None
    if specs:
        module = loaded.module if loaded.module is not None else None
        examples = example_inputs(specs, module)
        if module is not None:
            check_example_inputs(module, examples, specs, path)
    return tie(loaded, cfg, data=splits, finetune=finetune if splits is not None else None, out_dir=out_dir,
               force=force, data_path=data, export=export, example_inputs=examples)


def route(path: str | Path, *, data: str | Path | None = None, stream: bool = False) -> str:
    """Which pipeline `tie_file` runs for `path`: "onnx", "checkpoint" or "model" (in memory).

    >>> route("samples/digits_mlp.pt2")
    'model'
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if data is None and is_safetensors_checkpoint(path) and (stream or path.name.endswith(".index.json")):
        return "checkpoint"
    return "model"
