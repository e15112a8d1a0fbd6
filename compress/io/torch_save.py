"""`torch.save` files: a state_dict (or a dict holding one), or with trust a pickled `nn.Module`.

Everything is read with torch's weights-only unpickler unless the user trusts the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BadInputError
from .loaded import Loaded, find_aliases, named_tensors
from .safety.pickle import trusted_load, weights_only_load
from .sniff import pickle_head

SUPPORTED = ("supported: .pt2 (torch.export.save), .pt/.pth (state_dict or TorchScript), "
             ".safetensors or *.safetensors.index.json, .onnx")


def load_torch_save(path: Path, data_pkl: bytes, trust: bool) -> Loaded:
    if trust:
        obj = trusted_load(path, str(path))
    else:
        obj = weights_only_load(path, str(path), pickle_bytes=data_pkl, mmap=True)
    return _from_object(path, obj)


def load_pickle(path: Path, trust: bool) -> Loaded:
    if trust:
        obj = trusted_load(path, str(path))
    else:
        obj = weights_only_load(path, str(path), pickle_bytes=pickle_head(path, b""))
    return _from_object(path, obj)


def _from_object(path: Path, obj: Any) -> Loaded:
    """What torch.load returned: a module (only reachable with trust), or a state_dict (maybe wrapped)."""
    module = obj if isinstance(obj, nn.Module) else _wrapped_module(obj)
    if module is not None:
        tensors = dict(module.state_dict())
        return Loaded(path=path, kind="module", tensors=tensors,
                      aliases=find_aliases(named_tensors(module)), module=module)
    state_dict = _state_dict(obj)
    if state_dict is None:
        raise BadInputError(f"{path}: holds {describe_object(obj)}, not a state_dict (a dict of tensors, or one under "
                            "'state_dict' or 'model'); " + SUPPORTED)
    return Loaded(path=path, kind="state_dict", tensors=state_dict, aliases=find_aliases(state_dict.items()))


def _wrapped_module(obj: Any) -> nn.Module | None:
    if isinstance(obj, Mapping):
        for key in ("model", "module"):
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
    return None


def _state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    flat = _flat_state_dict(obj)
    if flat is not None:
        return flat
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = _flat_state_dict(obj.get(key))
            if inner is not None:
                return inner
    return None


def _flat_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
        return None
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    others = [k for k in obj if k not in tensors and not k.endswith("_extra_state")]
    return tensors if tensors and not others else None


def describe_object(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = ", ".join(repr(k) for k in list(obj)[:5])
        return f"a dict with keys {keys}{', ...' if len(obj) > 5 else ''}"
    return f"a {type(obj).__name__}"

