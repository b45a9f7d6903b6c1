"""Every DeepSpeed and MLflow internal NESTOR-DS relies on, in one place, checked against the tested versions.

Why: expert parallelism, elastic resume, fp32-master export and MLflow outage handling use parts of DeepSpeed and
MLflow that are not public API (private functions, parameter attributes, the files and keys of a ZeRO checkpoint,
private attributes of MLflow objects). A new release may change any of them without notice, and the failure would
surface far from its cause (a hang in an all-reduce, a silently wrong export). So every such use goes through this
module, which fails with one line naming the package and the versions when the installed one is not a version the
code below was tested with. Updating a pin means re-running the tests (the expert-parallel, elastic-resume, export
and tracking tests use each item below) and widening `SUPPORTED`.

What lives here:
- DeepSpeed's expert-parallel group registry (``deepspeed.utils.groups``: ``_create_expert_and_data_parallel``,
  ``_get_expert_parallel_group_dict``, ``_get_expert_parallel_group``) and its group names (``ep_size_<P>``);
- DeepSpeed-MoE's parameter tags (``allreduce = False``, ``group_name``), read by its engine and by
  ``split_params_into_different_moe_groups_for_optimizer``, and its ``MoE`` layer class our layout subclasses;
- ZeRO-1/2 optimizer internals used by elastic resume (``_lazy_init_hp_params_optimizer_state``, ``_hp_mapping``,
  ``safe_set_full_*``);
- the ZeRO checkpoint layout of DeepSpeed 0.19.8 (file names, keys of the model-state and optimizer-state files,
  the classes its files pickle) read by ``checkpoint/fp32_master.py``, ``elastic.py`` and ``safe_load.py``;
- MLflow's private API: ``Run.data._metric_objs``, ``resolve_tags`` of ``mlflow.tracking.context.registry``,
  ``SystemMetricsMonitor`` and its ``_shutdown_event``.

Importing this module imports neither DeepSpeed nor MLflow (``nestor_ds.moe`` and the shard tools must stay light):
the version of a package is checked on the first use of one of its internals (`require`).
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterable, Mapping
from typing import Any

from nestor_ds.errors import UserError

# package -> (requirement as pip writes it, lowest tested release, first release not tested); the same bounds are in
# pyproject.toml's dependencies
SUPPORTED: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {
    "deepspeed": ("==0.19.8", (0, 19, 8), (0, 19, 9)),
    "mlflow": (">=3.17,<3.18", (3, 17), (3, 18)),
}
# distributions that provide each package (a serving image may carry mlflow-skinny only)
_DISTRIBUTIONS = {"deepspeed": ("deepspeed",), "mlflow": ("mlflow", "mlflow-skinny")}
_checked: set[str] = set()


class UnsupportedVersion(UserError):
    """The installed DeepSpeed or MLflow is not a version whose internals this code was tested with."""


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string ("0.19.8+cu124" -> (0, 19, 8), "3.17.2rc1" -> (3, 17, 2))."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if m is None:
        raise UnsupportedVersion(f"cannot read the version {version!r}")
    return tuple(int(x) for x in m.group(1).split("."))


def _installed(package: str) -> str | None:
    for dist in _DISTRIBUTIONS.get(package, (package,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_version(package: str, installed: str | None = None) -> None:
    """Raise UnsupportedVersion (one line: package, installed and supported versions) unless `installed` (default:
    the installed distribution's version) lies in the tested range of `package`."""
    spec, low, high = SUPPORTED[package]
    installed = _installed(package) if installed is None else installed
    if installed is None:
        raise UnsupportedVersion(f"{package} is not installed; NESTOR-DS needs {package}{spec}")
    release = _release(installed)
    width = max(len(release), len(low), len(high))
    pad = lambda v: v + (0,) * (width - len(v))  # noqa: E731 - (3, 17) compares as (3, 17, 0)
    if not pad(low) <= pad(release) < pad(high):
        raise UnsupportedVersion(
            f"{package} {installed} is installed but NESTOR-DS supports {package}{spec} only (its {package} internals "
            f"were tested with that; pip install '{package}{spec}')"
        )


def require(package: str) -> None:
    """Check `package`'s version once per process (the first use of one of its internals)."""
    if package not in _checked:
        check_version(package)
        _checked.add(package)


# ---------------------------------------------------------------------------------------------- DeepSpeed: MoE


def expert_group_name(ep_size: int) -> str:
    """The name DeepSpeed's registry and its optimizer groups give the expert-parallel groups of size `ep_size`."""
    return f"ep_size_{ep_size}"


def expert_parallel_group(ep_size: int) -> Any:
    """This rank's expert-parallel group of `ep_size` consecutive ranks, created in DeepSpeed's group registry (with
    its expert-data-parallel group) when missing, so that DeepSpeed's engine and ZeRO-1/2 find them by name."""
    require("deepspeed")
    from deepspeed.utils import groups

    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name)


