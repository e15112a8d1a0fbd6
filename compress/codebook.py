"""Codebook storage: the shared form every merged tensor takes.

A merged tensor is a small table of shared values (`codebook`, one row per channel group) and an
integer `indices` tensor with the weight's shape. Decoding is one gather:

    weight = codebook.reshape(-1)[indices + group_of_row * K]

A vector codebook (`dim` 2 or 4) shares runs of `dim` consecutive weights along the last axis: the
codebook is [groups, K, dim], the indices have the weight's shape with the last axis divided by
`dim`, and the gather reads rows of `codebook.reshape(-1, dim)`. Optional outliers (`outlier_index`,
flat positions in the weight, and `outlier_value`) are written over the decoded weight.

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
FILE_FORMAT_VERSIONS = ("1", "2")  # 2: a recipe may have vector codebooks (`dim`) or outliers
VECTOR_DIMS = (1, 2, 4)


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


def index_shape(shape: tuple[int, ...], dim: int = 1) -> tuple[int, ...]:
    """Shape of the indices of a weight of `shape` whose runs of `dim` last-axis values share one index."""
    if dim == 1 or not shape:
        return tuple(shape)
    return (*shape[:-1], shape[-1] // dim)


def _indices_from(value, d) -> torch.Tensor:
    shape = index_shape(tuple(int(s) for s in d["shape"]), int(d.get("dim", 1)))
    return torch.tensor(value, dtype=torch.int64).reshape(shape).to(index_dtype(int(d.get("k", 256))))


def _outlier_index_from(value, d) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64).to(torch.int32)


def _outlier_value_from(value, d) -> torch.Tensor:
    return _codebook_from(value, d)


@dataclass
class TensorCodebook(Record):
    """One merged tensor: `codebook` [groups, K] in the weight's dtype, `indices` with its shape.

    `granularity` ("tensor", "channel", "group") and `group_size` say which codebook row each
    first-axis row of the weight reads (see `grain`). With `dim` > 1 the codebook is
    [groups, K, dim] and each index covers `dim` consecutive values of the last axis (`index_shape`).
    `outlier_index` (int32 flat positions) and `outlier_value` are exact values written over the
    decoded weight (None: no outliers).
    """

    name: str
    shape: tuple[int, ...]
    granularity: str
    codebook: torch.Tensor = field(metadata=codec(_tensor_list, _codebook_from))
    indices: torch.Tensor = field(metadata=codec(lambda t: t.reshape(-1).tolist(), _indices_from))
    group_size: int | None = None
    dim: int = 1
    outlier_index: torch.Tensor | None = field(default=None, metadata=codec(lambda t: t.tolist(),
                                                                            _outlier_index_from))
    outlier_value: torch.Tensor | None = field(default=None, metadata=codec(_tensor_list, _outlier_value_from))

    _what = "codebook"
    _derived = ("k", "bits", "dtype")

    @property
    def grain(self) -> Granularity:
        return Granularity.of(self.granularity, self.group_size)

    @property
    def k(self) -> int:
        return int(self.codebook.shape[1] if self.codebook.dim() > 1 else self.codebook.shape[-1])

    @property
    def bits(self) -> int:
        """Bits per index (an index covers `dim` weights)."""
        return bits_for(self.k)

    @property
    def index_shape(self) -> tuple[int, ...]:
        return index_shape(self.shape, self.dim)

    @property
    def index_count(self) -> int:
        return math.prod(self.index_shape)

    @property
    def outlier_count(self) -> int:
        return 0 if self.outlier_index is None else int(self.outlier_index.numel())

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: indices at their packed width, the codebook and the outliers counted."""
        return 8 * self.packed_bytes() / self.numel if self.numel else 0.0

    @property
    def dtype(self) -> torch.dtype:
        return self.codebook.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def decode(self) -> torch.Tensor:
        """The dense merged tensor (exactly the shared values and outliers, no rounding)."""
        return decode_tensor(self.codebook, self.indices, self.shape, self.grain, self.dim, self.outlier_index,
                             self.outlier_value)

    @property
    def outlier_bytes(self) -> int:
        """Bytes of the outliers: an int32 position and a value each."""
        return self.outlier_count * (4 + self.outlier_value.element_size()) if self.outlier_count else 0

    def packed_bytes(self) -> int:
        """Bytes the ideal storage takes: indices at `bits` each, the codebook, the outliers."""
        return (math.ceil(self.index_count * self.bits / 8) + self.codebook.numel() * self.codebook.element_size()
                + self.outlier_bytes)

    def to_dict(self, with_tensors: bool = True) -> dict:
        d = super().to_dict()
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        for key, default in (("dim", 1), ("outlier_index", None), ("outlier_value", None)):
            if d.get(key) == default:  # the scalar form stays as it was written before vectors existed
                del d[key]
        if not with_tensors:
            for key in ("codebook", "indices", "outlier_index", "outlier_value"):
                d.pop(key, None)
        return d

    @classmethod
    def _validate(cls, kw: dict, where: str) -> None:
        check_layout(kw["name"], tuple(kw["shape"]), kw.get("dim", 1), where)
        if (kw.get("outlier_index") is None) != (kw.get("outlier_value") is None):
            raise BadInputError(f"{where}: `{kw['name']}` needs both outlier_index and outlier_value, or neither")


