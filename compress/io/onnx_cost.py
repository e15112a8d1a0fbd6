"""What running an ONNX graph would cost, read from the graph before onnxruntime sees it.

Some nodes say how much they will allocate or how long they will loop with constants: a
`ConstantOfShape`, `Expand`, `Tile` or `Range` whose shape, repeats or bounds are constants, and a
`Loop` whose trip count is one. `check_run_cost` refuses a graph (main graph, subgraphs and
functions) in which one of them asks for more than the memory budget or more than `MAX_TRIPS`
iterations, so an obviously hostile file is refused in milliseconds; what constants cannot show
(a trip count computed from the input) is left to the child process's time and memory budget
(`compress.sandbox`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import BadInputError

MAX_TRIPS = 10_000_000
_MAX_CONSTANT = 64  # elements of a constant worth reading (shapes, bounds, trip counts)
_DEFAULT_ELEMENT = {"ConstantOfShape": 4}


def check_run_cost(model, path: Path, memory_bytes: int) -> None:
    """Refuse a graph whose constant-sized nodes would allocate more than `memory_bytes` or loop too long."""
    consts = _Constants(model)
    for node in _all_nodes(model):
        if node.domain not in ("", "ai.onnx"):
            continue
        op = node.op_type
        label = f"{path}: {op} node {(node.name or (node.output[0] if node.output else ''))[:80]!r}"
        if op == "Loop" and node.input and node.input[0]:
            trips = consts.ints(node.input[0])
            if trips is not None and trips and trips[0] > MAX_TRIPS:
                raise BadInputError(f"{label} loops {trips[0]:,} times (more than {MAX_TRIPS:,}); refused")
        elements = _elements(op, node, consts)
        if elements is not None:
            size = elements * _element_bytes(node)
            if size > memory_bytes:
                raise BadInputError(f"{label} would allocate {size:,} bytes, more than the {memory_bytes >> 20} MiB "
                                    "budget for running this model; refused")


def _elements(op: str, node, consts: _Constants) -> int | None:
    """A lower bound on the elements the node makes, when constants say it (else None)."""
    if op in ("ConstantOfShape", "Expand") and len(node.input) >= (1 if op == "ConstantOfShape" else 2):
        shape = consts.ints(node.input[0 if op == "ConstantOfShape" else 1])
        return math.prod(max(d, 0) for d in shape) if shape is not None else None
    if op == "Tile" and len(node.input) >= 2:
        repeats = consts.ints(node.input[1])
        return math.prod(max(r, 0) for r in repeats) if repeats is not None else None
    if op == "Range" and len(node.input) >= 3:
        start, limit, delta = (consts.numbers(n) for n in node.input[:3])
        if None in (start, limit, delta) or not delta[0]:
            return None
        return max(math.ceil((limit[0] - start[0]) / delta[0]), 0)
    return None


def _element_bytes(node) -> int:
    for attr in node.attribute:
        if attr.name == "value" and attr.HasField("t"):
            from onnx import helper

            try:
                return int(np.dtype(helper.tensor_dtype_to_np_dtype(attr.t.data_type)).itemsize)
            except (KeyError, TypeError, ValueError):
                return 1
    return _DEFAULT_ELEMENT.get(node.op_type, 1)


class _Constants:
    """Small constant tensors of the model by name: initializers and `Constant` node outputs."""

    def __init__(self, model):
        self.tensors = {}
        for graph in _all_graphs(model):
            for init in graph.initializer:
                self.tensors.setdefault(init.name, init)
        for node in _all_nodes(model):
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value" and attr.HasField("t"):
                        self.tensors.setdefault(node.output[0], attr.t)
                    elif attr.name in ("value_int", "value_ints", "value_float", "value_floats"):
                        self.tensors.setdefault(node.output[0], attr)

    def numbers(self, name: str) -> list[float] | None:
        value = self.tensors.get(name)
        if value is None:
            return None
        if hasattr(value, "ints") and not hasattr(value, "dims"):  # a Constant's value_* attribute
            return list(value.ints) or list(value.floats) or [value.i if "int" in value.name else value.f]
        if math.prod(value.dims) > _MAX_CONSTANT or value.data_location == 1:
            return None
        from onnx import numpy_helper

        try:
            return [float(v) if isinstance(v, float) else v for v in numpy_helper.to_array(value).reshape(-1).tolist()]
        except (ValueError, TypeError, KeyError):
            return None

    def ints(self, name: str) -> list[int] | None:
        values = self.numbers(name)
        if values is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return None
        return values


def _all_graphs(model) -> Iterator:
    stack = [model.graph]
    for fn in model.functions:
        stack.extend(_subgraphs(fn.node))
    while stack:
        graph = stack.pop()
        yield graph
        stack.extend(_subgraphs(graph.node))


def _subgraphs(nodes) -> Iterator:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield attr.g
            yield from attr.graphs


def _all_nodes(model) -> Iterator:
    for fn in model.functions:
        yield from fn.node
    for graph in _all_graphs(model):
        yield from graph.node
