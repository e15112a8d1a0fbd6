"""From a merged PyTorch model to an ONNX graph whose every decode is one visible placeholder node.

The merged model decodes each weight as `codebook.reshape(-1)[index + offset]`. Exported as it is,
the exporter's optimizer constant-folds that (and whatever the graph does to the weight after it:
gate reordering, BatchNorm fusion, transposes) into dense constants. Here each decode is traced as
one custom op, `compress::decode`, exported as a `compress.Decode(codebook, index, offset)` node
whose `tensor` attribute names the merged tensor: a node from an unknown domain that no optimizer
folds through. `compress.export.onnx` then replaces every placeholder by the real decode
(`_decode.py`), with the layout ops that follow it moved onto the indices (`layout.py`).

An `nn.Module` is traced with its `CodebookParametrization`s calling the op (`compress::decode_full`,
the same placeholder in ONNX, for vector codebooks and outliers, whose decode gives the whole weight);
an `ExportedProgram` (a merged `.pt2`, whose parametrizations are gone) has the same decode patterns
rewritten in the FX graph.
A TorchScript module goes through the TorchScript-based exporter without constant folding, and its
merged weights are found by value (`locate.py`).

The exporter's own chatter (warnings, "Evaluation failed: ..." from the optimizer's constant folding)
is kept off the terminal unless the `compress` logger is at DEBUG (`compress --debug ...`).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import TypeVar, Union

import onnx
import onnxscript
import torch
from onnxscript import BFLOAT16, DOUBLE, FLOAT, FLOAT16, INT16, INT32, INT64, UINT8
from torch import nn

from ..codebook import CodebookParametrization, Codebooks, lookup
from ..errors import UnsupportedModelError
from ..execution import as_args, eval_mode
from ..state import storage_names

DOMAIN = "compress"
OP = "Decode"
TENSOR_ATTR = "tensor"
_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir", "torch.fx.experimental")


@torch.library.custom_op("compress::decode", mutates_args=())
def _decode(codebook: torch.Tensor, index: torch.Tensor, offset: torch.Tensor, tensor: str) -> torch.Tensor:
    return codebook.reshape(-1)[index.long() + offset]


@_decode.register_fake
def _(codebook, index, offset, tensor):
    return codebook.new_empty(index.shape)


@torch.library.custom_op("compress::decode_full", mutates_args=())
def _decode_full(codebook: torch.Tensor, index: torch.Tensor, offset: torch.Tensor, outlier_index: torch.Tensor,
                 outlier_value: torch.Tensor, tensor: str) -> torch.Tensor:
    """The decode of a vector codebook ([groups, K, dim]) and/or one with outliers: the whole weight."""
    dim = codebook.shape[-1] if codebook.dim() == 3 else 1
    return lookup(codebook, index, offset, _full_shape(codebook, index), dim, outlier_index, outlier_value)


@_decode_full.register_fake
def _(codebook, index, offset, outlier_index, outlier_value, tensor):
    return codebook.new_empty(_full_shape(codebook, index))


def _full_shape(codebook: torch.Tensor, index: torch.Tensor) -> tuple[int, ...]:
    dim = codebook.shape[-1] if codebook.dim() == 3 else 1
    return (*index.shape[:-1], index.shape[-1] * dim) if index.dim() else tuple(index.shape)


_OPSET = onnxscript.values.Opset(DOMAIN, 1)
# onnxscript reads typing.Union bounds (an `X | Y` bound prints "Unsupported type annotation")
_TF = TypeVar("_TF", bound=Union[FLOAT, FLOAT16, BFLOAT16, DOUBLE])  # noqa: UP007
_TI = TypeVar("_TI", bound=Union[UINT8, INT16, INT32, INT64])  # noqa: UP007


@onnxscript.script(_OPSET)
def _decode_onnx(codebook: _TF, index: _TI, offset: INT64, tensor: str) -> _TF:
    weight = _OPSET.Decode(codebook, index, offset, tensor=tensor)
    return weight


_TO = TypeVar("_TO", bound=Union[INT32, INT64])  # noqa: UP007


@onnxscript.script(_OPSET)
def _decode_full_onnx(codebook: _TF, index: _TI, offset: INT64, outlier_index: _TO, outlier_value: _TF,
                      tensor: str) -> _TF:
    weight = _OPSET.Decode(codebook, index, offset, tensor=tensor)  # the outliers are the decode's own
    return weight


_TRANSLATIONS = {torch.ops.compress.decode.default: _decode_onnx,
                 torch.ops.compress.decode_full.default: _decode_full_onnx}


def is_placeholder(node: onnx.NodeProto) -> bool:
    return node.domain == DOMAIN and node.op_type == OP


def placeholder_tensor(node: onnx.NodeProto) -> str:
    """The merged tensor a placeholder decodes."""
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == TENSOR_ATTR).decode()


def placeholder(tensor: str, output: str) -> onnx.NodeProto:
    """A placeholder for `tensor` producing `output` (for graphs that did not come from the tracer)."""
    return onnx.helper.make_node(OP, [], [output], domain=DOMAIN, **{TENSOR_ATTR: tensor})


def trace_onnx(model: nn.Module | torch.export.ExportedProgram, codebooks: Codebooks, example_inputs,
               opset: int | None) -> tuple[onnx.ModelProto, set[str]]:
    """The exported ONNX graph of `model` with one placeholder node per decode of a tensor in `codebooks`,
    and the tensors whose decode was hooked (a hooked tensor without a placeholder is not used).

    Dimension 0 of every example input is exported as a dynamic batch.
    """
    args = as_args(example_inputs)
    hooked: set[str] = set()
    if isinstance(model, torch.jit.ScriptModule):  # nothing to hook: its weights are found by value
        return script_onnx(model, args, fold=False), hooked
    if isinstance(model, torch.export.ExportedProgram):
        model = _with_decode_ops(model.module(), codebooks, hooked)
    dynamic = tuple({0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() else None for a in args)
    with eval_mode(model), quiet_exporter(), _decode_ops(model, codebooks, hooked):
        try:
            program = torch.onnx.export(model, args, dynamo=True, optimize=True, opset_version=opset,
                                        dynamic_shapes=dynamic, verbose=False,
                                        custom_translation_table=_TRANSLATIONS)
        except Exception as e:  # the exporter raises many types; the first line says what failed
            raise UnsupportedModelError(f"torch.onnx.export could not export the model: {first_line(e)}") from e
    return program.model_proto, hooked


def script_onnx(model: torch.jit.ScriptModule, args: tuple, *, fold: bool) -> onnx.ModelProto:
    """A TorchScript module through the TorchScript-based exporter (the only one that takes it).

    Without constant folding (`fold=False`) every weight stays an initializer under its own name, so
    the weights of a merged module can be found by value; dimension 0 of each input is dynamic.
    """
    import io

    names = [f"input_{i}" for i in range(len(args))]
    buf = io.BytesIO()
    with quiet_exporter():
        try:
            torch.onnx.export(model, args, buf, dynamo=False, do_constant_folding=fold, input_names=names,
                              dynamic_axes={n: {0: "batch"} for n, a in zip(names, args)
                                            if isinstance(a, torch.Tensor) and a.dim()})
        except Exception as e:  # the exporter raises many types; the first line says what failed
            raise UnsupportedModelError(f"torch.onnx.export (TorchScript exporter) could not export the model: "
                                        f"{first_line(e)}") from e
    return onnx.load_from_string(buf.getvalue())


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Keep the exporters' log lines and warnings off the terminal, unless `compress` logs at DEBUG."""
    if logging.getLogger("compress").isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


