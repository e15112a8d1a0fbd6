"""`export_file`: write a merged model's exports (ONNX, safetensors, ORT format), as `compress export` does.

Example::

    reports = export_file("compressed/digits_cnn.tied.pt2", onnx="out/cnn.onnx", ort="out/cnn.ort")
    reports = export_file("compressed/digits_cnn.onnx", ort="out/cnn.ort")   # convert a codebook ONNX
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..atomic import all_or_nothing, check_output, staging_dir
from ..errors import BadInputError, Option
from ..export import export_onnx, export_safetensors
from ..export.ort import export_ort
from ..export.report import ExportReport
from ..io import load
from ..state import codebooks_from_state_dict


def export_file(path: str | Path, *, onnx: str | Path | None = None, safetensors: str | Path | None = None,
                ort: str | Path | None = None, codebook_dtype: str = "float32", dedup: bool = True,
                trust_pickle: bool = False, force: bool = False) -> dict[str, ExportReport]:
    """Export the merged model at `path` (a `.pt2` or state dict from `compress tie`) to the files asked for.

    An `.onnx` input (a codebook ONNX from `compress tie`) can only be converted to ORT format (`ort`).
    Every output is checked before any work; each is written atomically.

    Returns:
        format ("onnx", "safetensors", "ort") -> its `ExportReport`.
    """
    path = Path(path)
    outputs = [Path(p) for p in (onnx, safetensors, ort) if p is not None]
    if not outputs:
        raise BadInputError("nothing to write: give ", Option("onnx"), ", ", Option("safetensors"), " or ",
                            Option("ort"))
    for out in outputs:
        check_output(out, force=force, inputs=[path])
    loaded = load(path, trust_pickle=trust_pickle)
    if loaded.kind == "onnx":
        if onnx is not None or safetensors is not None:
            raise BadInputError(f"{path}: an ONNX file can only be converted to ORT format (", Option("ort"),
                                "); export ONNX or safetensors from the merged .pt2 instead")
        return {"ort": export_ort(path, ort, force=force)}
    source = loaded.module if loaded.module is not None else loaded.tensors
    codebooks = codebooks_from_state_dict(source)
    if not codebooks.tensors:
        raise BadInputError(f"{path}: no merged (codebook) tensors; run `compress tie {path}` first")
    with all_or_nothing():  # a full disk on the second file removes the first too
        return _export(loaded, codebooks, source, onnx, safetensors, ort, codebook_dtype, dedup, force)


def _export(loaded, codebooks, source, onnx, safetensors, ort, codebook_dtype: str, dedup: bool, force: bool
            ) -> dict[str, ExportReport]:
    path = loaded.path
    reports = {}
    if onnx is not None or ort is not None:
        if loaded.module is None or not loaded.example_inputs:
            raise BadInputError(f"{path}: ONNX export needs a runnable model with example inputs "
                                f"(a .pt2 from `compress tie`); this is a {loaded.kind} file")
        program = loaded.program if loaded.program is not None else loaded.module
        with contextlib.ExitStack() as stack:  # ORT format alone: its ONNX is an intermediate, staged beside it
            target = Path(onnx) if onnx is not None else stack.enter_context(staging_dir(Path(ort).parent)) / "m.onnx"
            reports["onnx"] = export_onnx(program, codebooks, target, loaded.example_inputs,
                                          codebook_dtype=codebook_dtype, dedup=dedup, force=force)
            if ort is not None:
                reports["ort"] = export_ort(target, ort, force=force)
            if onnx is None:
                del reports["onnx"]
    if safetensors is not None:
        reports["safetensors"] = export_safetensors(source, codebooks, safetensors, force=force)
    return reports