def check_layout(name: str, shape: tuple[int, ...], dim: int, where: str) -> None:
    """Refuse a vector length that is not 1, 2 or 4, or one the last axis of `shape` does not divide."""
    if dim not in VECTOR_DIMS:
        raise BadInputError(f"{where}: `{name}` has dim {dim}; use one of {', '.join(map(str, VECTOR_DIMS))}")
    if dim > 1 and (not shape or shape[-1] % dim):
        raise BadInputError(f"{where}: `{name}` has shape {list(shape)}, whose last axis does not divide by dim {dim}")


def decode_tensor(codebook: torch.Tensor, indices: torch.Tensor, shape: tuple[int, ...], grain: Granularity,
                  dim: int = 1, outlier_index: torch.Tensor | None = None,
                  outlier_value: torch.Tensor | None = None) -> torch.Tensor:
    """The dense tensor of `shape` that a codebook, its indices and optional outliers describe."""
    k = codebook.shape[1] if codebook.dim() > 1 else codebook.shape[-1]
    offsets = grain.row_offsets(tuple(indices.shape), k)
    return lookup(codebook, indices, offsets, shape, dim, outlier_index, outlier_value)


def lookup(codebook: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, shape: tuple[int, ...],
           dim: int = 1, outlier_index: torch.Tensor | None = None,
           outlier_value: torch.Tensor | None = None) -> torch.Tensor:
    """`decode_tensor` with each row's offset into the flattened codebook given (`Granularity.row_offsets`).

    The op sequence is the one a merged program records, which `export.trace` matches.
    """
    table = codebook.reshape(-1, dim) if dim > 1 else codebook.reshape(-1)
    dense = table[indices.long() + offsets].reshape(shape)
    if outlier_index is not None and outlier_index.numel():
        dense = dense.reshape(-1).index_put((outlier_index.long(),), outlier_value.to(dense.dtype)).reshape(shape)
    return dense


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
    dim: int = 1
    outliers: int = 0
    outlier_index: str | None = None
    outlier_value: str | None = None

    _what = "codebook recipe"

    @classmethod
    def _validate(cls, kw: dict, where: str) -> None:
        check_layout(kw["indices"], tuple(kw["shape"]), kw.get("dim", 1), where)
        if kw.get("outliers", 0) and (kw.get("outlier_index") is None or kw.get("outlier_value") is None):
            raise BadInputError(f"{where}: {kw.get('outliers')} outliers need 'outlier_index' and 'outlier_value'")
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

    def to_dict(self) -> dict:
        d = super().to_dict()
        for key, default in (("dim", 1), ("outliers", 0), ("outlier_index", None), ("outlier_value", None)):
            if d[key] == default:  # scalar recipes are written as before vectors and outliers existed
                del d[key]
        return d


class CodebookParametrization(nn.Module):
    """Parametrization whose `original` is the codebook [groups, K] (or [groups, K, dim]); it holds the
    indices as a buffer, and the outliers (`outlier_index`, `outlier_value`) when there are any."""

    def __init__(self, indices: torch.Tensor, shape: tuple[int, ...], granularity: str,
                 group_size: int | None, k: int, dim: int = 1, outlier_index: torch.Tensor | None = None,
                 outlier_value: torch.Tensor | None = None):
        super().__init__()
        self.shape = tuple(shape)
        self.granularity = granularity
        self.group_size = group_size
        self.dim = dim
        self.register_buffer("index", indices)
        grain = Granularity.of(granularity, group_size)
        self.register_buffer("offset", grain.row_offsets(index_shape(self.shape, dim), k), persistent=False)
        self.outliers = outlier_index is not None
        if self.outliers:
            self.register_buffer("outlier_index", outlier_index)
            self.register_buffer("outlier_value", outlier_value)

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        if self.dim == 1 and not self.outliers:
            return codebook.reshape(-1)[self.index.long() + self.offset]
        return lookup(codebook, self.index, self.offset, self.shape, self.dim,
                      self.outlier_index if self.outliers else None, self.outlier_value if self.outliers else None)

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
    p = CodebookParametrization(cb.indices, cb.shape, cb.granularity, cb.group_size, cb.k, cb.dim,
                                cb.outlier_index, cb.outlier_value)
    # register with the codebook as the new original: unsafe because shapes differ.
    with torch.no_grad():
        module._parameters[attr] = nn.Parameter(cb.codebook.clone(), requires_grad=current.requires_grad)
    parametrize.register_parametrization(module, attr, p, unsafe=True)
