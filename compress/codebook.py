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
from .granularity import KINDS, Granularity
from .records import Record, codec

FORMAT_VERSION = 1
GRANULARITIES = KINDS
FILE_FORMAT = "codebook"  # `compress.format` in the metadata of the codebook safetensors files
FILE_FORMAT_VERSION = 1
_MAX_DIM = 1 << 48
_MAX_RANK = 64


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


def _tensor_list(t: torch.Tensor) -> list:
    return t.double().tolist()


def _codebook_from(value, d) -> torch.Tensor:
    dtype = getattr(torch, str(d.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise BadInputError(f"codebook {d.get('name')!r}: dtype {d.get('dtype')!r} is not a float type")
    return torch.tensor(value, dtype=torch.float64).to(dtype)


def _indices_from(value, d) -> torch.Tensor:
    shape = tuple(int(s) for s in d["shape"])
    return torch.tensor(value, dtype=torch.int64).reshape(shape).to(index_dtype(int(d.get("k", 256))))


@dataclass
class TensorCodebook(Record):
    """One merged tensor: `codebook` [groups, K] in the weight's dtype, `indices` with its shape.

    `granularity` ("tensor", "channel", "group") and `group_size` say which codebook row each
    first-axis row of the weight reads (see `grain`).
    """

    name: str
    shape: tuple[int, ...]
    granularity: str
    codebook: torch.Tensor = field(metadata=codec(_tensor_list, _codebook_from))
    indices: torch.Tensor = field(metadata=codec(lambda t: t.reshape(-1).tolist(), _indices_from))
    group_size: int | None = None

    _what = "codebook"
    _derived = ("k", "bits", "dtype")

    @property
    def grain(self) -> Granularity:
        return Granularity.of(self.granularity, self.group_size)

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
        offsets = self.grain.row_offsets(self.shape, self.k)
        flat = self.codebook.reshape(-1)
        return flat[(self.indices.long() + offsets).reshape(-1)].reshape(self.shape)

    def packed_bytes(self) -> int:
        """Bytes the ideal storage takes: n*bits/8 for indices plus the codebook."""
        return math.ceil(self.numel * self.bits / 8) + self.codebook.numel() * self.codebook.element_size()

    def to_dict(self, with_tensors: bool = True) -> dict:
        d = super().to_dict()
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        if not with_tensors:
            del d["codebook"], d["indices"]
        return d


@dataclass
class Alias(Record):
    """`name` stores no data of its own: it is `target` (transposed when `transpose`)."""

    name: str
    target: str
    transpose: bool = False

    _what = "alias"


@dataclass
class Codebooks(Record):
    """Every merged tensor of a model and every tensor-level tie, keyed by parameter name."""

    tensors: dict[str, TensorCodebook] = field(default_factory=dict)
    aliases: dict[str, Alias] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    _what = "codebooks format"
    _version_required = True
    _version_hint = "re-run `compress tie` with this version"

    def to_dict(self, with_tensors: bool = True) -> dict:
        return {
            "version": self.version,
            "tensors": {n: t.to_dict(with_tensors) for n, t in self.tensors.items()},
            "aliases": {n: a.to_dict() for n, a in self.aliases.items()},
        }


@dataclass
class Recipe(Record):
    """How one merged tensor is stored in a codebook safetensors file (`compress.tensors` metadata)."""

    codebook: str
    indices: str
    bits: int
    k: int
    packing: str
    shape: list[int]
    dtype: str
    granularity: str
    group_size: int | None = None

    _what = "codebook recipe"

    @classmethod
    def _validate(cls, kw: dict, where: str) -> None:
        if not 1 <= kw["bits"] <= 16 or not 1 <= kw["k"] <= 1 << kw["bits"]:
            raise BadInputError(f"{where}: bits {kw['bits']} and k {kw['k']} do not fit (1 <= k <= 2**bits, "
                                "bits <= 16)")
        if any(s < 0 or s > _MAX_DIM for s in kw["shape"]) or len(kw["shape"]) > _MAX_RANK:
            raise BadInputError(f"{where}: shape {kw['shape'][:8]} has a negative or absurd dimension")
        if kw["granularity"] not in KINDS:
            raise BadInputError(f"{where}: unknown granularity {kw['granularity']!r}")
        if kw["granularity"] == "group" and (kw.get("group_size") is None or kw["group_size"] < 1):
            raise BadInputError(f"{where}: granularity 'group' needs a group_size >= 1, got {kw.get('group_size')!r}")
        if not isinstance(getattr(torch, kw["dtype"], None), torch.dtype) or kw["dtype"].startswith("_"):
            raise BadInputError(f"{where}: unknown dtype {kw['dtype']!r}")

    @property
    def grain(self) -> Granularity:
        return Granularity.of(self.granularity, self.group_size)


class CodebookParametrization(nn.Module):
    """Parametrization whose `original` is the codebook [groups, K]; it holds the indices as a buffer."""

    def __init__(self, indices: torch.Tensor, shape: tuple[int, ...], granularity: str,
                 group_size: int | None, k: int):
        super().__init__()
        self.shape = tuple(shape)
        self.granularity = granularity
        self.group_size = group_size
        self.register_buffer("index", indices)
        grain = Granularity.of(granularity, group_size)
        self.register_buffer("offset", grain.row_offsets(self.shape, k), persistent=False)

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
