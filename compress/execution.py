"""Running PyTorch models: train/eval mode for a block, flat outputs, and which loss fits the data.

A leaf module: the planner (importance), the fine-tuning loop, the pipeline, the exporters and
`verify` all run models through these helpers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn


@contextlib.contextmanager
def train_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Train or eval mode (dropout, batch norm) inside the block, restored after; exported programs
    have no modes and are left as they are."""
    was = model.training
    try:
        model.train(training)
    except NotImplementedError:
        yield
        return
    try:
        yield
    finally:
        model.train(was)


LOSS_MODES = ("cross-entropy", "reconstruction", "distillation")


def loss_mode(outputs: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor | None) -> str:
    """"reconstruction" when the output has the input's shape, "cross-entropy" with integer targets,
    else "distillation".

    >>> loss_mode(torch.zeros(4, 10), torch.zeros(4, 64), torch.zeros(4, dtype=torch.long))
    'cross-entropy'
    """
    if outputs.shape == inputs.shape:
        return "reconstruction"
    if targets is not None and not targets.is_floating_point() and not targets.is_complex():
        return "cross-entropy"
    return "distillation"


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
