"""Reading the toolkit's own codebook safetensors files back as dense tensors.

The format (written by `compress.export.safetensors` and, sharded, by `compress.export.sharded`):
`<name>.codebook` [groups, K] (or [groups, K, dim] for a vector codebook) and `<name>.indices` (uint8,
packed "lsb0", see `compress.packing`) per merged tensor, with outliers `<name>.outlier_index` (int32)
and `<name>.outlier_value`, every dense tensor under its own name, and in `__metadata__` the JSON strings
`compress.format` = "codebook", `compress.format_version`, `compress.tensors` = {name: `Recipe`},
`compress.aliases` = {name: {target, transpose}}. A sharded checkpoint adds an index whose
`metadata` maps every logical tensor to its shard (`compress.tensors`).

The header is validated by `io.safetensors` and every recipe by the `Recipe` record before any
tensor is built, and every recipe must agree with the stored tensors' dtypes and sizes.

    >>> load_codebook_safetensors("samples/digits_mlp.pt2")
    Traceback (most recent call last):
    ...
    compress.errors.BadInputError: samples/digits_mlp.pt2: not a safetensors file (the header length is not followed by a JSON object)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..codebook import (
    FILE_FORMAT,
    FILE_FORMAT_VERSION,
    FILE_FORMAT_VERSIONS,
    Recipe,
    index_shape,
)
from ..errors import BadInputError
from ..packing import PACKING, packed_size, unpack_bits
from . import safetensors as st_header
from ._errors import library_call


def load_codebook_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a codebook safetensors file, dense and exactly the merged values.

    Aliases are re-tied: an alias is the same tensor object as its target (or a transposed view).

    Example::

        tensors = load_codebook_safetensors("compressed/digits_mlp.safetensors")
        model.load_state_dict(tensors, strict=False)
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(16)
    if not st_header.is_safetensors(head, path.stat().st_size):
        raise BadInputError(f"{path}: not a safetensors file (the header length is not followed by a JSON "
                            "object)")
    header = st_header.read_header(path)
    recipes, aliases = read_metadata(header.metadata, path)
    _check_recipes(recipes, header, path)
    with library_call(path, "opening the safetensors file"):
        handle = safe_open(str(path), framework="pt")
    with handle as f:
        used = {t for r in recipes.values() for t in (r.codebook, r.indices, r.outlier_index, r.outlier_value) if t}
        out = {name: f.get_tensor(name) for name in header.tensors if name not in used}
        for name, recipe in recipes.items():
            outliers = (f.get_tensor(recipe.outlier_index), f.get_tensor(recipe.outlier_value)) if recipe.outliers \
                else None
            out[name] = decode_recipe(name, recipe, f.get_tensor(recipe.codebook), f.get_tensor(recipe.indices),
                                      path, outliers)
    _retie(out, aliases, path)
    return out


def load_codebook_checkpoint(index: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded codebook checkpoint (`tie_checkpoint`'s output), dense.

    Each shard is read with `load_codebook_safetensors`; shard paths must stay inside the index's
    folder, and the tensors found must be exactly those the index lists. Holds the whole model in
    memory: for checkpoints bigger than memory, read shard by shard.

    Example::

        tensors = load_codebook_checkpoint("compressed/model.tied/model.safetensors.index.json")
    """
    index = Path(index)
    if not index.is_file():
        raise BadInputError(f"{index}: no such file")
    weight_map = st_header.read_index(index)
    logical = _index_tensors(index, weight_map)
    out: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):
        for name, t in load_codebook_safetensors(shard).items():
            if name in out:
                raise BadInputError(f"{index}: tensor {name!r} is stored in more than one shard; the checkpoint "
                                    "is corrupt")
            if logical.get(name) != shard.name:
                raise BadInputError(f"{index}: shard {shard.name} holds {name!r}, which the index "
                                    f"{'places in ' + logical[name] if name in logical else 'does not list'}")
            out[name] = t
    missing = [n for n in logical if n not in out]
    if missing:
        raise BadInputError(f"{index}: tensor {missing[0]!r} is listed but no shard holds it")
    return {n: out[n] for n in logical}


