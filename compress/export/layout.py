"""Replace each decode placeholder by the real decode, with the layout ops that follow it on the indices.

Reordering, slicing, concatenating, transposing or reshaping a decoded weight is the same as doing it
to its flat index (the index into the flattened codebook, each row's codebook-row offset included)
and gathering afterwards: `layout(codebook[index]) == codebook[layout(index)]`. So a chain

    Decode(w) -> Slice/Concat/Transpose/... -> consumer (LSTM, MatMul, Conv, ...)

is written as

    index(w) -> the same Slice/Concat/Transpose/... on int32 indices -> Gather(codebook) -> consumer

and what is stored stays the codebook and the packed indices, whatever the exporter did to the weight
(an LSTM's gate reordering, a transposed or reshaped copy, a weight and its transpose both used).
A Concat of several decoded weights gathers from their codebooks concatenated (each index shifted by
the codebooks before it). Ops that are not pure layout (a scale, a BatchNorm) run after the gather.
Placeholders inside subgraphs (If/Loop/Scan bodies) are decoded in place.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import onnx
from onnx import helper

from . import graph as _graph
from ._decode import Constants, Decoder
from .trace import is_placeholder, placeholder_tensor

# op type -> which inputs carry the weight (None: all); every other input must be a constant
LAYOUT_OPS: dict[str, tuple[int, ...] | None] = {
    "Transpose": (0,), "Reshape": (0,), "Flatten": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Identity": (0,),
    "Expand": (0,), "Tile": (0,), "Slice": (0,), "Split": (0,), "Gather": (0,), "Concat": None,
}


@dataclass
class Placement:
    """What `replace_placeholders` did: per tensor the layout ops moved onto its indices; the values
    its gathers produce (weights, or layouts of them, read by the rest of the graph)."""

    moved: dict[str, list[str]] = field(default_factory=dict)
    gathered: dict[str, list[str]] = field(default_factory=dict)  # value -> the tensors it is gathered from


def replace_placeholders(model: onnx.ModelProto, decoders: dict[str, Decoder], namer, consts: Constants
                         ) -> Placement:
    """Decode every placeholder of `model` (in place).

    Only tensors that appear in a placeholder get their codebook and index initializers added.
    """
    g = model.graph
    used: set[str] = set()
    placement = _Rewrite(g, decoders, namer, consts, used).run()
    for node in _graph.all_nodes(g):
        for sub in _graph.subgraphs(node):
            _decode_in_place(sub, decoders, namer, consts, used)
    for name, dec in decoders.items():
        if name in used:
            g.initializer.extend(dec.initializers())
    return placement


class _Rewrite:
    """One pass over the top graph: which values are index-space, what is gathered where."""

    def __init__(self, g: onnx.GraphProto, decoders: dict[str, Decoder], namer, consts: Constants, used: set[str]):
        self.g, self.decoders, self.namer, self.consts, self.used = g, decoders, namer, consts, used
        self.constant = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
        self.parent: dict[str, str] = {}  # union-find over tensors joined by a Concat
        self.source: dict[str, str] = {}  # index-space value -> a tensor of its region
        self.members: dict[str, set[str]] = {}  # index-space value -> the tensors it is computed from
        self.nodes = list(g.node)  # one wrapper per node: positions index `pushed`
        self.pushed: set[int] = set()  # positions of the layout ops moved onto indices
        self.moved: dict[str, list[str]] = defaultdict(list)

    def run(self) -> Placement:
        self._mark()
        exits = self._exits()
        regions = self._regions()
        tables, bases, head = self._tables(regions)
        index_of: dict[str, str] = {}  # value -> its index-space name
        by_tensor: dict[str, str] = {}
        out = list(head)
        for pos, node in enumerate(self.nodes):
            if is_placeholder(node):
                tensor = placeholder_tensor(node)
                if tensor not in by_tensor:
                    by_tensor[tensor] = self.decoders[tensor].index(out, self.consts, self.namer, bases[tensor])
                    self.used.add(tensor)
                index_of[node.output[0]] = by_tensor[tensor]
            elif pos in self.pushed:
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                copy.name = ""
                for i, name in enumerate(copy.input):
                    if name in index_of and self._is_data(node, i):
                        copy.input[i] = index_of[name]
                for i, name in enumerate(node.output):
                    index_of[name] = copy.output[i] = self.namer("d")
                out.append(copy)
            else:
                out.append(node)
                continue
            for name in node.output:
                if name in exits:
                    root = self._find(self.source[name])
                    self.decoders[root].lookup(tables[root], index_of[name], name, out, self.consts, self.namer)
        del self.g.node[:]
        self.g.node.extend(out)
        return Placement(dict(self.moved), {v: sorted(self.members[v]) for v in exits})

    def _mark(self) -> None:
        for pos, node in enumerate(self.nodes):
            if is_placeholder(node):
                tensor = placeholder_tensor(node)
                self.parent.setdefault(tensor, tensor)
                self.source[node.output[0]] = tensor
                self.members[node.output[0]] = {tensor}
            elif self._pushable(node):
                self.pushed.add(pos)
                data = [n for i, n in enumerate(node.input) if self._is_data(node, i)]
                root = self._find(self.source[data[0]])
                for name in data[1:]:
                    self.parent[self._find(self.source[name])] = root
                members = set().union(*(self.members[n] for n in data))
                for name in node.output:
                    self.source[name], self.members[name] = root, members
                for tensor in sorted(members):
                    self.moved[tensor].append(node.op_type)

    def _pushable(self, node: onnx.NodeProto) -> bool:
        if node.op_type not in LAYOUT_OPS or node.domain not in ("", "ai.onnx"):
            return False
        data = [n for i, n in enumerate(node.input) if self._is_data(node, i)]
        rest = [n for i, n in enumerate(node.input) if n and not self._is_data(node, i)]
        if not data or not all(n in self.source and self.decoders[self.source[n]].elementwise for n in data):
            return False
        return all(n in self.constant and n not in self.source for n in rest)

    @staticmethod
    def _is_data(node: onnx.NodeProto, i: int) -> bool:
        slots = LAYOUT_OPS.get(node.op_type, ())
        return slots is None or i in slots

    def _exits(self) -> set[str]:
        """Index-space values something other than a moved layout op reads: gathered there."""
        out = set()
        for pos, node in enumerate(self.nodes):
            moved = pos in self.pushed
            for i, name in enumerate(node.input):
                if name in self.source and not (moved and self._is_data(node, i)):
                    out.add(name)
            for sub in _graph.subgraphs(node):
                out.update(n for n in _graph.used_names(sub) if n in self.source)
        out.update(o.name for o in self.g.output if o.name in self.source)
        return out

    def _find(self, tensor: str) -> str:
        while self.parent[tensor] != tensor:
            self.parent[tensor] = self.parent[self.parent[tensor]]
            tensor = self.parent[tensor]
        return tensor

    def _regions(self) -> dict[str, list[str]]:
        regions: dict[str, list[str]] = defaultdict(list)
        for tensor in self.parent:  # insertion order: first placeholder first
            regions[self._find(tensor)].append(tensor)
        return regions

    def _tables(self, regions: dict[str, list[str]]) -> tuple[dict[str, str], dict[str, int], list]:
        """Per region its table (one codebook, or several concatenated); per tensor its index shift."""
        tables, bases, nodes = {}, {}, []
        for root, members in regions.items():
            names, base = [], 0
            for tensor in members:
                dec = self.decoders[tensor]
                bases[tensor] = base
                base += dec.cb.codebook.numel()
                names.append(dec.table(nodes, self.namer))
            if len(names) == 1:
                tables[root] = names[0]
            else:
                tables[root] = self.namer("d")
                nodes.append(helper.make_node("Concat", names, [tables[root]], axis=0))
        return tables, bases, nodes


def _decode_in_place(sub: onnx.GraphProto, decoders: dict[str, Decoder], namer, consts: Constants,
                     used: set[str]) -> None:
    out = []
    for node in sub.node:
        if not is_placeholder(node):
            out.append(node)
            continue
        tensor = placeholder_tensor(node)
        dec = decoders[tensor]
        used.add(tensor)
        table = dec.table(out, namer)
        dec.lookup(table, dec.index(out, consts, namer), node.output[0], out, consts, namer)
    del sub.node[:]
    sub.node.extend(out)
    for node in sub.node:
        for deeper in _graph.subgraphs(node):
            _decode_in_place(deeper, decoders, namer, consts, used)
