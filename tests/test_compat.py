"""nestor_ds/compat.py: the version check fires with one line on untested DeepSpeed / MLflow releases, and no other
module touches the internals it wraps (so a version bump has exactly one place to re-check)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from nestor_ds import compat
from nestor_ds.cli import run_cli
from nestor_ds.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "package, version",
    [
        ("deepspeed", "0.19.8"),
        ("deepspeed", "0.19.8+cu124"),  # a local build of the tested release
        ("mlflow", "3.17.0"),
        ("mlflow", "3.17.2"),
    ],
)
def test_tested_versions_pass(package, version):
    compat.check_version(package, version)


@pytest.mark.parametrize(
    "package, version",
    [
        ("deepspeed", "0.19.7"),
        ("deepspeed", "0.19.9"),
        ("deepspeed", "0.20.0"),
        ("mlflow", "2.22.1"),
        ("mlflow", "3.16.9"),
        ("mlflow", "3.18.0"),
        ("mlflow", "4.0.0rc1"),
    ],
)
def test_other_versions_fail_with_one_line_naming_package_and_versions(package, version):
    with pytest.raises(compat.UnsupportedVersion) as err:
        compat.check_version(package, version)
    msg = str(err.value)
    spec = compat.SUPPORTED[package][0]
    assert "\n" not in msg and msg.startswith(f"{package} {version} is installed") and f"{package}{spec}" in msg, msg
    assert isinstance(err.value, UserError)


def test_installed_versions_are_the_tested_ones():
    """The environment the suite runs in is one the internals were tested with (else every test below lies)."""
    for package in compat.SUPPORTED:
        compat.check_version(package)


def test_untested_version_is_one_line_at_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: compat.check_version("deepspeed", "0.20.0") or 0)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.splitlines() == [err] and "deepspeed 0.20.0" in err, err


def test_requirements_bound_the_versions_compat_supports():
    """pyproject.toml's dependencies carry exactly the ranges compat.py accepts."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for package, (spec, _, _) in compat.SUPPORTED.items():
        assert f"{package}{spec}" in deps, (package, spec, deps)


def test_first_use_checks_the_installed_version(monkeypatch):
    """An accessor of a DeepSpeed internal refuses to run on an untested release (the check is not only a test)."""
    monkeypatch.setattr(compat, "_checked", set())
    monkeypatch.setattr(compat, "_installed", lambda package: "0.20.0" if package == "deepspeed" else "3.17.2")
    with pytest.raises(compat.UnsupportedVersion, match="deepspeed 0.20.0"):
        compat.expert_parallel_group(2)
    compat.require("mlflow")  # the other package is unaffected


# Internals only compat.py may touch. Attribute names: DeepSpeed's group registry, MoE tags, ZeRO optimizer
# internals, MLflow private attributes.
PRIVATE_ATTRIBUTES = {
    "_create_expert_and_data_parallel",
    "_get_expert_parallel_group_dict",
    "_get_expert_parallel_group",
    "_lazy_init_hp_params_optimizer_state",
    "_hp_mapping",
    "_metric_objs",
    "_shutdown_event",
    "allreduce",
    "group_name",
}
# modules whose import means relying on internals (or on DeepSpeed-MoE's layer, whose structure our layout mirrors)
PRIVATE_MODULES = (
    "deepspeed.utils.groups",
    "deepspeed.moe",
    "deepspeed.runtime",
    "mlflow.tracking.context",
    "mlflow.system_metrics",
)
# DeepSpeed names importable from public packages that still are ZeRO internals
PRIVATE_NAMES = {"groups", "safe_set_full_fp32_param", "safe_set_full_optimizer_state"}
# pieces of the ZeRO checkpoint layout (file names, keys of the optimizer and model-state files) as string literals
LAYOUT_STRINGS = re.compile(
    r"zero_pp_rank|expp_rank|mp_rank_|optim_states|single_partition_of_fp32_groups|"
    r"param_slice_mappings|param_alignment_paddings|partition_count|base_optimizer_state|optimizer_state_dict|"
    r"param_shapes|shared_params|global_steps|global_samples|_hp_mapping|^ep_size_"
)
# tools whose job is to run DeepSpeed's own MoE layer as a baseline (public use of `deepspeed.moe.layer.MoE`)
BASELINE_TOOLS = {"tools/bench_moe_ep.py"}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string nodes that are docstrings (they may name the layout they describe)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    docs = _docstrings(tree)
    in_fstring = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    bad = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
            bad.append(f"{where} .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            mod = node.module
            if mod.startswith(PRIVATE_MODULES):
                bad.append(f"{where} from {mod} import ...")
            elif mod.split(".")[0] in ("deepspeed", "mlflow"):
                names = [a.name for a in node.names]
                if any(n.startswith("_") or n in PRIVATE_NAMES for n in names):
                    bad.append(f"{where} from {mod} import {names}")
        elif isinstance(node, ast.Import):
            bad += [f"{where} import {a.name}" for a in node.names if a.name.startswith(PRIVATE_MODULES)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # error messages (f-strings) may name a file; lookups and patterns are plain literals
            if id(node) not in docs and id(node) not in in_fstring and LAYOUT_STRINGS.search(node.value):
                bad.append(f"{where} {node.value!r}")
    return bad


def test_no_module_but_compat_touches_deepspeed_or_mlflow_internals():
    files = sorted((REPO / "nestor_ds").rglob("*.py")) + sorted((REPO / "tools").rglob("*.py"))
    files = [f for f in files if f != REPO / "nestor_ds" / "compat.py"]
    files = [f for f in files if str(f.relative_to(REPO)) not in BASELINE_TOOLS]
    bad = [v for f in files for v in _violations(f)]
    assert not bad, "use nestor_ds.compat for these:\n" + "\n".join(bad)


def test_the_scan_sees_each_kind_of_use(tmp_path, monkeypatch):
    """The scan above is not vacuous: each kind of use it forbids, written in a module, is reported."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Docstrings may name zero_pp_rank_0_mp_rank_00_optim_states.pt."""\n'
        "from deepspeed.utils import groups\n"
        "from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor\n"
        "groups._get_expert_parallel_group_dict()\n"
        "p.allreduce = False\n"
        "run.data._metric_objs\n"
        "osd.get('single_partition_of_fp32_groups')\n"
        "raise ValueError(f'{d}: no mp_rank_00_model_states.pt')\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    found = _violations(sample)
    assert sorted(v.split(" ", 1)[0] for v in found) == [f"sample.py:{n}" for n in (2, 3, 4, 5, 6, 7)], found
