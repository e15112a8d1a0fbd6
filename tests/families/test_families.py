"""Every family of the zoo through default `tie`: the ONNX keeps its codebooks, whatever the graph does.

For each family (`zoo.FAMILIES`): onnxruntime matches the merged model within 1e-4 relative; the ONNX
audit finds every clustered tensor stored as codebook + indices and no more dense float data than the
model's unclustered tensors; the file is within 1.03x of the independent bound (the families all have
at least 100k parameters); the safetensors file round-trips bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx
import pytest

from compress.auditing.onnx import audit_onnx
from compress.io import Loaded
from compress.pipeline import tie
from compress.tying import TieConfig
from tests.families.zoo import FAMILIES, parameters

BOUND_RATIO = 1.03
REL_ERROR = 1e-4


def tie_family(name: str, out_dir: Path):
    model, inputs = FAMILIES[name]()
    loaded = Loaded(path=Path(f"{name}.pt"), kind="module", tensors=dict(model.state_dict()), module=model,
                    example_inputs=inputs)
    return model, tie(loaded, TieConfig(), out_dir=out_dir)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_keeps_its_codebooks_in_onnx(tmp_path, name):
    model, result = tie_family(name, tmp_path)
    onnx_report = next(e for e in result.exports if e.format == "onnx")
    checks = {Path(v.path).suffix: v for v in result.verification}

    # onnxruntime against the merged model, relative to the output's scale
    for c in checks[".onnx"].checks:
        assert c.max_abs <= REL_ERROR * c.max_reference, (c.name, c.max_abs, c.max_reference)

    # no clustered tensor is dense: each one's index decodes in the graph; dense data is the rest's
    storage = audit_onnx(onnx.load(onnx_report.path))
    for tp in result.plan.clustered():
        assert storage.of(f"{tp.name}.index").storage == "index", tp.name
    bound = onnx_report.independent_bound
    scalars = sum(i.bytes for i in storage.initializers if i.storage == "dense" and math.prod(i.shape) <= 4)
    assert storage.dense_bytes - scalars <= bound.dense_bytes  # the exporter's own scalar constants aside
    assert onnx_report.losses() == [] and not [n for n in result.report.notes if "dense" in n or "ONNX" in n]

    assert parameters(model) >= 100_000
    assert onnx_report.file_bytes <= BOUND_RATIO * bound.total, (onnx_report.file_bytes, bound)

    assert checks[".safetensors"].mode == "bit-exact" and checks[".safetensors"].passed
