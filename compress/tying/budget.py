"""Bits where they matter: spread an average bit budget over the tied tensors by their sensitivity.

Each tensor t has, for every candidate bit width b, a storage cost c_t(b) in bits (indices, codebook
and outliers) and an estimated output error e_t(b) (`assign` measures it). `allocate` starts every
tensor at the fewest bits and repeatedly buys the upgrade with the largest error saved per bit spent
that still fits, so the total never exceeds `budget` bits per tied weight.

    >>> costs = {"a": {2: 200, 3: 300, 4: 400}, "b": {2: 200, 3: 300, 4: 400}}
    >>> errors = {"a": {2: 8.0, 3: 2.0, 4: 0.5}, "b": {2: 0.4, 3: 0.1, 4: 0.03}}
    >>> allocate(costs, errors, 200, 3.0)
    {'a': 4, 'b': 2}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import BadInputError, Option
from ..records import Record
from .config import MAX_BITS


def candidates(budget: float, dim: int = 1) -> list[int]:
    """Bit widths tried around a budget: one below its floor to one above (indices of at most 8 bits)."""
    low = max(1, math.floor(budget) - 1)
    return [b for b in range(low, math.floor(budget) + 2) if b * dim <= MAX_BITS]


def cost_bits(index_count: int, bits: int, dim: int, groups: int, value_bits: int, outliers: int = 0) -> int:
    """Stored bits of one tensor: its indices (bits * dim each), codebook (groups x K x dim values) and
    outliers (an int32 position and a value each)."""
    k = 1 << (bits * dim)
    return index_count * bits * dim + groups * k * dim * value_bits + outliers * (32 + value_bits)


def allocate(costs: dict[str, dict[int, int]], errors: dict[str, dict[int, float]], weights: int,
             budget: float) -> dict[str, int]:
    """Bits per tensor minimizing the summed error with the total cost <= budget * weights.

    Raises `BadInputError` when even the fewest bits everywhere exceed the budget.
    """
    limit = budget * weights
    chosen = {n: min(c) for n, c in costs.items()}
    spent = sum(costs[n][b] for n, b in chosen.items())
    if spent > limit:
        raise BadInputError(f"the budget of {budget:g} bits per weight is below the smallest storage these tensors "
                            f"allow ({spent / max(weights, 1):.3f} bits per weight with the fewest bits each may take, "
                            "codebooks counted); raise ", Option("budget"))
    while True:
        best, best_gain = None, 0.0
        for n, b in chosen.items():
            for up in sorted(c for c in costs[n] if c > b):
                extra = costs[n][up] - costs[n][b]
                gain = (errors[n][b] - errors[n][up]) / max(extra, 1)
                if spent + extra <= limit and gain > best_gain:
                    best, best_gain = (n, up, extra), gain
        if best is None:
            return chosen
        n, up, extra = best
        chosen[n], spent = up, spent + extra


@dataclass
class Allocation(Record):
    """What `--budget` chose: bits per tensor, the measured errors behind it, the bits per weight reached."""

    budget: float
    bits_per_weight: float
    bits: dict[str, int] = field(default_factory=dict)
    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> {bits: estimated output error}
    measured: str = ""  # how the errors were measured

    _what = "bit allocation"
