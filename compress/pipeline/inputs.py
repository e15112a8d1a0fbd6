"""Example inputs for models that carry none (TorchScript files, pickled `nn.Module`s, ONNX files).

`input_shape` gives one spec per model input, `[dtype:]D0xD1x...`: `1x3x224x224` (float32 image),
`int64:1x128` (token ids). Dimension 0 is the batch (exported as dynamic). Float inputs are uniform in
[0, 1); integer inputs are token-id-like, uniform in [0, V) with V the smallest `num_embeddings` of
the model's embeddings (2 when it has none); bool inputs are random. Seeded, so runs repeat.

    >>> [str(s) for s in parse_input_shapes(["1x3x8x8", "int64:1x16"])]
    ['float32:1x3x8x8', 'int64:1x16']
    >>> [tuple(t.shape) for t in example_inputs(parse_input_shapes(["2x5"]))]
    [(2, 5)]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BadInputError, Option

DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "float64": torch.float64, "double": torch.float64, "int64": torch.int64,
          "long": torch.int64, "int32": torch.int32, "int": torch.int32, "int16": torch.int16, "int8": torch.int8,
          "uint8": torch.uint8, "bool": torch.bool}
_SPEC = re.compile(r"^(?:(?P<dtype>[a-z0-9]+):)?(?P<dims>\d+(?:x\d+)*)$")
_SEED = 0


@dataclass(frozen=True)
class InputSpec:
    """One model input: dtype name and shape."""

    dtype: str
    shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.dtype}:{'x'.join(map(str, self.shape))}"


def parse_input_shapes(specs: Sequence[str]) -> list[InputSpec]:
    """Parse `[dtype:]D0xD1x...` specs; a malformed one or an unknown dtype is a `BadInputError`."""
    out = []
    for text in specs:
        match = _SPEC.match(str(text).strip().lower())
        if match is None:
            raise BadInputError(f"input shape {text!r} is not [dtype:]D0xD1x... (e.g. 1x3x224x224 or int64:1x128); "
                                "fix ", Option("input_shape", text, many=True))
        dtype = match["dtype"] or "float32"
        if dtype not in DTYPES:
            raise BadInputError(f"input shape {text!r}: unknown dtype {dtype!r}; use one of "
                                f"{', '.join(sorted(set(DTYPES)))}")
        shape = tuple(int(d) for d in match["dims"].split("x"))
        if any(d < 1 for d in shape):
            raise BadInputError(f"input shape {text!r}: every dimension must be at least 1")
        out.append(InputSpec(str(DTYPES[dtype]).removeprefix("torch."), shape))
    return out


def example_inputs(specs: Sequence[InputSpec], model: nn.Module | None = None) -> tuple[torch.Tensor, ...]:
    """Seeded example tensors for `specs` (token-id range from `model`'s embeddings, when given)."""
    gen = torch.Generator().manual_seed(_SEED)
    high = _token_range(model)
    out = []
    for spec in specs:
        dtype = DTYPES[spec.dtype]
        if dtype.is_floating_point:
            out.append(torch.rand(spec.shape, generator=gen).to(dtype))
        elif dtype == torch.bool:
            out.append(torch.rand(spec.shape, generator=gen) < 0.5)
        else:
            out.append(torch.randint(0, high, spec.shape, generator=gen).to(dtype))
    return tuple(out)


def check_example_inputs(model, inputs: tuple, specs: Sequence[InputSpec], path) -> None:
    """Run `model` once on `inputs`: a model that refuses them is a `BadInputError` naming the specs."""
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:  # the model's own error says what it wanted
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        given = ", ".join(str(s) for s in specs)
        raise BadInputError(f"{path}: the model fails on example inputs {given} (",
                            Option("input_shape"), f"): {first}") from e


def _token_range(model: nn.Module | None) -> int:
    if not isinstance(model, nn.Module):
        return 2
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(2, min(sizes)) if sizes else 2
