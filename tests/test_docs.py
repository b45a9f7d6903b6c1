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


TEST_REF_RE = re.compile(r"(tests" + r"/test_\w+\.py)::(test_\w+)")  # split: test_repository_paths_exist reads this
NUMBER_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
SAFE_GLOBALS_RE = re.compile(r"\b(\d+|[a-z]+) DeepSpeed (?:state )?classes\b")


def docs() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _test_functions(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_named_tests_exist():
    """Every `<tests file>::<test function>` in README.md and docs/*.md names a test function that exists (a
    parametrized id `test_name[...]` counts by its function name)."""
    missing, found = [], 0
    for f in docs():
        for m in TEST_REF_RE.finditer(f.read_text()):
            found += 1
            file, name = REPO / m.group(1), m.group(2)
            if not file.is_file() or name not in _test_functions(file):
                missing.append(f"{f.relative_to(REPO)}: {m.group(0)}")
    assert found, "no test references found: the pattern is broken"
    assert not missing, "\n".join(missing)


def test_readme_counts_the_deepspeed_classes_the_safe_loader_allows():
    from nestor_ds.compat import DEEPSPEED_SAFE_GLOBALS

    stated = SAFE_GLOBALS_RE.findall((REPO / "README.md").read_text())
    assert stated, "README.md no longer says how many DeepSpeed classes the safe loader allows"
    numbers = [int(s) if s.isdigit() else NUMBER_WORDS.get(s) for s in stated]
    assert numbers == [len(DEEPSPEED_SAFE_GLOBALS)] * len(numbers), (stated, len(DEEPSPEED_SAFE_GLOBALS))


def test_readme_ds_configs_table_lists_every_config():
    """The README's DeepSpeed-config table names every file in ds_configs/ (`*_bf16.json` rows cover the bf16 ones)
    and nothing else."""
    text = (REPO / "README.md").read_text()
    table = text.split("### DeepSpeed configs", 1)[1].strip().split("\n\n", 1)[0]
    rows = [ln for ln in table.splitlines() if ln.startswith("| `")]
    named = {re.match(r"\| `([^`]+)`", ln).group(1) for ln in rows}
    files = {p.name for p in (REPO / "ds_configs").glob("*.json")}
    covered = {f for f in files if f in named or any(Path(f).match(n) for n in named if "*" in n)}
    assert files - covered == set(), f"ds_configs/ files missing from the README table: {sorted(files - covered)}"
    unknown = {n for n in named if "*" not in n} - files
    assert not unknown, f"README table names configs that do not exist: {sorted(unknown)}"


def test_readme_entry_commands_are_the_declared_ones():
    """The console commands the README lists are exactly pyproject.toml's [project.scripts]."""
    import tomllib

    scripts = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])
    named = set(re.findall(r"`(nestor-[a-z]+)`", (REPO / "README.md").read_text()))
    assert named == scripts, (sorted(named), sorted(scripts))
