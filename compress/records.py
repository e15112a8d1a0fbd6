"""One base for every config and result that is written to or read from JSON.

A record is a dataclass deriving from `Record`. `to_dict()` turns it into plain JSON values (nested
records, lists, tuples, dicts, non-finite floats as strings); `from_dict(d, source=...)` builds it
back and is strict: an unknown key, a missing key, a wrong type or an unsupported `version` raises
`BadInputError` naming the source, the key path and what was expected. Types come from the
dataclass annotations; a field holding something JSON has no type for (a tensor) declares a
`codec(encode, decode)`.

    >>> @dataclass
    ... class Point(Record):
    ...     x: int
    ...     y: float = 0.0
    >>> Point.from_dict({"x": 1, "y": 2}).to_dict()
    {'x': 1, 'y': 2.0}
    >>> Point.from_dict({"x": "1"}, source="p.json")
    Traceback (most recent call last):
    ...
    compress.errors.BadInputError: p.json: 'x' must be an integer, got "1"
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass  # noqa: F401 (the doctest above uses it)
from pathlib import Path
from typing import Any, ClassVar

from .errors import BadInputError

_NONE = type(None)
_HINTS: dict[type, dict[str, Any]] = {}


def codec(encode: Callable[[Any], Any], decode: Callable[[Any, Mapping], Any]) -> dict:
    """Field metadata for a value JSON cannot hold as is: `decode(value, whole_dict)` rebuilds it."""
    return {"codec": (encode, decode)}


SKIP = {"skip": True}  # field metadata: not written by to_dict, not read by from_dict


class Record:
    """Base class of the toolkit's versioned dataclasses (configs, plans, reports, results).

    Class attributes a subclass may set:
        _what: how messages name it ("tie config", "plan").
        _derived: keys `to_dict` adds from properties, accepted and ignored by `from_dict`.
        _version_required: `from_dict` refuses a dict without `version` (results; configs default it).
        _version_hint: what to do about an unsupported version.
        _omit_none: `to_dict` leaves out fields whose value is None (sections that only apply sometimes).
    """

    _what: ClassVar[str] = "record"
    _derived: ClassVar[tuple[str, ...]] = ()
    _version_required: ClassVar[bool] = False
    _version_hint: ClassVar[str] = ""
    _omit_none: ClassVar[bool] = False

    def to_dict(self) -> dict:
        """Plain JSON values, fields in declaration order, then the derived keys."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("skip"):
                continue
            value = getattr(self, f.name)
            if value is None and self._omit_none:
                continue
            out[f.name] = f.metadata["codec"][0](value) if "codec" in f.metadata and value is not None \
                else plain(value)
        for key in self._derived:
            out[key] = plain(getattr(self, key))
        return out

    @classmethod
    def from_dict(cls, d: Any, *, source: str | None = None, path: str = ""):
        """Build from a dict, refusing unknown keys, missing keys, wrong types and other versions."""
        where = source or cls._what
        if not isinstance(d, Mapping):
            raise BadInputError(f"{where}: {_at(path)}expected a JSON object, got {_json(d)}")
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("skip")}
        for key in d:
            if key not in fields and key not in cls._derived:
                raise BadInputError(f"{where}: unknown key {_at(path, key)}; known keys: "
                                    f"{', '.join(sorted(fields))}")
        cls._check_version(d, where)
        hints = _hints(cls)
        kw = {}
        for name, f in fields.items():
            if name not in d:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise BadInputError(f"{where}: {_at(path) or cls._what + ' '}is missing {name!r}")
                continue
            sub = f"{path}.{name}" if path else name
            if "codec" in f.metadata and d[name] is not None:
                kw[name] = f.metadata["codec"][1](d[name], d)
            else:
                kw[name] = decode(hints[name], d[name], where, sub)
        cls._validate(kw, where)
        return cls(**kw)

    @classmethod
    def _check_version(cls, d: Mapping, where: str) -> None:
        field = next((f for f in dataclasses.fields(cls) if f.name == "version"), None)
        if field is None:
            return
        current = field.default
        if "version" not in d and not cls._version_required:
            return
        got = d.get("version")
        if got != current or isinstance(got, bool):
            hint = f"; {cls._version_hint}" if cls._version_hint else ""
            raise BadInputError(f"{where}: {cls._what} version {got!r} is not supported (this is version "
                                f"{current}){hint}")

    @classmethod
    def _validate(cls, kw: dict, where: str) -> None:
        """Check decoded values before construction, naming `where` (override in subclasses)."""

    def to_json(self) -> str:
        """Indented JSON (lists of numbers on one line), ending in a newline."""
        return json_text(self.to_dict())

    @classmethod
    def load(cls, path: str | Path):
        """Read a JSON file written by `save` (or by hand)."""
        return cls.from_dict(read_json(path), source=str(path))

    def save(self, path: str | Path, *, force: bool = True) -> Path:
        """Write `to_json()` atomically."""
        from .atomic import write_text_atomic

        return write_text_atomic(path, self.to_json(), force=force)


