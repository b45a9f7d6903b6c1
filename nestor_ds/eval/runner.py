"""The evaluation pass: one-step and rollout errors of a model on the test split of every dataset.

Why it looks like this:
- Per-sample, per-channel values are accumulated as float64 sums and counts, then summed over ranks
  with one all-reduce per dataset: the result does not depend on how trajectories are split over
  ranks or batches (up to float rounding of the model itself), and padded channels never count.
- Under expert parallelism every rank must run the model the same number of times (the MoE
  all-to-all is collective). Ranks can hold different numbers of test batches, so with world_size > 1
  the ranks agree at every step whether anyone still has a batch; a rank that ran out repeats a
  dummy batch of the agreed shape and throws its result away.
- Under torch.distributed each rank scores a disjoint share of the test trajectories (unless told otherwise),
  so evaluation time shrinks with the world size while every rank still gets the whole report.

Shape legend: B samples (scored windows), X, Y grid, T frames (rollout steps), C channels, Nb spectrum bands.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from .metrics import SpectrumConfig, l2re, l2re_per_step, spectrum_band_error


class _Sums:
    """Float64 sums of per-window, per-channel metrics and their counts for one dataset (grows to the T, C seen).

    One-step metrics count every scored window; rollout metrics (rollout L2RE, per-step curve, rollout
    spectrum) count only the windows whose horizon lies inside the trajectory (``full``)."""

    ONE_STEP = ("one_step", "spec_one_step")
    ROLLOUT = ("rollout", "curve", "spec_rollout")

    def __init__(self, n_bands: int) -> None:
        self.n_bands = n_bands
        self.t = 0
        self.c = 0
        self.parts: dict[str, list[torch.Tensor]] = {f: [] for f in self.ONE_STEP + self.ROLLOUT}
        self.masks: list[torch.Tensor] = []
        self.full: list[torch.Tensor] = []

    def add(
        self,
        one_step: torch.Tensor,
        rollout: torch.Tensor,
        curve: torch.Tensor,
        spec_one: torch.Tensor,
        spec_roll: torch.Tensor,
        mask: torch.Tensor,
        full: torch.Tensor,
    ) -> None:
        self.t = max(self.t, curve.shape[1])
        self.c = max(self.c, mask.shape[1])
        for name, t in zip(
            ("one_step", "rollout", "curve", "spec_one_step", "spec_rollout"),
            (one_step, rollout, curve, spec_one, spec_roll),
            strict=True,
        ):
            self.parts[name].append(t.detach().double().cpu())
        self.masks.append(mask.detach().cpu())
        self.full.append(full.detach().cpu())

    def totals(self, t: int, c: int) -> torch.Tensor:
        """Sums and counts packed in one flat float64 vector (for a single all-reduce)."""
        sums = {
            "one_step": torch.zeros(c),
            "rollout": torch.zeros(c),
            "curve": torch.zeros(t, c),
            "spec_one_step": torch.zeros(self.n_bands, c),
            "spec_rollout": torch.zeros(self.n_bands, c),
        }
        sums = {n: t.double() for n, t in sums.items()}
        count_C = torch.zeros(c, dtype=torch.float64)
        count_roll_C = torch.zeros(c, dtype=torch.float64)
        windows = torch.zeros(2, dtype=torch.float64)  # [scored one-step, scored rollout]
        for i, (mask, full_B) in enumerate(zip(self.masks, self.full, strict=True)):
            w = mask.double()
            cc = w.shape[1]
            count_C[:cc] += w.sum(0)
            count_roll_C[:cc] += w[full_B].sum(0)
            windows += torch.tensor([float(mask.shape[0]), float(full_B.sum())], dtype=torch.float64)
            sums["one_step"][:cc] += self.parts["one_step"][i].sum(0)
            sums["spec_one_step"][:, :cc] += torch.nan_to_num(self.parts["spec_one_step"][i]).sum(0)
            sums["rollout"][:cc] += self.parts["rollout"][i][full_B].sum(0)
            curve = self.parts["curve"][i][full_B]
            sums["curve"][: curve.shape[1], :cc] += curve.sum(0)
            sums["spec_rollout"][:, :cc] += torch.nan_to_num(self.parts["spec_rollout"][i][full_B]).sum(0)
        flat = [t.reshape(-1) for t in sums.values()]
        return torch.cat(flat + [count_C, count_roll_C, windows])


def _unpack(flat: torch.Tensor, t: int, c: int, n_bands: int) -> dict[str, torch.Tensor]:
    sizes = {
        "one_step": (c,),
        "rollout": (c,),
        "curve": (t, c),
        "spec_one_step": (n_bands, c),
        "spec_rollout": (n_bands, c),
        "count": (c,),
        "count_rollout": (c,),
        "windows": (2,),
    }
    out, i = {}, 0
    for name, shape in sizes.items():
        n = int(torch.tensor(shape).prod())
        out[name] = flat[i : i + n].reshape(shape)
        i += n
    return out


def _all_reduce(t: torch.Tensor, op: Any, world_size: int) -> torch.Tensor:
    if world_size > 1:
        from nestor_ds.collectives import all_reduce_host

        all_reduce_host(t, op)
    return t


def _lockstep(batches: Iterable[dict], world_size: int, device: torch.device) -> Iterator[tuple[dict, bool]]:
    """Yield (batch, real) until no rank has a batch left; ranks that ran out get a dummy batch.

    Every step all-reduces [has_batch, X, Y, T_in, C, T_rest] with MAX so that a rank which never had
    a batch still knows the shape to run.
    """
    it = iter(batches)
    last: dict | None = None
    while True:
        batch = next(it, None)
        shape = [0] * 6 if batch is None else [1, *batch["x"].shape[1:], batch["y"].shape[3]]
        agreed = _all_reduce(torch.tensor(shape, dtype=torch.long), dist.ReduceOp.MAX, world_size).tolist()
        if agreed[0] == 0:
            return
        if batch is not None:
            last = batch
            yield batch, True
            continue
        if last is None:
            _, X, Y, T_in, C, T_rest = agreed
            last = {
                "x": torch.zeros(1, X, Y, T_in, C),
                "y": torch.zeros(1, X, Y, T_rest, C),
                "y_steps": torch.full((1,), T_rest, dtype=torch.long),
                "channel_mask": torch.ones(1, C, dtype=torch.bool),
            }
        yield last, False


def _share(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size) of the split: as given, else torch.distributed's, else one process scoring everything."""
    if rank is None and world_size is None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return rank or 0, world_size or 1


