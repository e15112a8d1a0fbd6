"""The merged model as a file: a `.pt2` program with the input's dynamic dimensions, or a state_dict."""

from __future__ import annotations

import io

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..export.trace import quiet_exporter

_STATIC = object()  # "export without dynamic dimensions"


def serialize(model: nn.Module, examples: tuple | None, program=None) -> tuple[bytes, bool | None]:
    """The merged model as `.pt2` bytes (with the input's dynamic dimensions) or a state_dict."""
    buf = io.BytesIO()
    if examples is None:
        torch.save(model.state_dict(), buf)
        return buf.getvalue(), None
    dims = _dynamic_shapes(program, examples)
    try:
        with quiet_exporter():
            exported = torch.export.export(model, tuple(examples), dynamic_shapes=dims)
    except Exception as e:  # torch's own message says which guard or op failed
        if program is not None or dims is None:
            raise UnsupportedModelError(f"torch.export failed on the merged model: {str(e).splitlines()[0]}") from e
        # a module (not a program) may pin its batch size: export it static; the report says so
        return serialize(model, examples, program=_STATIC)
    for node in exported.graph.nodes:
        # provenance of the re-traced program's nodes: debug text only, and io.load refuses it
        node.meta.pop("from_node", None)
    torch.export.save(exported, buf)
    return buf.getvalue(), dims is not None


def _dynamic_shapes(program, examples: tuple) -> tuple | None:
    """The first dimension of each input, dynamic with the input program's range (a module: batch >= 1)."""
    if program is _STATIC:
        return None
    if program is None:
        first = examples[0].shape[0] if examples[0].ndim else None
        batch = torch.export.Dim("batch", min=1)
        return tuple({0: batch} if t.ndim and t.shape[0] == first else None for t in examples)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    dims, by_symbol = [], {}
    for name in program.graph_signature.user_inputs:
        val = placeholders[name].meta.get("val")
        size = val.shape[0] if isinstance(val, torch.Tensor) and val.ndim else None
        if not isinstance(size, torch.SymInt):
            dims.append(None)
            continue
        expr = size.node.expr
        if expr not in by_symbol:
            r = program.range_constraints.get(expr)
            upper = _finite_int(None if r is None else r.upper)
            lower = 1 if r is None else max(1, int(r.lower))
            by_symbol[expr] = torch.export.Dim(f"batch{len(by_symbol) or ''}", min=lower, max=upper)
        dims.append({0: by_symbol[expr]})
    return tuple(dims) if by_symbol and len(dims) == len(examples) else None


def _finite_int(value) -> int | None:
    """A range bound as an int, or None for torch's unbounded `int_oo`."""
    import sympy

    return int(value) if isinstance(value, (int, sympy.Integer)) else None