@contextlib.contextmanager
def _decode_ops(model: nn.Module, codebooks: Codebooks, hooked: set[str]) -> Iterator[None]:
    """Each `CodebookParametrization` of a tensor in `codebooks` decodes through `compress::decode`."""
    names = _canonical(codebooks)
    patched = []
    for path, module in model.named_modules():
        if not isinstance(module, CodebookParametrization):
            continue
        owner, _, rest = path.rpartition(".parametrizations.")
        attr = rest.split(".")[0]
        name = names.get(f"{owner}.{attr}" if owner else attr)
        if name is None:
            continue
        module.forward = _op_forward(module, name)
        patched.append(module)
        hooked.add(name)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _op_forward(module: CodebookParametrization, name: str):
    if module.dim == 1 and not module.outliers:
        def forward(codebook: torch.Tensor) -> torch.Tensor:
            return torch.ops.compress.decode(codebook, module.index, module.offset, name)
        return forward

    def forward_full(codebook: torch.Tensor) -> torch.Tensor:
        where = module.outlier_index if module.outliers else torch.zeros(0, dtype=torch.int32)
        values = module.outlier_value.to(codebook.dtype) if module.outliers else codebook.new_zeros(0)
        return torch.ops.compress.decode_full(codebook, module.index, module.offset, where, values, name)
    return forward_full


