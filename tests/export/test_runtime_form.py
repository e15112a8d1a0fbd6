"""The decode in its cheapest run-time form (`compress.export.runtime_form`), exact in both session modes:

- an embedding read only by token-id lookups is decoded at the rows read: the ids gather rows of its
  *index* (uint8 rows of the same packed bits), so its whole table never exists, folded or not;
- an embedding that is also read whole (a tied output head) keeps its whole-table decode;
- every other decode reads the codebook with GatherElements.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compress.auditing.onnx import audit_onnx
from compress.export import export_onnx
from compress.export._decode import DECODE_NODE
from compress.runtime import feed, make_session
from tests.helpers.export_models import TiedEmbeddingHead, quantize_


class Tagger(nn.Module):
    """Token embedding read by ids, then linear layers read whole."""

    def __init__(self, vocab: int = 50, dim: int = 24) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, 64)
        self.fc = nn.Linear(64, 96)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.proj(self.emb(ids))))


def runs_like_torch(model: nn.Module, path, ids: torch.Tensor) -> None:
    """Both session modes give torch's output to float32 rounding."""
    with torch.no_grad():
        want = model(ids).numpy()
    for keep in (False, True):
        session = make_session(path, keep_compressed=keep)
        got = session.run(None, feed(session, (ids,)))[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def decoders(proto: onnx.ModelProto) -> dict[str, str]:
    """Decode node name -> its op."""
    return {n.name: n.op_type for n in proto.graph.node if n.name.startswith(DECODE_NODE)}


CASES = [(4, 24, "tensor", None), (4, 25, "tensor", None), (8, 24, "tensor", None), (4, 24, "channel", None),
         (4, 24, "group", 8)]


@pytest.mark.parametrize(("bits", "dim", "granularity", "group_size"), CASES,
                         ids=["4bit", "4bit-odd-row", "8bit", "4bit-channel", "4bit-group"])
def test_an_embedding_is_decoded_only_at_the_rows_its_ids_read(tmp_path, bits, dim, granularity, group_size):
    torch.manual_seed(0)
    model = Tagger(dim=dim).eval()
    cbs = quantize_(model, bits, granularity, group_size)
    ids = torch.randint(0, 50, (3, 7))
    report = export_onnx(model, cbs, tmp_path / "m.onnx", ids)
    proto = onnx.load(str(tmp_path / "m.onnx"))

    runs_like_torch(model, tmp_path / "m.onnx", torch.randint(0, 50, (3, 7)))
    [rows] = [n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] == "emb.weight.index"]
    assert rows.input[1] in {i.name for i in proto.graph.input}  # the token ids pick index rows
    row_bytes = math.ceil(dim * bits / 8)
    index = audit_onnx(proto).of("emb.weight.index")
    assert (index.storage, index.dtype, index.shape) == ("index", "uint8", [50, row_bytes])
    assert index.bits == pytest.approx(8 * row_bytes / dim, abs=0.5)  # whole bytes per row: 4.0 unless padded
    assert any("`emb.weight.index`: decoded only at the rows" in n for n in report.notes)
    ops = decoders(proto)
    assert ops[f"{DECODE_NODE}:decode|rows"] == "Gather"
    assert ("GatherElements" in ops.values()) == (bits == 4)  # 256 values expanded: as large as the weight


def test_a_tied_embedding_read_whole_by_its_head_keeps_the_whole_table_decode(tmp_path):
    torch.manual_seed(0)
    model = TiedEmbeddingHead().eval()
    cbs = quantize_(model, 4, names=["emb.weight"])
    ids = torch.randint(0, 96, (5, 7))
    export_onnx(model, cbs, tmp_path / "m.onnx", ids)
    proto = onnx.load(str(tmp_path / "m.onnx"))

    runs_like_torch(model, tmp_path / "m.onnx", ids)
    assert audit_onnx(proto).of("emb.weight.index").dtype == "uint4"
    assert not any(n.op_type == "Gather" and n.input[0] == "emb.weight.index" for n in proto.graph.node)
    assert "Gather" not in decoders(proto).values()
