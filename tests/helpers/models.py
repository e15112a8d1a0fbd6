"""Tiny models and files for the plan / soft-tie / merge / `compress tie` tests, each named for its case."""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compress.io import DataSplits


class TwoLayer(nn.Module):
    """fc1 (32x48 = 1,536 weights: clustered by default), fc2 (4x32: small), biases."""

    def __init__(self, d_in: int = 48, hidden: int = 32, d_out: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class ConvNormNet(nn.Module):
    """Conv2d (16x8x3x3 = 1,152), a LayerNorm of 1,024 (norm layer), and a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.norm = nn.LayerNorm(1024)
        self.head = nn.Linear(1024, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x.reshape(-1, 8, 8, 8)).flatten(1)
        return self.head(self.norm(h))


class TiedCopies(nn.Module):
    """`b` holds an equal copy of `a`'s weight and `c` a transposed copy: tensor-level ties."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(48, 32, bias=False)
        self.b = nn.Linear(48, 32, bias=False)
        self.c = nn.Linear(32, 48, bias=False)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)
            self.c.weight.copy_(self.a.weight.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x) + self.b(x))


class SharedHead(nn.Module):
    """An embedding and an output layer that are one `nn.Parameter` (tied embedding / head)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x.long()).mean(1))


class Recurrent(nn.Module):
    """A GRU, a GRUCell and an Embedding: registry coverage beyond Linear/Conv."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 8)
        self.gru = nn.GRU(8, 16, num_layers=2)
        self.cell = nn.GRUCell(16, 16)


def digits_like(n: int = 96, d_in: int = 48, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable random inputs and their integer labels."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    protos = torch.randn(classes, d_in, generator=gen)
    x = protos[y] + 0.3 * torch.randn(n, d_in, generator=gen)
    return x, y


def trained_two_layer(steps: int = 60, seed: int = 0) -> tuple[TwoLayer, DataSplits]:
    """A `TwoLayer` briefly trained on `digits_like` data, with the splits (no file path)."""
    torch.manual_seed(seed)
    model = TwoLayer()
    x, y = digits_like(seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    tx, ty = digits_like(n=48, seed=seed + 1)
    return model.eval(), DataSplits(x, y, tx, ty, Path("memory"))


def save_pt2(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """`torch.export` with a dynamic batch and save to `path`."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    path.write_bytes(buf.getvalue())
    return path


def save_data(path: Path, calib_inputs, calib_targets, test_inputs, test_targets) -> Path:
    d = {"version": 1, "calib_inputs": calib_inputs, "test_inputs": test_inputs}
    if calib_targets is not None:
        d["calib_targets"] = calib_targets
    if test_targets is not None:
        d["test_targets"] = test_targets
    torch.save(d, path)
    return path
