"""safetensors export: codebooks and densely packed indices as tensors, the recipe in the metadata.

File layout (any safetensors reader can open it; `compress.io.load_codebook_safetensors` rebuilds
the dense tensors):

- `<name>.codebook`: the codebook [groups, K] in the weight's dtype ([groups, K, dim] for a vector
  codebook, whose every index covers `dim` consecutive values of the last axis);
- `<name>.indices`: uint8 [ceil(n * bits / 8)], the n indices packed densely, "lsb0" order (element
  `i` takes stream bits `i*bits ..`, least significant bit first; stream bit `j` is bit `j % 8` of
  byte `j // 8`; see `_pack.py`);
- with outliers, `<name>.outlier_index` (int32 flat positions in the weight) and
  `<name>.outlier_value` (the weight's dtype), written over the decoded weight;
- every dense tensor under its own name, each stored once;
- `__metadata__` (JSON strings): `compress.format` = "codebook", `compress.format_version` ("1", or
  "2" when a recipe has `dim` or outliers), `compress.tensors` = {name: {codebook, indices, bits, k,
  packing, shape, dtype, granularity, group_size[, dim][, outliers, outlier_index, outlier_value]}},
  `compress.aliases` = {name: {target, transpose}} for tensors stored as another.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_outputs, write_error
from ..codebook import FILE_FORMAT, FILE_FORMAT_VERSION, Codebooks, TensorCodebook
from ..errors import BadInputError
from ..packing import PACKING, pack_bits, packed_size
from ..state import storage_names
from .report import ExportReport, TensorEntry


def export_safetensors(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], codebooks: Codebooks,
                       path: str | Path, *, force: bool = False) -> ExportReport:
    """Write a merged model as codebooks + packed indices + dense tensors, with the recipe in metadata.

    Args:
        model_or_state_dict: the merged model (or its state_dict); dense tensors come from it.
        codebooks: the merged tensors and aliases (`merge_`'s return, or `codebooks_from_state_dict`).
        path: the `.safetensors` file to write.
        force: overwrite an existing file.

    Example::

        report = export_safetensors(model, codebooks, "out/model.safetensors")
        tensors = compress.io.load_codebook_safetensors("out/model.safetensors")   # dense, the merged values
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    state = _state_of(model_or_state_dict)
    tensors: dict[str, torch.Tensor] = {}
    entries: list[TensorEntry] = []
    meta_tensors = {}
    for name, cb in codebooks.tensors.items():
        meta_tensors[name], entry = _put_codebook(cb, tensors)
        entries.append(entry)
    aliases, notes = _aliases(state, codebooks)
    skip = {s for name in codebooks.tensors for s in storage_names(name)} | set(codebooks.tensors)
    skip |= {s for name in aliases for s in storage_names(name)} | set(aliases)
    entries += _put_dense(state, skip, tensors, notes)
    entries += [TensorEntry(a, [], "alias", 0, 0, note=_alias_note(d)) for a, d in aliases.items()]
    version = 2 if any(cb.dim > 1 or cb.outlier_count for cb in codebooks.tensors.values()) else FILE_FORMAT_VERSION
    metadata = {"compress.format": FILE_FORMAT, "compress.format_version": str(version),
                "compress.tensors": json.dumps(meta_tensors, sort_keys=True),
                "compress.aliases": json.dumps(aliases, sort_keys=True)}
    _check_names(tensors, path)
    with atomic_outputs([path], force=force) as (tmp,):
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:  # the Rust writer's I/O errors (no space, file too large) come as this
            raise write_error(path.parent, e) from e
    size = path.stat().st_size
    data = sum(e.actual_bytes for e in entries)
    merged_dense = sum(cb.numel * cb.codebook.element_size() for cb in codebooks.tensors.values())
    dense = sum(e.actual_bytes for e in entries if e.storage == "dense")
    return ExportReport("safetensors", str(path), size, size - data, size - data + dense + merged_dense,
                        entries, files=[str(path)], notes=notes)


# --- writing --------------------------------------------------------------------------------------

def _state_of(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.export.ExportedProgram):
        return dict(obj.state_dict)
    if isinstance(obj, nn.Module):
        return obj.state_dict(keep_vars=False)
    if isinstance(obj, Mapping):
        return dict(obj)
    raise BadInputError(f"expected a model or a state_dict, got {type(obj).__name__}")


def _put_codebook(cb: TensorCodebook, tensors: dict) -> tuple[dict, TensorEntry]:
    cb_name, idx_name = f"{cb.name}.codebook", f"{cb.name}.indices"
    tensors[cb_name] = cb.codebook.detach().contiguous().clone()
    packed = pack_bits(cb.indices.detach().reshape(-1).to(torch.int64).numpy(), cb.bits)
    tensors[idx_name] = torch.from_numpy(packed)
    recipe = {"codebook": cb_name, "indices": idx_name, "bits": cb.bits, "k": cb.k, "packing": PACKING,
              "shape": list(cb.shape), "dtype": str(cb.dtype).removeprefix("torch."),
              "granularity": cb.granularity, "group_size": cb.group_size}
    side = 0
    if cb.dim > 1:
        recipe["dim"] = cb.dim
    if cb.outlier_count:
        recipe |= {"outliers": cb.outlier_count, "outlier_index": f"{cb.name}.outlier_index",
                   "outlier_value": f"{cb.name}.outlier_value"}
        tensors[recipe["outlier_index"]] = cb.outlier_index.detach().to(torch.int32).contiguous().clone()
        tensors[recipe["outlier_value"]] = cb.outlier_value.detach().to(cb.dtype).contiguous().clone()
        side = sum(tensors[recipe[k]].numel() * tensors[recipe[k]].element_size()
                   for k in ("outlier_index", "outlier_value"))
    size = packed.nbytes + tensors[cb_name].numel() * tensors[cb_name].element_size() + side
    bound = packed_size(cb.index_count, cb.bits) + tensors[cb_name].numel() * tensors[cb_name].element_size() + side
    entry = TensorEntry(cb.name, list(cb.shape), "codebook", size, bound, index_type=f"U8 {PACKING} {cb.bits}-bit",
                        bits=cb.bits, k=cb.k, granularity=cb.granularity,
                        stored_as=[cb_name, idx_name] + [recipe[k] for k in ("outlier_index", "outlier_value")
                                                         if k in recipe])
    return recipe, entry


def _aliases(state: dict[str, torch.Tensor], codebooks: Codebooks) -> tuple[dict[str, dict], list[str]]:
    """Declared aliases whose values really are their target's, plus names sharing storage in `state`."""
    dense = _dense_values(state, codebooks)
    aliases, notes = {}, []
    for alias in codebooks.aliases.values():
        mine = state.get(alias.name)
        target = dense.get(alias.target)
        if target is None:
            raise BadInputError(f"alias `{alias.name}` points to `{alias.target}`, which the model does not have")
        expect = target.t() if alias.transpose else target
        if mine is not None and not (mine.shape == expect.shape and torch.equal(mine, expect)):
            notes.append(f"`{alias.name}` is declared an alias of `{alias.target}` but holds other values: "
                         f"stored dense")
            continue
        aliases[alias.name] = {"target": alias.target, "transpose": alias.transpose}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        if name in aliases or name in codebooks.tensors or ".parametrizations." in f".{name}":
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        first = seen.setdefault(key, name)
        if first != name and t.numel():
            aliases[name] = {"target": first, "transpose": False}
    return aliases, notes


def _dense_values(state: dict[str, torch.Tensor], codebooks: Codebooks) -> dict[str, torch.Tensor]:
    values = {n: t for n, t in state.items()}
    values.update({n: cb.decode() for n, cb in codebooks.tensors.items()})
    return values


def _put_dense(state, skip: set[str], tensors: dict, notes: list[str]) -> list[TensorEntry]:
    entries, owners = [], {}
    for name, t in state.items():
        if name in skip or _is_storage_key(name):
            continue
        t = t.detach()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        t = t.contiguous().clone() if ptr in owners or not t.is_contiguous() else t
        if ptr is not None:
            owners.setdefault(ptr, name)
        tensors[name] = t
        size = t.numel() * t.element_size()
        note = next((n for n in notes if n.startswith(f"`{name}`")), "")
        entries.append(TensorEntry(name, list(t.shape), "dense", size, size, note=note))
    return entries


def _is_storage_key(name: str) -> bool:
    return ".parametrizations." in f".{name}" and name.endswith((".original", ".0.index", ".0.outlier_index",
                                                                 ".0.outlier_value"))


def _alias_note(d: dict) -> str:
    return f"{'transposed ' if d['transpose'] else ''}alias of `{d['target']}`"


def _check_names(tensors: dict, path: Path) -> None:
    clash = [n for n in tensors if n.endswith((".codebook", ".indices", ".outlier_index", ".outlier_value"))
             and n.rsplit(".", 1)[0] in tensors]
    if clash:
        raise BadInputError(f"{path}: tensor names {clash} clash with codebook storage names; rename them")
