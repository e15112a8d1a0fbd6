"""Plan the tying: for every parameter, whether and how it is clustered, or why it is left alone.

`analyze(model, TieConfig)` returns a `TiePlan`: a small versioned record a person can read and
edit as JSON. Each tensor gets an action, `cluster` (with granularity, K and the initial shared values),
`alias` (an equal or transposed copy of another tensor: it becomes that tensor) or `keep`, and a
reason ("Linear.weight", "bias", "norm layer", "small (< 1024 elements)", "excluded by 'fc1.*'").

Which parameters are clusterable comes from `compress.registry` (through `cluster.decide`). For a
`.pt2` program (whose `program.module()` has lost its module types) the types are recovered from the
graph's `nn_module_stack` metadata; where that fails the rule "at least 2 dims and named `*weight`" is
used, and the reason says so.

    >>> from torch import nn
    >>> plan = analyze(nn.Sequential(nn.Linear(64, 32)), TieConfig(bits=2))
    >>> plan.tensor("0.weight").k, plan.tensor("0.bias").reason
    (4, 'bias')
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .. import registry
from ..auditing import find_tensor_ties
from ..codebook import bits_for, index_shape
from ..errors import BadInputError, Option
from ..granularity import Granularity
from ..records import Record, codec
from .cluster import Decision, check_finite, cluster_tensor, decide, short_type
from .config import MAX_K, TieConfig

PLAN_VERSION = 1
ACTIONS = ("cluster", "alias", "keep")
_CLUSTER_KEYS = ("granularity", "group_size", "k", "max_error", "rel_error", "centers", "labels")


@dataclass
class TensorPlan(Record):
    """One parameter: `action` is "cluster", "alias" or "keep"; `reason` says why.

    For "cluster": `centers` is [groups][k] (the initial shared values; [groups][k][dim] for a
    vector codebook), `labels` (optional) the initial assignment with the tensor's shape,
    `max_error`/`rel_error` the clustering error. After `assign_`: `method` ("nearest" or
    "compensated"), `dim` and `outliers` (the count kept exactly) say how it was merged.
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
    max_error: float | None = None
    rel_error: float | None = None
    centers: list[list[float]] | list[list[list[float]]] | None = None
    labels: torch.Tensor | None = field(default=None, metadata=codec(lambda t: _pack_labels(t),
                                                                     lambda v, d: _unpack_labels(v, d)))
    method: str | None = None
    dim: int | None = None
    outliers: int | None = None

    _what = "plan tensor"
    _derived = ("bits",)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits(self) -> int | None:
        return None if self.k is None else bits_for(self.k)

    @property
    def grain(self) -> Granularity:
        return Granularity.of(self.granularity, self.group_size)

    def centers_tensor(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The shared values as a [groups, k] tensor."""
        return torch.tensor(self.centers, dtype=dtype)

    def to_dict(self, with_labels: bool = True) -> dict:
        d = super().to_dict()
        for key in ("method", "dim", "outliers"):  # set by assign_ only
            if d[key] is None:
                del d[key]
        if self.action != "cluster":
            return {k: v for k, v in d.items() if k not in _CLUSTER_KEYS and k != "bits"}
        if not with_labels or self.labels is None:
            d.pop("labels")
        return d

    @classmethod
    def _validate(cls, kw: dict, where: str) -> None:
        name = kw["name"]
        if kw["action"] not in ACTIONS:
            raise BadInputError(f"{where}: `{name}` has unknown action {kw['action']!r}; use cluster, alias or keep")
        if kw["action"] != "cluster":
            return
        for key in ("granularity", "k", "centers"):
            if kw.get(key) is None:
                raise BadInputError(f"{where}: tensor `{name}` is missing {key!r}")
        grain = Granularity.of(kw["granularity"], kw.get("group_size"))
        groups = grain.groups_for(tuple(kw["shape"]))
        k, dim = kw["k"], kw.get("dim") or 1
        ok = len(kw["centers"]) == groups and all(len(row) == k for row in kw["centers"])
        if ok:
            ok = all((not isinstance(c, list)) if dim == 1 else (isinstance(c, list) and len(c) == dim)
                     for row in kw["centers"] for c in row)
        if not ok:
            shape = f"[{groups}][{k}]" + (f"[{dim}]" if dim > 1 else "")
            raise BadInputError(f"{where}: `{name}` needs centers of shape {shape} for granularity "
                                f"{kw['granularity']!r}")
        if not 1 <= k <= MAX_K:
            raise BadInputError(f"{where}: `{name}` has k={k}; k must be between 1 and {MAX_K}")
        labels = kw.get("labels")
        if labels is not None and (tuple(labels.shape) != index_shape(tuple(kw["shape"]), dim)
                                   or (labels.numel() and int(labels.max()) >= k)):
            raise BadInputError(f"{where}: labels of `{name}` do not fit its shape {list(kw['shape'])} and k={k}; "
                                "delete the 'labels' entry")


@dataclass
class PlannedTie(Record):
    """`name` becomes `target` (read through `.t()` when `transpose`); `kind` as found by the audit."""

    name: str
    target: str
    kind: str
    transpose: bool = False
    rel_error: float = 0.0

    _what = "plan tie"


@dataclass
class TiePlan(Record):
    """What `merge_` and `SoftTie` will do, tensor by tensor. Saved and loaded as JSON."""

    tensors: list[TensorPlan]
    ties: list[PlannedTie] = field(default_factory=list)
    config: TieConfig = field(default_factory=TieConfig)
    module_types: str = "modules"  # where the module types came from: modules | graph | fallback
    version: int = PLAN_VERSION

    _what = "plan"
    _version_required = True
    _version_hint = "re-run `compress tie`"

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

    def to_json(self, with_labels: bool = True) -> str:
        from ..records import json_text

        return json_text(self.to_dict(with_labels))

    def save(self, path, *, with_labels: bool = True, force: bool = True):
        """Write the plan as readable JSON (atomically). `with_labels=False` leaves the assignments out."""
        from ..atomic import write_text_atomic

        return write_text_atomic(path, self.to_json(with_labels), force=force)


def _pack_labels(labels: torch.Tensor) -> dict:
    """Labels as 8-bit-or-narrower fields, MSB first, base64: compact and still plain JSON."""
    bits = bits_for(int(labels.max()) + 1) if labels.numel() else 1
    flat = labels.reshape(-1).to(torch.uint8).numpy()
    planes = np.unpackbits(flat[:, None], axis=1)[:, 8 - bits:]
    return {"shape": list(labels.shape), "bits": bits, "base64": base64.b64encode(np.packbits(planes)).decode()}


def _unpack_labels(d, name) -> torch.Tensor:
    name = name.get("name") if isinstance(name, dict) else name
    try:
        shape, bits = [int(s) for s in d["shape"]], int(d["bits"])
        if not 1 <= bits <= 8:
            raise ValueError(f"bits {bits} is not 1..8")
        n = math.prod(shape)
        raw = np.frombuffer(base64.b64decode(d["base64"], validate=True), dtype=np.uint8)
        if raw.size * 8 < n * bits:
            raise ValueError(f"{raw.size} bytes cannot hold {n} labels of {bits} bits")
        planes = np.unpackbits(raw)[: n * bits].reshape(n, bits)
    except (KeyError, TypeError, ValueError) as e:
        raise BadInputError(f"plan: labels of `{name}` are corrupt ({e}); delete the 'labels' entry") from e
    full = np.concatenate([np.zeros((n, 8 - bits), dtype=np.uint8), planes], axis=1)
    return torch.from_numpy(np.packbits(full, axis=1).reshape(shape).copy())


# --- analysis -------------------------------------------------------------------------------------

def analyze(model: nn.Module, cfg: TieConfig | None = None, *, importance: dict[str, torch.Tensor] | None = None,
            program: torch.export.ExportedProgram | None = None) -> TiePlan:
    """Decide, for every parameter of `model`, whether and how it is tied; cluster the tied ones.

    Args:
        model: the module (not changed).
        cfg: the `TieConfig` (default: 4 bits per tensor).
        importance: name -> per-weight importance (`estimate_importance`), needed when
            `cfg.importance` is set: the clustering minimizes the importance-weighted error.
        program: the `ExportedProgram` `model` came from, to recover module types from the graph.

    Returns:
        A `TiePlan` with every parameter's action and reason, the initial shared values and the
        tensor-level ties.
    """
    cfg = cfg or TieConfig()
    params, shared = _unique_parameters(model)
    if not any(p.is_floating_point() for p in params.values()):
        raise BadInputError("the model has no floating-point parameters; there is nothing to tie")
    types, source = _module_types(model, program, params)
    decisions = {n: decide(n, p, types.get(n), cfg) for n, p in params.items()}
    ties = _plan_ties(params, shared, decisions, cfg)
    aliased = {t.name: t for t in ties}
    if cfg.importance and importance is None:
        raise BadInputError("importance weighting (", Option("importance"), ") needs the importance of each weight: "
                            "pass importance=estimate_importance(model, data)")
    tensors = []
    for n, p in params.items():
        d = decisions[n]
        if d.action == "cluster" and n not in aliased:
            check_finite(n, p)
    for n, p in params.items():
        tensors.append(_tensor_plan(n, p, decisions[n], aliased.get(n), short_type(types.get(n)),
                                    (importance or {}).get(n) if cfg.importance else None))
    for alias, target in shared.items():
        p = params[target]
        tensors.append(TensorPlan(alias, tuple(p.shape), str(p.dtype).removeprefix("torch."), None, "alias",
                                  f"the same parameter object as `{target}`"))
    return TiePlan(tensors, ties, cfg, source)


def _tensor_plan(name: str, p: torch.Tensor, d: Decision, tie: PlannedTie | None, module_type: str | None,
                 importance: torch.Tensor | None) -> TensorPlan:
    action, reason = d.action, d.reason
    if tie is not None:
        action, reason = "alias", (f"transposed copy of `{tie.target}`" if tie.transpose
                                   else f"{tie.kind} copy of `{tie.target}`")
    tp = TensorPlan(name, tuple(p.shape), str(p.dtype).removeprefix("torch."), module_type, action, reason)
    if action == "cluster":
        c = cluster_tensor(p.detach(), d.settings, importance=importance, name=name)
        tp.granularity, tp.group_size, tp.k = c.grain.kind, c.grain.group_size, c.k
        tp.centers = c.centers.tolist()
        tp.labels = torch.from_numpy(c.labels)
        tp.max_error, tp.rel_error = c.max_error, c.rel_error
    return tp


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


def _plan_ties(params: dict, shared: dict[str, str], decisions: dict, cfg: TieConfig) -> list[PlannedTie]:
    ties = [PlannedTie(alias, target, "shared") for alias, target in shared.items()]
    if not cfg.tie_tensors:
        return ties
    candidates = {n: p.detach() for n, p in params.items() if decisions[n].action == "cluster"}
    if len(candidates) < 2:
        return ties
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