def tag_expert_params(params: Iterable[Any], ep_size: int) -> None:
    """Mark parameters as DeepSpeed-MoE expert parameters of the `ep_size` groups: DeepSpeed's engine then skips
    them in the data-parallel all-reduce and reduces them over the expert-data-parallel group instead."""
    require("deepspeed")
    for p in params:
        p.allreduce = False
        p.group_name = expert_group_name(ep_size)


def is_expert_param(p: Any) -> bool:
    """Whether `p` carries DeepSpeed-MoE's expert tag (see `tag_expert_params`)."""
    return getattr(p, "allreduce", True) is False


def expert_param_group(p: Any) -> str | None:
    """The expert-parallel group name of a tagged expert parameter (None for a data-parallel one)."""
    return getattr(p, "group_name", None) if is_expert_param(p) else None


def deepspeed_moe_class() -> type:
    """DeepSpeed's ``MoE`` layer class: its engine finds MoE layers by this type (and calls their
    ``set_deepspeed_parallelism``), so our parameter layout subclasses it."""
    require("deepspeed")
    from deepspeed.moe.layer import MoE

    return MoE


def split_moe_param_groups(groups: list[dict]) -> list[dict]:
    """Optimizer groups with the tagged expert parameters split into their own groups (``moe: True``, named by
    `expert_group_name`), as DeepSpeed's ZeRO-1/2 needs them."""
    require("deepspeed")
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(groups)


# ------------------------------------------------------------------------------ DeepSpeed: ZeRO-1/2 optimizer


def link_hp_fragments(optimizer: Any) -> None:
    """Link each parameter to its fragment of the ZeRO-1/2 fp32 partition (DeepSpeed does this after the first
    step); before it, `has_hp_mapping` is False everywhere and the ``safe_set_full_*`` setters cannot write."""
    require("deepspeed")
    optimizer._lazy_init_hp_params_optimizer_state()


def has_hp_mapping(param: Any) -> bool:
    """Whether this rank's ZeRO-1/2 partition holds a fragment of `param` (False: frozen, or another rank's)."""
    return getattr(param, "_hp_mapping", None) is not None


def set_full_fp32_param(param: Any, value: Any) -> None:
    """Write the full fp32 master of `param` into this rank's fragment of it."""
    require("deepspeed")
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(param, value)


def set_full_optimizer_state(param: Any, value: Any, key: str) -> None:
    """Write the full optimizer state `key` (e.g. Adam's ``exp_avg``) of `param` into this rank's fragment."""
    require("deepspeed")
    from deepspeed.utils import safe_set_full_optimizer_state

    safe_set_full_optimizer_state(param, value, key)


# ------------------------------------------------------------------- DeepSpeed 0.19.8: the ZeRO checkpoint layout
# (engine `_save_checkpoint` / `_save_zero_checkpoint`, `zero/stage_1_and_2.py`, `bf16_optimizer.py`,
# `utils/zero_to_fp32.py`); described in nestor_ds/checkpoint/fp32_master.py

