"""Tensors that are, or could be, one storage: shared, exact, transposed and near copies.

Each tensor is read once to fingerprint it (content hash, norm, an 8x8 grid of block means);
only pairs whose fingerprints could be within the tolerance are read again and compared.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BadInputError
from .report import TIE_KINDS, TensorAudit, TensorTie

_SKETCH_GRID = 8


def find_tensor_ties(tensors: Mapping[str, torch.Tensor], tolerance: float,
                     aliases: Mapping[str, str] | None = None) -> list[TensorTie]:
    """Pairs of float tensors that are (or could be) one storage.

    Reads each tensor once to fingerprint it (content hash, norm, an 8x8 grid of block means),
    compares fingerprints of tensors with the same number of elements, and re-reads only the pairs
    whose fingerprints could be within `tolerance` (the grid is a contraction, so none is missed).

    Args:
        tensors: name -> tensor (may be lazy: each is read when indexed).
        tolerance: largest relative error ||a - b|| / max(||a||, ||b||) for "near" and "transposed".
        aliases: name -> canonical name for storage already shared (reported as "shared").

    Returns:
        `TensorTie`s, "shared" then "exact", "transposed", "near"; `a` comes first in `tensors`.
        Each tensor is `b` at most once: tied to its first exact copy, or else to the first earlier
        tensor it matches that is not itself tied to another (a star around first occurrences,
        not every pair of a cluster of near copies).

    >>> w = torch.randn(8, 4)
    >>> find_tensor_ties({"enc": w, "dec": w.t().clone()}, 1e-3)
    [TensorTie(a='enc', b='dec', kind='transposed', rel_error=0.0)]
    """
    if not math.isfinite(tolerance) or tolerance < 0:
        raise BadInputError(f"tie tolerance must be a finite number >= 0, got {tolerance!r}")
    aliases = {a: c for a, c in dict(aliases or {}).items() if a != c}
    finder = TieFinder(float(tolerance))
    for name in tensors:
        if name in aliases:
            continue
        t = tensors[name]
        if t.dtype.is_floating_point and t.numel() >= 2:
            flat = t.detach().reshape(-1).to(torch.float64).numpy()
            if np.isfinite(flat).all():
                finder.add(name, t, flat)
    return finder.ties(tensors, aliases)


@dataclass
class _Fingerprint:
    name: str
    order: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    digest: bytes
    norm: float
    grid: np.ndarray  # weighted block means: an L2 contraction of the tensor viewed as 2D


class TieFinder:
    """Collects fingerprints during one pass, then compares plausible pairs (re-reading lazily)."""

    def __init__(self, tolerance: float):
        self.tolerance = tolerance
        self.prints: list[_Fingerprint] = []

    def add(self, name: str, t: torch.Tensor, flat: np.ndarray) -> None:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        shape = tuple(int(s) for s in t.shape)
        self.prints.append(_Fingerprint(name, len(self.prints), shape, t.dtype, hashlib.blake2b(raw).digest(),
                                        float(np.linalg.norm(flat)), _grid(flat.reshape(_as_2d(shape)))))

    def ties(self, tensors: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> list[TensorTie]:
        out = [TensorTie(c, a, "shared", 0.0) for a, c in aliases.items()]
        reps: list[_Fingerprint] = []
        seen: dict[tuple, _Fingerprint] = {}
        for fp in self.prints:
            key = (fp.shape, fp.dtype, fp.digest)
            if key in seen:
                out.append(TensorTie(seen[key].name, fp.name, "exact", 0.0))
            else:
                seen[key] = fp
                reps.append(fp)
        candidates = sorted(self._candidates(reps), key=lambda c: (c[1].order, c[0].order))
        out += self._first_partners(tensors, candidates)
        rank = {fp.name: fp.order for fp in self.prints}
        return sorted(out, key=lambda t: (TIE_KINDS.index(t.kind), rank.get(t.a, -1), rank.get(t.b, -1),
                                          t.a, t.b))

    def _first_partners(self, tensors, candidates) -> list[TensorTie]:
        """Tie each tensor to the first earlier tensor it matches that is not itself tied to another.

        A star around first occurrences rather than every pair of a cluster of near copies.
        """
        taken: set[str] = set()
        out = []
        for _, group in itertools.groupby(candidates, key=lambda c: (c[1].order, c[0].order)):
            same_pair = list(group)
            a, b = same_pair[0][0], same_pair[0][1]
            kinds = [kind for _, _, kind in same_pair]
            if a.name in taken or b.name in taken:
                continue
            checked = (self._confirm(tensors, a, b, kind) for kind in kinds)
            confirmed = [t for t in checked if t is not None]
            if confirmed:
                out.append(min(confirmed, key=lambda t: t.rel_error))
                taken.add(b.name)
        return out

    def _candidates(self, reps: list[_Fingerprint]) -> Iterator[tuple[_Fingerprint, _Fingerprint, str]]:
        by_shape: dict[tuple, list[_Fingerprint]] = {}
        for fp in reps:
            by_shape.setdefault(fp.shape, []).append(fp)
        for shape, group in by_shape.items():
            yield from ((a, b, "near") for a, b in self._close(group, group, transpose=False))
            if len(shape) == 2 and shape[0] <= shape[1]:
                other = group if shape[0] == shape[1] else by_shape.get(shape[::-1], [])
                yield from ((a, b, "transposed") for a, b in self._close(group, other, transpose=True))

    def _close(self, left: list[_Fingerprint], right: list[_Fingerprint], transpose: bool):
        """Pairs whose fingerprints allow a relative error within the tolerance (no false negatives)."""
        if not left or not right:
            return
        same = left is right
        gl = np.stack([fp.grid.reshape(-1) for fp in left])
        gr = np.stack([(fp.grid.T if transpose else fp.grid).reshape(-1) for fp in right])
        nl = np.array([fp.norm for fp in left])
        nr = np.array([fp.norm for fp in right])
        for s in range(0, len(left), 512):
            block = gl[s:s + 512]
            dist = np.sqrt(np.maximum(0.0, (block * block).sum(1)[:, None] + (gr * gr).sum(1)[None, :]
                                      - 2 * block @ gr.T))
            scale = np.maximum(nl[s:s + 512, None], nr[None, :])
            limit = self.tolerance * scale + 1e-6 * scale
            ok = (dist <= limit) & (np.abs(nl[s:s + 512, None] - nr[None, :]) <= limit)
            for i, j in zip(*np.nonzero(ok)):
                a, b = left[s + i], right[j]
                if same and a.order >= b.order:
                    continue
                yield (a, b) if a.order < b.order else (b, a)

    def _confirm(self, tensors, a: _Fingerprint, b: _Fingerprint, kind: str) -> TensorTie | None:
        ta, tb = tensors[a.name].detach(), tensors[b.name].detach()
        if kind == "transposed":
            tb = tb.t()
        diff = torch.linalg.vector_norm((ta.double() - tb.double()).reshape(-1)).item()
        scale = max(a.norm, b.norm)
        rel = diff / scale if scale > 0 else 0.0
        return TensorTie(a.name, b.name, kind, float(rel)) if rel <= self.tolerance else None


_TRANSPOSES = {"aten.t.default", "aten.transpose.int", "aten.numpy_T.default", "aten.permute.default"}


def graph_ties(program, rows: list[TensorAudit]) -> list[TensorTie]:
    """2D parameters an exported program reads both as they are and transposed: one storage, two uses.

    Reported as "shared" ties with `b` = `NAME.T` (e.g. a tied autoencoder's decoder reading the
    encoder weight through `aten.t`).
    """
    signature = getattr(program, "graph_signature", None)
    if signature is None:
        return []
    names = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    is_2d = {r.name for r in rows if len(r.shape) == 2}
    out = []
    for node in program.graph.nodes:
        name = names.get(node.name) if node.op == "placeholder" else None
        if name not in is_2d:
            continue
        kinds = {str(user.target) in _TRANSPOSES for user in node.users}
        if kinds == {True, False}:
            out.append(TensorTie(name, f"{name}.T", "shared", 0.0))
    return out


def _as_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def _grid(m: np.ndarray) -> np.ndarray:
    """Block sums / sqrt(block size) over an up-to-8x8 grid: ||grid(a) - grid(b)|| <= ||a - b||."""
    rs, cs = _split_starts(m.shape[0]), _split_starts(m.shape[1])
    sums = np.add.reduceat(np.add.reduceat(m, rs, axis=0), cs, axis=1)
    rsize = np.diff(np.append(rs, m.shape[0]))
    csize = np.diff(np.append(cs, m.shape[1]))
    return sums / np.sqrt(np.outer(rsize, csize))


def _split_starts(n: int) -> np.ndarray:
    g = min(_SKETCH_GRID, n)
    sizes = np.full(g, n // g)
    sizes[: n % g] += 1
    return np.concatenate([[0], np.cumsum(sizes)[:-1]])
