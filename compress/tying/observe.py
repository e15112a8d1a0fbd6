"""Observing what each tied layer sees: H = XᵀX of its inputs, through the layers already merged.

Error-compensated assignment needs, for every tied weight W [rows, cols], the Gram matrix of the
inputs its layer multiplies (a Linear's input rows; a convolution's im2col patches). `passes` runs
the model on calibration batches under a `TorchFunctionMode` that sees every `linear` / `conv1d` /
`conv2d` call, in a plain `nn.Module` and in a `.pt2` program's graph alike, and recognises a tied
weight by identity (the `nn.Parameter` itself is the call's weight).

`sequential(model, params, batches, handle)` runs all calibration batches at once, one thread each,
in lockstep: every thread stops at each tied weight's call, H is summed over all of them, `handle`
assigns the weight and returns its merged value, and every thread goes on with that value. One forward
pass over the calibration data, each layer seeing inputs computed through the layers merged before it;
memory holds one layer's H (and that layer's inputs, for all batches) at a time.

When the batches do not take the same path (data-dependent control flow), it falls back to `passes`:
each pass observes the *clean* pending weights: those whose input was computed before any pending
weight was used (so only through merged or untied layers), or that read the very same input tensor as
one that was (the query, key and value projections of an attention block). It stops the forward
pass at the first pending weight whose input is not clean, hands their H to the caller, which assigns
and merges them, and starts the next pass.

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> census = Census.of(model, {"0.weight": model[0].weight, "2.weight": model[2].weight}, [(torch.rand(3, 8),)])
    >>> sorted(census.observable), census.unobservable
    (['0.weight', '2.weight'], {})
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..execution import as_args, train_mode

_OPS = ("linear", "conv1d", "conv2d")


def _op(func) -> str | None:
    """"linear", "conv1d" or "conv2d" for the functional and the aten forms of those calls."""
    name = getattr(func, "__name__", "")
    base, _, overload = name.partition(".")
    return base if base in _OPS and overload in ("", "default") else None


def batches_of(inputs, batch_size: int = 64) -> list[tuple]:
    """Calibration batches (tuples of model arguments) from a tensor or a tuple of tensors split on dim 0."""
    args = as_args(inputs)
    n = len(args[0])
    return [tuple(a[s:s + batch_size] for a in args) for s in range(0, n, batch_size)]


class _Stop(Exception):
    """Raised inside the forward pass once nothing more can be observed in it."""


@dataclass
class Census:
    """Which tied weights a forward pass lets us observe, and why the others cannot be."""

    observable: dict[str, str] = field(default_factory=dict)  # name -> op
    unobservable: dict[str, str] = field(default_factory=dict)  # name -> reason

    @classmethod
    def of(cls, model: nn.Module, params: dict[str, torch.Tensor], batches: Sequence[tuple]) -> Census:
        """Run one batch and record how each of `params` is used."""
        by_id = {id(p): n for n, p in params.items()}
        uses: dict[str, list[str]] = {n: [] for n in params}

        class Watch(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                op = _op(func)
                for i, a in enumerate([*args, *kwargs.values()]):
                    name = by_id.get(id(a))
                    if name is not None:
                        if op is not None and i == 1:
                            uses[name].append(op if _supported(op, args, kwargs) else f"{op} with groups > 1 or "
                                              "padding by name")
                        else:
                            uses[name].append(getattr(func, "__name__", str(func)))
                return func(*args, **kwargs)

        with torch.no_grad(), train_mode(model, False), Watch():
            model(*batches[0])
        out = cls()
        for name, used in uses.items():
            if len(used) == 1 and used[0] in _OPS:
                out.observable[name] = used[0]
            elif not used:
                out.unobservable[name] = "not used by the forward pass on the calibration inputs"
            elif len(used) > 1:
                out.unobservable[name] = f"used {len(used)} times in one forward pass"
            else:
                out.unobservable[name] = f"read by `{used[0]}`, not by a linear or convolution call"
        return out


def _supported(op: str, args: tuple, kwargs: dict) -> bool:
    if op == "linear":
        return True
    groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
    padding = args[4] if len(args) > 4 else kwargs.get("padding", 0)
    return groups == 1 and not isinstance(padding, str)


def _columns(op: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """The input rows the weight (as [rows, cols]) multiplies: [n, cols]."""
    x, w = args[0], args[1]
    if op == "linear":
        return x.reshape(-1, w.shape[-1])
    get = (lambda i, key, default: args[i] if len(args) > i else kwargs.get(key, default))
    stride, padding, dilation = get(3, "stride", 1), get(4, "padding", 0), get(5, "dilation", 1)
    if op == "conv1d":
        x, w = x.unsqueeze(-2), w.unsqueeze(-2)
        stride, padding, dilation = ((1, _one(s)) for s in (stride, padding, dilation))
        padding = (0, padding[1])
    patches = F.unfold(x, w.shape[-2:], dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _one(v) -> int:
    return int(v[0]) if isinstance(v, (tuple, list)) else int(v)


class _Recorder(TorchFunctionMode):
    """Accumulates XᵀX for the clean pending weights of one pass; raises `_Stop` past the last."""

    def __init__(self, pending: dict[int, str], only: set[str] | None):
        super().__init__()
        self.pending, self.only = pending, only
        self.grams: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.seen: list[str] = []
        self._tainted = False
        self._clean: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = _op(func)
        name = self.pending.get(id(args[1])) if op is not None and len(args) > 1 else None
        if name is None:
            return func(*args, **kwargs)
        x = args[0]
        clean = not self._tainted or id(x) in self._clean
        if not clean or (self.only is not None and name not in self.only):
            raise _Stop
        self._clean.add(id(x))
        cols = _columns(op, args, kwargs).detach().float()
        gram = (cols.T @ cols).double()
        self.grams[name] = self.grams[name] + gram if name in self.grams else gram
        self.rows[name] = self.rows.get(name, 0) + cols.shape[0]
        self.seen.append(name)
        out = func(*args, **kwargs)
        self._tainted = True
        if self.only is not None and len(self.seen) == len(self.only):
            raise _Stop
        return out


def passes(model: nn.Module, params: dict[str, torch.Tensor], batches: Sequence[tuple]
           ) -> Iterator[dict[str, torch.Tensor]]:
    """Yield {name: H} (the mean of XᵀX over the calibration rows) pass by pass until every weight of
    `params` (all observable, see `Census`) has been observed.

    Between two passes the caller assigns and merges (or not) the weights it was handed; a merged
    weight is no longer the `nn.Parameter` object, and a weight handed once is never observed again.
    """
    pending = {id(p): n for n, p in params.items()}
    while pending:
        grams, rows = _one_pass(model, pending, batches)
        if not grams:
            raise RuntimeError(f"no pending weight could be observed ({sorted(pending.values())[:3]} ...)")
        yield {n: grams[n] / max(rows[n], 1) for n in grams}
        for n in grams:
            del pending[id(params[n])]


def _one_pass(model: nn.Module, pending: dict[int, str], batches: Sequence[tuple]):
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    only: set[str] | None = None
    with torch.no_grad(), train_mode(model, False):
        for batch in batches:
            rec = _Recorder(pending, only)
            try:
                with rec:
                    model(*batch)
            except _Stop:
                pass
            if only is None:  # the first batch decides which weights this pass observes
                only = set(rec.seen)
            for n in only & set(rec.grams):  # a batch that takes another path adds only what it saw
                grams[n] = grams[n] + rec.grams[n] if n in grams else rec.grams[n]
                rows[n] = rows.get(n, 0) + rec.rows[n]
    return grams, rows


Handle = Callable[[str, torch.Tensor], "torch.Tensor | None"]


def sequential(model: nn.Module, params: dict[str, torch.Tensor], batches: Sequence[tuple], handle: Handle,
               commit: Callable[[list[str]], None]) -> str:
    """Hand every weight of `params` (all observable) to `handle(name, H)` in the order the forward pass
    uses them, each H observed through the values `handle` returned for the weights before it.

    `commit(names)` is called once those weights may be merged into the model (after the lockstep
    run, or after each pass of the fallback). Returns "lockstep" or "passes" (which ran).
    """
    try:
        done = _lockstep(model, params, batches, handle)
    except _Diverged:
        done = []
    if done:
        commit(done)
    rest = {n: p for n, p in params.items() if n not in done}
    if not rest:
        return "lockstep"
    for grams in passes(model, rest, batches):
        for name, h in grams.items():
            handle(name, h)
        commit(list(grams))
    return "passes"


class _Diverged(Exception):
    """The batches took different paths through the model: lockstep is not possible."""


def _lockstep(model: nn.Module, params: dict[str, torch.Tensor], batches: Sequence[tuple], handle: Handle
              ) -> list[str]:
    meeting = _Meeting(len(batches), handle)
    pending = {id(p): n for n, p in params.items()}

    class Meet(TorchFunctionMode):
        def __init__(self, slot: int):
            super().__init__()
            self.slot = slot

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            op = _op(func)
            name = pending.get(id(args[1])) if op is not None and len(args) > 1 else None
            if name is None:
                return func(*args, **kwargs)
            value = meeting.meet(self.slot, (name, args[0], _columns(op, args, kwargs).detach().float()))
            if value is not None:
                args = (args[0], value.to(args[1].dtype), *args[2:])
            return func(*args, **kwargs)

    errors: list[BaseException] = []

    def run(slot: int) -> None:
        try:
            with torch.no_grad(), Meet(slot):
                model(*batches[slot])
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)
        finally:
            meeting.leave()

    with train_mode(model, False):
        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(batches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if meeting.error is not None:
        raise meeting.error
    real = [e for e in errors if not isinstance(e, _Diverged)]
    if real:
        raise real[0]
    if errors or len(meeting.done) != len(params):
        raise _Diverged()
    return meeting.done


class _Meeting:
    """Where the batch threads meet at each tied weight: the last to arrive sums H and calls `handle`."""

    def __init__(self, parties: int, handle: Handle):
        self.parties, self.handle = parties, handle
        self.cond = threading.Condition()
        self.slots: list = [None] * parties
        self.arrived = self.generation = self.left = 0
        self.error: BaseException | None = None
        self.key, self.gram, self.value = None, None, None
        self.done: list[str] = []

    def meet(self, slot: int, entry: tuple):
        with self.cond:
            if self.left or self.error is not None:
                raise _Diverged()
            self.slots[slot] = entry
            self.arrived += 1
            generation = self.generation
            if self.arrived == self.parties:
                self._collect()
                self.arrived, self.generation = 0, generation + 1
                self.cond.notify_all()
            else:
                while self.generation == generation and not self.left and self.error is None:
                    self.cond.wait()
            if self.generation == generation:
                raise _Diverged()
            return self.value

    def leave(self) -> None:
        with self.cond:
            self.left += 1
            self.cond.notify_all()

    def _collect(self) -> None:
        names = {s[0] for s in self.slots}
        if len(names) != 1:
            raise _Diverged()
        name = names.pop()
        key = tuple(s[1] for s in self.slots)  # the input tensors themselves (held: their ids stay unique)
        try:
            if self.key is None or any(a is not b for a, b in zip(key, self.key)):  # q, k, v: one H
                rows = sum(s[2].shape[0] for s in self.slots)
                self.gram = sum((s[2].T @ s[2]).double() for s in self.slots) / max(rows, 1)
                self.key = key
            self.value = self.handle(name, self.gram)
        except BaseException as e:
            self.error = e
            self.cond.notify_all()
            raise
        self.done.append(name)
        self.slots = [None] * self.parties
