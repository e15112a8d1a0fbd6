"""The tie report carries the independent size bound of the ONNX file and reads back from its JSON."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.io import Loaded
from compress.packing import packed_size
from compress.pipeline import TieReport, tie
from compress.tying import TieConfig


@pytest.mark.slow
def test_the_report_json_reads_back_with_the_independent_bound(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    loaded = Loaded(tmp_path / "mlp.pt", "module", dict(model.state_dict()), module=model,
                    example_inputs=(torch.rand(2, 48),))
    result = tie(loaded, TieConfig(bits=4), out_dir=tmp_path / "out")
    onnx_report = next(e for e in result.exports if e.format == "onnx")
    bound = onnx_report.independent_bound
    # from the codebooks and the model, not from the file: 4-bit indices, 16-value codebooks, the biases
    assert bound.index_bytes == packed_size(48 * 64, 4) + packed_size(64 * 32, 4)
    assert bound.codebook_bytes == 2 * 16 * 4 and bound.dense_bytes == (64 + 32) * 4
    assert 0 < bound.graph_bytes < bound.fp32_file_bytes
    assert bound.total == bound.index_bytes + bound.codebook_bytes + bound.dense_bytes + bound.graph_bytes
    assert onnx_report.vs_bound == onnx_report.file_bytes / bound.total
    back = TieReport.load(result.report_path)
    assert back.exports[0].independent_bound == bound and back.tool.version == result.report.tool.version
