"""Tiny models and a simple merge for the export and verify tests.

`quantize_` stands in for the real pipeline (`merge_`): it clusters each chosen weight by quantiles
into K = 2**bits values per tensor / channel / group and attaches the codebook with
`attach_codebook_`, so the tests exercise exactly the storage form `merge_` produces.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compress.codebook import Alias, Codebooks, TensorCodebook, attach_codebook_
from compress.granularity import Granularity


class MLP(nn.Module):
    def __init__(self, hidden: int = 48) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 12, 3, padding=1)
        self.fc = nn.Linear(12 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv(x.reshape(-1, 1, 8, 8))), 2)
        return self.fc(h.flatten(1))


class TiedAutoencoder(nn.Module):
    """The decoder reads the encoder's weight transposed: one parameter, two uses."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(64, 40)
        self.dec_bias = nn.Parameter(torch.randn(64) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.enc(x))
        return F.linear(h, self.enc.weight.t(), self.dec_bias)


class GRULike(nn.Module):
    """A GRU cell unrolled over 4 steps of 16 pixels: every step reads the same weights."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(16, 24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, 4, 16)
        h = x.new_zeros(rows.shape[0], 24)
        for t in range(4):
            h = self.cell(rows[:, t], h)
        return self.fc(h)


class TiedEmbeddingHead(nn.Module):
    """Token embedding whose matrix is also the output head (read in forward, one parameter)."""

    def __init__(self, vocab: int = 96, dim: int = 24) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.emb(tokens).mean(1)))
        return F.linear(h, self.emb.weight)


class DeclaredTie(nn.Module):
    """Embedding and head as two parameters; the tie exists only as `Codebooks.aliases`."""

    def __init__(self, vocab: int = 96, dim: int = 24) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(tokens).mean(1)))


class Wide(nn.Module):
    """One big linear layer: large enough that the file size is dominated by the indices."""

    def __init__(self, d_in: int = 256, d_out: int = 1024) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def digits_input(batch: int = 5) -> torch.Tensor:
    return torch.rand(batch, 64)


def tokens_input(batch: int = 5, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, 7))


MODELS = {
    "mlp": (MLP, digits_input),
    "conv": (ConvNet, digits_input),
    "tied_ae": (TiedAutoencoder, digits_input),
    "gru_like": (GRULike, digits_input),
    "tied_emb_head": (TiedEmbeddingHead, tokens_input),
}


def cluster(name: str, w: torch.Tensor, bits: int, granularity: str = "tensor",
            group_size: int | None = None) -> TensorCodebook:
    """K = 2**bits values per group at evenly spaced quantiles, each weight to its nearest value."""
    k = 1 << bits
    shape = tuple(w.shape)
    grain = Granularity.of(granularity, group_size)
    blocks = grain.row_blocks(shape[0])
    groups = len(blocks)
    rows = w.detach().reshape(shape[0], -1)
    codebook = torch.empty(groups, k)
    indices = torch.empty(rows.shape, dtype=torch.long)
    for g, sl in enumerate(blocks):
        block = rows[sl]
        centers = torch.quantile(block.reshape(-1).float(), torch.linspace(0, 1, k))
        codebook[g] = centers
        nearest = torch.bucketize(block, (centers[1:] + centers[:-1]) / 2)  # centers are sorted
        indices[sl] = nearest
    dtype = torch.uint8 if k <= 256 else torch.int16
    return TensorCodebook(name, shape, granularity, codebook.to(w.dtype), indices.reshape(shape).to(dtype),
                          group_size if granularity == "group" else None)


def quantize_(model: nn.Module, bits: int, granularity: str = "tensor", group_size: int | None = None,
              names: list[str] | None = None) -> Codebooks:
    """Merge every weight with >= 2 dims (or `names`) into a codebook; returns the Codebooks."""
    params = dict(model.named_parameters())
    names = names if names is not None else [n for n, p in params.items() if p.dim() >= 2]
    cbs = Codebooks()
    for name in names:
        cb = cluster(name, params[name], bits, granularity, group_size)
        attach_codebook_(model, cb)
        cbs.tensors[name] = cb
    return cbs


def merged(kind: str, bits: int, granularity: str = "tensor", group_size: int | None = None):
    """A merged model of `kind`, its codebooks and example inputs."""
    make, inputs = MODELS[kind]
    model = make().eval()
    cbs = quantize_(model, bits, granularity, group_size)
    return model, cbs, inputs()


def declared_tie(bits: int = 4) -> tuple[DeclaredTie, Codebooks, torch.Tensor]:
    """Merge `emb.weight`; `head.weight` holds the same decoded values and is declared its alias."""
    model = DeclaredTie().eval()
    cbs = quantize_(model, bits, names=["emb.weight"])
    with torch.no_grad():
        model.head.weight.copy_(cbs.tensors["emb.weight"].decode())
    cbs.aliases["head.weight"] = Alias("head.weight", "emb.weight")
    return model, cbs, tokens_input()


def unique_per_group(cb: TensorCodebook) -> int:
    return max(len(np.unique(row)) for row in cb.codebook.numpy())