# --- encoding -------------------------------------------------------------------------------------

def plain(v: Any) -> Any:
    """`v` as JSON values: records as dicts, tuples as lists, non-finite floats as strings."""
    if isinstance(v, Record):
        return v.to_dict()
    if isinstance(v, Mapping):
        return {str(k) if not isinstance(k, str) else k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


# --- decoding -------------------------------------------------------------------------------------

def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)  # each class in the MRO with its own module's names
    return _HINTS[cls]


def decode(hint: Any, value: Any, where: str, path: str) -> Any:
    """`value` (from JSON) as the annotated type `hint`, or a BadInputError naming `path`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and _NONE in args:
            return None
        errors = []
        for arg in (a for a in args if a is not _NONE):
            try:
                return decode(arg, value, where, path)
            except BadInputError as e:
                errors.append(e)
        raise _wrong(where, path, hint, value)
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_dict(value, source=where, path=path)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _wrong(where, path, hint, value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise _wrong(where, path, hint, value)
            items = [decode(a, v, where, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            item = args[0] if args else Any
            items = [decode(item, v, where, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or hint) is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise _wrong(where, path, hint, value)
        kt, vt = args if args else (Any, Any)
        return {_key(kt, k, where, path): decode(vt, v, where, f"{path}[{k!r}]") for k, v in value.items()}
    return _scalar(hint, value, where, path)


def _scalar(hint: Any, value: Any, where: str, path: str) -> Any:
    if hint is _NONE:
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if value in ("inf", "-inf", "nan"):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"records cannot decode the annotation {hint!r} (at {path}); give the field a codec")
    raise _wrong(where, path, hint, value)


def _key(hint: Any, key: str, where: str, path: str) -> Any:
    if hint is int:
        try:
            return int(key)
        except ValueError:
            raise BadInputError(f"{where}: key {key!r} of {path!r} must be an integer") from None
    return key


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false", _NONE: "null",
          list: "a list", tuple: "a list", dict: "an object"}


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_type_name(a) for a in args))
    if isinstance(hint, type) and issubclass(hint, Record):
        return "an object"
    return _NAMES.get(origin or hint, getattr(hint, "__name__", str(hint)))


def _wrong(where: str, path: str, hint: Any, value: Any) -> BadInputError:
    return BadInputError(f"{where}: {path!r} must be {_type_name(hint)}, got {_json(value)}")


def _json(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _at(path: str, key: str | None = None) -> str:
    full = f"{path}.{key}" if path and key else (key or path)
    if key is not None:
        return repr(full)
    return f"{full!r} " if full else ""


# --- JSON text --------------------------------------------------------------------------------------

def json_text(obj: Any, indent: int = 2) -> str:
    """Indented JSON whose lists of numbers stay on one line (a codebook row is one line).

    >>> print(json_text({"centers": [[0.5, 1.0]], "name": "fc1.weight"}), end="")
    {
      "centers": [
        [0.5, 1.0]
      ],
      "name": "fc1.weight"
    }
    """
    return _dump(plain(obj), 0, indent) + "\n"


def _dump(obj: Any, level: int, indent: int) -> str:
    pad, inner = " " * (level * indent), " " * ((level + 1) * indent)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {_dump(v, level + 1, indent)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj and not all(isinstance(v, (int, float, str, bool, _NONE)) for v in obj):
        return "[\n" + ",\n".join(inner + _dump(v, level + 1, indent) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False)


def read_json(path: str | Path) -> Any:
    """A small JSON file (a config, a plan) that the user names; errors name the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BadInputError(f"{path}: is a folder, not a JSON file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"{path}: not valid JSON ({e})") from None


__all__ = ["SKIP", "Record", "codec", "decode", "json_text", "plain", "read_json"]
