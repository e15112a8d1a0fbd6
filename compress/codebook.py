"""Codebook storage: the shared form every merged tensor takes.

A merged tensor is a small table of shared values (`codebook`, one row per channel group) and an
integer `indices` tensor with the weight's shape. Decoding is one gather:

    weight = codebook.reshape(-1)[indices + group_of_row * K]

`Codebooks` is what `merge_` returns and what the exporters consume; it round-trips through JSON
(`to_dict`/`from_dict`, tensors written as lists) so it can ride inside safetensors metadata.
`CodebookParametrization` makes a module *store* a codebook instead of its dense weight, so the
state_dict, `torch.export` and the ONNX exporter all see the compact form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import BadInputError

FORMAT_VERSION = 1
GRANULARITIES = ("tensor", "channel", "group")


def bits_for(k: int) -> int:
    """Index bits needed to address `k` shared values (at least 1)."""
    return max(1, math.ceil(math.log2(max(k, 1))))


def index_dtype(k: int) -> torch.dtype:
    """Narrowest torch integer dtype holding indices 0..k-1."""
    if k <= 256:
        return torch.uint8
    if k <= 32768:
        return torch.int16
    return torch.int32


def groups_for(shape: tuple[int, ...], granularity: str, group_size: int | None) -> int:
    """Number of codebook rows: 1 per tensor, one per output channel, or one per group of channels."""
    if granularity == "tensor" or len(shape) == 0:
        return 1
    if granularity == "channel":
        return shape[0]
    if granularity == "group":
        if not group_size or group_size < 1:
            raise BadInputError("granularity 'group' needs a group size >= 1 (--group-size N)")
        return math.ceil(shape[0] / group_size)
    raise BadInputError(f"unknown granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}")


def row_offsets(shape: tuple[int, ...], granularity: str, group_size: int | None, k: int) -> torch.Tensor:
    """Offset into the flat codebook for every element's row, broadcastable to `shape` (int64)."""
    if granularity == "tensor" or len(shape) == 0:
        return torch.zeros((), dtype=torch.int64)
    rows = torch.arange(shape[0], dtype=torch.int64)
    group = rows if granularity == "channel" else rows // int(group_size)
    return (group * k).view(shape[0], *([1] * (len(shape) - 1)))


@dataclass
class TensorCodebook:
    """One merged tensor: `codebook` [groups, K] in the weight's dtype, `indices` with its shape."""

    name: str
    shape: tuple[int, ...]
    granularity: str
    codebook: torch.Tensor
    indices: torch.Tensor
    group_size: int | None = None

    @property
    def k(self) -> int:
        return int(self.codebook.shape[-1])

    @property
    def bits(self) -> int:
        return bits_for(self.k)

    @property
    def dtype(self) -> torch.dtype:
        return self.codebook.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def decode(self) -> torch.Tensor:
        """The dense merged tensor (exactly the shared values, no rounding)."""
        offsets = row_offsets(self.shape, self.granularity, self.group_size, self.k)
        flat = self.codebook.reshape(-1)
        return flat[(self.indices.long() + offsets).reshape(-1)].reshape(self.shape)

    def packed_bytes(self) -> int:
        """Bytes the ideal storage takes: n*bits/8 for indices plus the codebook."""
        return math.ceil(self.numel * self.bits / 8) + self.codebook.numel() * self.codebook.element_size()

    def to_dict(self, with_tensors: bool = True) -> dict:
        d = {
            "name": self.name,
            "shape": list(self.shape),
            "granularity": self.granularity,
            "group_size": self.group_size,
            "k": self.k,
            "bits": self.bits,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        if with_tensors:
            d["codebook"] = self.codebook.double().tolist()
            d["indices"] = self.indices.reshape(-1).tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TensorCodebook:
        dtype = getattr(torch, d["dtype"])
        shape = tuple(int(s) for s in d["shape"])
        codebook = torch.tensor(d["codebook"], dtype=torch.float64).to(dtype)
        indices = torch.tensor(d["indices"], dtype=torch.int64).reshape(shape).to(index_dtype(d["k"]))
        return cls(d["name"], shape, d["granularity"], codebook, indices, d.get("group_size"))


@dataclass
class Alias:
    """`name` stores no data of its own: it is `target` (transposed when `transpose`)."""

    name: str
    target: str
    transpose: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "target": self.target, "transpose": self.transpose}

    @classmethod
    def from_dict(cls, d: dict) -> Alias:
        return cls(d["name"], d["target"], bool(d.get("transpose", False)))


@dataclass
class Codebooks:
    """Every merged tensor of a model and every tensor-level tie, keyed by parameter name."""

    tensors: dict[str, TensorCodebook] = field(default_factory=dict)
    aliases: dict[str, Alias] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def to_dict(self, with_tensors: bool = True) -> dict:
        return {
            "version": self.version,
            "tensors": {n: t.to_dict(with_tensors) for n, t in self.tensors.items()},
            "aliases": {n: a.to_dict() for n, a in self.aliases.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> Codebooks:
        if d.get("version") != FORMAT_VERSION:
            raise BadInputError(
                f"codebooks format version {d.get('version')!r} is not supported (this is version "
                f"{FORMAT_VERSION}); re-run `compress tie` with this version"
            )
        return cls(
            {n: TensorCodebook.from_dict(t) for n, t in d["tensors"].items()},
            {n: Alias.from_dict(a) for n, a in d.get("aliases", {}).items()},
        )


class CodebookParametrization(nn.Module):
    """Parametrization whose `original` is the codebook [groups, K]; it holds the indices as a buffer."""

    def __init__(self, indices: torch.Tensor, shape: tuple[int, ...], granularity: str,
                 group_size: int | None, k: int):
        super().__init__()
        self.shape = tuple(shape)
        self.granularity = granularity
        self.group_size = group_size
        self.register_buffer("index", indices)
        self.register_buffer("offset", row_offsets(self.shape, granularity, group_size, k), persistent=False)

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        return codebook.reshape(-1)[self.index.long() + self.offset]

    def right_inverse(self, codebook: torch.Tensor) -> torch.Tensor:
        return codebook


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def attach_codebook_(model: nn.Module, cb: TensorCodebook) -> None:
    """Make `model` store `cb` for parameter `cb.name` (a parametrization; the model is changed in place)."""
    module, attr = _owner(model, cb.name)
    current = getattr(module, attr)
    if tuple(current.shape) != cb.shape:
        raise BadInputError(f"`{cb.name}` has shape {tuple(current.shape)}, codebook expects {cb.shape}")
    if parametrize.is_parametrized(module, attr):
        parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    p = CodebookParametrization(cb.indices, cb.shape, cb.granularity, cb.group_size, cb.k)
    # register with the codebook as the new original: unsafe because shapes differ.
    with torch.no_grad():
        module._parameters[attr] = nn.Parameter(cb.codebook.clone(), requires_grad=current.requires_grad)
    parametrize.register_parametrization(module, attr, p, unsafe=True)
