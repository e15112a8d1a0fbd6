"""Measuring a tie run: bytes as stored, and how far the merged model's outputs moved."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..codebook import bits_for
from ..execution import loss_mode, train_mode
from .report import Quality


def stored_bytes(model: nn.Module) -> dict:
    """Bytes as stored: each tensor object once; a codebook index at its ideal packed width."""
    seen: set[int] = set()
    params = buffers = packed_index = 0
    for _, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel() * p.element_size()
    for name, b in model.named_buffers(remove_duplicate=False):
        if id(b) in seen or name.endswith(".offset"):
            continue
        seen.add(id(b))
        if name.endswith(".index") and ".parametrizations." in name:
            k = _codebook_k(model, name)
            packed_index += -(-b.numel() * bits_for(k) // 8)
        else:
            buffers += b.numel() * b.element_size()
    return {"parameters": params, "buffers": buffers, "indices": packed_index,
            "total": params + buffers + packed_index}


def _codebook_k(model: nn.Module, index_name: str) -> int:
    owner, _, _ = index_name.rpartition(".0.index")
    return int(model.get_submodule(owner).original.shape[1])


@torch.no_grad()
def quality(reference: nn.Module | None, merged: nn.Module, data, examples: tuple | None) -> Quality:
    """Output error of the merged model against the original on the test (or example) inputs."""
    if reference is None:
        return Quality()
    if data is not None and len(data.test_inputs):
        x, y, label = data.test_inputs, data.test_targets, f"test inputs ({len(data.test_inputs)})"
    elif examples:
        x, y, label = examples[0], None, f"example inputs ({len(examples[0])})"
    else:
        return Quality()
    a, b = _run(reference, x), _run(merged, x)
    out = Quality(label, float((a - b).abs().max()),
                  float(F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).mean()))
    kind = loss_mode(a, x, y)
    if kind == "cross-entropy":
        out.accuracy_before = 100.0 * float((a.argmax(1) == y).double().mean())
        out.accuracy_after = 100.0 * float((b.argmax(1) == y).double().mean())
    elif kind == "reconstruction":
        out.mse_before = float(F.mse_loss(a.double(), x.double()))
        out.mse_after = float(F.mse_loss(b.double(), x.double()))
    return out


def _run(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    with train_mode(model, False):
        return torch.cat([model(x[s:s + batch]) for s in range(0, len(x), batch)])