def _names(spec: Any, i: int) -> tuple[str, list[str]]:
    """Dataset name and channel names (from the shard manifest; c0, c1, ... when it has none)."""
    from nestor_ds.data.config import DatasetSpec, load_manifest, spec_manifest

    name = getattr(spec, "name", None) or f"dataset{i}"
    channels = getattr(spec, "channels", None)
    if channels is None and getattr(spec, "path", None):  # a URL spec's manifest is not under its path
        channels = (spec_manifest(spec) if isinstance(spec, DatasetSpec) else load_manifest(spec.path)).get("channels")
    return str(name), [str(c) for c in channels or []]


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    datasets: Sequence[Any] | Any,
    data_cfg: Any = None,
    rollout_steps: int | None = None,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    rank: int | None = None,
    world_size: int | None = None,
    *,
    max_trajectories: int | None = None,
    spectrum: SpectrumConfig | None = None,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    windows: str = "all",
) -> dict[str, Any]:
    """Evaluate `model` on the test split of each dataset; every rank returns the same report dict.

    windows: "all" (default) scores every start frame that has t_in frames before it (DPOT-style);
    "first" scores only the first window of each trajectory. One-step metrics average over every scored
    window, rollout metrics over the windows whose rollout horizon lies inside the trajectory.

    datasets: the DatasetSpecs to score (dataset_id = position), or a DataConfig (then its `.datasets`
    are scored and it is also the data_cfg). rollout_steps: frames to roll out autoregressively;
    None -> min(available, dataset's rollout_steps). rank/world_size split the test trajectories; by
    default they are torch.distributed's (each rank scores a disjoint share, the sums are all-reduced, every
    rank gets the report one process would), or 0/1 without a process group.
    Report: {"datasets": {name: {...}}, "mean": {...}, "settings": {...}} with, per dataset, the mean
    over samples and real channels of the one-step L2RE, the rollout L2RE (over all T frames), the
    L2RE at each rollout step, and the relative energy-spectrum error per wavenumber band -- each
    also per channel.
    """
    from nestor_ds.data import build_eval_batches  # the data part; imported here to keep metrics light

    if hasattr(datasets, "datasets"):  # a DataConfig
        data_cfg = datasets if data_cfg is None else data_cfg
        datasets = datasets.datasets
    if data_cfg is None:
        raise ValueError("evaluate_model: data_cfg (DataConfig) is required when datasets is a list of specs")
    rank, world_size = _share(rank, world_size)
    spectrum = spectrum or SpectrumConfig()
    device = torch.device(device)
    was_training = model.training
    model.eval()
    report: dict[str, Any] = {"datasets": {}}
    try:
        for ds_id, spec in enumerate(datasets):
            name, channels = _names(spec, ds_id)
            want = rollout_steps if rollout_steps is not None else getattr(spec, "rollout_steps", None)
            sums = _Sums(spectrum.n_bands)
            horizon = None if want is None else max(1, int(want))
            batches = build_eval_batches(
                spec, data_cfg, ds_id, batch_size, max_trajectories, rank, world_size, windows=windows, horizon=horizon
            )
            stream = _lockstep(batches, world_size, device) if world_size > 1 else ((b, True) for b in batches)
            bar = tqdm(stream, desc=f"eval {name}", unit="batch", disable=not progress or rank != 0, leave=False)
            for batch, real in bar:
                x = batch["x"].to(device, dtype=dtype)  # dtype: the weights' (bf16 under DeepSpeed bf16)
                y = batch["y"].to(device)
                mask = batch["channel_mask"].to(device)
                t = y.shape[3] if horizon is None else min(horizon, y.shape[3])
                # the rollout's first frame is the one-step forecast (eval mode: deterministic), one pass serves both
                pred_T = model.rollout(x, t, mask).float()
                if not real:
                    continue
                full_B = batch["y_steps"] >= t
                pred1, true1, true_T = pred_T[..., :1, :], y[..., :1, :].float(), y[..., :t, :].float()
                sums.add(
                    l2re(pred1, true1, mask),
                    l2re(pred_T, true_T, mask),
                    l2re_per_step(pred_T, true_T, mask),
                    spectrum_band_error(pred1, true1, mask, spectrum),
                    spectrum_band_error(pred_T, true_T, mask, spectrum),
                    mask,
                    full_B,
                )
            tc = _all_reduce(torch.tensor([sums.t, sums.c], dtype=torch.long), dist.ReduceOp.MAX, world_size).tolist()
            flat = _all_reduce(sums.totals(*tc), dist.ReduceOp.SUM, world_size)
            report["datasets"][name] = {
                **_summarise(_unpack(flat, *tc, spectrum.n_bands), channels, spectrum),
                "windows": windows,
            }
    finally:
        model.train(was_training)
    report["mean"] = _mean_over_datasets(report["datasets"])
    report["settings"] = {
        "windows": windows,
        "rollout_steps": rollout_steps,
        "batch_size": batch_size,
        "max_trajectories": max_trajectories,
        "world_size": world_size,
        "spectrum_bands": spectrum.names(),
        "spectrum_include_dc": spectrum.include_dc,
    }
    return report


