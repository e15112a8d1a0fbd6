"""Running PyTorch models the way the exporters and `verify` need: eval mode, no grad, flat outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Run in eval mode (no dropout) and leave the caller's model as it was.

    The module of a loaded `.pt2` refuses `eval()`: its graph was fixed at `torch.export` time.
    """
    training = isinstance(model, nn.Module) and model.training
    if training:
        try:
            model.eval()
        except NotImplementedError:
            training = False
    try:
        yield
    finally:
        if training:
            model.train()


def as_args(inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def run(model, inputs) -> list[torch.Tensor]:
    """The model's outputs on `inputs`, flattened in pytree order (the order ONNX outputs take)."""
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    with eval_mode(model), torch.no_grad():
        return flatten(model(*as_args(inputs)))


def flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in flatten(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten(v)]
    return []
