"""`.pt2` files (`torch.export.save`): the program, its module, weights and example inputs.

`torch.export.load` is not safe on untrusted files; `safety.pt2` says why and how its doors are shut.
"""

from __future__ import annotations

import contextlib
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..errors import BadInputError, CompressError, UnsafePickleError
from ._errors import library_call, short
from .loaded import Loaded, find_aliases, named_tensors
from .safety import pt2 as pt2_safety
from .safety.zip import ZipListing


def load_pt2(path: Path, zf: zipfile.ZipFile, listing: ZipListing, trust: bool) -> Loaded:
    models = pt2_safety.check_entries(path, listing, zf)
    if not trust:
        pt2_safety.check_payloads(path, listing, zf, models)
    with warnings.catch_warnings(), pt2_safety.captured_torch_export_log() as swallowed:
        warnings.simplefilter("ignore")
        program = _export_load(path, trust, swallowed)
        if not trust:
            pt2_safety.check_program(program, path)
        with library_call(path, "building the module from the exported program"):
            module = program.module()
    _retie_shared_parameters(module)
    tensors = dict(program.state_dict)
    for name, value in program.constants.items():
        if isinstance(value, torch.Tensor) and name not in tensors:
            tensors[name] = value
    args = program.example_inputs[0] if program.example_inputs else None
    return Loaded(path=path, kind="pt2", tensors=tensors, aliases=find_aliases(named_tensors(module)),
                  module=module, example_inputs=tuple(args) if args is not None else None, program=program)


def _retie_shared_parameters(module: nn.Module) -> None:
    """Make the names of one saved parameter one `nn.Parameter` object again.

    `torch.export.load` gives each name of a shared parameter (a tied embedding and head, one layer
    used three times) its own `Parameter` over the same storage; planning and fine-tuning treat
    distinct objects as distinct weights, so the tie would be lost.
    """
    first: dict[tuple, nn.Parameter] = {}
    for owner in module.modules():
        for attr, p in list(owner._parameters.items()):
            if p is None or p.numel() == 0:
                continue
            key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.stride()), tuple(p.shape), p.dtype)
            kept = first.setdefault(key, p)
            if kept is not p:
                owner._parameters[attr] = kept


def _export_load(path: Path, trust: bool, swallowed: list[BaseException]):
    try:
        with (contextlib.nullcontext() if trust else pt2_safety.guarded_serde(path)), \
                library_call(path, "torch.export.load"):
            return torch.export.load(str(path))
    except BadInputError as e:
        if not swallowed or isinstance(e, UnsafePickleError):
            raise
        cause = swallowed[-1]  # torch logged the real error and raised a generic one
        if isinstance(cause, CompressError):
            raise cause from None
        raise BadInputError(f"{path}: torch.export.load failed "
                            f"({type(cause).__name__}: {short(cause)})") from cause

