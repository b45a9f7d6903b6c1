"""The package boundaries of docs/ARCHITECTURE.md hold: each package imports only the packages its row allows
(module-level and function-level imports alike), the imports between packages and top-level modules form no cycle,
no `nestor_ds` file imports `tools`, and the size limits of the layout hold (for `tools/` too)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "nestor_ds"
TOOLS = REPO / "tools"

# package -> the packages of ours it may import (docs/ARCHITECTURE.md, "Packages")
ALLOWED: dict[str, set[str]] = {
    "synth": set(),
    "shards": set(),
    "data": {"shards"},
    "moe": set(),
    "model": {"moe"},
    "checkpoint": {"model", "moe"},
    "eval": {"model", "data"},
    "tracking": {"checkpoint", "eval", "model", "moe", "data"},
    "routing": {"checkpoint", "data", "model", "moe"},
    "engine": {"synth", "shards", "data", "moe", "model", "checkpoint", "eval", "tracking"},
}
# top-level module -> the packages of ours it may import (besides SHARED)
ALLOWED_TOP: dict[str, set[str]] = {"config": {"data", "engine", "model", "tracking"}}
# small helpers every package may use
SHARED = {"log", "procs", "typed_config", "cli", "redact", "collectives", "files", "errors", "compat"}
ENTRIES = {"cli.py", "__main__.py"}  # a package's command line is an entry: it may use any package


def _imports(path: Path) -> set[str]:
    """Top-level package names of ours that `path` imports (absolute or relative)."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(PKG).parts
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = list(rel[:-1])[: len(rel) - 1 - (node.level - 1)]
                mod = ".".join(["nestor_ds", *base, *(node.module.split(".") if node.module else [])])
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
                if node.module == "nestor_ds":
                    names = [f"nestor_ds.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "nestor_ds" and len(parts) > 1:
                found.add(parts[1])
    return found


def _node(path: Path) -> str:
    """The node of `path` in the package graph: its package under nestor_ds/, else its top-level module's name
    (`__init__` for nestor_ds/__init__.py)."""
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else path.stem


def package_graph() -> dict[str, set[str]]:
    """node -> the nodes it imports (every nestor_ds file, entries included; a name imported from the top-level
    package that is no module of it, `from nestor_ds import load_pretrained`, is an edge to `__init__`)."""
    files = sorted(PKG.rglob("*.py"))
    nodes = {_node(f) for f in files}
    graph: dict[str, set[str]] = {n: set() for n in nodes}
    for f in files:
        node = _node(f)
        graph[node] |= {n if n in nodes else "__init__" for n in _imports(f)} - {node}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, nodes in sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_graph_has_no_cycle():
    cycle = find_cycle(package_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_check_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _imports_tools(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        if any(n == "tools" or n.startswith("tools.") for n in names):
            return True
    return False


def test_nestor_ds_never_imports_tools():
    """tools/ may import nestor_ds, never the reverse: an installed package has no tools/."""
    bad = [str(f.relative_to(REPO)) for f in sorted(PKG.rglob("*.py")) if _imports_tools(f)]
    assert not bad, bad


def test_top_level_modules_import_only_what_their_row_allows():
    bad = []
    for mod, allowed in ALLOWED_TOP.items():
        extra = _imports(PKG / f"{mod}.py") - allowed - SHARED
        if extra:
            bad.append(f"nestor_ds/{mod}.py imports {sorted(extra)}")
    assert not bad, "\n".join(bad)


def test_packages_import_only_what_their_row_allows():
    bad = []
    for pkg, allowed in ALLOWED.items():
        for f in sorted((PKG / pkg).rglob("*.py")):
            if f.name in ENTRIES:
                continue
            extra = _imports(f) - allowed - SHARED - {pkg}
            if extra:
                bad.append(f"{f.relative_to(REPO)} imports {sorted(extra)}")
    assert not bad, "\n".join(bad)


def test_shards_and_synth_do_not_import_torch():
    bad = []
    for pkg in ("shards", "synth"):
        for f in sorted((PKG / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                mods = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                if any(m == "torch" or m.startswith("torch.") for m in mods):
                    bad.append(str(f.relative_to(REPO)))
    assert not bad, bad


def test_size_limits():
    """Files of ~400 lines at most (one idea may exceed it a little), in nestor_ds/ and tools/; engine functions of
    60 lines at most."""
    files = [*PKG.rglob("*.py"), *TOOLS.rglob("*.py")]
    long_files = [f"{f.relative_to(REPO)}: {n}" for f in files if (n := len(f.read_text().splitlines())) > 450]
    assert not long_files, long_files
    long_fns = []
    for f in (PKG / "engine").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long_fns.append(f"{f.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not long_fns, long_fns
