"""The house keeps its plan: one import direction, no cycles, imports at the top, small modules.

``LAYERS`` is the layer order of ``src/ccdcal`` (the same table is in ARCHITECTURE.md). A module
may import its own unit (subpackage or root module) and any unit of a lower layer. It may not
import upwards, nor a sibling unit of its own layer, except inside ``if TYPE_CHECKING:``. Imports
of ccdcal modules sit at the top of a module, except in the places listed in ``DEFERRED``
(start-up time of the ``ccdcal`` command and of ``import ccdcal``). No module imports a
``_private`` name defined in another module (private *modules* are fine). The graph of module
imports has no cycle. No module is longer than ``MODULE_LINES`` lines, and no function outside the
numba kernels longer than ``FUNCTION_LINES`` lines.

``ALLOWED`` lists today's exceptions by rule; each later step shrinks it, and a listed exception
that no longer occurs fails too, so the list never goes stale.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "ccdcal"

# layer: units (a subpackage, or a module of the package root), from the bottom up
LAYERS: dict[int, tuple[str, ...]] = {
    0: ("__init__", "errors"),
    1: ("masks", "sections", "_shared"),
    2: ("stretch",),
    3: ("io", "_repr"),
    4: ("calibration", "combining", "qa", "colour"),
    5: ("stacking",),
    6: ("planning",),
    7: ("report",),
    8: ("pipeline",),
    9: ("notebook", "demo"),
    10: ("ui",),
    11: ("cli",),
}
LAYER_OF = {unit: layer for layer, units in LAYERS.items() for unit in units}

# Modules whose package-internal imports may sit inside functions: the command line and the
# package's lazy ``__init__`` (``ccdcal --help`` and ``import ccdcal`` stay instant).
DEFERRED = {"ccdcal.cli", "ccdcal.__init__"}

# Where process state may live (see ccdcal._shared.state): the owner itself, and the flag that
# records a process-wide allocator setting (made once by the ``ccdcal`` command, never undone).
# _shared.jit: the numba cache folders the process holds locked, empty outside a load or save
STATE_OWNERS = {"ccdcal._shared.state", "ccdcal._shared.memory", "ccdcal._shared.jit"}

MODULE_LINES = 1000
FUNCTION_LINES = 80

# Today's exceptions, by rule. Later steps shrink these to nothing.
ALLOWED: dict[str, set[str]] = {
    "upward": set(),
    "sibling": set(),
    "cycle": set(),
    "private": set(),
    "deferred": set(),
    "module size": set(),
    "function size": set(),
}


@dataclass(frozen=True)
class Edge:
    """One import of a ccdcal module by another."""

    source: str           # importing module, dotted
    target: str           # imported module, dotted (``ccdcal.__init__`` for the package root)
    names: tuple[str, ...]
    deferred: bool        # inside a function body
    typing_only: bool     # inside ``if TYPE_CHECKING:``
    line: int


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")[:-1]          # the package holding ``module`` (or ``__init__``)
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def as_module(dotted: str) -> str | None:
    """The key of MODULES for an imported dotted name, or None when it is not ccdcal's."""
    if dotted in MODULES:
        return dotted
    if f"{dotted}.__init__" in MODULES:
        return f"{dotted}.__init__"
    return None


