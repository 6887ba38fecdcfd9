"""The import rules of the house, checked on the source: no import circles inside
``llumnix`` or ``llumnix_kv`` (counting imports under ``TYPE_CHECKING`` and inside
functions, which hide circles rather than remove them), and ``llumnix_kv`` never imports
``llumnix`` (the data plane does not know the scheduler)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("llumnix", "llumnix_kv")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                # The deepest module of ours that the name is or lies in.
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    edges[mod].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def ancestors(mod: str) -> set[str]:
    parts = mod.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_circles() -> None:
    edges = graph()
    # A package importing its own submodules (re-exports) is not a circle: drop edges from a
    # package to what lies inside it, and from a module to the packages above it.
    for mod, targets in edges.items():
        edges[mod] = {t for t in targets if not t.startswith(mod + ".") and t not in ancestors(mod)}
    assert cycles(edges) == []


def test_the_data_plane_does_not_import_the_scheduler() -> None:
    edges = graph()
    bad = {m: sorted(t for t in ts if t.split(".")[0] == "llumnix") for m, ts in edges.items()}
    assert {m: ts for m, ts in bad.items() if m.startswith("llumnix_kv") and ts} == {}


def test_the_graph_sees_relative_and_type_checking_imports() -> None:
    edges = graph()
    assert "llumnix.sim.metrics" in edges["llumnix.sim.runner"]
    assert "llumnix_kv.plugins.vllm" in edges["llumnix.llumlet.vllm"]
