"""What a `.pt2`'s JSON may say, checked before torch turns it into code.

torch 2.13's deserializer runs code built from strings in `models/*.json` without checking them:
`sympy.sympify` evaluates every `expr_str` (a Python expression), the FX code generator pastes
placeholder names, attribute paths and keyword names into the `forward` it `exec`s while loading,
and `program.module()` `exec`s `guards_code`. A crafted file can therefore run code with no pickle
involved (seen: a placeholder named `x=__import__('os').system(...)` ran on `torch.export.load`).

So every string is checked by what it is used for: names must be plain identifiers or dotted
paths, `expr_str` must parse to a sympy expression built only from known sympy classes, numbers
and symbols, `guards_code` only to shape comparisons on `L[...]` inputs. Free-text metadata
(stack traces, module stacks, string arguments that codegen writes with `repr`) is left alone.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from ...errors import BadInputError, UnsafePickleError
from .pickle import TRUST_HINT

_NAME = re.compile(r"[A-Za-z0-9_.:#\-]*\Z")
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\Z|[+-]?(inf|nan)\Z")
_BARE_SYMBOL = re.compile(r"[a-z]{1,4}\d+\Z")
_FREE_TEXT = {"stack_trace", "nn_module_stack", "torch_fn", "source_fn_stack", "custom", "from_node",
              "torch_version", "as_string", "as_strings", "doc_string"}
_TREESPEC = {"in_spec", "out_spec"}
_MAX_EXPR = 10_000
_MAX_INT = 1 << 63
_MAX_EXPONENT = 64
_MAX_KEYWORD = 1024

_SYMPY_CALLS = {
    "Symbol", "Dummy", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
    "floor", "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality",
    "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "And", "Or", "Not", "Piecewise",
    "ExprCondPair", "Tuple", "IntInfinity", "NegativeIntInfinity",
    # torch.utils._sympy.functions, as listed by the deserializer
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
    "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
    "ToFloat", "Identity",
}
_SYMPY_CONSTANTS = {"oo", "zoo", "nan", "true", "false", "pi", "E", "I", "int_oo", "True", "False"}
_POW_CALLS = {"Pow", "PowByNatural", "FloatPow"}
_GUARD_METHODS = {"size", "stride", "storage_offset", "dim", "numel"}
_GUARD_CALLS = {"Max", "Min", "Abs", "FloorDiv", "Mod", "PythonMod", "CeilToInt", "FloorToInt",
                "IntTrueDiv", "FloatTrueDiv", "ToFloat", "TruncToInt", "sym_max", "sym_min", "int", "float"}
_MATH_CALLS = {"floor", "ceil", "trunc", "sqrt"}
_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd, ast.Not,
        ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)


class _Refused(Exception):
    """A string that failed a check; the caller turns it into an error naming the file."""


class _Growing(_Refused):
    """An expression that is code-free but would grow without bound when sympy evaluates it."""


def _error(e: _Refused, where: str) -> BadInputError:
    if isinstance(e, _Growing):
        return BadInputError(f"{where}: {e} would grow without bound when evaluated (an exponent must be a literal "
                             "of at most 64 or one symbol, a power's base holds no other power, a precision is at "
                             "most 1024); refused")
    return UnsafePickleError(f"{where}: {e} could run code when loaded; refused; ", *TRUST_HINT)


def check_json_text(text: str | bytes, where: str) -> Any:
    """Parse one JSON entry of a `.pt2` and check every string in it; returns the parsed object."""
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BadInputError(f"{where}: not valid JSON ({type(e).__name__}: {str(e)[:120]})") from e
    try:
        _walk(obj, None)
    except _Refused as e:
        raise _error(e, where) from None
    except RecursionError:
        raise BadInputError(f"{where}: JSON nested too deeply; refused") from None
    return obj


def check_sym_expr(text: str, where: str) -> None:
    """Refuse an `expr_str` that is not a plain sympy expression (sympify would evaluate it as Python)."""
    try:
        _check_expr(text)
    except _Refused as e:
        raise _error(e, where) from None


def check_guard(text: str, where: str) -> None:
    """Refuse a `guards_code` line that is not a comparison of input shapes."""
    try:
        _check_guard(text)
    except _Refused as e:
        raise _error(e, where) from None


def check_name(text: str, what: str, where: str) -> None:
    """Refuse a name that FX would paste into generated code unless it is a plain (dotted) name."""
    if not isinstance(text, str) or not _NAME.match(text):
        raise UnsafePickleError(f"{where}: {what} {str(text)[:80]!r} could run code when loaded; refused; ",
                            *TRUST_HINT)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _walk(obj: Any, key: str | None) -> None:
    if key in _FREE_TEXT:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if key == "range_constraints":
                _check_expr(k)
            elif not _NAME.match(k):
                raise _Refused(f"the key {k[:80]!r}")
            _walk(v, k)
    elif isinstance(obj, list):
        for v in obj:
            _walk(v, key)
    elif isinstance(obj, str):
        _check_string(obj, key)


def _check_string(text: str, key: str | None) -> None:
    if key == "expr_str":
        _check_expr(text)
    elif key == "guards_code":
        _check_guard(text)
    elif key in _TREESPEC:
        _check_treespec(text)
    elif not _NAME.match(text):
        raise _Refused(f"the {key or 'string'} {text[:80]!r}")


def _check_treespec(text: str) -> None:
    try:
        spec = json.loads(text)
    except ValueError:
        raise _Refused(f"the pytree spec {text[:80]!r}") from None
    _walk_treespec(spec)


def _walk_treespec(node: Any) -> None:
    if isinstance(node, list):
        for v in node:
            _walk_treespec(v)
    elif isinstance(node, dict):
        for k, v in node.items():
            if k == "context" and isinstance(v, str):
                try:
                    _walk(json.loads(v), None)
                except ValueError:
                    raise _Refused(f"the pytree context {v[:80]!r}") from None
            else:
                _walk_treespec(v)
    elif isinstance(node, str) and not _NAME.match(node):
        raise _Refused(f"the pytree entry {node[:80]!r}")


def _parse(text: str, what: str) -> ast.expr:
    if len(text) > _MAX_EXPR:
        raise _Refused(f"the {what} of {len(text)} characters")
    try:
        return ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise _Refused(f"the {what} {text[:80]!r}") from None


def _check_expr(text: str) -> None:
    node = _parse(text, "symbolic expression")
    try:
        _expr_node(node)
    except _Refused as e:
        raise type(e)(f"the symbolic expression {text[:80]!r}") from None
    except RecursionError:
        raise _Refused(f"the symbolic expression {text[:80]!r} (nested too deeply)") from None


def _expr_node(node: ast.AST) -> None:
    if isinstance(node, ast.Constant):
        _constant(node.value)
    elif isinstance(node, ast.Name):
        if node.id not in _SYMPY_CONSTANTS and not _BARE_SYMBOL.match(node.id):
            raise _Refused(node.id)
    elif isinstance(node, ast.Call):
        _expr_call(node)
    else:
        _operators(node, _expr_node)


def _expr_call(node: ast.Call) -> None:
    if not isinstance(node.func, ast.Name) or node.func.id not in _SYMPY_CALLS:
        raise _Refused("call")
    name = node.func.id
    for i, arg in enumerate(node.args):
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            pattern = _SYMBOL if name in ("Symbol", "Dummy") else _FLOAT
            if i != 0 or name not in ("Symbol", "Dummy", "Float") or not pattern.match(arg.value):
                raise _Refused("string")
        else:
            _expr_node(arg)
    for kw in node.keywords:
        plain = isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, (bool, int))
        if kw.arg is None or not plain:
            raise _Refused("keyword")
        if not isinstance(kw.value.value, bool) and abs(kw.value.value) > _MAX_KEYWORD:
            raise _Growing("keyword")  # precision=10**9 would make every Float operation a bignum one
    if name in ("Integer", "Rational") and any(_literal_int(a) is None for a in node.args):
        raise _Refused("number")
    if name in _POW_CALLS or name == "LShift":
        if len(node.args) != 2:
            raise _Refused("power")
        _power(node.args[0], node.args[1])


def _operators(node: ast.AST, inner) -> None:
    """Arithmetic, comparisons and boolean logic over operands checked by `inner`."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, _OPS):
        if isinstance(node.op, ast.Pow):
            _power(node.left, node.right)
        inner(node.left)
        inner(node.right)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, _OPS):
        inner(node.operand)
    elif isinstance(node, ast.BoolOp) and isinstance(node.op, _OPS):
        for v in node.values:
            inner(v)
    elif isinstance(node, ast.Compare) and all(isinstance(op, _OPS) for op in node.ops):
        inner(node.left)
        for v in node.comparators:
            inner(v)
    else:
        raise _Refused(type(node).__name__)