def edges_of(module: str) -> list[Edge]:
    tree = ast.parse(MODULES[module].read_text())
    found: list[Edge] = []

    def visit(node: ast.AST, deferred: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            in_function = deferred or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            in_typing = typing_only or (
                isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            )
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = as_module(alias.name)
                    if target:
                        found.append(Edge(module, target, (), deferred, typing_only, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                base = resolve(module, child)
                if base.split(".")[0] != "ccdcal":
                    continue
                submodules = [a.name for a in child.names if as_module(f"{base}.{a.name}")]
                for name in submodules:
                    found.append(Edge(module, as_module(f"{base}.{name}"), (), deferred,
                                      typing_only, child.lineno))
                names = tuple(a.name for a in child.names if a.name not in submodules)
                if names:
                    found.append(Edge(module, as_module(base), names, deferred, typing_only,
                                      child.lineno))
            visit(child, in_function, in_typing)

    visit(tree, False, False)
    return found


EDGES = [edge for module in MODULES for edge in edges_of(module)]


def unit(module: str) -> str:
    return module.split(".")[1]


def check(rule: str, found: set[str]) -> None:
    allowed = ALLOWED[rule]
    new = sorted(found - allowed)
    gone = sorted(allowed - found)
    assert not new, f"{rule}: not allowed: {new}"
    assert not gone, f"{rule}: allowed but no longer found (remove from ALLOWED): {gone}"


#: public functions of the package: no module or subpackage takes one of these names (the public
#: ``ccdcal.stretch`` is the module ``stretch`` itself)
PUBLIC_FUNCTIONS = {"scan", "reduce", "combine", "calibrate", "imexamine", "show", "stack", "debayer"}


def test_no_module_is_named_like_a_public_function():
    named = {part for module in MODULES for part in module.split(".")[1:]}
    assert not named & PUBLIC_FUNCTIONS


def test_every_unit_has_a_layer():
    assert not {unit(m) for m in MODULES} - set(LAYER_OF)


@pytest.mark.parametrize("rule", ["upward", "sibling"])
def test_imports_point_down_the_layers(rule):
    found = set()
    for edge in EDGES:
        if edge.typing_only or edge.target == "ccdcal.__init__":
            continue
        source, target = unit(edge.source), unit(edge.target)
        if source == target:
            continue
        upward = LAYER_OF[target] > LAYER_OF[source]
        sibling = LAYER_OF[target] == LAYER_OF[source]
        if (rule == "upward" and upward) or (rule == "sibling" and sibling):
            found.add(f"{edge.source} -> {edge.target}")
    check(rule, found)


def test_package_internal_imports_sit_at_the_top():
    found = {
        f"{edge.source} -> {edge.target}"
        for edge in EDGES
        if edge.deferred and edge.source not in DEFERRED
    }
    check("deferred", found)


def test_no_private_name_crosses_modules():
    found = {
        f"{edge.source} -> {edge.target.removesuffix('.__init__')}.{name}"
        for edge in EDGES
        for name in edge.names
        if name.startswith("_") and not name.startswith("__") and edge.target != edge.source
    }
    check("private", found)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for edge in EDGES:
        if not edge.typing_only and edge.target != edge.source:
            graph[edge.source].add(edge.target)
    cycles = set()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.add(" -> ".join([*stack[stack.index(target):], target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module)
    check("cycle", cycles)


def test_modules_stay_small():
    found = {
        module for module, path in MODULES.items()
        if len(path.read_text().splitlines()) > MODULE_LINES
    }
    check("module size", found)


def test_no_function_is_longer_than_80_lines():
    found = set()
    for module, path in MODULES.items():
        if path.name == "_kernels.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.body
                if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                    body = body[1:]
                if body and body[-1].end_lineno - body[0].lineno + 1 > FUNCTION_LINES:
                    found.add(f"{module}.{node.name}")
    check("function size", found)


_EMPTY_CALLS = {"dict", "list", "set", "OrderedDict", "defaultdict", "deque", "WeakValueDictionary",
                "WeakKeyDictionary", "ThreadPoolExecutor", "local"}


def _mutable_at_import(value: ast.AST | None) -> bool:
    """Whether ``value`` makes a container to fill later (or a pool), not a constant."""
    if isinstance(value, ast.Dict | ast.List | ast.Set) and not (getattr(value, "keys", None) or
                                                                  getattr(value, "elts", None)):
        return True
    if isinstance(value, ast.Call):
        func = value.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        return name in _EMPTY_CALLS
    return False


def test_process_state_has_one_owner():
    """No module keeps a cache, registry or pool of its own at module level (an empty container
    or pool made at import, a ``global`` rebound in a function, a module-level name filled by
    subscript at import): what is kept between calls is a ``ccdcal._shared.state.Cache``, whose
    lifetime one owner ends."""
    found = set()
    for module, path in MODULES.items():
        if module in STATE_OWNERS:
            continue
        tree = ast.parse(path.read_text())
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) else []
            if targets and _mutable_at_import(node.value):
                found.add(f"{module}: {ast.unparse(targets[0])}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                found.add(f"{module}: global {', '.join(node.names)}")
    assert not found, f"process state outside ccdcal._shared.state: {sorted(found)}"
