"""The rules that keep the library one drawable shape, checked on every import, including the imports
inside functions (read with `ast`, nothing is executed):

- the layers below, lowest first: a module imports only its own layer and the layers beneath;
- no cycle between modules;
- no `_private` name or module is imported from another top-level package (`compress.io`,
  `compress.tying`, ... and `cli` each count as one);
- the library never imports the command line; no module grows past 500 lines.

Imports under `if TYPE_CHECKING:` (annotations only, never executed) are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

LAYERS = [
    {"errors"},
    {"units", "records", "granularity", "registry", "kmeans", "packing", "execution", "atomic", "sandbox"},
    {"codebook", "state"},
    {"io"},
    {"auditing", "plot"},
    {"tying"},
    {"export", "runtime"},
    {"verify"},
    {"pipeline"},
    {""},  # compress/__init__.py: the public facade re-exports every layer
    {"cli"},
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for root in ("compress", "cli") for p in sorted((ROOT / root).rglob("*.py"))}


def _unit(module: str) -> str:
    """The top-level package a module belongs to: `io` for compress.io.safety.pickle, `cli` for cli.*."""
    parts = module.split(".")
    return "cli" if parts[0] == "cli" else (parts[1] if len(parts) > 1 else "")


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = MODULES[importer].name == "__init__.py"
    base = importer.split(".")[: len(importer.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import statement in `module`."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    for node in ast.walk(tree):  # annotations only: `if TYPE_CHECKING:` imports never run
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub, None, node.lineno) if sub in MODULES else (target, alias.name, node.lineno))
    return [(m, name, line) for m, name, line in out if m in MODULES]


EDGES = {m: _imports(m) for m in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_only_its_own_and_lower_layers(module):
    here = LAYER_OF[_unit(module)]
    for target, _, line in EDGES[module]:
        there = LAYER_OF[_unit(target)]
        assert there <= here, (f"{module}:{line} imports {target}, a higher layer ({_unit(target) or 'compress'} "
                               f"is layer {there}, {_unit(module) or 'compress'} is layer {here})")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_private_names_stay_inside_their_package(module):
    for target, name, line in EDGES[module]:
        if _unit(target) == _unit(module):
            continue
        private_module = any(part.startswith("_") and part != "__init__" for part in target.split("."))
        assert not private_module, f"{module}:{line} imports the private module {target} across packages"
        assert not (name or "").startswith("_"), f"{module}:{line} imports the private name {target}.{name}"


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in EDGES[m] if t != m} for m in MODULES}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_library_never_imports_the_command_line():
    for module in (m for m in MODULES if m.startswith("compress")):
        assert not [t for t, _, _ in EDGES[module] if t.startswith("cli")], module


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_longer_than_500_lines(module):
    lines = MODULES[module].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines; split it by concern"


def test_the_walk_sees_imports_inside_functions():
    """`tying.plan` imports `auditing` at module level and `atomic` inside `TiePlan.save`: both count."""
    targets = {t for t, _, _ in EDGES["compress.tying.plan"]}
    assert "compress.atomic" in targets and "compress.auditing" in targets
