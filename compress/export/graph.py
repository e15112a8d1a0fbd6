"""ONNX graph plumbing for the exporters: dead-code removal, renaming uses, content deduplication of
initializers, and saving with external data.

Works on `onnx.ModelProto` in place. Names used inside subgraphs (If/Loop/Scan bodies) count as uses.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EXTERNAL_MIN_BYTES = 1024  # tensors smaller than this stay inside the .onnx file


# --- small helpers -------------------------------------------------------------------------------

def tensor_bytes(t: TensorProto) -> bytes:
    """The tensor's data as bytes (raw_data, or the typed fields converted)."""
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.to_array(t).tobytes()


def data_size(t: TensorProto) -> int:
    """Bytes of data a tensor stores (inline or external)."""
    if t.data_location == TensorProto.EXTERNAL:
        return int({e.key: e.value for e in t.external_data}.get("length", 0))
    return len(tensor_bytes(t))


def numel(t: TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for g in subgraphs(node):
            yield from all_nodes(g)


def used_names(graph: onnx.GraphProto) -> dict[str, int]:
    """How many times each value name is read (node inputs at any depth, graph outputs)."""
    uses: dict[str, int] = defaultdict(int)
    for node in all_nodes(graph):
        for name in node.input:
            if name:
                uses[name] += 1
    for out in graph.output:
        uses[out.name] += 1
    return uses


def rename_uses(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Read `mapping[name]` wherever a node (at any depth) reads `name`; graph outputs keep their names."""
    if not mapping:
        return
    for node in all_nodes(graph):
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
    for out in graph.output:
        if out.name in mapping:
            graph.node.append(helper.make_node("Identity", [mapping[out.name]], [out.name]))


def eliminate_dead(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nobody reads, and unread initializers (top-level graph)."""
    while True:
        uses = used_names(graph)
        keep = [n for n in graph.node if any(uses.get(o) for o in n.output if o)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    uses = used_names(graph)
    inputs = {i.name for i in graph.input}  # an initializer listed as an input is its default value: keep it
    inits = [t for t in graph.initializer if uses.get(t.name) or t.name in inputs]
    if len(inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(inits)
    names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    vis = [v for v in graph.value_info if v.name in names]
    del graph.value_info[:]
    graph.value_info.extend(vis)


def strip_debug_metadata(model: onnx.ModelProto) -> None:
    """Drop per-node and per-value debug metadata (the exporter's stack traces, FX node text, name
    scopes) and value infos that repeat an initializer's own type and shape.

    It can outweigh the weights of a small model and leaks local paths; the model-level metadata stays.
    """
    for node in all_nodes(model.graph):
        del node.metadata_props[:]
        node.doc_string = ""
    g = model.graph
    inits = {t.name for t in g.initializer}
    kept = [v for v in g.value_info if v.name not in inits]
    del g.value_info[:]
    g.value_info.extend(kept)
    for v in [*g.value_info, *g.input, *g.output]:
        del v.metadata_props[:]
    for t in g.initializer:
        del t.metadata_props[:]


class Namer:
    """Fresh value names that collide with nothing in the model."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.taken = {t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
        for node in all_nodes(g):
            self.taken.update(node.input)
            self.taken.update(node.output)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


# --- content deduplication -------------------------------------------------------------------------

def _key(t: TensorProto, data: bytes) -> tuple:
    return (t.data_type, tuple(t.dims), hashlib.sha256(data).digest())


def dedup_initializers(model: onnx.ModelProto, protected: Iterable[str] = ()
                       ) -> tuple[int, int, dict[str, str]]:
    """Keep one initializer per distinct (dtype, shape, bytes); others read the kept one.

    Then replace 2-D float initializers equal to another's transpose with a Transpose node.
    Returns (tensors removed, data bytes saved, {removed name: the name it now reads}).
    """
    g = model.graph
    protected = set(protected)
    kept: dict[tuple, TensorProto] = {}
    mapping: dict[str, str] = {}
    saved = 0
    for t in g.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            continue
        data = tensor_bytes(t)
        first = kept.setdefault(_key(t, data), t)
        if first is not t and t.name not in protected and tensor_bytes(first) == data:
            mapping[t.name] = first.name
            saved += len(data)
    rename_uses(g, mapping)
    eliminate_dead(g)
    transposed, more = _dedup_transposed(model, protected)
    return len(mapping) + len(transposed), saved + more, {**mapping, **transposed}


_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


def _dedup_transposed(model: onnx.ModelProto, protected: set[str]) -> tuple[dict[str, str], int]:
    g = model.graph
    by_key: dict[tuple, TensorProto] = {}
    candidates = [t for t in g.initializer if t.data_type in _FLOATS and len(t.dims) == 2
                  and t.HasField("raw_data") and len(t.raw_data) >= 256]
    for t in candidates:
        by_key.setdefault(_key(t, t.raw_data), t)
    nodes, removed, saved = [], {}, 0
    for t in candidates:
        if t.name in removed or t.name in protected:
            continue
        arr = numpy_helper.to_array(t)
        tr = np.ascontiguousarray(arr.T)
        probe = TensorProto(data_type=t.data_type, dims=list(tr.shape))
        other = by_key.get(_key(probe, tr.tobytes()))
        if other is None or other is t or other.name in removed:
            continue
        nodes.append(helper.make_node("Transpose", [other.name], [t.name], perm=[1, 0]))
        removed[t.name] = other.name
        saved += len(t.raw_data)
    if not nodes:
        return {}, 0
    inits = [t for t in g.initializer if t.name not in removed]
    del g.initializer[:]
    g.initializer.extend(inits)
    for n in reversed(nodes):
        g.node.insert(0, n)
    return removed, saved


# --- saving --------------------------------------------------------------------------------------

def save(model: onnx.ModelProto, onnx_tmp: Path, data_tmp: Path | None, data_location: str | None) -> None:
    """Serialize `model` to `onnx_tmp`; with `data_tmp`, large tensors go there as external data.

    `data_location` is the final file name of the data file (relative to the model's folder), which
    is what the model records; the bytes are written to `data_tmp` (renamed onto it by the caller).
    """
    if data_tmp is None:
        onnx_tmp.write_bytes(model.SerializeToString())
        return
    offset = 0
    with open(data_tmp, "wb") as f:
        for t in _tensors(model.graph):
            if not t.HasField("raw_data") or len(t.raw_data) < EXTERNAL_MIN_BYTES:
                continue
            pad = (-offset) % 64
            f.write(b"\0" * pad)
            offset += pad
            f.write(t.raw_data)
            t.data_location = TensorProto.EXTERNAL
            del t.external_data[:]
            for key, value in (("location", data_location), ("offset", offset), ("length", len(t.raw_data))):
                t.external_data.add(key=key, value=str(value))
            offset += len(t.raw_data)
            t.ClearField("raw_data")
    onnx_tmp.write_bytes(model.SerializeToString())


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose external initializers are graph inputs of the same type: checkable without the data."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    external = [t for t in g.initializer if t.data_location == TensorProto.EXTERNAL]
    names = {t.name for t in external}
    kept = [t for t in g.initializer if t.name not in names]
    del g.initializer[:]
    g.initializer.extend(kept)
    g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in external)
    return out


def _tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for node in all_nodes(graph):
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
