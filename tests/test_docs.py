"""Docs and code refer only to what is in the repository: every repository path, markdown link and
`python -m` module they name exists, and no path of a development machine appears."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOP = ("nestor_ds", "tools", "docs", "configs", "ds_configs", "tests", ".ci")
PATH_RE = re.compile(r"(?<![\w./-])((?:{})/[\w./-]*\w)".format("|".join(re.escape(t) for t in TOP)))
LINK_RE = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
MODULE_RE = re.compile(r"-m ((?:nestor_ds|tools)(?:\.\w+)*)")
# files that a documented command writes (targets, not references)
OUTPUTS = {"configs/my_run.yaml", "docs/gpu_bench_h200.json", "docs/gpu_legacy_h200.json"}
MACHINE_RE = re.compile(r"(?<![\w.])/(?:work|root|home/\w+|opt/torch)/")


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=True)
    return [REPO / line for line in out.stdout.splitlines() if (REPO / line).is_file()]


def texts() -> list[Path]:
    return tracked("*.md", "*.py", "*.sh", "*.yaml", "*.toml", "*.txt", ".ci/run", "docs/*.json")


def test_repository_paths_exist():
    missing = []
    for f in texts():
        for m in PATH_RE.finditer(f.read_text(errors="replace")):
            ref = m.group(1).rstrip(".")
            if "*" in ref or "<" in ref or ref.endswith("/") or ref in OUTPUTS:
                continue
            if not (REPO / ref).exists():
                missing.append(f"{f.relative_to(REPO)}: {ref}")
    assert not missing, "\n".join(missing)


def test_markdown_links_resolve():
    missing = []
    for f in tracked("*.md"):
        for m in LINK_RE.finditer(f.read_text()):
            target = m.group(1)
            if re.match(r"^[a-z]+:", target):
                continue
            if not (f.parent / target).exists():
                missing.append(f"{f.relative_to(REPO)}: {target}")
    assert not missing, "\n".join(missing)


def test_modules_named_in_commands_exist():
    missing = []
    for f in texts():
        for m in MODULE_RE.finditer(f.read_text(errors="replace")):
            if importlib.util.find_spec(m.group(1)) is None:
                missing.append(f"{f.relative_to(REPO)}: python -m {m.group(1)}")
    assert not missing, "\n".join(missing)


def test_no_development_machine_paths():
    found = [
        f"{f.relative_to(REPO)}: {m.group(0)}"
        for f in texts()
        if f.name != "test_docs.py"
        for m in MACHINE_RE.finditer(f.read_text(errors="replace"))
    ]
    assert not found, "\n".join(found)