def _canonical(codebooks: Codebooks) -> dict[str, str]:
    names = {n: n for n in codebooks.tensors}
    for alias in codebooks.aliases.values():
        if alias.target in codebooks.tensors:
            names[alias.name] = alias.target
    return names


# --- a merged program: the decode pattern of `CodebookParametrization.forward` in its FX graph -------

_PASS_THROUGH = {"aten.reshape.default", "aten.view.default", "aten._to_copy.default", "aten.to.dtype",
                 "aten.clone.default", "aten.alias.default"}


def _with_decode_ops(gm: torch.fx.GraphModule, codebooks: Codebooks, hooked: set[str]) -> torch.fx.GraphModule:
    """`program.module()` with each `index(reshape(codebook), [add(to(index), offset)])` as one decode op
    (for vector codebooks and outliers, with the reshapes and the `index_put` that follow it)."""
    by_storage = {}
    for name, cb in codebooks.tensors.items():
        original, index, where, values = storage_names(name)
        by_storage[original], by_storage[index] = (name, "codebook"), (name, "index")
        by_storage[where], by_storage[values] = (name, "outlier_index"), (name, "outlier_value")
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or str(node.target) != "aten.index.Tensor" or len(node.args[1]) != 1:
            continue
        src, idx = node.args[0], node.args[1][0]
        codebook = _attr_through(src, by_storage, "codebook")
        if codebook is None or idx.op != "call_function" or str(idx.target) != "aten.add.Tensor":
            continue
        index, offset = _attr_through(idx.args[0], by_storage, "index"), idx.args[1]
        if index is None or by_storage[codebook.target][0] != by_storage[index.target][0]:
            continue
        name = by_storage[index.target][0]
        cb = codebooks.tensors[name]
        if cb.dim == 1 and not cb.outlier_count:
            end, op, args = node, torch.ops.compress.decode.default, (codebook, index, offset, name)
        else:
            found = _full_decode(node, cb, by_storage)
            if found is None:
                continue
            end, where, values = found
            where = where if where is not None else _empty(gm, graph, f"_compress_no_outliers_{len(hooked)}",
                                                           torch.zeros(0, dtype=torch.int32))
            values = values if values is not None else _empty(gm, graph, f"_compress_no_values_{len(hooked)}",
                                                              torch.zeros(0, dtype=cb.codebook.dtype))
            op, args = torch.ops.compress.decode_full.default, (codebook, index, offset, where, values, name)
        with graph.inserting_before(end):
            new = graph.call_function(op, args)
        end.replace_all_uses_with(new)
        hooked.add(name)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


_RESHAPES = {"aten.reshape.default", "aten.view.default"}


def _full_decode(node, cb, by_storage: dict):
    """The node ending a vector / outlier decode that starts at the lookup `node` (the reshape to the
    weight's shape, after the outliers' `index_put` when there are any), with the outliers' get_attr
    nodes; None when the graph does not read as `CodebookParametrization.forward`."""
    end = _only_user(node, _RESHAPES)
    if end is None or not cb.outlier_count:
        return None if end is None else (end, None, None)
    flat = _only_user(end, _RESHAPES)
    put = _only_user(flat, {"aten.index_put.default"}) if flat is not None else None
    if put is None or len(put.args[1]) != 1:
        return None
    where = _attr_through(put.args[1][0], by_storage, "outlier_index")
    values = _attr_through(put.args[2], by_storage, "outlier_value")
    final = _only_user(put, _RESHAPES)
    return None if where is None or values is None or final is None else (final, where, values)


def _only_user(node, targets: set[str]):
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and str(users[0].target) in targets:
        return users[0]
    return None


def _empty(gm: torch.fx.GraphModule, graph: torch.fx.Graph, name: str, value: torch.Tensor):
    gm.register_buffer(name, value)
    with graph.inserting_before(next(iter(graph.nodes))):
        return graph.get_attr(name)


def _attr_through(node, by_storage: dict, role: str):
    """The get_attr node of a codebook/index storage that `node` reads through pass-through ops."""
    while isinstance(node, torch.fx.Node):
        if node.op == "get_attr":
            found = by_storage.get(str(node.target))
            return node if found is not None and found[1] == role else None
        if node.op != "call_function" or str(node.target) not in _PASS_THROUGH:
            return None
        node = node.args[0]
    return None
