"""Which module types own which clusterable parameters: one `register` call per type.

The plan asks the registry, never an `isinstance` chain, whether a parameter is a weight worth
clustering. Names may be fnmatch globs (`weight_ih_l*` covers every layer and direction of an RNN).
A type is found by walking its MRO, so subclasses (e.g. `NonDynamicallyQuantizableLinear`, the
`out_proj` of `MultiheadAttention`) inherit their base's entry. Exported programs keep only the
qualified class name of each module (`torch.nn.modules.linear.Linear`), so look-ups by that name
work too.

    >>> clusterable_names(nn.Linear(4, 4)), clusterable_names(nn.LayerNorm(4))
    (('weight',), None)
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

_CLUSTERABLE: dict[type, tuple[str, ...]] = {}
_NORMS: set[type] = set()


def qualified_name(module_type: type) -> str:
    """`torch.nn.modules.linear.Linear` for `nn.Linear`: the form `nn_module_stack` metadata uses."""
    return f"{module_type.__module__}.{module_type.__qualname__}"


def register(module_type: type, param_names: tuple[str, ...] | list[str]) -> None:
    """Declare that `module_type` owns clusterable parameters `param_names` (fnmatch globs allowed).

    A later call for the same type replaces the earlier one.

    Example::

        register(MyLowRankLinear, ("u", "v"))
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"register() needs an nn.Module subclass, got {module_type!r}")
    _CLUSTERABLE[module_type] = tuple(param_names)


def register_norm(module_type: type) -> None:
    """Declare `module_type` a normalisation layer: its parameters are left alone by default."""
    _NORMS.add(module_type)


def _lookup(module_type: type | str) -> tuple[type | None, tuple[str, ...] | None]:
    if isinstance(module_type, str):
        for t, names in _CLUSTERABLE.items():
            if qualified_name(t) == module_type:
                return t, names
        return None, None
    for t in module_type.__mro__:
        if t in _CLUSTERABLE:
            return t, _CLUSTERABLE[t]
    return None, None


def clusterable_names(module: nn.Module | type | str) -> tuple[str, ...] | None:
    """The registered parameter-name globs of a module (instance, type or qualified name); None if unknown.

    >>> clusterable_names("torch.nn.modules.rnn.GRU")
    ('weight_ih_l*', 'weight_hh_l*')
    """
    t = module if isinstance(module, (type, str)) else type(module)
    return _lookup(t)[1]


def is_registered(module: nn.Module | type | str) -> bool:
    """Whether the registry knows this module type (instance, type or qualified name)."""
    return clusterable_names(module) is not None


def is_clusterable(module: nn.Module | type | str, param_name: str) -> bool:
    """Whether `param_name` (the attribute name on the module) is one of its registered weights."""
    names = clusterable_names(module)
    return bool(names) and any(fnmatchcase(param_name, pattern) for pattern in names)


def is_norm(module: nn.Module | type | str) -> bool:
    """Whether the module type is a normalisation layer (BatchNorm, LayerNorm, GroupNorm, ...)."""
    if isinstance(module, str):
        return any(qualified_name(t) == module for t in _NORMS)
    t = module if isinstance(module, type) else type(module)
    return any(base in _NORMS for base in t.__mro__)


def _register_builtins() -> None:
    for t in (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
              nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Embedding, nn.EmbeddingBag):
        register(t, ("weight",))
    for t in (nn.RNN, nn.GRU, nn.LSTM):
        register(t, ("weight_ih_l*", "weight_hh_l*"))
    for t in (nn.RNNCell, nn.GRUCell, nn.LSTMCell):
        register(t, ("weight_ih", "weight_hh"))
    # out_proj is an nn.Linear subclass and is found through its own entry.
    register(nn.MultiheadAttention, ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"))
    for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm,
              nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
              getattr(nn, "RMSNorm", None)):
        if t is not None:
            register_norm(t)


_register_builtins()
