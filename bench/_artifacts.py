"""The files `runtime.py` and `storage.py` measure: fp32 ONNX and the toolkit's ONNX and safetensors.

Each model is built the way a user of the toolkit would: `analyze` with the default `TieConfig(bits=4)`
(one codebook per tensor, every registered weight of >= 1,024 elements: Linear, Conv, Embedding,
GRUCell ...), `merge_`, then `export_onnx` and `export_safetensors`. The fp32 ONNX comes from the same
dynamo export settings (`_common.fp32_onnx`), so the graphs differ only by the codebook decode.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import _common as C
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_NAMES = ("digits_mlp", "digits_cnn", "digits_autoencoder", "digits_gru")
MAX_TOKENS = 128


class SentenceEmbedder(nn.Module):
    """BertModel + mean pooling + L2 normalisation: the sentence-transformers pipeline as one module.

    `attention_mask` defaults to `input_ids != 0` (BERT's [PAD] id), so the toolkit's one-input
    importance and distillation loops can drive it with token ids alone.
    """

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = (input_ids != 0).long()
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def tokenize(st_model, sentences: list[str], max_length: int = MAX_TOKENS) -> dict[str, torch.Tensor]:
    return dict(st_model.tokenizer(list(sentences), padding="longest", truncation=True, max_length=max_length,
                                   return_tensors="pt"))


@dataclass
class Built:
    """One model's files and what the exporters reported about them."""

    name: str
    fp32_onnx: Path
    onnx: Path
    safetensors: Path
    inputs: tuple[torch.Tensor, ...]  # the inputs the runtime benchmark feeds
    onnx_report: object = None
    st_report: object = None
    clustered: int = 0
    clustered_numel: int = 0
    total_numel: int = 0
    packed_bytes: int = 0  # merged tensors at ceil(n * bits / 8) index bytes + codebook bytes
    dense_bytes: int = 0  # every parameter and buffer that was not merged, each storage once
    fp32_safetensors: Path | None = None
    notes: list[str] = field(default_factory=list)


def _toolkit():
    from compress.export.onnx import export_onnx
    from compress.export.safetensors import export_safetensors
    from compress.tying import TieConfig, analyze, merge_

    return TieConfig, analyze, merge_, export_onnx, export_safetensors


def build(name: str, model: nn.Module, example: tuple[torch.Tensor, ...], out_dir: Path, bits: int = 4,
          inputs: tuple[torch.Tensor, ...] | None = None, program=None) -> Built:
    """fp32 ONNX + fp32 safetensors of `model`, then the toolkit's ONNX and safetensors at `bits`."""
    from safetensors.torch import save_model

    TieConfig, analyze, merge_, export_onnx, export_safetensors = _toolkit()
    out_dir.mkdir(parents=True, exist_ok=True)
    b = Built(name, out_dir / f"{name}.fp32.onnx", out_dir / f"{name}.onnx", out_dir / f"{name}.safetensors",
              inputs if inputs is not None else example)
    C.fp32_onnx(model, example, b.fp32_onnx)
    b.fp32_safetensors = out_dir / f"{name}.fp32.safetensors"
    save_model(model, str(b.fp32_safetensors))  # safetensors' own writer keeps one copy of shared tensors
    merged = copy.deepcopy(model)
    plan = analyze(merged, TieConfig(bits=bits), program=program)
    codebooks = merge_(merged, plan)
    b.onnx_report = export_onnx(merged, codebooks, b.onnx, example, force=True)
    b.st_report = export_safetensors(merged, codebooks, b.safetensors, force=True)
    b.clustered = len(codebooks.tensors)
    b.clustered_numel = sum(cb.numel for cb in codebooks.tensors.values())
    b.total_numel = sum(p.numel() for p in model.parameters())
    b.packed_bytes = sum(cb.packed_bytes() for cb in codebooks.tensors.values())
    b.dense_bytes = _dense_bytes(model, set(codebooks.tensors) | set(codebooks.aliases))
    return b


def _dense_bytes(model: nn.Module, merged: set[str]) -> int:
    """Bytes of the original model's tensors that stay dense: each storage counted once."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if name in merged or key in seen:
            seen.add(key)
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def build_sample(name: str, out_dir: Path, bits: int = 4, batch: int = 64) -> Built:
    """A bundled sample, loaded with `compress.io.load` (its `.pt2` program keeps the module types)."""
    from compress.io import load, load_data

    loaded = load(C.SAMPLES / f"{name}.pt2")
    data = load_data(C.SAMPLES / "digits_data.pt")
    return build(name, loaded.module, tuple(loaded.example_inputs), out_dir, bits,
                 inputs=(data.test_inputs[:batch],), program=loaded.program)


def build_minilm(out_dir: Path, bits: int = 4, batch: int = 8) -> Built:
    """all-MiniLM-L6-v2 as a sentence embedder (BertModel + mean pooling), inputs: `batch` real sentences."""
    st = C.load_minilm()
    model = SentenceEmbedder(C.bert_of(st)).eval()
    tokens = tokenize(st, C.sentence_set(600, 512).eval[:batch])
    example = (tokens["input_ids"], tokens["attention_mask"])
    b = build("minilm", model, example, out_dir, bits)
    b.notes.append(f"MiniLM input: {batch} sentences, {tokens['input_ids'].shape[1]} tokens (the export fixes the "
                   "sequence length; dimension 0 is dynamic)")
    return b


def build_family(name: str, out_dir: Path, bits: int = 4, batch: int = 8) -> Built:
    """A model of the family zoo (`tests/families/zoo.py`: seeded, random weights) and its seeded inputs."""
    from tests.families.zoo import FAMILIES

    model, inputs = FAMILIES[name](batch=batch)
    return build(name, model, tuple(inputs), out_dir, bits)
