"""What opening a file gives: `Loaded` (a model's tensors, aliases, module, example inputs) and
`DataSplits` (calibration and test data), and how tied tensors are recognized (`find_aliases`)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import TRUST, BadInputError, UnsafePickleError
from ._errors import library_call


@dataclass
class Loaded:
    """A model file, opened: its tensors, aliases and (where the format has them) module and inputs.

    `tensors` holds every parameter and buffer name; names in `aliases` share storage with their
    canonical name (skip them to count unique storage). For safetensors and ONNX it is lazy: each
    tensor is read when indexed.
    """

    path: Path
    kind: str
    tensors: Mapping[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)
    module: nn.Module | None = None
    example_inputs: tuple[torch.Tensor, ...] | None = None
    program: Any = None  # torch.export.ExportedProgram for kind "pt2"
    onnx_model: Any = None  # onnx.ModelProto (external data not loaded) for kind "onnx"
    sha256: str = ""
    notes: list[str] = field(default_factory=list)  # what the reader found or did, said to the user
    untrusted_code: str = ""  # code the file carries that was not run (TorchScript): running it needs trust

    def require_module(self, purpose: str) -> nn.Module:
        """The runnable module, or an error saying why there is none (naming the trust flag when it would help)."""
        if self.module is not None:
            return self.module
        if self.untrusted_code:
            raise UnsafePickleError(f"{self.path}: {purpose} runs the model, but it is {self.untrusted_code}, which "
                                    "was not run; pass ", TRUST, " only for files you trust")
        raise BadInputError(f"{self.path}: {purpose} runs the model, but this {self.kind} file holds only tensors; "
                            "give the .pt2 program")

    def describe(self) -> str:
        """One line: file, kind, tensor count and size, aliases, module and example inputs.

        >>> from compress.io import load
        >>> load("samples/digits_mlp.pt2").describe()
        'digits_mlp.pt2: pt2, 6 tensors, 50,610 values (202.4 KB), runnable module, example inputs [4, 64]'
        """
        values = size = 0
        for name in self.tensors:
            if name in self.aliases:
                continue
            dtype, shape = _spec(self.tensors, name)
            values += math.prod(shape)
            size += math.prod(shape) * _itemsize(dtype)
        n = len(self.tensors)
        parts = [f"{self.path.name}: {self.kind}", f"{n} tensor{'' if n == 1 else 's'}",
                 f"{values:,} values ({_human(size)})"]
        if self.aliases:
            parts.append(f"{len(self.aliases)} alias{'es' if len(self.aliases) > 1 else ''}")
        if self.module is not None:
            parts.append("runnable module")
        if self.example_inputs:
            shapes = ", ".join(str(list(t.shape)) for t in self.example_inputs if isinstance(t, torch.Tensor))
            parts.append(f"example inputs {shapes}")
        return ", ".join(parts)


@dataclass
class DataSplits:
    """Calibration and test data: inputs (first dimension = samples) and optional targets."""

    calib_inputs: torch.Tensor
    calib_targets: torch.Tensor | None
    test_inputs: torch.Tensor
    test_targets: torch.Tensor | None
    path: Path


# --- aliases, data splits, helpers ---------------------------------------------------------------

def find_aliases(named: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """Names whose tensors are the same view of the same storage (tied weights): other -> first name.

    >>> emb = torch.nn.Embedding(10, 4); head = torch.nn.Linear(4, 10, bias=False); head.weight = emb.weight
    >>> find_aliases([("emb.weight", emb.weight), ("head.weight", head.weight)])
    {'head.weight': 'emb.weight'}
    """
    first: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for name, t in named:
        if not isinstance(t, torch.Tensor) or t.is_nested or t.is_meta or t.layout != torch.strided or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.stride()), tuple(t.shape), t.dtype)
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


def _spec(tensors: Mapping, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
    spec = getattr(tensors, "spec", None)
    if spec is not None:
        return spec(name)
    t = tensors[name]
    return t.dtype, tuple(t.shape)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with library_call(path, "hashing the file"), open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["DataSplits", "Loaded", "file_sha256", "find_aliases", "named_tensors"]

