"""`pip install .` gives a working install: declared dependencies and extras, the license, and every console command
running from a directory outside the repository (no PYTHONPATH, no checkout on sys.path).

The venvs are made with ``--system-site-packages --without-pip``: torch, DeepSpeed, MLflow and the rest come from
the environment running the tests (a venv without them would install ~1 GB, torch included: ~70 s on the
project's machine per the README, longer without a local wheel cache), and pip and setuptools >= 77 too (a venv's
own ensurepip brings setuptools 65, which cannot read the SPDX ``license`` field). So ``pip install --no-index
--no-build-isolation`` runs offline and checks that every declared dependency is satisfied by what is installed.
The project is copied out first: building in place would write ``build/`` and ``*.egg-info`` into the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRIES = (
    "nestor-train",
    "nestor-finetune",
    "nestor-evaluate",
    "nestor-checkpoint",
    "nestor-shards",
    "nestor-synth",
    "nestor-model",
)


def _copy_project(dest: Path) -> Path:
    """What a source distribution holds: the package, pyproject.toml, README.md, LICENSE (nothing else needed)."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "nestor_ds", dest / "nestor_ds", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _env() -> dict[str, str]:
    """The caller's environment without anything that would put the checkout on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}
    env.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def _venv_with(tmp_path: Path, *install: str) -> Path:
    """A venv (see the module docstring) with `pip install <install...>` done in it; returns its bin directory."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index", "--no-build-isolation", *install]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return venv / "bin"


def _run(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(600)
def test_pip_install_runs_every_entry_from_another_directory(tmp_path):
    src = _copy_project(tmp_path / "src")
    bin_ = _venv_with(tmp_path, str(src))
    shutil.rmtree(src)  # a non-editable install must not need its source any more
    work = tmp_path / "elsewhere"
    work.mkdir()
    python = str(bin_ / "python")

    # the installed package, not a checkout, is what runs; metadata as declared
    probe = (
        "import importlib.metadata as m, json, nestor_ds; d = m.distribution('nestor-ds'); "
        "print(json.dumps({'file': nestor_ds.__file__, 'requires': d.requires or [], "
        "'license': d.metadata.get('License-Expression'), 'files': [str(f) for f in d.files or []], "
        "'scripts': sorted(e.name for e in d.entry_points if e.group == 'console_scripts')}))"
    )
    proc = _run([python, "-c", probe], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(meta["file"]).is_relative_to(bin_.parent), meta["file"]
    runtime = [r for r in meta["requires"] if "extra ==" not in r]
    assert "torch==2.13.0" in runtime and "deepspeed==0.19.8" in runtime, runtime
    assert any(r.startswith("mlflow") and "<3.18" in r for r in runtime), runtime
    assert not any(r.startswith(("pytest", "ruff")) for r in runtime), "test/lint tools are not runtime needs"
    extras = [r for r in meta["requires"] if "extra ==" in r]
    assert any(r.startswith("ruff==0.17.6") and 'extra == "dev"' in r for r in extras), extras
    assert any(r.startswith("nvidia-ml-py") and 'extra == "gpu"' in r for r in extras), extras
    assert meta["license"] == "Apache-2.0" and any(f.endswith("LICENSE") for f in meta["files"]), meta
    assert meta["scripts"] == sorted(ENTRIES)

    for entry in ENTRIES:
        proc = _run([str(bin_ / entry), "--help"], work)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (entry, proc.stderr[-2000:])

    # real work from there: presets, a tiny raw dataset, shards built and verified from it
    proc = _run([str(bin_ / "nestor-model"), "--list"], work)
    assert proc.returncode == 0 and "nestor-ti" in proc.stdout.split(), proc.stderr[-2000:]
    proc = _run([str(bin_ / "nestor-synth"), "--demo", "raw", "--tiny", "--quiet"], work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    raw = work / "raw" / "2D_diff-react_NA_NA.h5"
    assert raw.is_file(), sorted(p.name for p in (work / "raw").iterdir())
    build = ["--input", str(raw), "--out", "shards/dr", "--test-fraction", "0.5"]
    proc = _run([str(bin_ / "nestor-shards"), *build], work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _run([str(bin_ / "nestor-shards"), "--verify", "shards/dr"], work)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (work / "shards" / "dr" / "manifest.json").is_file()

    # the user's mistake through an installed command: one line, exit 2
    proc = _run([str(bin_ / "nestor-train"), "--ds_config", "ds.json", "--config", "missing.yaml"], work)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error:"), proc.stderr


@pytest.mark.timeout(300)
def test_editable_install_runs_the_modules_from_anywhere(tmp_path):
    """README: `pip install -e .` once lets `python -m nestor_ds.<entry>` (and the commands) run from anywhere."""
    src = _copy_project(tmp_path / "src")
    bin_ = _venv_with(tmp_path, "-e", str(src))
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = _run([str(bin_ / "python"), "-c", "import nestor_ds; print(nestor_ds.__file__)"], work)
    assert proc.returncode == 0 and Path(proc.stdout.strip()).is_relative_to(src), proc.stdout + proc.stderr
    proc = _run([str(bin_ / "python"), "-m", "nestor_ds.model", "--list"], work)
    assert proc.returncode == 0 and "afno-ti" in proc.stdout.split(), proc.stderr[-2000:]
    proc = _run([str(bin_ / "nestor-model"), "--preset", "nestor-tiny", "--json"], work)
    assert proc.returncode == 0 and json.loads(proc.stdout.strip().splitlines()[-1])["total_params"] > 0, proc.stderr
