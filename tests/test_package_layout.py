"""The package's architecture, as DESIGN.md draws it: no import cycles, and the arrows point one way.

Imports are read from the source (every `import` / `from ... import`, at module level or inside
functions, since a lazy import inside a function still couples the modules), not by importing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sparse_viz"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports (a `from pkg import name` counts as pkg.name when that
    is a module, else as pkg)."""
    name = module_name(path)
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` names module a.b.c or a package above
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): package_imports(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None; a package's `__init__` importing its own
    submodule is not a cycle by itself (the submodule imports the package first, by Python's rules)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def edges(module: str) -> set[str]:
        # A submodule always imports its parent package first; that edge is implicit, not a cycle.
        return {t for t in graph[module] if not module.startswith(t + ".")}

    def visit(module: str) -> list[str] | None:
        colour[module] = GREY
        stack.append(module)
        for target in sorted(edges(module)):
            if colour[target] == GREY:
                return stack[stack.index(target):] + [target]
            if colour[target] == WHITE and (cycle := visit(target)):
                return cycle
        stack.pop()
        colour[module] = BLACK
        return None

    for module in sorted(graph):
        if colour[module] == WHITE and (cycle := visit(module)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"p": {"p.x"}, "p.x": {"p"}}) is None  # a package and its own submodule


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    # a lazy import inside a function body
    assert "sparse_viz.analysis.masking.experiment" in graph["sparse_viz.analysis.cli"]
    # `from .rope import apply_rope` inside sparse_viz/model
    assert "sparse_viz.model.rope" in graph["sparse_viz.model.attention"]


def test_no_import_cycle_anywhere_in_sparse_viz():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# DESIGN.md's arrows: which packages each package may import (besides itself, sparse_viz.errors and
# sparse_viz.output_dir: the torch-free rule for writing result folders that analysis, report, pretrained
# and the experiments share, and that imports nothing of the package but errors).
# report -> tracking: only the run directory's format (tracking.store, tracking.token_types), which is
# torch-free (checked below); tracking -> report: the callback renders the report from the files it
# wrote, at the end of fit.
ALLOWED = {
    "model": set(),
    "data": set(),
    "pretrained": {"model", "data"},  # data: the tokenizer of this project's own checkpoints
    "report": {"tracking"},
    "tracking": {"model", "report"},
    "training": {"model", "tracking", "pretrained", "data"},
    "analysis": {"pretrained", "report", "model", "data"},  # data: held-out text of a corpus for evaluation
}
TORCH_FREE_TRACKING = {"sparse_viz.tracking", "sparse_viz.tracking.store", "sparse_viz.tracking.token_types"}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_design_arrows(package):
    graph = import_graph()
    prefix = f"sparse_viz.{package}"
    wrong = []
    for module, targets in graph.items():
        if module != prefix and not module.startswith(prefix + "."):
            continue
        for target in targets:
            parts = target.split(".")
            other = parts[1] if len(parts) > 1 else ""
            if other in ("", package, "errors", "output_dir") or other in ALLOWED[package]:
                continue
            wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against DESIGN.md's arrows: " + "; ".join(sorted(wrong))


def test_the_shared_top_level_modules_import_nothing_but_errors():
    graph = import_graph()
    assert graph["sparse_viz.errors"] == set()
    assert graph["sparse_viz.output_dir"] == {"sparse_viz.errors"}


def test_the_report_reads_runs_through_torch_free_modules_only():
    """`python -m sparse_viz.report RUN_DIR` must work without torch: the report may import only the
    run directory's format from tracking, and that must not import torch (directly or lazily)."""
    graph = import_graph()
    reached = {t for m, ts in graph.items() if m.startswith("sparse_viz.report") for t in ts if t.startswith("sparse_viz.tracking")}
    assert reached <= TORCH_FREE_TRACKING, sorted(reached - TORCH_FREE_TRACKING)
    for module in TORCH_FREE_TRACKING:
        path = PACKAGE.parent / (module.replace(".", "/") + ("/__init__.py" if module == "sparse_viz.tracking" else ".py"))
        imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
        assert "torch" not in imported and "lightning" not in imported, module
