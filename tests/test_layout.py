"""The package boundaries of docs/ARCHITECTURE.md hold: each package imports only the packages its row allows
(module-level and function-level imports alike), and the size limits of the layout hold."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "nestor_ds"

# package -> the packages of ours it may import (docs/ARCHITECTURE.md, "Packages")
ALLOWED: dict[str, set[str]] = {
    "synth": set(),
    "shards": set(),
    "data": {"shards"},
    "moe": set(),
    "model": {"moe"},
    "checkpoint": {"model", "moe", "config"},
    "eval": {"model", "data"},
    "tracking": {"checkpoint", "eval", "model", "moe", "data"},
    "engine": {"synth", "shards", "data", "moe", "model", "checkpoint", "eval", "tracking", "config"},
}
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
    """Files of ~400 lines at most (one idea may exceed it a little); engine functions of 60 lines at most."""
    long_files = [
        f"{f.relative_to(REPO)}: {n}" for f in PKG.rglob("*.py") if (n := len(f.read_text().splitlines())) > 450
    ]
    assert not long_files, long_files
    long_fns = []
    for f in (PKG / "engine").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long_fns.append(f"{f.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not long_fns, long_fns
