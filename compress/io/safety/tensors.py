"""Tensors from a file are checked before anything reads, expands or computes with them.

A pickle or a `.pt2` stores a tensor as a storage plus a view (shape, strides, offset). The view is
free to describe far more elements than the storage holds: `torch.zeros(1).expand(2**20, 2**12)`
saves 4 bytes of storage and loads as 2**32 elements, which the first `.clone()`, `.sum()` or
k-means materializes (16 GiB). So a view is accepted only when it stays inside its storage and has
no more elements than the storage (zero or overlapping strides that inflate it are refused), and
a tensor only when it is what the toolkit computes with: strided (dense), on the CPU, with data
(not `meta`), not quantized or nested, of a real dtype. Anything else is refused by name and kind,
with what to do about it. Sparse tensors are refused rather than validated: their indices would be
trusted by every later operation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ...errors import BadInputError

MAX_DIM = 1 << 48  # no real tensor has a dimension this long; keeps products far from overflow
MAX_RANK = 64


def check_view(where: str, name: str, shape: Sequence[Any], stride: Sequence[Any], offset: Any,
               storage_numel: int) -> None:
    """Refuse a view (shape, strides, offset) that reads outside a storage of `storage_numel`
    elements or describes more elements than it holds.

    >>> check_view("m.pt", "w", [2, 3], [3, 1], 0, 6)
    >>> check_view("m.pt", "w", [2**20, 2**12], [0, 0], 0, 1)
    Traceback (most recent call last):
    ...
    compress.errors.BadInputError: m.pt: tensor 'w' has shape [1048576, 4096] (4,294,967,296 elements) over a storage of 1 (strides [0, 0] repeat its elements); refused: save it with .contiguous() or .clone()
    """
    shape, stride = list(shape), list(stride)
    label = f"{where}: tensor {_name(name)}"
    if not all(_is_int(d) for d in [*shape, *stride, offset]):
        raise BadInputError(f"{label} has a non-integer shape, stride or offset; the file is corrupt")
    if len(shape) != len(stride) or len(shape) > MAX_RANK:
        raise BadInputError(f"{label} has shape {shape[:8]} but strides {stride[:8]}; the file is corrupt")
    if any(d < 0 or d > MAX_DIM for d in shape) or any(s < 0 for s in stride) or offset < 0:
        raise BadInputError(f"{label} has shape {shape[:8]}, strides {stride[:8]}, offset {offset}: negative or "
                            "absurd values; the file is corrupt")
    numel = math.prod(shape)
    if numel == 0:
        if math.prod(max(d, 1) for d in shape) > MAX_DIM:
            raise BadInputError(f"{label} has an empty shape {shape[:8]} with absurd dimensions; the file is corrupt")
        return
    end = offset + sum((d - 1) * s for d, s in zip(shape, stride)) + 1
    if end > storage_numel:
        raise BadInputError(f"{label} reads elements up to {end:,} of a storage of {storage_numel:,}; the file "
                            "is corrupt")
    if numel > storage_numel:
        raise BadInputError(f"{label} has shape {shape[:8]} ({numel:,} elements) over a storage of "
                            f"{storage_numel:,} (strides {stride[:8]} repeat its elements); refused: save it with "
                            ".contiguous() or .clone()")


def check_tensor(where: str, name: str, t: torch.Tensor, *, what: str = "tensor") -> None:
    """Refuse a tensor the toolkit must not compute with (see the module docstring)."""
    kind = _odd_kind(t)
    if kind is not None:
        raise BadInputError(f"{where}: {what} {_name(name)} is {kind}; compress reads dense (strided) CPU tensors "
                            f"of a real dtype only: {_fix(t)}")
    storage = t.untyped_storage()
    size = t.element_size()
    check_view(where, name, t.shape, t.stride(), t.storage_offset(), storage.nbytes() // size if size else 0)


def check_tensors(where: str, named: Iterable[tuple[str, Any]], *, what: str = "tensor") -> None:
    """`check_tensor` on every tensor of `named` (other values are skipped)."""
    for name, value in named:
        if isinstance(value, torch.Tensor):
            check_tensor(where, name, value, what=what)


def _odd_kind(t: torch.Tensor) -> str | None:
    if t.is_nested:
        return "a nested tensor"
    if t.layout != torch.strided:
        return f"a {str(t.layout).removeprefix('torch.')} tensor"
    if t.is_meta:
        return "a meta tensor (it has no data)"
    if t.is_quantized:
        return f"quantized ({str(t.dtype).removeprefix('torch.')})"
    if t.device.type != "cpu":
        return f"on {t.device}"
    if t.is_complex():
        return f"complex ({str(t.dtype).removeprefix('torch.')})"
    if type(t) not in (torch.Tensor, torch.nn.Parameter, torch.nn.Buffer):
        return f"a tensor subclass ({type(t).__name__})"
    return None


def _fix(t: torch.Tensor) -> str:
    if t.is_quantized:
        return "dequantize it (t.dequantize()) and save it again"
    if t.layout != torch.strided and not t.is_nested:
        return "convert it with .to_dense() and save it again, or leave it out of the file"
    return "convert it to a plain float tensor and save it again, or leave it out of the file"


def _name(name: str) -> str:
    text = repr(name)
    return text if len(text) <= 82 else text[:79] + "..."


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
