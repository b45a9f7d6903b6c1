"""The one training loop, shared by pre-training (``train.py``) and fine-tuning (``finetune.py``).

An entry builds a :class:`RunConfig`, optionally a ``prepare`` hook (fine-tune: load weights, freeze, choose
learning-rate groups), and calls :func:`run_training`. Everything else is here: process group, expert
parallelism, the DeepSpeed engine, the data stream, the loss, evaluation, checkpoints, preemption and MLflow.

Determinism: every random draw of step ``s`` on rank ``r`` comes from generators seeded by
``derive_seed(seed, purpose, r, s)``, the data stream is a function of (seed, rank, worker, step) and the
learning rate a function of the step, so a run resumed from step ``k`` replays exactly the steps an
uninterrupted run would have taken.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from nestor_ds.config import RunConfig, format_config
from nestor_ds.checkpoint import save_resume as ckpt
from nestor_ds.engine.budget import Budget
from nestor_ds.engine.compile import CompilePlan, apply_compile, eager_for_evaluation
from nestor_ds.engine.distributed import (DistInfo, any_rank, derive_seed, init_distributed, resolve_ep_size,
                                          set_threads, setup_expert_parallel)
from nestor_ds.engine.hot_loop import PART_NAMES, DeviceFeed, DeviceLog
from nestor_ds.engine.loss import inject_noise, noise_generator, training_loss
from nestor_ds.engine.optim import apply_lr, build_optimizer, build_param_groups, lr_at
from nestor_ds.engine.perf import PerfMeter
from nestor_ds.engine.preemption import Preemption as _Preemption
from nestor_ds.log import get_logger

log = get_logger(__name__)

# prepare(model, cfg, dist) -> {"group name": (params, lr multiplier)}; called before the engine is built.
PrepareHook = Callable[[torch.nn.Module, RunConfig, DistInfo], dict[str, tuple[list[torch.nn.Parameter], float]]]
# batches(start_micro_step) -> iterator of batch dicts for this rank; default: the shard stream of cfg.data.
BatchSource = Callable[[int], Iterator[dict[str, torch.Tensor]]]


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # all-reduced loss per optimizer step, this process's run
    final_eval: dict[str, Any] = field(default_factory=dict)
    run_id: Optional[str] = None
    preempted: bool = False
    model: Optional[torch.nn.Module] = None  # the trained module (this rank's experts under expert parallelism)


def load_ds_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--ds_config {p}: file not found")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--ds_config {p}: not valid JSON ({e.msg} at line {e.lineno})") from None


def check_ds_config(ds: dict[str, Any], cfg: RunConfig, world_size: int) -> tuple[int, int, int]:
    """(micro-batch, accumulation, ZeRO stage) from the JSON; refuse combinations that cannot work, naming the fix."""
    micro = int(ds.get("train_micro_batch_size_per_gpu", 0))
    accum = int(ds.get("gradient_accumulation_steps", 1))
    if micro <= 0:
        raise ValueError("ds_config: train_micro_batch_size_per_gpu must be set to a positive integer")
    if "train_batch_size" in ds and int(ds["train_batch_size"]) != micro * accum * world_size:
        raise ValueError(
            f"ds_config: train_batch_size={ds['train_batch_size']} != micro ({micro}) x accumulation ({accum}) x "
            f"data-parallel size ({world_size}); drop train_batch_size and DeepSpeed derives it")
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if cfg.model.arch == "nestor" and cfg.model.moe.backend == "megablocks" and not ds.get("bf16", {}).get("enabled"):
        raise ValueError("model.moe.backend=megablocks runs its experts in bf16: use a *_bf16.json ds_config")
    return micro, accum, stage


def run_training(cfg: RunConfig, ds_config_path: str, entry: str = "pretrain", run_name: Optional[str] = None,
                 resume: Optional[str] = None, prepare: Optional[PrepareHook] = None,
                 parent_run_id: Optional[str] = None, evaluate_before: bool = False,
                 batch_source: Optional[BatchSource] = None) -> TrainResult:
    """Train ``cfg`` with DeepSpeed; returns what tests and entries need (run dir, losses, final evaluation)."""
    import deepspeed

    from nestor_ds.data import TrainStream
    from nestor_ds.model import build_model
    from nestor_ds.tracking import ExpertUsage, Tracker
    from nestor_ds.tracking.datasets import log_run_inputs
    from nestor_ds.tracking.model_logging import log_trained_model
    from nestor_ds.tracking.redact import redact

    dist_info = init_distributed()
    threads = set_threads(cfg.train.threads_per_rank, dist_info.local_world_size)
    ds_config = load_ds_config(ds_config_path)
    micro, accum, zero_stage = check_ds_config(ds_config, cfg, dist_info.world_size)
    ep = resolve_ep_size(cfg.ep_size, dist_info.world_size, cfg.model.moe.num_experts,
                         cfg.model.moe.backend if cfg.model.arch == "nestor" else "none", zero_stage)
    cfg.model.moe.ep_size = ep
    run_name = run_name or f"{entry}-{cfg.preset or cfg.model.arch}"
    run_dir = Path(cfg.train.output_dir) / run_name
    ckpt_root = run_dir / "checkpoints"
    existing = ckpt.complete_tags(ckpt_root)
    if resume is None and existing:
        raise ValueError(f"{run_dir} already holds checkpoints (newest {existing[-1].name}): continue that run with "
                         f"--resume auto, or start a new one with another --run-name")

    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        log.info("%s: world size %d, ep_size %d, %d thread(s) per rank, device %s", entry, dist_info.world_size, ep, threads, dist_info.device)
        log.info("resolved configuration:\n%s", format_config(cfg, ds_config))

    torch.manual_seed(derive_seed(cfg.train.seed, "init"))  # identical initial weights on every rank
    model = build_model(cfg.model)
    setup_expert_parallel(model, ep, lockstep=zero_stage == 3)  # process groups given to the model from outside
    groups = prepare(model, cfg, dist_info) if prepare else {"model": (list(model.parameters()), 1.0)}
    # in place and lazy: state_dict keys unchanged, traced at the first step with the weights DeepSpeed cast
    compiled = apply_compile(model, cfg.train.compile, cfg.train.cuda_graphs, dist_info.device)
    optimizer = build_optimizer(build_param_groups(groups), cfg.optim)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    device = engine.device
    # DeepSpeed casts the weights for bf16/fp16; inputs follow them (the loss is computed in fp32)
    input_dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32

    client = ckpt.resume(engine, resume, ckpt_root, run_dir / "metrics.jsonl")  # load, fall back, tidy (checkpoint.py)
    if client.get("config_digest") not in (None, cfg.digest()) and dist_info.is_main:
        log.warning("the configuration differs from the checkpoint's (digest %s vs %s): the trajectory will not match an uninterrupted run",
                    client.get("config_digest"), cfg.digest())
    start_step = int(client.get("step", 0))

    tracker = Tracker(cfg.tracking, rank=dist_info.rank, entry=entry, run_name=run_name, parent_run_id=parent_run_id,
                      resume_run_id=client.get("mlflow_run_id"), buffer_dir=run_dir / "mlflow_buffer")
    log_run_inputs(tracker, cfg, entry)  # dataset lineage (start of run only)
    usage = ExpertUsage(num_datasets=len(cfg.data.datasets))
    perf = PerfMeter(cfg.model, samples_per_step=micro * accum * dist_info.world_size, device=device)
    stats = perf.model_stats()
    if start_step == 0:
        tracker.log_params({"config": cfg.to_dict(), "ds_config": ds_config, "world_size": dist_info.world_size,
                            "ep_size": ep, "preset": cfg.preset, "entry": entry, **stats})  # flattened by the tracker
    tracker.set_tags({"nestor.preset": cfg.preset or cfg.model.arch, "nestor.params_total": stats["total_params"],
                      "nestor.params_active": stats["active_params"]})

    run_config_json = redact({**cfg.to_dict(), "world_size": dist_info.world_size, "ep_size": ep,
                              "mlflow_run_id": tracker.run_id or ""})  # no credentials beside the weights
    if batch_source is None:
        stream = TrainStream(cfg.data, micro_batch=micro, rank=dist_info.rank, world_size=dist_info.world_size, seed=cfg.train.seed)
        batch_source = stream.batches
    batches = DeviceFeed(iter(batch_source(start_step * accum)), device)
    result = TrainResult(run_dir=run_dir, steps=start_step, run_id=tracker.run_id, model=engine.module)

    if evaluate_before and start_step == 0:
        result.final_eval["before"] = _evaluate_eager(compiled, engine, cfg, dist_info, tracker, step=start_step, prefix="eval_before")

    total = cfg.train.max_steps
    # a time/FLOP budget (engine/budget.py): the schedule follows the share spent, the loop stops when it is spent
    budget = Budget(cfg.train.time_budget_s, cfg.train.flop_budget,
                    flops_per_step=3.0 * stats["flops_per_sample"] * micro * accum * dist_info.world_size)
    budget.load(client.get("budget"), start_step)
    progress = _progress(dist_info.is_main, start_step, None if budget.active else total, run_name)
    step = start_step
    # the hot loop reads nothing from the device: loss parts, grad norms and routing wait in `pending` until a
    # logging step (every log_every steps, the first and last step, before evaluations and checkpoints)
    pending = DeviceLog(usage)
    # DeepSpeed's ZeRO-0 fp32 path clips without keeping the norm: take it ourselves so train/grad_norm is always logged
    own_grad_norm = zero_stage == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())
    interval_start, interval_steps = time.perf_counter(), 0
    with _Preemption() as preempt:
        while step < total:
            lr = lr_at(step, total, cfg.optim, fraction=budget.fraction(step))
            apply_lr(optimizer, lr)
            parts_P = _optimizer_step(engine, batches, cfg, dist_info.rank, step, accum, input_dtype, pending, compiled,
                                      local_norm=own_grad_norm)
            step += 1
            grad_norm = engine.get_global_grad_norm()
            pending.add_step(step, lr, parts_P, pending.take_local_grad_norm() if grad_norm is None else grad_norm)
            interval_steps += 1

            last = step == total or budget.exhausted(step)
            checkpoint = last or step % cfg.train.ckpt_every == 0 or step == cfg.train.stop_at
            evaluate = bool(cfg.train.eval_every) and step % cfg.train.eval_every == 0
            if not (step % cfg.train.log_every == 0 or last or step == start_step + 1 or evaluate or checkpoint
                    or budget.needs_check(step)):
                continue
            # logging step: one read of everything since the last one; preemption (and the seconds spent, under a
            # time budget) agreed on here (collectives)
            now = time.perf_counter()
            timing = perf.step((now - interval_start) / interval_steps)
            if budget.time_s is not None:
                budget.agree(step, now - interval_start, interval_steps)
                if budget.exhausted(step):
                    last = checkpoint = True
            evaluate = evaluate and not last  # the final evaluation runs after the loop
            interval_start, interval_steps = now, 0
            for logged_step, m in pending.flush():
                metrics = {**m, **timing, **(budget.metrics(logged_step) if budget.active else {})}
                result.losses.append(metrics["train/loss"])
                if dist_info.is_main:
                    with open(run_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps({"step": logged_step, **metrics}) + "\n")
                if not math.isfinite(metrics["train/loss"]):
                    raise FloatingPointError(f"step {logged_step}: loss is {metrics['train/loss']} (lr {metrics['train/lr']:.3g}); "
                                             "lower optim.lr or check the data")
                progress.update(metrics)
            tracker.log_metrics(metrics, step=step)

            stop = any_rank(preempt.requested) or step == cfg.train.stop_at
            if evaluate:
                usage.reduce()
                tracker.log_metrics(usage.metrics("experts"), step=step)
                _evaluate_eager(compiled, engine, cfg, dist_info, tracker, step=step, usage=usage, figures=True)
                usage.reset()
            if stop or checkpoint:
                state = {
                    "step": step, "samples_seen": step * micro * accum * dist_info.world_size,
                    "data_position": step * accum, "rng": ckpt.rng_state(), "config_digest": cfg.digest(),
                    "mlflow_run_id": tracker.run_id or "", "budget": budget.state(step),
                }
                tag_dir = ckpt.save_checkpoint(engine, ckpt_root, step, state, run_config_json, cfg.train.keep_last)
                progress.note(f"checkpoint {tag_dir}")
            if stop and not last:
                result.preempted = True
                progress.note(f"preempted: stopped cleanly at step {step}; resume with --resume auto")
                break
            if last:
                if step < total:
                    progress.note(f"budget spent at step {step}: {budget.metrics(step)}")
                break
            interval_start = time.perf_counter()   # evaluation and checkpoint time is not step time
    progress.close()
    result.steps = step
    if not result.preempted:
        pending.flush_usage()
        usage.reduce()
        tracker.log_metrics(usage.metrics("experts"), step=step)
        result.final_eval["after"] = _evaluate_eager(compiled, engine, cfg, dist_info, tracker, step=step, usage=usage, figures=True)
        if dist_info.is_main:
            _write_summary(run_dir / "run_summary.json", cfg, step, stats, budget, result.final_eval["after"], usage)
        if dist_info.is_main:  # end of run only: export, log (and register) the model in MLflow
            log_trained_model(tracker, ckpt_root / ckpt.tag_for(step), run_dir / "model.safetensors",
                              result.final_eval["after"])
    tracker.finish("KILLED" if result.preempted else "FINISHED")
    if dist_info.is_main:
        log.info("run directory: %s (checkpoints in %s)", run_dir, ckpt_root)
    return result


def _write_summary(path: Path, cfg: RunConfig, step: int, stats: dict[str, Any], budget: Budget,
                   final_eval: dict[str, Any], usage: Any) -> None:
    """run_summary.json beside metrics.jsonl: what a finished run reached and cost (read by tools/study.py)."""
    names = [d.name for d in cfg.data.datasets]
    experts = {str(b): {"dataset_expert": usage.counts_matrix(b).tolist(), "mi_bits": usage.specialisation(b),
                        "datasets": names} for b in sorted(usage.blocks)}
    summary = {"steps": step, "model_stats": stats, **budget.metrics(step), "final_eval": final_eval,
               "expert_usage": experts}
    path.write_text(json.dumps(summary, indent=1))


def _optimizer_step(engine: Any, batches: Iterator[dict[str, torch.Tensor]], cfg: RunConfig, rank: int, step: int,
                    accum: int, input_dtype: torch.dtype, pending: DeviceLog,
                    compiled: Optional[CompilePlan] = None, local_norm: bool = False) -> torch.Tensor:
    """One optimizer step = ``accum`` micro-batches (DeepSpeed steps the optimizer at the boundary).

    Every random draw is seeded by (seed, purpose, rank, step, micro-batch): a resumed run replays them exactly;
    the input noise is drawn on the device. Returns this rank's loss parts averaged over the micro-batches as a
    [P] device tensor (order PART_NAMES); reads nothing back to the host. ``local_norm``: DeepSpeed reports no
    gradient norm (ZeRO-0 in fp32), so the norm of the gradients about to be applied is taken here, on the device.
    """
    device = engine.device
    parts_P: Optional[torch.Tensor] = None
    for micro_i in range(accum):
        if compiled is not None:
            compiled.step_begin()
        batch = next(batches)
        torch.manual_seed(derive_seed(cfg.train.seed, "step", rank, step, micro_i))
        noise_gen = noise_generator(device, derive_seed(cfg.train.seed, "noise", rank, step, micro_i))
        x = inject_noise(batch["x"].to(device, non_blocking=True), cfg.train.input_noise, noise_gen).to(dtype=input_dtype)
        mask = batch["channel_mask"].to(device, non_blocking=True)
        out = engine(x, mask)
        loss, parts = training_loss(out.pred.float(), batch["y"].to(device, non_blocking=True), mask, out.aux_losses, cfg.loss)
        engine.backward(loss)
        if local_norm and micro_i == accum - 1:  # after the boundary's gradient all-reduce, before the step
            pending.note_local_grad_norm(_grad_norm(engine.module))
        engine.step()
        # the skipped-window count (data.on_bad_sample: skip) is summed over the micro-batches, the loss parts averaged
        counts = {"skipped_samples": _skipped_count(batch, device)}
        micro_P = torch.stack([parts[k] / accum if k in parts else counts[k] for k in PART_NAMES])
        parts_P = micro_P if parts_P is None else parts_P + micro_P
        pending.add_micro(out.routing, batch["dataset_id"], copy=compiled is not None and compiled.cuda_graphs)
    assert parts_P is not None
    return parts_P


def _grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """L2 norm of this rank's gradients as a device scalar (under expert parallelism: the experts this rank holds)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def _skipped_count(batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Windows of this micro-batch skipped as bad data (zeroed and masked out by the stream), as a device scalar."""
    if "skipped" not in batch:  # batch sources other than the shard stream
        return torch.zeros((), device=device)
    return batch["skipped"].to(device, non_blocking=True).sum().float()


