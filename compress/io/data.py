"""Data files: the calibration and test splits a tie run fine-tunes and measures on."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInputError
from ._errors import library_call
from .loaded import DataSplits
from .safety.pickle import weights_only_load
from .safety.tensors import check_tensor
from .safety.zip import check_archive, is_zip
from .sniff import check_file, is_pickle, pickle_head
from .torch_save import describe_object


def load_data(path: Path | str) -> DataSplits:
    """Read a data file: a dict saved by `torch.save`, loaded with `weights_only=True`.

    Keys: `calib_inputs`, `test_inputs` (tensors, first dimension = samples), optional
    `calib_targets`/`test_targets` (one per sample) and `version` (1). Anything else is an error.

    >>> data = load_data("samples/digits_data.pt")
    >>> data.calib_inputs.shape, data.test_targets.dtype
    (torch.Size([1257, 64]), torch.int64)
    """
    path = Path(path)
    head, _ = check_file(path)
    if not (is_zip(head) or is_pickle(path, head)):
        raise BadInputError(f"{path}: not a torch.save file; save the splits with "
                            "torch.save({'calib_inputs': ..., 'test_inputs': ...}, path)")
    if is_zip(head):
        with library_call(path, "opening the zip archive"), zipfile.ZipFile(path) as zf:
            listing = check_archive(path, zf)
        if "data.pkl" not in listing.entries:
            what = "a .pt2 program" if "archive_format" in listing.entries else "a zip archive"
            raise BadInputError(f"{path}: {what}, not a data file; save the splits with "
                                "torch.save({'calib_inputs': ..., 'test_inputs': ...}, path)")
    obj = weights_only_load(path, str(path), pickle_bytes=pickle_head(path, head), mmap=is_zip(head),
                            hint=("a data file must be a plain dict of tensors saved with torch.save",))
    return _splits(obj, path)


_SPLIT_KEYS = ("calib_inputs", "calib_targets", "test_inputs", "test_targets")


def _splits(obj: Any, path: Path) -> DataSplits:
    if not isinstance(obj, Mapping):
        raise BadInputError(f"{path}: holds {describe_object(obj)}; a data file is a dict with calib_inputs and "
                            "test_inputs")
    unknown = [k for k in obj if k not in _SPLIT_KEYS and k != "version"]
    if unknown:
        raise BadInputError(f"{path}: unknown key {unknown[0]!r}; allowed: version, {', '.join(_SPLIT_KEYS)}")
    if obj.get("version", 1) != 1:
        raise BadInputError(f"{path}: data file version {obj['version']!r} is not supported (expected 1)")
    calib = _inputs(obj, "calib_inputs", path)
    test = _inputs(obj, "test_inputs", path)
    return DataSplits(calib_inputs=calib, calib_targets=_targets(obj, "calib_targets", calib, path),
                      test_inputs=test, test_targets=_targets(obj, "test_targets", test, path), path=path)


def _inputs(obj: Mapping, key: str, path: Path) -> torch.Tensor:
    if key not in obj:
        raise BadInputError(f"{path}: missing {key!r}; a data file needs calib_inputs and test_inputs")
    t = _tensor(obj[key], key, path)
    if t.dim() == 0 or t.shape[0] == 0:
        raise BadInputError(f"{path}: {key} has shape {list(t.shape)}; it needs at least one sample "
                            "along the first dimension")
    return t


def _targets(obj: Mapping, key: str, inputs: torch.Tensor, path: Path) -> torch.Tensor | None:
    if obj.get(key) is None:
        return None
    t = _tensor(obj[key], key, path)
    if t.dim() == 0 or t.shape[0] != inputs.shape[0]:
        raise BadInputError(f"{path}: {key} has {t.shape[0] if t.dim() else 0} rows but "
                            f"{key.replace('targets', 'inputs')} has {inputs.shape[0]}; they must match")
    return t


def _tensor(value: Any, key: str, path: Path) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise BadInputError(f"{path}: {key} is a {type(value).__name__}, expected a tensor")
    check_tensor(str(path), key, value, what="data tensor")  # dense, CPU, real, no view inflating its storage
    if value.dtype == torch.bool or not (value.is_floating_point() or _is_int(value)):
        raise BadInputError(f"{path}: {key} has dtype {value.dtype}; use a float or integer tensor")
    if value.is_floating_point() and value.numel():
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise BadInputError(f"{path}: {key} has {bad} NaN or infinite values; clean the data")
        largest = float(value.abs().max())
        if largest > MAX_MAGNITUDE:
            raise BadInputError(f"{path}: {key} has values up to {largest:.3g}; values beyond {MAX_MAGNITUDE:.2g} "
                                "overflow float32 arithmetic (their squares are infinite): rescale the data")
    return value


# sqrt(float32 max): a larger input's square is infinite in float32, and fine-tuning on it ends in NaN
MAX_MAGNITUDE = 1.8e19


def _is_int(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool

