"""A merged model's state_dict: recover its `Codebooks`, and the values it computes with.

Recovery is for models whose parametrization objects are gone.

A merged model saved with `torch.export.save` and loaded back (`program.module()`) keeps the storage
names `<mod>.parametrizations.<attr>.original` (the codebook [groups, K], or [groups, K, dim] for a
vector codebook), `<mod>.parametrizations.<attr>.0.index` (indices with the weight's shape, the last
axis divided by dim) and, with outliers, `.0.outlier_index` and `.0.outlier_value`, but not the
`CodebookParametrization` that says how to decode them. The granularity is inferred from the
codebook's rows: 1 -> "tensor", shape[0] -> "channel", otherwise "group" with
`group_size = ceil(shape[0] / groups)` (the convention `merge_` uses; checked for consistency).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import nn

from .codebook import Alias, Codebooks, TensorCodebook
from .errors import BadInputError

_ORIGINAL = re.compile(r"^(?:(?P<mod>.+)\.)?parametrizations\.(?P<attr>[^.]+)\.original$")


def storage_names(name: str) -> tuple[str, str, str, str]:
    """State-dict keys of the codebook, the index and the outliers (index, value) of merged parameter `name`."""
    mod, _, attr = name.rpartition(".")
    prefix = f"{mod}.parametrizations.{attr}" if mod else f"parametrizations.{attr}"
    return f"{prefix}.original", f"{prefix}.0.index", f"{prefix}.0.outlier_index", f"{prefix}.0.outlier_value"


def codebooks_from_state_dict(state: Mapping[str, torch.Tensor] | nn.Module | torch.export.ExportedProgram
                              ) -> Codebooks:
    """Every merged tensor of a state_dict (or module), with aliases for tensors that share storage.

    Which aliases are transposed comes from a `Transpose` step in the parametrization: the live
    module's, or for a loaded `.pt2` the `nn_module_stack` its graph records; a bare state_dict
    cannot say, so its aliases are recorded untransposed.

    Example::

        cbs = codebooks_from_state_dict(compress.io.load("compressed/digits_mlp.tied.pt2").module)
    """
    module = state if isinstance(state, nn.Module) else None
    graph = getattr(state, "graph", None)
    constants = {}
    if isinstance(state, torch.export.ExportedProgram):
        state, constants = state.state_dict, state.constants
    elif module is not None:
        state = module.state_dict(keep_vars=True)
    cbs = Codebooks()
    for key, codebook in state.items():
        match = _ORIGINAL.match(key)
        if not match:
            continue
        name = f"{match['mod']}.{match['attr']}" if match["mod"] else match["attr"]
        _, index_key, oi_key, ov_key = storage_names(name)
        if index_key not in state:
            continue  # some other parametrization (weight norm, ...): not a codebook
        outliers = (state[oi_key].detach(), state[ov_key].detach()) if oi_key in state and ov_key in state else None
        group_size = _group_size(module, constants, index_key.removesuffix(".index"))
        cbs.tensors[name] = _tensor_codebook(name, codebook.detach(), state[index_key].detach(), outliers,
                                             group_size)
    _add_shared_storage_aliases(state, cbs)
    if module is not None:
        _mark_transposed(module, cbs)
    if isinstance(graph, torch.fx.Graph):
        _mark_transposed_in_graph(graph, cbs)
    return cbs


_STEP = re.compile(r"^(?:(?P<mod>.+)\.)?parametrizations\.(?P<attr>[^.]+)\.\d+$")


def _mark_transposed_in_graph(graph: torch.fx.Graph, cbs: Codebooks) -> None:
    # torch.export records, per node, the modules it ran in: a `...parametrizations.<attr>.<i>` of a
    # class named Transpose means that alias reads its target transposed.
    for node in graph.nodes:
        for fqn, type_name in (node.meta.get("nn_module_stack") or {}).values():
            match = _STEP.match(str(fqn))
            if match and str(type_name).rsplit(".", 1)[-1] == "Transpose":
                name = f"{match['mod']}.{match['attr']}" if match["mod"] else match["attr"]
                if name in cbs.aliases:
                    cbs.aliases[name].transpose = True


def _mark_transposed(module: nn.Module, cbs: Codebooks) -> None:
    for prefix, m in module.named_modules():
        chains = getattr(m, "parametrizations", None)
        if not isinstance(chains, nn.ModuleDict):  # a loaded .pt2 keeps the names, not the objects
            continue
        for attr, steps in chains.items():
            name = f"{prefix}.{attr}" if prefix else attr
            if name in cbs.aliases and any(type(s).__name__ == "Transpose" for s in steps):
                cbs.aliases[name].transpose = True


def _group_size(module: nn.Module | None, constants: Mapping, step: str) -> int | None:
    """The group size the parametrization `step` (`...parametrizations.<attr>.0`) was built with, where the
    model says it: the live module's, or a program's row offsets (a group's rows share offset g * K).

    Several group sizes can give the same number of groups (1,000 rows in 16 groups: 63 to 66), so the
    codebook's shape alone cannot tell.
    """
    if module is not None:
        try:
            return getattr(module.get_submodule(step), "group_size", None)
        except AttributeError:
            return None
    offset = constants.get(f"{step}.offset")
    if isinstance(offset, torch.Tensor) and offset.dim() and offset.shape[0] > 1:
        return int((offset.reshape(offset.shape[0], -1)[:, 0] == offset.reshape(-1)[0]).sum())
    return None


def _tensor_codebook(name: str, codebook: torch.Tensor, index: torch.Tensor,
                     outliers: tuple[torch.Tensor, torch.Tensor] | None = None,
                     group_size: int | None = None) -> TensorCodebook:
    if codebook.dim() not in (2, 3) or index.dtype.is_floating_point or (codebook.dim() == 3 and index.dim() == 0):
        raise BadInputError(
            f"`{name}`: expected a codebook [groups, K] (or [groups, K, dim]) and integer indices, found a "
            f"{codebook.dim()}-D codebook and {index.dtype} indices; is this a model merged by `compress tie`?"
        )
    dim = int(codebook.shape[2]) if codebook.dim() == 3 else 1
    shape = tuple(index.shape) if dim == 1 else (*index.shape[:-1], int(index.shape[-1]) * dim)
    groups, k = codebook.shape[:2]
    granularity, group_size = _granularity(name, shape, groups, group_size)
    if index.numel() and int(index.max()) >= k:
        raise BadInputError(f"`{name}`: index {int(index.max())} is out of range for a codebook of {k} values")
    oi, ov = outliers if outliers is not None else (None, None)
    if oi is not None and (oi.numel() != ov.numel() or (oi.numel() and not 0 <= int(oi.min()) <= int(oi.max())
                                                         < math.prod(shape))):
        raise BadInputError(f"`{name}`: its outliers do not fit a tensor of shape {list(shape)}")
    return TensorCodebook(name, shape, granularity, codebook.clone(), index.clone(), group_size, dim,
                          None if oi is None else oi.clone(), None if ov is None else ov.clone())


def _granularity(name: str, shape: tuple[int, ...], groups: int, known: int | None = None
                 ) -> tuple[str, int | None]:
    """The granularity of `groups` codebook rows for a tensor of `shape`; the group size `known` from the
    model, else the smallest that gives `groups` groups (what a bare state_dict allows)."""
    if groups == 1:
        return "tensor", None
    rows = shape[0] if shape else 1
    if groups == rows and not known:
        return "channel", None
    group_size = known or _likely_group_size(rows, groups)
    if math.ceil(rows / group_size) != groups:
        raise BadInputError(
            f"`{name}`: a codebook of {groups} rows does not fit {rows} output channels "
            f"(no group size gives {groups} groups); the file is not a merged model this version can read"
        )
    return "group", group_size


def _likely_group_size(rows: int, groups: int) -> int:
    """Of the group sizes that cut `rows` into `groups` groups, a power of two (what granularity "auto"
    and the usual --group-size values give) if one fits, else the smallest."""
    smallest = math.ceil(rows / groups)
    largest = (rows - 1) // (groups - 1) if groups > 1 else rows
    powers = [1 << p for p in range(max(rows, 1).bit_length() + 1) if smallest <= 1 << p <= largest]
    return powers[0] if powers else smallest


def _add_shared_storage_aliases(state: Mapping[str, torch.Tensor], cbs: Codebooks) -> None:
    # Names whose tensors share memory are one parameter: keep the first, alias the rest.
    seen: dict[tuple, str] = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.device.type == "meta":
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        first = seen.setdefault(ident, key)
        if first == key:
            continue
        name, target = _param_name(key), _param_name(first)
        if name != target and name not in cbs.aliases:
            cbs.aliases[name] = Alias(name, target)
            cbs.tensors.pop(name, None)


def _param_name(key: str) -> str:
    match = _ORIGINAL.match(key)
    if match:
        return f"{match['mod']}.{match['attr']}" if match["mod"] else match["attr"]
    if key.endswith((".0.index", ".0.outlier_index", ".0.outlier_value")) and ".parametrizations." in key:
        mod, _, rest = key.partition(".parametrizations.")
        return f"{mod}.{rest.split('.')[0]}"
    return key


def effective_tensors(model_or_state) -> dict[str, torch.Tensor]:
    """Parameter name -> the value the model computes with (codebook storage decoded)."""
    if isinstance(model_or_state, torch.export.ExportedProgram):
        model_or_state = model_or_state.state_dict
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    if not isinstance(state, Mapping):
        raise BadInputError(f"expected a model or a state_dict, got {type(model_or_state).__name__}")
    cbs = codebooks_from_state_dict(model_or_state if isinstance(model_or_state, nn.Module) else state)
    storage = {s for name in list(cbs.tensors) + list(cbs.aliases) for s in storage_names(name)}
    out = {n: t.detach() for n, t in state.items() if n not in storage and not n.endswith(".0.offset")}
    out.update({n: cb.decode() for n, cb in cbs.tensors.items()})
    for alias in cbs.aliases.values():
        if alias.target in out and alias.name not in out:
            out[alias.name] = out[alias.target].t() if alias.transpose else out[alias.target]
    return out