def _evaluate(engine: Any, cfg: RunConfig, dist_info: DistInfo, tracker: Any, step: int, prefix: str = "eval",
              usage: Any = None, figures: bool = False) -> dict[str, Any]:
    """One-step and short-rollout L2RE per dataset on the test split, logged to MLflow.

    Every rank evaluates the same trajectories: under expert parallelism each forward pass is a collective,
    so all ranks must run the same number of them (the cost is small: test sets are capped by
    ``train.eval_max_trajectories``).
    """
    from nestor_ds.eval import evaluate_model

    model = engine.module
    was_training = model.training
    model.eval()
    report = evaluate_model(model, cfg.data, rollout_steps=cfg.train.eval_rollout_steps, batch_size=cfg.train.eval_batch_size,
                            max_trajectories=cfg.train.eval_max_trajectories, device=engine.device,
                            progress=dist_info.is_main, dtype=next(model.parameters()).dtype,
                            windows=cfg.train.eval_windows)
    metrics = {}
    for name, ds in report.get("datasets", {}).items():
        metrics[f"{prefix}/{name}/l2re_1step"] = ds["l2re_1step"]
        if ds.get("l2re_rollout") is not None:
            metrics[f"{prefix}/{name}/l2re_rollout"] = ds["l2re_rollout"]
    tracker.log_metrics(metrics, step=step)
    if dist_info.is_main:
        log.info("step %d %s: %s", step, prefix, "  ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in metrics.items() if k.endswith("l2re_1step")))
    if figures and cfg.tracking.figure_every_eval:
        from nestor_ds.tracking.report_figures import log_eval_figures

        log_eval_figures(tracker, model, cfg, report, usage, engine.device, step)
    tracker.log_dict(report, f"{prefix}_step{step:08d}.json")
    model.train(was_training)
    return report


def _evaluate_eager(plan: CompilePlan, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`_evaluate` with compiled regions run eagerly (evaluation routes dropless, other batch sizes)."""
    with eager_for_evaluation(plan):
        return _evaluate(*args, **kwargs)


class _progress:
    """Rank-0 progress bar (step, loss, samples/s, ETA); other ranks stay quiet."""

    def __init__(self, enabled: bool, start: int, total: Optional[int], name: str) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=name, unit="step", dynamic_ncols=True, file=sys.stderr,
                            mininterval=1.0)

    def update(self, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", l2=f"{metrics['train/rel_l2']:.4f}",
                                 sps=f"{metrics.get('perf/samples_per_s', 0):.1f}", refresh=False)
            self.bar.update(1)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(f"[nestor-ds] {text}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
