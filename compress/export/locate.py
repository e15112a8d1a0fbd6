"""The fallback for merged tensors the tracer gave no placeholder: find their dense copies by value.

A merged tensor whose decode was not traced as `compress::decode` (a program whose decode pattern was
not recognised) reaches the ONNX graph as whatever the exporter made of it. Dense initializers equal to
its decoded value (as is, transposed or reshaped; exact bytes, never a guess) become placeholders
(with a Transpose / Reshape after them), so they are decoded like any other. One the exporter folded
into some other constant cannot be found: the report counts it as stored dense.

Alias targets without a codebook (dense ties) are stored once: the other copies read the first one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..codebook import Codebooks
from . import graph as _graph
from ._decode import onnx_float_type
from .trace import placeholder

FLOAT_TYPES = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16,
               TensorProto.DOUBLE: torch.float64, TensorProto.BFLOAT16: torch.bfloat16}


@dataclass
class Use:
    """An initializer of the exported graph holding a target's value: as is, transposed or reshaped."""

    init: str
    how: str  # "same" | "transpose" | "reshape"
    dims: list[int] | None = None  # the initializer's shape, for "reshape"


def locate_by_value(proto: onnx.ModelProto, codebooks: Codebooks, names: list[str],
                    dense_ties: dict[str, torch.Tensor], namer) -> None:
    """Turn dense copies of the merged tensors `names` into placeholders; store dense ties once (in place)."""
    index = _ValueIndex(proto.graph)
    claimed: set[str] = set()
    uses = {}
    for name in names:
        uses[name] = [u for u in index.find(codebooks.tensors[name].decode().detach()) if u.init not in claimed]
        claimed.update(u.init for u in uses[name])
    ties = {}
    for name, value in dense_ties.items():
        ties[name] = [u for u in index.find(value) if u.init not in claimed]
        claimed.update(u.init for u in ties[name])
    nodes = [n for name, found in uses.items() for n in _placeholders(name, found, namer)]
    removed = {u.init for found in uses.values() for u in found}
    for found in ties.values():
        tie_nodes = _tie_dense(found)
        nodes += tie_nodes
        removed |= {n.output[0] for n in tie_nodes}
    if removed:
        kept = [t for t in proto.graph.initializer if t.name not in removed]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
    for node in reversed(nodes):
        proto.graph.node.insert(0, node)


def _placeholders(name: str, uses: list[Use], namer) -> list[onnx.NodeProto]:
    if not uses:
        return []
    same = [u for u in uses if u.how == "same"]
    out = same[0].init if same else namer("d")
    nodes = [placeholder(name, out)]
    for use in uses:
        if use.init == out:
            continue
        if use.how == "same":
            nodes.append(helper.make_node("Identity", [out], [use.init]))
        elif use.how == "transpose":
            nodes.append(helper.make_node("Transpose", [out], [use.init], perm=[1, 0]))
        else:
            shape = namer(f"{use.init}.shape")
            nodes.append(helper.make_node("Constant", [], [shape],
                                          value=onnx.numpy_helper.from_array(np.array(use.dims, np.int64))))
            nodes.append(helper.make_node("Reshape", [out, shape], [use.init]))
    return nodes


def _tie_dense(uses: list[Use]) -> list[onnx.NodeProto]:
    # Keep the first copy found; the others read it (through a Transpose where they were transposed).
    if len(uses) < 2:
        return []
    first, nodes = uses[0], []
    for use in uses[1:]:
        if use.how == first.how and use.dims == first.dims:
            nodes.append(helper.make_node("Identity", [first.init], [use.init]))
        elif {use.how, first.how} == {"same", "transpose"}:
            nodes.append(helper.make_node("Transpose", [first.init], [use.init], perm=[1, 0]))
        else:
            return []
    return nodes


def dense_tie_targets(model, codebooks: Codebooks) -> dict[str, torch.Tensor]:
    """Dense values of alias targets that are not merged (ties without a codebook)."""
    wanted = {a.target for a in codebooks.aliases.values() if a.target not in codebooks.tensors}
    if not wanted:
        return {}
    if isinstance(model, torch.export.ExportedProgram):
        state = model.state_dict
    else:
        state = model.state_dict() if isinstance(model, torch.nn.Module) else {}
    return {n: state[n].detach() for n in wanted if n in state}


class _ValueIndex:
    """Float initializers by (element type, content hash), for exact value matching."""

    def __init__(self, graph: onnx.GraphProto):
        self.by_key: dict[tuple, list[TensorProto]] = {}
        for t in graph.initializer:
            if t.data_type in FLOAT_TYPES and t.data_location != TensorProto.EXTERNAL:
                data = _graph.tensor_bytes(t)
                self.by_key.setdefault((t.data_type, hashlib.sha256(data).digest()), []).append(t)

    def find(self, value: torch.Tensor) -> list[Use]:
        onnx_type = onnx_float_type(value.dtype)
        found = self._lookup(onnx_type, value, "same")
        if value.dim() == 2:
            found += [u for u in self._lookup(onnx_type, value.t(), "transpose")
                      if u.init not in {f.init for f in found}]
        return found

    def _lookup(self, onnx_type: int, value: torch.Tensor, how: str) -> list[Use]:
        data = _torch_bytes(value)
        uses = []
        for t in self.by_key.get((onnx_type, hashlib.sha256(data).digest()), []):
            if _graph.tensor_bytes(t) != data:
                continue
            if list(t.dims) == list(value.shape):
                uses.append(Use(t.name, how))
            elif how == "same":
                uses.append(Use(t.name, "reshape", list(t.dims)))
        return uses


def _torch_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()
