"""Which codebook row each weight reads: one per tensor, one per output channel, or one per group.

A weight of shape `[rows, ...]` is split along its first axis. `Granularity` is the one place that
says which codebook row (group) each first-axis row uses: every row uses row 0 ("tensor"), row r
uses row r ("channel"), or row r uses row `r // size` ("group", the last group may be smaller).
Clustering, merging, soft tying, the exporters and the file readers all ask it.

    >>> g = Granularity.of("group", 4)
    >>> g.groups(9), g.group_of_rows(9).tolist()
    (3, [0, 0, 0, 0, 1, 1, 1, 1, 2])
    >>> [(s.start, s.stop) for s in g.row_blocks(9)]
    [(0, 4), (4, 8), (8, 9)]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import BadInputError, Option

KINDS = ("tensor", "channel", "group")


@dataclass(frozen=True)
class Granularity:
    """`kind` is "tensor", "channel" or "group"; `size` is the rows per group (only for "group")."""

    kind: str = "tensor"
    size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BadInputError(f"unknown granularity {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.kind == "group":
            if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
                raise BadInputError("granularity 'group' needs a group size >= 1 (", Option("group_size"), ")")
        elif self.size is not None:
            object.__setattr__(self, "size", None)  # only groups have a size

    @classmethod
    def of(cls, kind: str | None, size: int | None = None) -> Granularity:
        """From the (kind, group size) pair configs and files store."""
        return cls(kind or "tensor", size)

    @property
    def group_size(self) -> int | None:
        """The size as configs and files store it (None unless "group")."""
        return self.size

    def rows(self, shape: tuple[int, ...]) -> int:
        """First-axis rows of a tensor of `shape` (a scalar is one row)."""
        return int(shape[0]) if len(shape) else 1

    def groups(self, rows: int) -> int:
        """Codebook rows a tensor with `rows` first-axis rows needs."""
        if self.kind == "tensor" or rows == 0:
            return 1
        if self.kind == "channel":
            return rows
        return -(-rows // self.size)

    def groups_for(self, shape: tuple[int, ...]) -> int:
        """Codebook rows for a tensor of `shape` (a scalar has one)."""
        return 1 if len(shape) == 0 else self.groups(int(shape[0]))

    def group_of_rows(self, rows: int) -> torch.Tensor:
        """Codebook row of each first-axis row (int64, length `rows`)."""
        if self.kind == "tensor":
            return torch.zeros(rows, dtype=torch.int64)
        r = torch.arange(rows, dtype=torch.int64)
        return r if self.kind == "channel" else r // self.size

    def row_blocks(self, rows: int) -> list[slice]:
        """The first-axis rows of each codebook row, in order."""
        if self.kind == "tensor":
            return [slice(0, rows)]
        size = 1 if self.kind == "channel" else self.size
        return [slice(g * size, min((g + 1) * size, rows)) for g in range(self.groups(rows))]

    def block_of(self, r0: int, r1: int) -> slice:
        """The codebook rows that first-axis rows [r0, r1) use."""
        if self.kind == "tensor":
            return slice(0, 1)
        if self.kind == "channel":
            return slice(r0, r1)
        return slice(r0 // self.size, -(-r1 // self.size))

    def row_offsets(self, shape: tuple[int, ...], k: int) -> torch.Tensor:
        """Offset of each element's codebook row in the flattened codebook, broadcastable to `shape`."""
        if self.kind == "tensor" or len(shape) == 0:
            return torch.zeros((), dtype=torch.int64)
        return (self.group_of_rows(int(shape[0])) * k).view(int(shape[0]), *([1] * (len(shape) - 1)))

    def describe(self) -> str:
        """"tensor", "channel" or "group of N"."""
        return f"group of {self.size}" if self.kind == "group" else self.kind


TENSOR = Granularity("tensor")
