"""A pickle's cost, bounded before any unpickler sees it.

Even a weights-only unpickler builds whatever dicts, sets and tuples the stream describes, and two
shapes of stream make that take hours: keys that all share one hash (CPython's dicts and sets are
quadratic then; integers, floats, complex numbers and tuples of them hash alike in every process,
so a 1.4 MB pickle of 100,000 int keys `7 + i * (2**61 - 1)` takes minutes), and tuples nested
through the memo so that hashing one visits billions of items. `check_pickle_cost` walks the
opcodes once, linearly, and refuses a stream in which more than `MAX_SAME_HASH` distinct values
share a hash, whose tuples hold more than `MAX_TUPLE_ITEMS` items in all (counting a shared tuple
each time it is used), with more than `MAX_OPS` opcodes, or nested deeper than `MAX_DEPTH`.

The values it follows are the ones the stream spells out: numbers, strings, `None`/booleans, tuples
of them, and `complex(...)` / `torch.Size(...)` calls (the weights-only unpickler's hashable
results); anything else is an opaque stack slot. It returns the persistent ids the stream refers to
(torch's storages: `('storage', <type>, key, location, numel)`, so their sizes can be checked
against the archive before torch reads them) and the globals it names.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import sys
from dataclasses import dataclass
from typing import Any

from ...errors import BadInputError

MAX_SAME_HASH = 32
MAX_TUPLE_ITEMS = 50_000_000  # a state dict spends ~25 per tensor; 2M tensors fit
MAX_OPS = 50_000_000
MAX_DEPTH = 10_000
_MAX_PICKLES = 5  # torch.save's legacy format: magic, protocol, sys_info, the object, storage keys

_VALUE_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
              "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
              "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False, "EMPTY_TUPLE": ()}
_TUPLES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_HASHABLE_CALLS = {"builtins.complex", "__builtin__.complex", "torch.Size"}
_RANDOMIZED = bool(sys.flags.hash_randomization)


class _Opaque:
    """A stack slot whose value is not followed; `items` counts what hashing it could visit."""

    __slots__ = ("items",)

    def __init__(self, items: int = 1):
        self.items = items


class _Global(str):
    """The name a GLOBAL / STACK_GLOBAL pushed."""


def check_pickle_cost(data: bytes, where: str) -> Scanned:
    """Refuse a pickle stream built to make unpickling take hours (see the module docstring).

    >>> import pickle
    >>> check_pickle_cost(pickle.dumps({"fc.weight": 1, 2: (3, 4.5)}), "m.pt")
    Scanned(persistent_ids=[], globals=frozenset())
    >>> check_pickle_cost(pickle.dumps([7 + i * (2**61 - 1) for i in range(40)]), "m.pt")
    Traceback (most recent call last):
    ...
    compress.errors.BadInputError: m.pt: the pickle holds 33 different values with one hash (a stream built to make loading take hours); refused
    """
    stream = io.BytesIO(data)
    scan = _Scan(where)
    for _ in range(_MAX_PICKLES):
        start = stream.tell()
        if start >= len(data):
            break
        try:
            scan.run(stream)
        except (ValueError, EOFError, KeyError, IndexError, pickle.UnpicklingError, UnicodeDecodeError):
            break  # not (or no longer) a pickle: the unpickler says what is wrong with it
        if stream.tell() == start:
            break
    return Scanned(scan.persistent_ids, frozenset(scan.globals))


@dataclass(frozen=True)
class Scanned:
    """What a checked pickle refers to: persistent ids (torch's storages) and the globals it names."""

    persistent_ids: list[Any]
    globals: frozenset[str]


class _Scan:
    def __init__(self, where: str):
        self.where = where
        self.ops = 0
        self.tuple_items = 0
        self.buckets: dict[int, list[Any]] = {}
        self.sizes: dict[int, tuple[tuple, int]] = {}  # id of a followed tuple -> (it, items)
        self.persistent_ids: list[Any] = []  # what BINPERSID / PERSID referred to (torch: its storages)
        self.globals: set[str] = set()  # what GLOBAL / STACK_GLOBAL named

    def run(self, stream: io.BytesIO) -> None:
        stack: list[Any] = []
        marks: list[int] = []
        memo: dict[Any, Any] = {}
        for op, arg, _ in pickletools.genops(stream):
            self.ops += 1
            if self.ops > MAX_OPS:
                self._refuse(f"has more than {MAX_OPS:,} opcodes")
            name = op.name
            if name == "STOP":
                return
            if name == "MARK":
                marks.append(len(stack))
                if len(marks) > MAX_DEPTH:
                    self._refuse(f"nests more than {MAX_DEPTH:,} levels")
            elif name in _PUTS or name == "MEMOIZE":
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1] if stack else _Opaque()
            elif name in _GETS:
                stack.append(memo.get(arg, _Opaque()))
            else:
                self._apply(op, arg, stack, marks)

    def _apply(self, op, arg: Any, stack: list, marks: list[int]) -> None:
        name = op.name
        if name in _VALUE_OPS:
            value = arg
        elif name in _CONSTANTS:
            value = _CONSTANTS[name]
        elif name == "GLOBAL":
            value = _Global(str(arg).replace(" ", "."))
            self.globals.add(value)
        elif name == "STACK_GLOBAL":
            module, qualname = _pop(stack, 2)
            value = _Global(f"{module}.{qualname}") if isinstance(module, str) and isinstance(qualname, str) \
                else _Opaque()
            if isinstance(value, _Global):
                self.globals.add(value)
        elif name in _TUPLES or name == "TUPLE":
            value = self._tuple(_pop(stack, _TUPLES[name]) if name in _TUPLES else _pop_to_mark(stack, marks))
        elif name == "REDUCE":
            func, args = _pop(stack, 2)
            value = _call(func, args)
        elif name in ("BINPERSID", "PERSID"):
            pid = arg if name == "PERSID" else _pop(stack, 1)[0]
            self.persistent_ids.append(pid)
            value = _Opaque()
        else:
            has_mark, pops, pushes = _effect(op)
            if has_mark:
                _pop_to_mark(stack, marks)
            _pop(stack, pops)
            stack.extend(_Opaque() for _ in range(pushes))
            return
        if not isinstance(value, (_Opaque, _Global)):
            self._seen(value)
        stack.append(value)

    def _items(self, value: Any) -> int:
        if isinstance(value, _Opaque):
            return value.items
        if isinstance(value, tuple):
            return self.sizes[id(value)][1] if id(value) in self.sizes else 1 + len(value)
        return 1

    def _tuple(self, items: list) -> Any:
        size, opaque = 1, False
        for i in items:
            if isinstance(i, _Opaque):
                size, opaque = size + i.items, True
            else:
                size += self._items(i)
        self.tuple_items += size
        if self.tuple_items > MAX_TUPLE_ITEMS:
            self._refuse(f"builds tuples of more than {MAX_TUPLE_ITEMS:,} items in all (nested through its memo)")
        if opaque:
            return _Opaque(size)
        value = tuple(items)
        self.sizes[id(value)] = (value, size)
        return value

    def _seen(self, value: Any) -> None:
        if type(value) in (str, bytes) and _RANDOMIZED:
            return  # their hashes are salted per process: a file cannot make them collide
        try:
            h = hash(value)
        except TypeError:
            return
        bucket = self.buckets.get(h)
        if bucket is None:
            self.buckets[h] = [value]
            return
        for v in bucket:
            if type(v) is type(value) and v == value:
                return
        bucket.append(value)
        if len(bucket) > MAX_SAME_HASH:
            self._refuse(f"holds {len(bucket)} different values with one hash (a stream built to make loading "
                         "take hours)")

    def _refuse(self, what: str):
        raise BadInputError(f"{self.where}: the pickle {what}; refused")