MODEL_STATES = "mp_rank_00_model_states.pt"  # non-expert weights + engine state + our client state
EXPERT_FILE_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")  # one token expert
OPTIM_FILE_RE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")  # ZeRO-1/2 partition
ZERO3_MODEL_FILES = "zero_pp_rank_*_model_states.pt"  # glob: ZeRO-3 partitioned weights
EXPERT_OPTIM_FILES = "expp_rank_*_optim_states.pt"  # glob: DeepSpeed-MoE optimizer files (not read by us)
TENSOR_PARALLEL_MODEL_FILES = "mp_rank_0[1-9]*_model_states.pt"  # glob: tensor-parallel shards (not supported)
# DeepSpeed-MoE's names of the token experts inside a model state; local ids before the expert files' renaming
EXPERT_ID_RE = re.compile(r"(\.deepspeed_moe\.experts\.deepspeed_experts\.)(\d+)\.")
EXPERT_KEY = ".deepspeed_moe.experts."  # expert parameters live in their own files, not in the module state

# keys of the model-state file
MODULE = "module"
PARAM_SHAPES = "param_shapes"  # [group] {rank-local name: shape}, in each optimizer group's flat order
SHARED_PARAMS = "shared_params"  # {alias: source}
NUM_EXPERTS = "num_experts"  # [MoE layer] expert count
GLOBAL_STEPS, GLOBAL_SAMPLES = "global_steps", "global_samples"
# every key DeepSpeed writes into the model-state file for itself; the rest is the client state (ours)
DEEPSPEED_MODEL_STATE_KEYS = frozenset(
    {
        MODULE,
        "buffer_names",
        "optimizer",
        PARAM_SHAPES,
        "frozen_param_shapes",
        SHARED_PARAMS,
        "frozen_param_fragments",
        "lr_scheduler",
        "data_sampler",
        "random_ltd",
        "sparse_tensor_module_names",
        "skipped_steps",
        GLOBAL_STEPS,
        GLOBAL_SAMPLES,
        "dp_world_size",
        "mp_world_size",
        "checkpoint_parallel_dimensions",
        "ds_config",
        "ds_version",
        NUM_EXPERTS,
        "ds_autoep_layers",
    }
)

# keys of a ZeRO-1/2 optimizer-state file
OPTIMIZER_STATE_DICT = "optimizer_state_dict"  # the optimizer's state_dict inside the file
FP32_PARTITIONS = "single_partition_of_fp32_groups"  # [group] this rank's slice of the flat fp32 master
PARTITION_COUNT = "partition_count"  # [group] ranks the group is split over
ALIGNMENT_PADDINGS = "param_alignment_paddings"  # [group] gap after each parameter
SLICE_MAPPINGS = "param_slice_mappings"  # [group] {rank-local name: fragment_address(start, numel)}
BASE_OPTIMIZER_STATE = "base_optimizer_state"  # torch's optimizer state_dict over the partitions
ZERO_STAGE = "zero_stage"

# classes DeepSpeed's checkpoint files pickle besides tensors and containers: plain state holders that run no code
# on load, the only globals the safe loader (`torch.load(weights_only=True)`) admits
DEEPSPEED_SAFE_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


# ------------------------------------------------------------------------------------------- MLflow private API


def metric_objs(run: Any) -> list[Any]:
    """The latest value of every metric of an MLflow run as Metric objects (key, value, step, timestamp):
    ``Run.data.metrics`` has the values only, and the step tells how far a resumed run's metrics got."""
    require("mlflow")
    return list(run.data._metric_objs)


def resolve_context_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """`tags` plus the context tags ``mlflow.start_run`` adds (user, source name, ...) for a run created through
    ``MlflowClient.create_run``, which adds none."""
    require("mlflow")
    from mlflow.tracking.context.registry import resolve_tags

    return resolve_tags(dict(tags))


def system_metrics_monitor(run_id: str, sampling_interval: float, resume_logging: bool, tracking_uri: str) -> Any:
    """MLflow's system-metrics sampler bound to one run and one tracking URI (``mlflow.start_run`` would bind it to
    the global active run, which a client-only tracker does not have). Call ``.start()`` and ``.finish()``."""
    require("mlflow")
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    return SystemMetricsMonitor(
        run_id, sampling_interval=sampling_interval, resume_logging=resume_logging, tracking_uri=tracking_uri
    )


def stop_system_metrics_now(monitor: Any) -> None:
    """Stop a `system_metrics_monitor` without its final flush (``finish`` would log to the store that just
    failed): its sampler thread ends at its next wake-up."""
    monitor._shutdown_event.set()