def read_metadata(meta: Mapping[str, str], path: Path) -> tuple[dict[str, Recipe], dict[str, dict]]:
    """The recipes and aliases of a codebook file's metadata, each checked."""
    if meta.get("compress.format") != FILE_FORMAT:
        raise BadInputError(f"{path}: no codebook metadata; the file was not written by compress's safetensors "
                            "export (open it with safetensors.safe_open instead)")
    if meta.get("compress.format_version") not in FILE_FORMAT_VERSIONS:
        raise BadInputError(f"{path}: codebook format version {meta.get('compress.format_version')!r} is not "
                            f"supported (this reads versions {', '.join(FILE_FORMAT_VERSIONS)}); re-export the model")
    try:
        recipes = json.loads(meta["compress.tensors"])
        aliases = json.loads(meta.get("compress.aliases", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise BadInputError(f"{path}: corrupt codebook metadata ({e}); re-export the model") from e
    if not isinstance(recipes, dict) or not isinstance(aliases, dict):
        raise BadInputError(f"{path}: codebook metadata 'compress.tensors' and 'compress.aliases' must be JSON "
                            "objects; the file is corrupt")
    checked = {name: Recipe.from_dict(r, source=f"{path}: recipe of {name[:80]!r}") for name, r in recipes.items()}
    for name, a in aliases.items():
        if (not isinstance(a, dict) or set(a) != {"target", "transpose"} or not isinstance(a["target"], str)
                or not isinstance(a["transpose"], bool)):
            raise BadInputError(f"{path}: alias {name[:80]!r} must be {{\"target\": name, \"transpose\": bool}}; "
                                "the file is corrupt")
    return checked, aliases


def _check_recipes(recipes: dict[str, Recipe], header, path: Path) -> None:
    """Every recipe names stored tensors of the right dtype and size (checked before reading any)."""
    for name, r in recipes.items():
        side = (r.outlier_index, r.outlier_value) if r.outliers else ()
        for key in (r.codebook, r.indices, *side):
            if key not in header.tensors:
                raise BadInputError(f"{path}: `{name}` names {key!r}, which the file does not store")
        n = math.prod(index_shape(tuple(r.shape), r.dim))
        idx = header.tensors[r.indices]
        if idx.dtype != "U8" or idx.shape != (packed_size(n, r.bits),):
            raise BadInputError(f"{path}: `{name}` needs {packed_size(n, r.bits)} packed index bytes (U8), the "
                                f"file has {list(idx.shape)} ({idx.dtype}); the file is corrupt")
        cb = header.tensors[r.codebook]
        groups = r.grain.groups_for(tuple(r.shape))
        want = (groups, r.k) if r.dim == 1 else (groups, r.k, r.dim)
        if cb.shape != want or str(cb.torch_dtype).removeprefix("torch.") != r.dtype:
            raise BadInputError(f"{path}: `{name}` needs a {r.dtype} codebook of shape {list(want)}, the file has "
                                f"{list(cb.shape)} ({cb.dtype}); the file is corrupt")
        if side and (header.tensors[side[0]].dtype != "I32" or header.tensors[side[0]].shape != (r.outliers,)
                     or header.tensors[side[1]].shape != (r.outliers,)):
            raise BadInputError(f"{path}: `{name}` needs {r.outliers} outliers (I32 positions and values); the "
                                "file is corrupt")


def decode_recipe(name: str, recipe: Recipe, codebook: torch.Tensor, packed: torch.Tensor,
                  path: Path, outliers: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The dense tensor a recipe describes, from its codebook, packed indices and outliers.

    Decoded `_DECODE_CHUNK` indices at a time, so the memory beyond the result stays small whatever
    the shape (unpacking all indices at once took 8 bytes per index bit).
    """
    shape = tuple(recipe.shape)
    n = math.prod(index_shape(shape, recipe.dim))
    if recipe.packing != PACKING:
        raise BadInputError(f"{path}: `{name}` uses packing {recipe.packing!r}, not {PACKING!r}")
    if packed.dtype != torch.uint8 or packed.numel() != packed_size(n, recipe.bits):
        raise BadInputError(f"{path}: `{name}` needs {packed_size(n, recipe.bits)} packed index bytes, the file "
                            f"has {packed.numel()} ({packed.dtype}); the file is corrupt")
    k, dim = codebook.shape[1], recipe.dim
    table = codebook.reshape(-1, dim)
    raw = packed.numpy()
    ishape = index_shape(shape, dim)
    row_len = math.prod(ishape[1:]) if len(ishape) > 1 else 1
    per_row = recipe.grain.row_offsets(ishape, k).reshape(-1)  # each row's first entry in `table`
    out = torch.empty(n, dim, dtype=codebook.dtype)
    for start in range(0, n, _DECODE_CHUNK):
        stop = min(n, start + _DECODE_CHUNK)
        chunk = raw[start * recipe.bits // 8: packed_size(stop, recipe.bits)]
        indices = torch.from_numpy(unpack_bits(chunk, recipe.bits, stop - start).astype(np.int64))
        if int(indices.max()) >= k:
            raise BadInputError(f"{path}: `{name}` has index {int(indices.max())} for a codebook of {k} values; "
                                f"the file is corrupt")
        if per_row.numel() > 1:
            indices += per_row[torch.arange(start, stop, dtype=torch.int64) // row_len]
        out[start:stop] = table[indices]
    dense = out.reshape(shape)
    oi, ov = outliers if outliers is not None else (None, None)
    if oi is not None and oi.numel():
        if not 0 <= int(oi.min()) <= int(oi.max()) < dense.numel():
            raise BadInputError(f"{path}: `{name}` has an outlier position outside its {dense.numel()} values; "
                                "the file is corrupt")
        dense = dense.reshape(-1).index_put((oi.long(),), ov.to(dense.dtype)).reshape(shape)
    return dense


_DECODE_CHUNK = 1 << 18  # a multiple of 8, so every chunk starts on a byte of the packed stream


def _retie(out: dict[str, torch.Tensor], aliases: dict[str, dict], path: Path) -> None:
    pending = dict(aliases)
    while pending:
        ready = [n for n, a in pending.items() if a["target"] in out]
        if not ready:
            raise BadInputError(f"{path}: aliases {sorted(pending)} point to tensors the file does not hold")
        for name in ready:
            a = pending.pop(name)
            target = out[a["target"]]
            if a["transpose"] and target.dim() != 2:
                raise BadInputError(f"{path}: alias {name!r} is a transpose of {a['target']!r}, which is not 2-D")
            out[name] = target.t() if a["transpose"] else target


def _index_tensors(index: Path, weight_map: dict[str, Path]) -> dict[str, str]:
    """logical name -> shard file name, from the index `tie_checkpoint` writes (checked)."""
    meta = json.loads(index.read_text(encoding="utf-8")).get("metadata")
    if not isinstance(meta, dict) or meta.get("compress.format") != FILE_FORMAT:
        raise BadInputError(f"{index}: not a codebook checkpoint index (no compress.format metadata); it was not "
                            "written by tie_checkpoint (load plain checkpoints with compress.io.load)")
    if meta.get("compress.format_version") != str(FILE_FORMAT_VERSION):
        raise BadInputError(f"{index}: codebook format version {meta.get('compress.format_version')!r} is not "
                            f"supported (this is {FILE_FORMAT_VERSION}); re-run tie_checkpoint")
    logical = meta.get("compress.tensors")
    shards = {p.name for p in weight_map.values()}
    if not isinstance(logical, dict) or not all(isinstance(v, str) and v in shards for v in logical.values()):
        raise BadInputError(f"{index}: metadata 'compress.tensors' must map every tensor to a shard of the "
                            "weight_map; the index is corrupt")
    return logical