_EFFECTS: dict[str, tuple[bool, int, int]] = {}


def _effect(op) -> tuple[bool, int, int]:
    """(pops to a mark, items popped below it, items pushed) of an opcode, from pickletools' description."""
    effect = _EFFECTS.get(op.name)
    if effect is None:
        before = list(op.stack_before)
        has_mark = pickletools.markobject in before
        if has_mark:
            before = before[: before.index(pickletools.markobject)]
        effect = _EFFECTS[op.name] = (has_mark, len(before), len(op.stack_after))
    return effect


def _call(func: Any, args: Any) -> Any:
    if isinstance(func, _Global) and func in _HASHABLE_CALLS and isinstance(args, tuple):
        try:
            if func.endswith("complex") and all(type(a) in (int, float) for a in args) and len(args) <= 2:
                return complex(*args)
            if func == "torch.Size" and len(args) == 1 and isinstance(args[0], tuple):
                return args[0]  # hashes as the tuple it wraps
        except (TypeError, ValueError, OverflowError):
            pass
    return _Opaque()


def _pop(stack: list, n: int) -> list:
    if n == 0:
        return []
    items = stack[-n:] if len(stack) >= n else [_Opaque()] * (n - len(stack)) + stack[:]
    del stack[-n:]
    return items


def _pop_to_mark(stack: list, marks: list[int]) -> list:
    at = marks.pop() if marks else 0
    items = stack[at:]
    del stack[at:]
    return items
