"""The import contract of docs/DESIGN.md §7: each layer imports only the layers below it, and no module imports
itself through others (a cycle). Read from the source with ``ast`` (imports inside functions count too), so it
needs no import of the package and runs in a moment.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mask_impact"

# Lowest first. A module not listed here fails the test: every new module takes its place in the layers.
LAYERS = {
    "options, errors and utilities": ["version", "errors", "options", "groups", "config", "resources", "pictures",
                                      "threads", "stopping", "dataset"],
    "families": ["families", "families.*"],
    "core": ["spec", "patches", "units", "inputs", "knockout", "models", "engine", "engines", "engines.*", "stages",
             "shard", "sweep", "metrics", "estimate", "demo_tasks"],
    "input/output": ["colours", "report", "resume", "figures", "aggregate"],
    "pipeline": ["pipeline"],
    "front ends": ["mask_impact", "entry", "api", "cli", "batch", "study", "demo", "planted"],
}

def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[1:-1] if parts[-1] == "__init__" else parts[1:])
    return name or "mask_impact"


def imports() -> dict[str, set[str]]:
    """Each module of the package → the package's modules it imports (short names: ``engines.pixels``)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    found: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = [part for part in package.split(".") if part and part != "mask_impact"]
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                stem = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    candidate = f"{stem}.{alias.name}".strip(".")
                    targets.add(candidate if candidate in modules else stem or "mask_impact")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for full in names:
                    if full == "mask_impact" or full.startswith("mask_impact."):
                        targets.add(full.removeprefix("mask_impact.") if full != "mask_impact" else "mask_impact")
        resolved = set()
        for target in targets:
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                resolved.add(target)
        found[name] = resolved
    return found


def layer_of(module: str) -> int:
    for rank, members in enumerate(LAYERS.values()):
        for member in members:
            if module == member or (member.endswith(".*") and module.startswith(member[:-1])):
                return rank
    raise AssertionError(f"module {module} has no layer: add it to LAYERS (and to docs/DESIGN.md §7)")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_reader_finds_real_imports():
    graph = imports()
    assert "engine" in graph["engines.pixels"] and "patches" in graph["engines.pixels"]  # relative, two levels
    assert "families.base" in graph["families.qwen_vl"] and "errors" in graph["families.qwen_vl"]
    assert "options" in graph["units"] and "units" not in graph["options"]


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert layer_of("engines.vit") == layer_of("sweep") > layer_of("families.qwen_vl") > layer_of("errors")


def test_no_module_imports_a_layer_above_it():
    graph = imports()
    upward = sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                    if layer_of(target) > layer_of(module))
    assert upward == [], "imports of a higher layer (docs/DESIGN.md §7)"


def test_no_cycles():
    assert cycles(imports()) == [], "a cycle of imports (docs/DESIGN.md §7)"


def test_the_core_reaches_a_family_only_through_its_adapter():
    """Above the families, only the registry (``families``) and the adapter's base class are imported: what a family
    knows (its geometry, its views) is asked of its adapter, never of the family's module."""
    graph = imports()
    reached = sorted(f"{module} -> {target}" for module, targets in graph.items() if layer_of(module) > 1
                     for target in targets if target.startswith("families.") and target != "families.base")
    assert reached == []
