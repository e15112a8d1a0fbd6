"""Plan the tying: for every parameter, whether and how it is clustered, or why it is left alone.

`analyze(model, TieConfig)` returns a `TiePlan`: a small versioned dataclass a person can read and
edit as JSON. Each tensor gets an action, `cluster` (with granularity, K and the initial shared values),
`alias` (an equal or transposed copy of another tensor: it becomes that tensor) or `keep`, and a
reason ("Linear.weight", "bias", "norm layer", "small (< 1024 elements)", "excluded by 'fc1.*'").

Which parameters are clusterable comes from `compress.registry`. For a `.pt2` program (whose
`program.module()` has lost its module types) the types are recovered from the graph's
`nn_module_stack` metadata; where that fails the rule "at least 2 dims and named `*weight`" is used,
and the reason says so.

Configuration is layered: global values, then `by_type` (module class name, e.g. "Linear"), then
`by_name` (fnmatch glob), each able to set `bits`, `tolerance`, `granularity`, `group_size` or
`enabled`.

    >>> plan = analyze(model, TieConfig(bits=4))
    >>> plan.save("model.plan.json")
    >>> TiePlan.load("model.plan.json").tensor("fc1.weight").k
    16
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import registry
from ._atomic import write_text_atomic
from .codebook import GRANULARITIES, bits_for, groups_for
from .errors import BadInputError
from .kmeans import fewest_centers, kmeans_1d

CONFIG_VERSION = 1
PLAN_VERSION = 1
MAX_K = 256
_OVERRIDE_KEYS = {"bits": (int, type(None)), "tolerance": (float, int, type(None)), "granularity": (str,),
                  "group_size": (int, type(None)), "enabled": (bool,)}


# --- configuration --------------------------------------------------------------------------------

@dataclass
class TieConfig:
    """What to tie and how. K comes from `bits` (K = 2**bits) or, when set, from `tolerance`.

    Args:
        bits: index bits per weight, 1..8 (ignored when `tolerance` is set).
        tolerance: keep every weight within this absolute distance of its shared value, with the
            fewest shared values that allow it (at most 256).
        granularity: one codebook per "tensor", per output "channel" (row), or per "group" of
            `group_size` rows.
        importance: weight the clustering by each weight's mean squared gradient on the data.
        min_elements: tensors with fewer elements are left alone.
        include / exclude: fnmatch globs on parameter names; `include` clusters a tensor the
            defaults would skip (bias, norm, small, unregistered); `exclude` always wins.
        tie_tensors: make equal or transposed copies of a tensor one parameter.
        tie_tolerance: relative error under which two tensors count as copies (0: exact only).
        by_type / by_name: overrides `{pattern: {"bits"|"tolerance"|"granularity"|"group_size"|"enabled": v}}`.

    >>> TieConfig.from_dict({"bits": 2, "by_name": {"fc3.*": {"bits": 8}}}).bits
    2
    """

    bits: int | None = 4
    tolerance: float | None = None
    granularity: str = "tensor"
    group_size: int | None = None
    importance: bool = False
    min_elements: int = 1024
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    tie_tensors: bool = True
    tie_tolerance: float = 0.0
    by_type: dict[str, dict] = field(default_factory=dict)
    by_name: dict[str, dict] = field(default_factory=dict)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        _check_values(vars(self), "config")

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "config") -> TieConfig:
        """Build from a dict (e.g. a `tie.json`), rejecting unknown keys and wrong types by name."""
        if not isinstance(d, dict):
            raise BadInputError(f"{source}: expected a JSON object, got {type(d).__name__}")
        known = {f.name: f for f in fields(cls)}
        for key in d:
            if key not in known:
                raise BadInputError(f"{source}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        for key, value in d.items():
            _check_type(source, key, value, _FIELD_TYPES[key])
        version = d.get("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise BadInputError(f"{source}: config version {version} is not supported (this is {CONFIG_VERSION})")
        _check_values({f.name: getattr(cls, f.name, None) for f in fields(cls)} | d, source)
        return cls(**{k: (list(v) if isinstance(v, list) else v) for k, v in d.items()})

    @classmethod
    def load(cls, path: str | Path) -> TieConfig:
        """Read a `tie.json` config file."""
        return cls.from_dict(_read_json(path), source=str(path))

    def resolved(self, name: str, module_type: str | None) -> _Settings:
        """The settings for one parameter after the by_type and by_name layers."""
        s = _Settings(self.bits, self.tolerance, self.granularity, self.group_size, True, "")
        if module_type is not None and module_type in self.by_type:
            s = s.apply(self.by_type[module_type], f"by_type {module_type!r}")
        for pattern, over in self.by_name.items():
            if fnmatchcase(name, pattern):
                s = s.apply(over, f"by_name {pattern!r}")
        return s


_FIELD_TYPES = {
    "bits": (int, type(None)), "tolerance": (float, int, type(None)), "granularity": (str,),
    "group_size": (int, type(None)), "importance": (bool,), "min_elements": (int,), "include": (list,),
    "exclude": (list,), "tie_tensors": (bool,), "tie_tolerance": (float, int), "by_type": (dict,),
    "by_name": (dict,), "version": (int,),
}


@dataclass(frozen=True)
class _Settings:
    bits: int | None
    tolerance: float | None
    granularity: str
    group_size: int | None
    enabled: bool
    source: str  # the last override that changed something, for reasons

    def apply(self, over: dict, source: str) -> _Settings:
        new = replace(self, **over, source=source)
        # The layer that names K wins: bits clears an inherited tolerance and vice versa.
        if "bits" in over and "tolerance" not in over:
            new = replace(new, tolerance=None)
        if "tolerance" in over and over["tolerance"] is not None and "bits" not in over:
            new = replace(new, bits=None)
        return new


def _check_values(v: dict, where: str) -> None:
    _check_k_settings(v["bits"], v["tolerance"], v["granularity"], v["group_size"], where)
    if v["bits"] is None and v["tolerance"] is None:
        raise BadInputError(f"{where}: set bits (1..8) or tolerance; both are null")
    if v["granularity"] == "group" and v["group_size"] is None:
        raise BadInputError(f"{where}: granularity 'group' needs a group size (--group-size N)")
    if v["min_elements"] < 0:
        raise BadInputError(f"{where}: min_elements must be >= 0, got {v['min_elements']}")
    if v["tie_tolerance"] < 0:
        raise BadInputError(f"{where}: tie_tolerance must be >= 0, got {v['tie_tolerance']}")
    for section in ("by_type", "by_name"):
        for pattern, over in (v[section] or {}).items():
            _check_override(section, pattern, over, where)


def _type_names(types: tuple) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list",
             dict: "an object", type(None): "null"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


def _check_type(source: str, key: str, value, types: tuple) -> None:
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise BadInputError(f"{source}: {key!r} must be {_type_names(types)}, got {json.dumps(_plain(value))}")
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise BadInputError(f"{source}: {key!r} must be a list of strings (globs)")
    if key in ("by_type", "by_name"):
        for pattern, over in value.items():
            _check_override(key, pattern, over, source)


def _check_override(section: str, pattern: str, over, source: str = "config") -> None:
    where = f"{source}: {section}[{pattern!r}]"
    if not isinstance(over, dict):
        raise BadInputError(f"{where} must be an object of overrides")
    for key, value in over.items():
        if key not in _OVERRIDE_KEYS:
            raise BadInputError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(_OVERRIDE_KEYS))}")
        _check_type(where, key, value, _OVERRIDE_KEYS[key])
    _check_k_settings(over.get("bits"), over.get("tolerance"), over.get("granularity", "tensor"),
                      over.get("group_size", 1), where)


def _check_k_settings(bits, tolerance, granularity, group_size, where: str) -> None:
    if bits is not None and not (isinstance(bits, int) and 1 <= bits <= 8):
        raise BadInputError(f"{where}: bits must be between 1 and 8, got {bits}")
    if tolerance is not None and (not math.isfinite(tolerance) or tolerance < 0):
        raise BadInputError(f"{where}: tolerance must be a finite number >= 0, got {tolerance}")
    if granularity not in GRANULARITIES:
        raise BadInputError(f"{where}: granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if group_size is not None and group_size < 1:
        raise BadInputError(f"{where}: group_size must be >= 1, got {group_size}")


# --- the plan -------------------------------------------------------------------------------------

@dataclass
class TensorPlan:
    """One parameter: `action` is "cluster", "alias" or "keep"; `reason` says why.

    For "cluster": `centers` is [groups][k] (the initial shared values), `labels` (optional) the
    initial assignment with the tensor's shape, `max_error`/`rel_error` the clustering error.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    module_type: str | None
    action: str
    reason: str
    granularity: str | None = None
    group_size: int | None = None
    k: int | None = None
    centers: list[list[float]] | None = None
    labels: torch.Tensor | None = None
    max_error: float | None = None
    rel_error: float | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits(self) -> int | None:
        return None if self.k is None else bits_for(self.k)

    def centers_tensor(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The shared values as a [groups, k] tensor."""
        return torch.tensor(self.centers, dtype=dtype)

    def to_dict(self, with_labels: bool = True) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "module_type": self.module_type,
             "action": self.action, "reason": self.reason}
        if self.action == "cluster":
            d.update(granularity=self.granularity, group_size=self.group_size, k=self.k, bits=self.bits,
                     max_error=self.max_error, rel_error=self.rel_error, centers=self.centers)
            if with_labels and self.labels is not None:
                d["labels"] = _pack_labels(self.labels, self.bits)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TensorPlan:
        _require(d, ("name", "shape", "dtype", "action", "reason"), "tensor")
        t = cls(d["name"], tuple(int(s) for s in d["shape"]), d["dtype"], d.get("module_type"), d["action"],
                d["reason"])
        if t.action not in ("cluster", "alias", "keep"):
            raise BadInputError(f"plan: `{t.name}` has unknown action {t.action!r}; use cluster, alias or keep")
        if t.action == "cluster":
            _require(d, ("granularity", "k", "centers"), f"tensor `{t.name}`")
            t.granularity, t.group_size, t.k = d["granularity"], d.get("group_size"), int(d["k"])
            t.centers = [[float(c) for c in row] for row in d["centers"]]
            t.max_error, t.rel_error = d.get("max_error"), d.get("rel_error")
            if "labels" in d:
                t.labels = _unpack_labels(d["labels"], t.name)
            _check_centers(t)
        return t


@dataclass
class PlannedTie:
    """`name` becomes `target` (read through `.t()` when `transpose`); `kind` as found by the audit."""

    name: str
    target: str
    kind: str
    transpose: bool = False
    rel_error: float = 0.0

    def to_dict(self) -> dict:
        return {"name": self.name, "target": self.target, "kind": self.kind, "transpose": self.transpose,
                "rel_error": self.rel_error}

    @classmethod
    def from_dict(cls, d: dict) -> PlannedTie:
        _require(d, ("name", "target", "kind"), "tie")
        return cls(d["name"], d["target"], d["kind"], bool(d.get("transpose", False)),
                   float(d.get("rel_error", 0.0)))


@dataclass
class TiePlan:
    """What `merge_` and `SoftTie` will do, tensor by tensor. Saved and loaded as JSON."""

    tensors: list[TensorPlan]
    ties: list[PlannedTie] = field(default_factory=list)
    config: TieConfig = field(default_factory=TieConfig)
    module_types: str = "modules"  # where the module types came from: modules | graph | fallback
    version: int = PLAN_VERSION

    def tensor(self, name: str) -> TensorPlan:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def clustered(self) -> list[TensorPlan]:
        """The tensors that get a codebook, in model order."""
        return [t for t in self.tensors if t.action == "cluster"]

    def to_dict(self, with_labels: bool = True) -> dict:
        return {"version": self.version, "module_types": self.module_types, "config": self.config.to_dict(),
                "tensors": [t.to_dict(with_labels) for t in self.tensors],
                "ties": [t.to_dict() for t in self.ties]}

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "plan") -> TiePlan:
        if not isinstance(d, dict):
            raise BadInputError(f"{source}: expected a JSON object")
        if d.get("version") != PLAN_VERSION:
            raise BadInputError(f"{source}: plan version {d.get('version')!r} is not supported "
                                f"(this is {PLAN_VERSION}); re-run `compress tie`")
        unknown = set(d) - {"version", "module_types", "config", "tensors", "ties"}
        if unknown:
            raise BadInputError(f"{source}: unknown key {min(unknown)!r}")
        return cls([TensorPlan.from_dict(t) for t in d.get("tensors", [])],
                   [PlannedTie.from_dict(t) for t in d.get("ties", [])],
                   TieConfig.from_dict(d.get("config", {}), source=f"{source}: config"),
                   d.get("module_types", "modules"))

    def to_json(self, with_labels: bool = True) -> str:
        return json_text(self.to_dict(with_labels))

    def save(self, path: str | Path, *, with_labels: bool = True, force: bool = True) -> Path:
        """Write the plan as readable JSON (atomically). `with_labels=False` leaves the assignments out."""
        return write_text_atomic(path, self.to_json(with_labels), force=force)

    @classmethod
    def load(cls, path: str | Path) -> TiePlan:
        return cls.from_dict(_read_json(path), source=str(path))


def _require(d: dict, keys: Iterable[str], what: str) -> None:
    for key in keys:
        if key not in d:
            raise BadInputError(f"plan: {what} is missing {key!r}")


def _check_centers(t: TensorPlan) -> None:
    groups = groups_for(t.shape, t.granularity, t.group_size)
    if len(t.centers) != groups or any(len(row) != t.k for row in t.centers):
        raise BadInputError(f"plan: `{t.name}` needs centers of shape [{groups}][{t.k}] for granularity "
                            f"{t.granularity!r}")
    if not 1 <= t.k <= MAX_K:
        raise BadInputError(f"plan: `{t.name}` has k={t.k}; k must be between 1 and {MAX_K}")


def _pack_labels(labels: torch.Tensor, bits: int) -> dict:
    """Labels as `bits`-bit fields, MSB first, base64: compact and still plain JSON."""
    flat = labels.reshape(-1).to(torch.uint8).numpy()
    planes = np.unpackbits(flat[:, None], axis=1)[:, 8 - bits:]
    return {"shape": list(labels.shape), "bits": bits, "base64": base64.b64encode(np.packbits(planes)).decode()}


def _unpack_labels(d: dict, name: str) -> torch.Tensor:
    try:
        shape, bits = [int(s) for s in d["shape"]], int(d["bits"])
        n = math.prod(shape)
        raw = np.frombuffer(base64.b64decode(d["base64"], validate=True), dtype=np.uint8)
        planes = np.unpackbits(raw)[: n * bits].reshape(n, bits)
    except (KeyError, TypeError, ValueError) as e:
        raise BadInputError(f"plan: labels of `{name}` are corrupt ({e}); delete the 'labels' entry") from e
    full = np.concatenate([np.zeros((n, 8 - bits), dtype=np.uint8), planes], axis=1)
    return torch.from_numpy(np.packbits(full, axis=1).reshape(shape).copy())


# --- JSON that a person can read --------------------------------------------------------------------

def json_text(obj, indent: int = 2) -> str:
    """Indented JSON whose lists of numbers stay on one line (a codebook row is one line)."""
    return _dump(obj, 0, indent) + "\n"


def _dump(obj, level: int, indent: int) -> str:
    pad, inner = " " * (level * indent), " " * ((level + 1) * indent)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {_dump(v, level + 1, indent)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj and not all(isinstance(v, (int, float, str, bool, type(None))) for v in obj):
        return "[\n" + ",\n".join(inner + _dump(v, level + 1, indent) for v in obj) + "\n" + pad + "]"
    return json.dumps(_plain(obj), allow_nan=False)


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _read_json(path: str | Path):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise BadInputError(f"{path}: no such file") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"{path}: not valid JSON ({e})") from e


# --- analysis -------------------------------------------------------------------------------------

def analyze(model: nn.Module, cfg: TieConfig | None = None, *, data=None,
            program: torch.export.ExportedProgram | None = None) -> TiePlan:
    """Decide, for every parameter of `model`, whether and how it is tied; cluster the tied ones.

    Args:
        model: the module (not changed).
        cfg: the `TieConfig` (default: 4 bits per tensor).
        data: `DataSplits` for importance weighting (`cfg.importance`); its calibration inputs are used.
        program: the `ExportedProgram` `model` came from, to recover module types from the graph.

    Returns:
        A `TiePlan` with every parameter's action and reason, the initial shared values and the
        tensor-level ties.

    >>> plan = analyze(nn.Sequential(nn.Linear(64, 32)), TieConfig(bits=2))
    >>> plan.tensor("0.weight").k, plan.tensor("0.bias").reason
    (4, 'bias')
    """
    cfg = cfg or TieConfig()
    params, shared = _unique_parameters(model)
    if not any(p.is_floating_point() for p in params.values()):
        raise BadInputError("the model has no floating-point parameters; there is nothing to tie")
    types, source = _module_types(model, program, params)
    decisions = {n: _decide(n, p, types.get(n), source, cfg) for n, p in params.items()}
    ties = _plan_ties(params, shared, decisions, cfg)
    aliased = {t.name for t in ties}
    if cfg.importance and data is None:
        raise BadInputError("importance weighting (--importance) needs calibration data (--data FILE)")
    todo = [n for n, d in decisions.items() if d[0] == "cluster" and n not in aliased]
    for n in todo:
        _check_finite(n, params[n])
    importance = _importance(model, data, set(todo)) if cfg.importance else {}
    tensors = []
    for n, p in params.items():
        action, reason, settings = decisions[n]
        if n in aliased:
            tie = next(t for t in ties if t.name == n)
            action, reason = "alias", (f"transposed copy of `{tie.target}`" if tie.transpose
                                       else f"{tie.kind} copy of `{tie.target}`")
        tp = TensorPlan(n, tuple(p.shape), str(p.dtype).removeprefix("torch."), _short(types.get(n)), action,
                        reason)
        if action == "cluster":
            _cluster_into(tp, p.detach(), settings, importance.get(n))
        tensors.append(tp)
    for alias, target in shared.items():
        p = params[target]
        tensors.append(TensorPlan(alias, tuple(p.shape), str(p.dtype).removeprefix("torch."), None, "alias",
                                  f"the same parameter object as `{target}`"))
    return TiePlan(tensors, ties, cfg, source)


def _short(module_type: str | None) -> str | None:
    return None if module_type is None else module_type.rpartition(".")[2]


def _unique_parameters(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parameters by first name, and every other name of a shared parameter -> its first name."""
    first: dict[int, str] = {}
    params: dict[str, torch.Tensor] = {}
    shared: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            shared[name] = first[id(p)]
        else:
            first[id(p)] = name
            params[name] = p
    return params, shared


def _module_types(model: nn.Module, program, params: dict) -> tuple[dict[str, str], str]:
    """Parameter name -> qualified module type name of its owner, and where the types came from."""
    if program is not None:
        types = _types_from_graph(program)
        return types, ("graph" if types else "fallback")
    owners = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for attr, _ in module.named_parameters(recurse=False):
            owners.setdefault(f"{path}.{attr}" if path else attr, type(module))
    # a bare nn.Module (an unflattened program's submodule, a checkpoint's folder) says nothing
    known = {n: registry.qualified_name(t) for n, t in owners.items() if n in params and t is not nn.Module}
    return known, ("modules" if known else "fallback")


def _types_from_graph(program: torch.export.ExportedProgram) -> dict[str, str]:
    """Recover each parameter's owning module type from `nn_module_stack` metadata of the nodes using it."""
    by_input = program.graph_signature.inputs_to_parameters
    types: dict[str, str] = {}
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for arg in node.all_input_nodes:
            fqn = by_input.get(arg.name)
            if fqn is None or fqn in types:
                continue
            owner = fqn.rpartition(".")[0]
            for path, module_type in stack.values():
                if path == owner:
                    types[fqn] = module_type if isinstance(module_type, str) else registry.qualified_name(
                        module_type)
    return types


def _decide(name: str, p: torch.Tensor, module_type: str | None, source: str,
            cfg: TieConfig) -> tuple[str, str, _Settings | None]:
    attr = name.rpartition(".")[2]
    if not p.is_floating_point():
        return "keep", f"{str(p.dtype).removeprefix('torch.')} dtype (not floating point)", None
    if p.numel() == 0:  # nothing to store, even when a glob in --include names it
        return "keep", "empty (0 elements)", None
    for pattern in cfg.exclude:
        if fnmatchcase(name, pattern):
            return "keep", f"excluded by {pattern!r}", None
    settings = cfg.resolved(name, _short(module_type))
    if not settings.enabled:
        return "keep", f"disabled by {settings.source}", None
    for pattern in cfg.include:
        if fnmatchcase(name, pattern):
            return "cluster", f"included by {pattern!r}", settings
    if module_type is not None and registry.is_norm(module_type):
        return "keep", "norm layer", None
    if attr.startswith("bias") or attr.endswith("bias"):
        return "keep", "bias", None
    if p.numel() < cfg.min_elements:
        return "keep", f"small (< {cfg.min_elements} elements)", None
    if module_type is not None and registry.is_registered(module_type):
        if registry.is_clusterable(module_type, attr):
            return "cluster", f"{_short(module_type)}.{attr}", settings
        return "keep", f"not a registered weight of {_short(module_type)}", None
    if p.ndim >= 2 and attr.endswith("weight"):
        why = "module type unknown" if module_type is None else f"{_short(module_type)} is not registered"
        return "cluster", f"{why}; fallback rule: >= 2 dims and named *weight", settings
    why = "module type unknown" if module_type is None else f"{_short(module_type)} is not registered"
    return "keep", f"{why}; not a >= 2-dim *weight", None


def _check_finite(name: str, p: torch.Tensor) -> None:
    bad = int((~torch.isfinite(p.detach())).sum())
    if bad:
        raise BadInputError(f"`{name}` has {bad} NaN/Inf values; clean the checkpoint or pass --exclude '{name}'")


def _plan_ties(params: dict, shared: dict[str, str], decisions: dict, cfg: TieConfig) -> list[PlannedTie]:
    ties = [PlannedTie(alias, target, "shared") for alias, target in shared.items()]
    if not cfg.tie_tensors:
        return ties
    candidates = {n: p.detach() for n, p in params.items() if decisions[n][0] == "cluster"}
    if len(candidates) < 2:
        return ties
    from .audit import find_tensor_ties

    taken: set[str] = set()
    for tie in find_tensor_ties(candidates, cfg.tie_tolerance):
        a, b = tie.a, tie.b
        if tie.kind == "shared" or b in taken or a in taken or a == b:
            continue
        if tie.kind == "near" and tie.rel_error > cfg.tie_tolerance:
            continue
        ties.append(PlannedTie(b, a, tie.kind, tie.kind == "transposed", float(tie.rel_error)))
        taken.add(b)
    return ties


# --- clustering -----------------------------------------------------------------------------------

def _cluster_into(tp: TensorPlan, w: torch.Tensor, s: _Settings, importance: torch.Tensor | None) -> None:
    """Fill the plan entry with granularity, K, initial centres, labels and the clustering error."""
    if s.granularity == "group" and s.group_size is None:
        raise BadInputError(f"`{tp.name}`: granularity 'group' needs a group size (--group-size N)")
    groups = groups_for(tuple(w.shape), s.granularity, s.group_size)
    values = w.double().cpu().numpy().reshape(max(w.shape[0], 1) if w.ndim else 1, -1)
    imp = None if importance is None else importance.double().cpu().numpy().reshape(values.shape)
    blocks = _row_blocks(values.shape[0], s.granularity, s.group_size, groups)
    if s.tolerance is not None:
        results = [fewest_centers(values[b], s.tolerance) for b in blocks]
        k = max(len(r.centers) for r in results)
        if k > MAX_K:
            raise BadInputError(f"`{tp.name}` needs {k} shared values to stay within tolerance {s.tolerance}, "
                                f"more than {MAX_K} (8 bits); raise --tolerance or use --bits")
    else:
        k = 2 ** s.bits
        if k > w.numel():
            raise BadInputError(f"`{tp.name}` has {w.numel()} elements, fewer than K={k} ({s.bits} bits); "
                                f"use fewer bits or pass --exclude '{tp.name}'")
        results = [kmeans_1d(values[b], k, None if imp is None else imp[b]) for b in blocks]
    centers = np.zeros((groups, k))
    labels = np.zeros(values.shape, dtype=np.uint8)
    for g, (b, r) in enumerate(zip(blocks, results)):
        centers[g, : len(r.centers)] = r.centers
        centers[g, len(r.centers):] = r.centers[-1]
        labels[b] = r.labels.reshape(values[b].shape)
    merged = np.take_along_axis(centers[_group_of_rows(values.shape[0], blocks)], labels.astype(np.int64), 1)
    err = merged - values
    norm = float(np.sqrt(np.einsum("ij,ij->", values, values)))  # einsum: no BLAS call, no temporary
    tp.granularity, tp.group_size, tp.k = s.granularity, (s.group_size if s.granularity == "group" else None), k
    tp.centers = centers.tolist()
    tp.labels = torch.from_numpy(labels.reshape(tuple(w.shape)))
    tp.max_error = float(np.abs(err).max())
    tp.rel_error = float(np.sqrt(np.einsum("ij,ij->", err, err)) / norm) if norm > 0 else 0.0


def _row_blocks(rows: int, granularity: str, group_size: int | None, groups: int) -> list[slice]:
    if granularity == "tensor":
        return [slice(0, rows)]
    size = 1 if granularity == "channel" else int(group_size)
    return [slice(g * size, min((g + 1) * size, rows)) for g in range(groups)]


def _group_of_rows(rows: int, blocks: list[slice]) -> np.ndarray:
    out = np.zeros(rows, dtype=np.int64)
    for g, b in enumerate(blocks):
        out[b] = g
    return out


def _importance(model: nn.Module, data, names: set[str], batch_size: int = 256, seed: int = 0
                ) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the loss per weight over the calibration inputs.

    With integer targets the loss is cross-entropy (or reconstruction MSE when the output has the
    input's shape); without targets it is `r . f(x)` with random signs r, whose squared gradient
    estimates the diagonal of J^T J, the curvature of output distillation (Hutchinson).
    """
    from .finetune import train_mode

    params = {n: p for n, p in model.named_parameters() if n in names}
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    try:
        with train_mode(model, False):
            return _mean_squared_grads(model, params, data, batch_size, torch.Generator().manual_seed(seed))
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])


def _mean_squared_grads(model: nn.Module, params: dict, data, batch_size: int, gen: torch.Generator
                        ) -> dict[str, torch.Tensor]:
    from .finetune import loss_mode

    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    inputs, targets = data.calib_inputs, data.calib_targets
    batches = 0
    for start in range(0, len(inputs), batch_size):
        x = inputs[start:start + batch_size]
        out = model(x)
        kind = loss_mode(out, x, targets)
        if kind == "cross-entropy":
            loss = nn.functional.cross_entropy(out, targets[start:start + batch_size])
        elif kind == "reconstruction":
            loss = nn.functional.mse_loss(out, x)
        else:
            signs = torch.randint(0, 2, out.shape, generator=gen).to(out.dtype) * 2 - 1
            loss = (signs * out).sum() / len(x)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:
                sums[n] += g.double() ** 2
        batches += 1
    return {n: s / max(batches, 1) for n, s in sums.items()}