def _constant(value: Any) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return
    if isinstance(value, int) and abs(value) <= _MAX_INT:
        return
    raise _Refused("constant")


def _power(base: ast.AST, exponent: ast.AST) -> None:
    # sympy evaluates powers of numbers eagerly and simplifies before it evaluates: `2**(s77 - s77 + 10**18)`
    # becomes 2**(10**18), `((2**64)**64)**64` a number of 2**18 bits per level. So an exponent is a literal
    # of at most 64 or one bare symbol (nothing that can cancel), and a base holds no other power: the
    # largest number an expression can make is then 64 times the digits written in it.
    if _has_power(base):
        raise _Growing("nested power")
    if _bare_symbol(exponent):
        return
    value = _literal_int(exponent)
    if value is None or abs(value) > _MAX_EXPONENT:
        raise _Growing("exponent")


def _has_power(node: ast.AST) -> bool:
    return any(isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.Pow) or _calls(sub, (*_POW_CALLS, "LShift"))
               for sub in ast.walk(node))


def _bare_symbol(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return bool(_BARE_SYMBOL.match(node.id))
    return _calls(node, ("Symbol", "Dummy"))


def _literal_int(node: ast.AST) -> int | None:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _literal_int(node.operand)
        return None if inner is None else (-inner if isinstance(node.op, ast.USub) else inner)
    if _calls(node, ("Integer", "Rational")):
        values = [_literal_int(a) for a in node.args]
        return None if None in values or not values else max(values, key=abs)
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    return None


def _calls(node: ast.AST, names: tuple[str, ...]) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names


def _check_guard(text: str) -> None:
    node = _parse(text, "guard")
    try:
        _guard_node(node)
    except _Refused as e:
        raise type(e)(f"the guard {text[:80]!r}") from None
    except RecursionError:
        raise _Refused(f"the guard {text[:80]!r} (nested too deeply)") from None


def _guard_node(node: ast.AST) -> None:
    if isinstance(node, ast.Constant):
        _constant(node.value)
    elif isinstance(node, ast.Subscript):
        _guard_subscript(node)
    elif isinstance(node, ast.Call):
        _guard_call(node)
    else:
        _operators(node, _guard_node)


def _guard_subscript(node: ast.Subscript) -> None:
    key = node.slice
    if not (isinstance(key, ast.Constant) and type(key.value) in (int, str)):
        raise _Refused("subscript")
    if isinstance(key.value, str) and not _NAME.match(key.value):
        raise _Refused("subscript")
    if isinstance(node.value, ast.Name) and node.value.id == "L":
        return
    if isinstance(node.value, (ast.Subscript, ast.Call)):
        _guard_node(node.value)
        return
    raise _Refused("subscript")


def _guard_call(node: ast.Call) -> None:
    if node.keywords:
        raise _Refused("keyword")
    func = node.func
    if isinstance(func, ast.Attribute) and func.attr in _GUARD_METHODS:
        if not isinstance(func.value, (ast.Subscript, ast.Call)):
            raise _Refused("method")
        _guard_node(func.value)
    elif isinstance(func, ast.Attribute) and func.attr in _MATH_CALLS:
        if not (isinstance(func.value, ast.Name) and func.value.id == "math"):
            raise _Refused("call")
    elif not (isinstance(func, ast.Name) and func.id in _GUARD_CALLS):
        raise _Refused("call")
    for arg in node.args:
        _guard_node(arg)
