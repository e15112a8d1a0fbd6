"""`TieConfig`: what to tie and how, in layers (global values, by module type, by name glob).

    >>> cfg = TieConfig.from_dict({"bits": 2, "by_name": {"fc3.*": {"bits": 8}}})
    >>> cfg.resolved("fc3.weight", "Linear").bits, cfg.resolved("fc1.weight", "Linear").bits
    (8, 2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from fnmatch import fnmatchcase
from pathlib import Path

from ..errors import BadInputError, Option
from ..granularity import KINDS, Granularity
from ..records import Record, decode, read_json

CONFIG_VERSION = 1
MAX_BITS = 8
MAX_K = 1 << MAX_BITS
METHODS = ("auto", "nearest", "compensated")
AUTO = "auto"
AUTO_GROUP = 16
AUTO_SLACK = 0.1
AUTO_MIN = 1 << 16
GRANULARITIES = (*KINDS, AUTO)
DIMS = (1, 2, 4)
_OVERRIDE_TYPES = {"bits": int | None, "tolerance": float | None, "granularity": str, "group_size": int | None,
                   "enabled": bool}


@dataclass
class TieConfig(Record):
    """What to tie and how. K comes from `bits` (K = 2**bits) or, when set, from `tolerance`.

    Args:
        bits: index bits per weight, 1..8 (ignored when `tolerance` is set).
        tolerance: keep every weight within this absolute distance of its shared value, with the
            fewest shared values that allow it (at most 256).
        granularity: one codebook per "tensor", per output "channel" (row), or per "group" of
            `group_size` rows; "auto" (the default): for matrices of at least 65,536 weights the
            smallest groups of 16, 32, 64, ... rows whose codebooks cost less than 0.1 bits per weight
            more than one per tensor, else one per tensor.
        importance: weight the clustering by each weight's mean squared gradient on the data.
        min_elements: tensors with fewer elements are left alone.
        include / exclude: fnmatch globs on parameter names; `include` clusters a tensor the
            defaults would skip (bias, norm, small, unregistered); `exclude` always wins.
        tie_tensors: make equal or transposed copies of a tensor one parameter.
        tie_tolerance: relative error under which two tensors count as copies (0: exact only).
        by_type / by_name: overrides `{pattern: {"bits"|"tolerance"|"granularity"|"group_size"|"enabled": v}}`.
        method: how weights are assigned to the shared values: "nearest" (each to its nearest value),
            "compensated" (error-compensated, second order: each assignment's output error is passed on
            to the weights not yet assigned, from calibration inputs observed layer by layer), or
            "auto": compensated when calibration inputs exist, else nearest.
        dim: 1, or 2 / 4 for vector codebooks: K = 2**(bits * dim) shared runs of `dim` consecutive
            weights (along the last axis), one index of bits * dim bits per run.
        outliers: fraction of each tied tensor's weights (0.005 is 0.5%) kept exactly, in a sparse
            side tensor (int32 position + value each), counted in its bits per weight.
        budget: average bits per tied weight (codebooks, indices and outliers counted) to spread over
            the tensors by their measured sensitivity; `bits` is then only the starting point (a tensor
            whose K an override sets keeps it, and its storage counts against the budget).

    >>> TieConfig.from_dict({"bits": 2, "by_name": {"fc3.*": {"bits": 8}}}).bits
    2
    """

    bits: int | None = 4
    tolerance: float | None = None
    granularity: str = "auto"
    group_size: int | None = None
    importance: bool = False
    min_elements: int = 1024
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    tie_tensors: bool = True
    tie_tolerance: float = 0.0
    by_type: dict[str, dict] = field(default_factory=dict)
    by_name: dict[str, dict] = field(default_factory=dict)
    method: str = "auto"
    dim: int = 1
    outliers: float = 0.0
    budget: float | None = None
    version: int = CONFIG_VERSION

    _what = "config"

    def __post_init__(self) -> None:
        self._validate(vars(self), "config")

    def to_dict(self) -> dict:
        d = super().to_dict()
        for key in ("method", "dim", "outliers", "budget"):  # defaults left out: configs read as they were
            if d[key] == getattr(TieConfig, key):
                del d[key]
        return d

    @classmethod
    def _validate(cls, v: dict, where: str) -> None:
        full = {f: getattr(cls, f, None) for f in ("bits", "tolerance", "granularity", "group_size",
                                                   "min_elements", "tie_tolerance")} | v
        full.setdefault("by_type", {})
        full.setdefault("by_name", {})
        _check_k_settings(full["bits"], full["tolerance"], full["granularity"], full["group_size"], where)
        if full["bits"] is None and full["tolerance"] is None:
            raise BadInputError(f"{where}: set bits (1..{MAX_BITS}) or tolerance; both are null")
        if full["granularity"] == "group" and full["group_size"] is None:
            raise BadInputError(f"{where}: granularity 'group' needs a group size (", Option("group_size"), ")")
        _check_quality_settings(full, where)
        if full["min_elements"] < 0:
            raise BadInputError(f"{where}: min_elements must be >= 0, got {full['min_elements']}")
        if not math.isfinite(full["tie_tolerance"]) or full["tie_tolerance"] < 0:
            raise BadInputError(f"{where}: tie_tolerance must be a finite number >= 0, got {full['tie_tolerance']}")
        for section in ("by_type", "by_name"):
            for pattern, over in (full[section] or {}).items():
                _check_override(section, pattern, over, where)

    @classmethod
    def load(cls, path: str | Path) -> TieConfig:
        """Read a `tie.json` config file."""
        return cls.from_dict(read_json(path), source=str(path))

    @classmethod
    def layered(cls, path: str | Path | None = None, *, source: str = "settings", **values) -> TieConfig:
        """The config file's values (or the defaults) with `values` that are not None on top.

        `bits` and `tolerance` exclude each other (the one given wins over the file's); `include`
        and `exclude` add to the file's globs.

        >>> TieConfig.layered(bits=2, exclude=["fc3.*"]).to_dict()["exclude"]
        ['fc3.*']
        """
        base = cls.load(path).to_dict() if path is not None else cls().to_dict()
        given = {k: v for k, v in values.items() if v is not None and v != () and v is not False}
        if "bits" in given and "tolerance" in given:
            raise BadInputError("give ", Option("bits"), " or ", Option("tolerance"), ", not both")
        if "bits" in given:
            base["tolerance"] = None
        if "tolerance" in given:
            base["bits"] = None
        for key in ("include", "exclude"):
            if key in given:
                given[key] = [*base[key], *given[key]]
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"TieConfig.layered() got unknown settings {unknown}")
        return cls.from_dict(base | given, source=str(path) if path else source)

    def resolved(self, name: str, module_type: str | None) -> Settings:
        """The settings for one parameter after the by_type and by_name layers."""
        s = self.settings()
        if module_type is not None and module_type in self.by_type:
            s = s.apply(self.by_type[module_type], f"by_type {module_type!r}")
        for pattern, over in self.by_name.items():
            if fnmatchcase(name, pattern):
                s = s.apply(over, f"by_name {pattern!r}")
        return s

    def settings(self) -> Settings:
        """The global settings (no overrides applied)."""
        auto = self.granularity == AUTO
        grain = Granularity.of("tensor" if auto else self.granularity, self.group_size)
        return Settings(self.bits, self.tolerance, grain, True, "", auto)


@dataclass(frozen=True)
class Settings:
    """What one tensor gets: K from `bits` or `tolerance`, a granularity, whether it is tied at all."""

    bits: int | None
    tolerance: float | None
    grain: Granularity
    enabled: bool = True
    source: str = ""  # the last override that changed something, for reasons
    auto: bool = False  # granularity "auto": `for_shape` picks tensor or groups of AUTO_GROUP rows

    def apply(self, over: dict, source: str) -> Settings:
        kind = over.get("granularity", AUTO if self.auto else self.grain.kind)
        size = over.get("group_size", self.grain.size)
        auto = kind == AUTO
        kind = "tensor" if auto else kind
        new = replace(self, bits=over.get("bits", self.bits), tolerance=over.get("tolerance", self.tolerance),
                      grain=Granularity.of(kind, size if kind == "group" else None),
                      enabled=over.get("enabled", self.enabled), source=source, auto=auto)
        # The layer that names K wins: bits clears an inherited tolerance and vice versa.
        if "bits" in over and "tolerance" not in over:
            new = replace(new, tolerance=None)
        if "tolerance" in over and over["tolerance"] is not None and "bits" not in over:
            new = replace(new, bits=None)
        return new

    def for_shape(self, shape: tuple[int, ...], dim: int = 1) -> Settings:
        """Granularity "auto" made concrete for a tensor of `shape` (vectors of `dim` weights): the
        smallest groups of 16, 32, 64, ... rows whose extra codebooks (K x dim values of 32 bits each)
        cost less than 0.1 bits per weight, for a matrix of at least 65,536 weights; else one codebook."""
        if not self.auto:
            return self
        rows = int(shape[0]) if len(shape) >= 2 else 1
        numel = math.prod(shape)
        if self.bits is None or numel < AUTO_MIN:
            return replace(self, auto=False)
        vector = dim > 1 and shape[-1] % dim == 0 and self.bits * dim <= MAX_BITS
        per_group = (1 << (self.bits * dim if vector else self.bits)) * (dim if vector else 1) * 32
        size = AUTO_GROUP
        while size < rows:
            if per_group * (-(-rows // size) - 1) < AUTO_SLACK * numel:
                return replace(self, grain=Granularity("group", size), auto=False)
            size *= 2
        return replace(self, auto=False)


def _check_quality_settings(v: dict, where: str) -> None:
    """method, dim, outliers and budget, each refused with one line naming the setting."""
    method, dim = v.get("method", "auto"), v.get("dim", 1)
    outliers, budget = v.get("outliers", 0.0), v.get("budget")
    if method not in METHODS:
        raise BadInputError(f"{where}: ", Option("method", method), f" is not one of {', '.join(METHODS)}")
    if isinstance(dim, bool) or dim not in DIMS:
        raise BadInputError(f"{where}: ", Option("dim", dim), " must be 1, 2 or 4 (weights per shared vector)")
    if not (isinstance(outliers, (int, float)) and math.isfinite(outliers) and 0 <= outliers < 1):
        shown = f"{100 * outliers:g}%" if isinstance(outliers, (int, float)) else repr(outliers)
        raise BadInputError(f"{where}: ", Option("outliers", shown), " must be a share of the weights from 0% to "
                            "below 100% (e.g. 0.5%)")
    if budget is not None and not (math.isfinite(budget) and 1 <= budget <= MAX_BITS):
        raise BadInputError(f"{where}: ", Option("budget", budget), f" must be between 1 and {MAX_BITS} bits per "
                            "weight (the average over the tied weights, codebooks counted)")
    if budget is not None and v.get("tolerance") is not None:
        raise BadInputError(f"{where}: give ", Option("budget"), " or ", Option("tolerance"), ", not both")
    if dim > 1 and v.get("tolerance") is not None:
        raise BadInputError(f"{where}: vector codebooks (", Option("dim", dim), ") need ", Option("bits"),
                            ", not ", Option("tolerance"))
    bits = v.get("bits")
    if dim > 1 and bits is not None and bits * dim > MAX_BITS:
        raise BadInputError(f"{where}: ", Option("dim", dim), f" with {bits} bits needs {bits * dim}-bit indices; "
                            f"at most {MAX_BITS}: use ", Option("bits", MAX_BITS // dim), " or fewer")


def _check_override(section: str, pattern: str, over, source: str = "config") -> None:
    where = f"{source}: {section}[{pattern!r}]"
    if not isinstance(over, dict):
        raise BadInputError(f"{where} must be an object of overrides")
    for key, value in over.items():
        if key not in _OVERRIDE_TYPES:
            raise BadInputError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(_OVERRIDE_TYPES))}")
        decode(_OVERRIDE_TYPES[key], value, where, key)
    _check_k_settings(over.get("bits"), over.get("tolerance"), over.get("granularity", "tensor"),
                      over.get("group_size", 1), where)


def _check_k_settings(bits, tolerance, granularity, group_size, where: str) -> None:
    if bits is not None and not (isinstance(bits, int) and 1 <= bits <= MAX_BITS):
        raise BadInputError(f"{where}: bits must be between 1 and {MAX_BITS}, got {bits}")
    if tolerance is not None and (not math.isfinite(tolerance) or tolerance < 0):
        raise BadInputError(f"{where}: tolerance must be a finite number >= 0, got {tolerance}")
    if granularity not in GRANULARITIES:
        raise BadInputError(f"{where}: granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if group_size is not None and group_size < 1:
        raise BadInputError(f"{where}: group_size must be >= 1, got {group_size}")
