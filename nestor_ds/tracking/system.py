"""Facts about the machine and code a run executed on, for MLflow tags.

A result is only reviewable if we know which code and which library versions produced it, so
every run is tagged with the git commit and the versions of the stack that shape numerics and
speed (torch, DeepSpeed, MLflow, CUDA). Everything here is best effort: a missing git binary or
library yields "unknown", never an exception.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import socket
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Packages whose versions decide numerics, speed or the tracking format.
_VERSIONED_PACKAGES = ("torch", "deepspeed", "mlflow", "numpy", "webdataset", "megablocks", "flash-attn")


def _git(*args: str) -> str | None:
    """Run a read-only git command in the repository; None when git or the repo is unavailable."""
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_state() -> dict[str, str]:
    """Commit hash, branch and whether the working tree has uncommitted changes."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"git.commit": "unknown"}
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git.commit": commit,
        "git.branch": _git("rev-parse", "--abbrev-ref", "HEAD") or "unknown",
        "git.dirty": str(bool(dirty)).lower(),
    }


def package_versions() -> dict[str, str]:
    """Installed versions of the packages in `_VERSIONED_PACKAGES` ("not-installed" if absent)."""
    versions = {}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[f"version.{name}"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[f"version.{name}"] = "not-installed"
    return versions


def accelerator_info() -> dict[str, str]:
    """CUDA build and visible GPUs as torch sees them (CPU-only runs say so)."""
    try:
        import torch
    except ImportError:
        return {"accelerator": "unknown"}
    info = {"version.cuda": str(torch.version.cuda or "none")}
    if torch.cuda.is_available():
        info["accelerator"] = "cuda"
        info["gpu.count"] = str(torch.cuda.device_count())
        info["gpu.name"] = torch.cuda.get_device_name(0)
    else:
        info["accelerator"] = "cpu"
        info["cpu.threads"] = str(torch.get_num_threads())
    return info


def system_metrics_available() -> bool:
    """MLflow's system-metrics sampler needs psutil (GPU sampling additionally needs pynvml)."""
    return importlib.util.find_spec("psutil") is not None


def run_environment() -> dict[str, str]:
    """All environment facts as flat string tags: git state, versions, host and accelerator."""
    env = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "version.python": platform.python_version(),
        "cpu.count": str(os.cpu_count()),
    }
    env.update(git_state())
    env.update(package_versions())
    env.update(accelerator_info())
    return env
