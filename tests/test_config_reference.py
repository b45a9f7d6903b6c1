"""The configuration reference (docs/configuration.md), the README's presets table and the minimal config are what
the code says: generated from the dataclasses and the preset registry, and checked here against them."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from nestor_ds import config_reference

REPO = Path(__file__).resolve().parents[1]
MINIMAL = REPO / "configs" / "pretrain_minimal.yaml"


@pytest.fixture(scope="module")
def generated() -> str:
    return config_reference.render()


def test_committed_reference_is_current(generated):
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == generated, config_reference.stale_summary(committed, generated, "docs/configuration.md")


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, type, str]]:
    """(dotted path, owning class, field name) of every non-dataclass field reached from `cls`, lists of
    dataclasses included (as `path[].key`)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path, hint = f"{prefix}{f.name}", hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out += _leaves(hint, f"{path}.")
            continue
        out.append((path, cls, f.name))
        args = typing.get_args(hint) if typing.get_origin(hint) is list else ()
        if args and dataclasses.is_dataclass(args[0]):
            out += _leaves(args[0], f"{path}[].")
    return out


def _rows(text: str) -> dict[str, list[str]]:
    """{key: [type, default, meaning]} of the reference's tables (cells split on unescaped pipes)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.replace("\\|", "\0").strip("|").split("|")]
            cells = [c.replace("\0", "|") for c in cells]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_every_leaf_key_of_the_run_config_has_a_meaning(generated):
    from nestor_ds.config import RunConfig

    rows = _rows(generated)
    leaves = _leaves(RunConfig)
    assert len(leaves) > 100, len(leaves)  # the walk reaches every section
    missing, empty = [], []
    for path, cls, name in leaves:
        key = path
        comment = config_reference.field_comments(cls).get(name, "")
        alias = config_reference.ALIAS_RE.match(comment)
        if alias:  # a RunConfig field the YAML sets under another key (model.moe.ep_size, model.preset)
            key = alias.group(1)
        if key not in rows:
            missing.append(key)
        elif not rows[key][2].strip():
            empty.append(key)
    assert not missing, f"keys missing from docs/configuration.md: {missing}"
    assert not empty, f"keys without a meaning (add a comment beside the field): {empty}"
    assert rows["model.moe.ep_size"][1] == '`"auto"`', rows["model.moe.ep_size"]  # the run's default, not MoEConfig's


@dataclass
class _Sample:
    """Comment placements the generator reads (module docstring of nestor_ds.config_reference)."""

    a: int = 1  # trailing
    # a block above a field without a trailing comment
    # is that field's
    b: int = 2
    c: int = 3  # trailing, continued
    # by the lines right below it
    d: list[str] = field(default_factory=list)  # d's own
    e: str | None = None


def test_field_comments_follow_the_documented_rules():
    assert config_reference.field_comments(_Sample) == {
        "a": "trailing",
        "b": "a block above a field without a trailing comment is that field's",
        "c": "trailing, continued by the lines right below it",
        "d": "d's own",
        "e": "",
    }


def test_check_reports_a_stale_file_in_one_line(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text((REPO / "docs" / "configuration.md").read_text().replace("past frames", "old words", 1))
    cmd = [sys.executable, "-m", "nestor_ds.config_reference", "--out", str(stale), "--check"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is stale" in lines[0] and "1 line(s)" in lines[0], proc.stderr


def test_readme_presets_table_is_the_code_s(generated):
    """Every preset's parameters and FLOPs in the README are those of `nestor_ds.model.flops.account`."""
    from nestor_ds.model import list_presets

    table = config_reference.presets_table()
    assert table in (REPO / "README.md").read_text(), "README.md's presets table differs from:\n" + table
    assert table in generated
    assert set(list_presets()) == {ln.split("|")[1].strip() for ln in table.splitlines()[2:]}


def test_minimal_config_loads_and_builds(tmp_path, monkeypatch):
    """configs/pretrain_minimal.yaml, as shown in the README, loads and validates against shards of its dataset
    names (built here, small), and its model builds."""
    from nestor_ds.config import load_config
    from nestor_ds.model import build_model
    from nestor_ds.shards.build import BuildConfig, build
    from nestor_ds.synth.layouts import write_dataset

    assert MINIMAL.read_text().strip() in (REPO / "README.md").read_text(), "README.md must show the minimal config"
    raw = yaml.safe_load(MINIMAL.read_text())
    layouts = (("ns", "fno-mat"), ("dr", "pdebench-groups"))
    for i, spec in enumerate(raw["data"]["datasets"]):
        pde, layout = layouts[i % 2]
        src = write_dataset(pde, layout, tmp_path / "raw" / f"{spec['name']}.h5", n=3, res=16, steps=21, seed=i)
        build(BuildConfig(inputs=[str(src)], out=str(tmp_path / spec["path"]), name=spec["name"], progress=False))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(MINIMAL)
    assert cfg.preset == raw["model"]["preset"] and cfg.model.resolution == raw["data"]["resolution"]
    assert cfg.train.max_steps == raw["train"]["max_steps"]
    build_model(cfg.model)