def _summarise(t: dict[str, torch.Tensor], channels: list[str], spectrum: SpectrumConfig) -> dict[str, Any]:
    """Sums -> means over samples (per channel) and over real channels (overall), as plain floats."""
    real = (t["count"] > 0).nonzero().squeeze(1).tolist()
    names = [channels[c] if c < len(channels) else f"c{c}" for c in real]
    bands = spectrum.names()

    def per_channel(s: torch.Tensor, count: torch.Tensor) -> torch.Tensor:  # [..., C] sums -> [..., C_real] means
        return (s / count.clamp_min(1))[..., real]

    def overall(s: torch.Tensor, count: torch.Tensor) -> torch.Tensor:  # mean over (window, real channel) pairs
        return s[..., real].sum(-1) / count[real].sum().clamp_min(1)

    n_one, n_roll = (int(v) for v in t["windows"].tolist())
    out: dict[str, Any] = {
        "n_samples": n_one,
        "n_rollout_windows": n_roll,
        "channels": names,
        "rollout_steps": int(t["curve"].shape[0]),
    }
    for key, src, count in (
        ("l2re_1step", "one_step", t["count"]),
        ("l2re_rollout", "rollout", t["count_rollout"]),
        ("l2re_curve", "curve", t["count_rollout"]),
    ):
        out[key] = overall(t[src], count).tolist()
        out[f"{key}_per_channel"] = dict(zip(names, per_channel(t[src], count).t().tolist(), strict=True))
    for key, src, count in (
        ("spectrum_err_1step", "spec_one_step", t["count"]),
        ("spectrum_err_rollout", "spec_rollout", t["count_rollout"]),
    ):
        out[key] = dict(zip(bands, overall(t[src], count).tolist(), strict=True))
        out[f"{key}_per_channel"] = {
            n: dict(zip(bands, v, strict=True))
            for n, v in zip(names, per_channel(t[src], count).t().tolist(), strict=True)
        }
    if n_roll == 0:  # no window long enough for this horizon: say so instead of reporting 0
        out["l2re_rollout"] = float("nan")
    return out


def _mean_over_datasets(per_ds: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Unweighted mean over datasets (each dataset counts once, as in the paper's tables)."""
    out: dict[str, float] = {}
    for key in ("l2re_1step", "l2re_rollout"):
        vals = [d[key] for d in per_ds.values() if d["n_samples"] > 0]
        out[key] = float(sum(vals) / len(vals)) if vals else float("nan")
    return out
