"""TorchScript archives (`torch.jit.save`)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import TRUST, UnsafePickleError
from ._errors import library_call
from .loaded import Loaded, find_aliases

_SCRIPT_NAMESPACES = {"aten", "prim", "prims", "quantized", "_quantized", "quantized_decomposed", "profiler"}
_DENIED_OPS = {"aten::save", "aten::from_file"}


def load_torchscript(path: Path, trust: bool) -> Loaded:
    # torch.jit.load reads data.pkl/constants.pkl with TorchScript's own unpickler, which resolves only
    # TorchScript classes and a fixed set of torch rebuild functions: a pickle naming os.system fails with
    # "Unknown type name 'posix.system'" and runs nothing (checked on torch 2.13). code/ is TorchScript,
    # compiled by the TorchScript compiler, not executed as Python. What it can still do is call an
    # operator that touches files (aten::save, aten::from_file), so the graphs are checked below.
    with warnings.catch_warnings(), library_call(path, "torch.jit.load"):
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")
    if not trust:
        _check_script_ops(module, path)
    tensors = dict(module.state_dict())
    return Loaded(path=path, kind="torchscript", tensors=tensors, aliases=find_aliases(tensors.items()),
                  module=module)


def _check_script_ops(module: torch.jit.ScriptModule, path: Path) -> None:
    for sub_name, sub in module.named_modules():
        for method in sub._c._method_names():
            graph = sub._c._get_method(method).inlined_graph
            for kind in _node_kinds(graph.nodes()):
                namespace = kind.split("::", 1)[0]
                if namespace not in _SCRIPT_NAMESPACES or kind in _DENIED_OPS:
                    where = f"{sub_name or 'model'}.{method}"
                    raise UnsafePickleError(f"{path}: TorchScript method {where} calls {kind}, which is "
                                            "not a plain tensor operator; refused; pass ", TRUST,
                                            " only for files you trust")


def _node_kinds(nodes) -> Iterable[str]:
    for node in nodes:
        yield node.kind()
        for block in node.blocks():
            yield from _node_kinds(block.nodes())

