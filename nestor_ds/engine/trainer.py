"""The one training loop, shared by pre-training (``train.py``) and fine-tuning (``finetune.py``).

An entry builds a :class:`RunConfig`, optionally a ``prepare`` hook (fine-tune: load weights, freeze, choose
learning-rate groups), and calls :func:`run_training`. The :class:`Trainer` here sets up the process group, expert
parallelism, the DeepSpeed engine, the data stream, resume and MLflow, then runs the loop: optimizer steps
(``step.py``), logging steps, evaluation (``evaluation.py``), checkpoints, preemption and budgets, and the end of
the run (final evaluation, ``run_summary.json``, model export to MLflow).

Determinism: every random draw of step ``s`` on rank ``r`` comes from generators seeded by
``derive_seed(seed, purpose, r, s)``, the data stream is a function of (seed, rank, worker, step) and the
learning rate a function of the step, so a run resumed from step ``k`` replays exactly the steps an
uninterrupted run would have taken.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from nestor_ds.checkpoint import save_resume as ckpt
from nestor_ds.checkpoint.elastic import RunLayout
from nestor_ds.config import RunConfig, format_config
from nestor_ds.engine.budget import Budget
from nestor_ds.engine.compile import apply_compile
from nestor_ds.engine.distributed import (
    DistInfo,
    derive_seed,
    exit_on_lost_peer,
    init_distributed,
    resolve_ep_size,
    set_threads,
    setup_expert_parallel,
)
from nestor_ds.engine.ds_config import check_ds_config, load_ds_config
from nestor_ds.engine.evaluation import evaluate_eager
from nestor_ds.engine.hot_loop import DeviceFeed, DeviceLog
from nestor_ds.engine.optim import apply_lr, build_optimizer, build_param_groups, lr_at
from nestor_ds.engine.perf import PerfMeter
from nestor_ds.engine.preemption import Preemption
from nestor_ds.engine.report import USAGE_LOG, Progress, TrainResult, append_usage_row, write_summary
from nestor_ds.engine.step import optimizer_step
from nestor_ds.log import get_logger

log = get_logger(__name__)

# prepare(model, cfg, dist) -> {"group name": (params, lr multiplier)}; called before the engine is built.
PrepareHook = Callable[[torch.nn.Module, RunConfig, DistInfo], dict[str, tuple[list[torch.nn.Parameter], float]]]
# batches(start_micro_step) -> iterator of batch dicts for this rank; default: the shard stream of cfg.data.
BatchSource = Callable[[int], Iterator[dict[str, torch.Tensor]]]


def run_training(cfg: RunConfig, ds_config_path: str, evaluate_before: bool = False, **setup: Any) -> TrainResult:
    """Train ``cfg`` with DeepSpeed; returns what tests and entries need (run dir, losses, final evaluation).

    ``setup``: :func:`start_training`'s keywords (entry, run_name, resume, prepare, parent_run_id, batch_source).
    ``evaluate_before``: score the weights before the first step too (fine-tuning's "before" column)."""
    trainer, client = start_training(cfg, ds_config_path, **setup)
    if evaluate_before and trainer.start_step == 0:
        trainer.result.final_eval["before"] = trainer.evaluate(prefix="eval_before")
    trainer.start_loop(client)
    with Preemption(step=trainer.start_step) as preempt, exit_on_lost_peer(trainer.dist, trainer.ckpt_root):
        trainer.loop(preempt)
        return trainer.finish()


def start_training(
    cfg: RunConfig,
    ds_config_path: str,
    entry: str = "pretrain",
    run_name: str | None = None,
    resume: str | None = None,
    prepare: PrepareHook | None = None,
    parent_run_id: str | None = None,
    batch_source: BatchSource | None = None,
) -> tuple[Trainer, dict[str, Any]]:
    """A run set up to its loop (engine, resume, tracking, data): shared by ``run_training`` and the per-step
    benchmark ``tools/bench_loop.py``, so the benchmark measures the product's own set-up. Returns (trainer, the
    resumed client state)."""
    trainer = Trainer(cfg, ds_config_path, entry, run_name, resume)
    trainer.build(prepare)
    client = trainer.resume(resume)
    trainer.start_tracking(client, parent_run_id)
    trainer.open_data(batch_source)
    return trainer, client


class Trainer:
    """One run on this rank, set up in the order ``run_training`` calls the steps (each needs the ones before)."""

    def __init__(
        self, cfg: RunConfig, ds_config_path: str, entry: str, run_name: str | None, resume: str | None
    ) -> None:
        """Process group, threads, DeepSpeed JSON, ep_size, run directory (refused if it has checkpoints, no resume)."""
        self.cfg, self.entry = cfg, entry
        self.dist = init_distributed(cfg.train.collective_timeout_s)
        threads = set_threads(cfg.train.threads_per_rank, self.dist.local_world_size)
        self.ds_config = load_ds_config(ds_config_path)
        self.micro, self.accum, self.zero_stage = check_ds_config(self.ds_config, cfg, self.dist.world_size)
        self.ep = resolve_ep_size(
            cfg.ep_size,
            self.dist.world_size,
            cfg.model.moe.num_experts,
            cfg.model.moe.backend if cfg.model.arch == "nestor" else "none",
            self.zero_stage,
            self.dist.local_world_size,
        )
        self.run_name = cfg.run_name(entry, run_name)
        self.run_dir = Path(cfg.train.output_dir) / self.run_name
        self.ckpt_root = self.run_dir / "checkpoints"
        existing = ckpt.complete_tags(self.ckpt_root)
        if resume is None and existing:
            raise ckpt.CheckpointError(
                f"{self.run_dir} already holds checkpoints (newest {existing[-1].name}): continue that "
                f"run with --resume auto, or start a new one with another --run-name"
            )
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            log.info(
                "%s: world size %d, ep_size %d, %d thread(s) per rank, device %s",
                entry,
                self.dist.world_size,
                self.ep,
                threads,
                self.dist.device,
            )
            log.info("resolved configuration:\n%s", format_config(cfg, self.ds_config))

    @property
    def samples_per_step(self) -> int:
        return self.micro * self.accum * self.dist.world_size

    def build(self, prepare: PrepareHook | None) -> None:
        """Model (identical initial weights on every rank), expert-parallel groups, the prepare hook, regional
        compilation, optimizer groups and the DeepSpeed engine."""
        import deepspeed

        from nestor_ds.model import build_model

        torch.manual_seed(derive_seed(self.cfg.train.seed, "init"))  # identical initial weights on every rank
        model = build_model(self.cfg.model, ep_size=self.ep)  # the run config keeps what was asked
        # process groups given to the model from outside; ZeRO 1-3: every rank calls the same image experts
        setup_expert_parallel(model, self.ep, self.zero_stage)
        groups = prepare(model, self.cfg, self.dist) if prepare else {"model": (list(model.parameters()), 1.0)}
        # in place and lazy: state_dict keys unchanged, traced at the first step with the weights DeepSpeed cast
        self.compiled = apply_compile(model, self.cfg.train.compile, self.cfg.train.cuda_graphs, self.dist.device)
        optimizer = build_optimizer(build_param_groups(groups), self.cfg.optim)
        engine_config, self.own_clip = self.ds_config, 0.0
        precision = {k: bool((self.ds_config.get(k) or {}).get("enabled")) for k in ("bf16", "fp16")}
        if self.dist.world_size == 1 and self.zero_stage == 0 and not any(precision.values()):
            # one fp32 process: DeepSpeed clips with its own per-tensor norm and we take the norm again for the log;
            # clip here instead, with torch's foreach norm, once (5% of a small model's CPU step, docs/benchmarks.md)
            self.own_clip = float(self.ds_config.get("gradient_clipping") or 0.0)
            engine_config = {**self.ds_config, "gradient_clipping": 0.0}
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=engine_config)
        if self.dist.world_size == 1 and self.zero_stage == 0:
            # one process: DeepSpeed would still flatten, all-reduce over itself and copy back every gradient at each
            # step (10% of a small model's step on CPU, docs/benchmarks.md); its own switch for "no data parallelism"
            self.engine.enable_backward_allreduce = False
        # DeepSpeed casts the weights for bf16/fp16; inputs follow them (the loss is computed in fp32)
        self.input_dtype = (
            torch.bfloat16
            if self.engine.bfloat16_enabled()
            else torch.float16
            if self.engine.fp16_enabled()
            else torch.float32
        )

    def resume(self, resume: str | None) -> dict[str, Any]:
        """Load, fall back past broken tags and tidy (``checkpoint/save_resume.py``); the checkpoint's client state."""
        cfg = self.cfg
        layout = RunLayout(self.dist.world_size, self.ep, self.zero_stage, cfg.model.to_dict(), cfg.train.expert_order)
        logs = (self.run_dir / "metrics.jsonl", self.run_dir / USAGE_LOG)
        client = ckpt.resume(self.engine, resume, self.ckpt_root, logs, layout)
        if client.get("config_digest") not in (None, self.cfg.digest()) and self.dist.is_main:
            log.warning(
                "the configuration differs from the checkpoint's (digest %s vs %s): the trajectory will not "
                "match an uninterrupted run",
                client.get("config_digest"),
                self.cfg.digest(),
            )
        self.start_step = self.step = int(client.get("step", 0))
        # samples, not steps, are what carries over when the layout changed (elastic resume, docs/reliability.md):
        # each rank's stream continues at samples seen / (micro-batch x ranks), = step x accum on the same layout
        self.start_samples = int(client.get("samples_seen", self.start_step * self.samples_per_step))
        self.data_position = self.start_samples // (self.micro * self.dist.world_size)
        if "resharded_from" in client and self.dist.is_main:
            log.info(
                "elastic resume at step %d: %d samples seen; each rank's data stream continues at micro-batch %d",
                self.start_step,
                self.start_samples,
                self.data_position,
            )
        return client

    def start_tracking(self, client: dict[str, Any], parent_run_id: str | None) -> None:
        """The MLflow run (continued on resume), dataset lineage, parameters (fresh runs only) and tags."""
        from nestor_ds.redact import redact
        from nestor_ds.tracking import ExpertUsage, Tracker
        from nestor_ds.tracking.datasets import log_run_inputs

        cfg, dist = self.cfg, self.dist
        self.tracker = Tracker(
            cfg.tracking,
            rank=dist.rank,
            entry=self.entry,
            run_name=self.run_name,
            parent_run_id=parent_run_id,
            resume_run_id=client.get("mlflow_run_id"),
            buffer_dir=self.run_dir / "mlflow_buffer",
        )
        log_run_inputs(self.tracker, cfg, self.entry)  # dataset lineage (start of run only)
        self.usage = ExpertUsage(num_datasets=len(cfg.data.datasets), ep_size=self.ep)
        self.perf = PerfMeter(cfg.model, samples_per_step=self.samples_per_step, device=self.engine.device)
        self.stats = self.perf.model_stats()
        if self.start_step == 0:
            self.tracker.log_params(
                {
                    "config": cfg.to_dict(),
                    "ds_config": self.ds_config,
                    "world_size": dist.world_size,
                    "ep_size": self.ep,
                    "preset": cfg.preset,
                    "entry": self.entry,
                    **self.stats,
                }
            )  # flattened by the tracker
        self.tracker.set_tags(
            {
                "nestor.preset": cfg.preset or cfg.model.arch,
                "nestor.params_total": self.stats["total_params"],
                "nestor.params_active": self.stats["active_params"],
            }
        )
        self.run_config_json = redact(
            {
                **cfg.to_dict(),
                "world_size": dist.world_size,
                "ep_size": self.ep,
                "mlflow_run_id": self.tracker.run_id or "",
            }
        )  # no credentials beside the weights

    def open_data(self, batch_source: BatchSource | None) -> None:
        """This rank's batches from the resumed position (default: the shard stream of ``cfg.data``)."""
        if batch_source is None:
            from nestor_ds.data import TrainStream

            stream = TrainStream(
                self.cfg.data,
                micro_batch=self.micro,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                seed=self.cfg.train.seed,
            )
            batch_source = stream.source(self.engine.device)  # windows cut on the host, or on the device
        self.batches = DeviceFeed(iter(batch_source(self.data_position)), self.engine.device)
        self.result = TrainResult(
            run_dir=self.run_dir, steps=self.start_step, run_id=self.tracker.run_id, model=self.engine.module
        )

    def evaluate(self, prefix: str = "eval", figures: bool = False) -> dict[str, Any]:
        """Evaluate at the current step (compiled regions run eagerly); with figures, the expert usage is drawn."""
        usage = self.usage if figures else None
        return evaluate_eager(
            self.compiled,
            self.engine,
            self.cfg,
            self.dist,
            self.tracker,
            step=self.step,
            prefix=prefix,
            usage=usage,
            figures=figures,
        )

    def start_loop(self, client: dict[str, Any]) -> None:
        """Budget (``engine/budget.py``: the schedule follows the share spent), progress bar, deferred logging."""
        self.budget = Budget(
            self.cfg.train.time_budget_s,
            self.cfg.train.flop_budget,
            flops_per_step=3.0 * self.stats["flops_per_sample"] * self.samples_per_step,
        )
        self.budget.load(client.get("budget"), self.start_step)
        total = None if self.budget.active else self.cfg.train.max_steps
        self.progress = Progress(self.dist.is_main, self.start_step, total, self.run_name)
        # the hot loop reads nothing from the device: loss parts, grad norms and routing wait in `pending` until a
        # logging step (every log_every steps, the first and last step, before evaluations and checkpoints)
        self.pending = DeviceLog(self.usage)
        # DeepSpeed's ZeRO-0 fp32 path clips without keeping the norm: take it ourselves so train/grad_norm is logged
        self.own_grad_norm = self.zero_stage == 0 and not (self.engine.bfloat16_enabled() or self.engine.fp16_enabled())
        self.interval_start, self.interval_steps = time.perf_counter(), 0

    def loop(self, preempt: Preemption) -> None:
        """Optimizer steps until ``max_steps``, a spent budget, ``stop_at`` or preemption. Only logging steps read the
        device; they also come before every evaluation and checkpoint."""
        train, total = self.cfg.train, self.cfg.train.max_steps
        while self.step < total:
            self.train_step()
            step = self.step
            # preemption agreed over the ranks within 2 steps of a request, no host sync (preemption.py)
            stop = preempt.poll(step) or step == train.stop_at
            last = step == total or self.budget.exhausted(step)
            checkpoint = last or stop or step % train.ckpt_every == 0
            evaluate = bool(train.eval_every) and step % train.eval_every == 0
            usage = bool(train.usage_every) and step % train.usage_every == 0
            if not (
                step % train.log_every == 0
                or last
                or step == self.start_step + 1
                or evaluate
                or usage
                or checkpoint
                or self.budget.needs_check(step)
            ):
                continue
            if self.log_interval():  # the time budget ran out (agreed over the ranks)
                last = checkpoint = True
            evaluate = evaluate and not last  # the final evaluation runs after the loop
            if evaluate:
                self.periodic_evaluation()
            elif usage and not last:  # the end of the run logs its own
                self.log_usage()
            if stop or checkpoint:
                self.save()
            if stop and not last:
                self.result.preempted = True
                self.progress.note(f"preempted: stopped cleanly at step {step}; resume with --resume auto")
                break
            if last:
                if step < total:
                    self.progress.note(f"budget spent at step {step}: {self.budget.metrics(step)}")
                break
            self.interval_start = time.perf_counter()  # evaluation and checkpoint time is not step time

    def train_step(self) -> None:
        """One optimizer step at the scheduled learning rate; its results stay on the device (``pending``)."""
        lr = lr_at(self.step, self.cfg.train.max_steps, self.cfg.optim, fraction=self.budget.fraction(self.step))
        apply_lr(self.optimizer, lr)
        step_parts = optimizer_step(
            self.engine,
            self.batches,
            self.cfg,
            self.dist.rank,
            self.step,
            self.accum,
            self.input_dtype,
            self.pending,
            self.compiled,
            local_norm=self.own_grad_norm,
            clip=self.own_clip,
        )
        self.step += 1
        grad_norm = self.engine.get_global_grad_norm()
        self.pending.add_step(
            self.step, lr, step_parts, self.pending.take_local_grad_norm() if grad_norm is None else grad_norm
        )
        self.interval_steps += 1

    def log_interval(self) -> bool:
        """The logging step: one read of every step since the last one -> metrics.jsonl rows, progress bar, MLflow.
        Under a time budget the seconds spent are agreed over the ranks (a collective); returns whether it is spent."""
        now = time.perf_counter()
        timing = self.perf.step((now - self.interval_start) / self.interval_steps)
        spent = False
        if self.budget.time_s is not None:
            self.budget.agree(self.step, now - self.interval_start, self.interval_steps)
            spent = self.budget.exhausted(self.step)
        self.interval_start, self.interval_steps = now, 0
        for logged_step, m in self.pending.flush():
            metrics = {**m, **timing, **(self.budget.metrics(logged_step) if self.budget.active else {})}
            self.result.losses.append(metrics["train/loss"])
            if self.dist.is_main:
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": logged_step, **metrics}) + "\n")
            if not math.isfinite(metrics["train/loss"]):
                raise FloatingPointError(
                    f"step {logged_step}: loss is {metrics['train/loss']} "
                    f"(lr {metrics['train/lr']:.3g}); lower optim.lr or check the data"
                )
            self.progress.update(metrics)
        self.tracker.log_metrics(metrics, step=self.step)
        return spent

    def periodic_evaluation(self) -> None:
        """Expert usage since the last record, then the evaluation with figures (its heat map from the same counts)."""
        self.log_usage(reset=False)
        self.evaluate(figures=True)
        self.usage.reset()

    def log_usage(self, reset: bool = True) -> None:
        """Expert usage since the last record, summed over ranks (a collective): MLflow ``experts/...`` metrics and a
        row of expert_usage.jsonl, so specialisation can be followed over training without evaluating."""
        self.usage.reduce()
        self.tracker.log_metrics(self.usage.metrics("experts"), step=self.step)
        if self.dist.is_main and self.usage.blocks:
            append_usage_row(self.run_dir / USAGE_LOG, self.cfg, self.step, self.budget, self.usage)
        if reset:
            self.usage.reset()

    def save(self) -> None:
        """Checkpoint (collective) with the client state a resume needs to replay the same steps."""
        step = self.step
        state = {
            "step": step,
            "samples_seen": self.start_samples + (step - self.start_step) * self.samples_per_step,
            "data_position": self.data_position + (step - self.start_step) * self.accum,
            "rng": ckpt.rng_state(),
            "config_digest": self.cfg.digest(),
            "mlflow_run_id": self.tracker.run_id or "",
            "budget": self.budget.state(step),
        }
        tag_dir = ckpt.save_checkpoint(
            self.engine, self.ckpt_root, step, state, self.run_config_json, self.cfg.train.keep_last, self.tracker
        )
        self.progress.note(f"checkpoint {tag_dir}")

    def finish(self) -> TrainResult:
        """End of run: unless preempted, final usage and evaluation, run_summary.json and the model in MLflow; the
        MLflow run ends FINISHED (KILLED when preempted)."""
        from nestor_ds.tracking.model_logging import log_trained_model

        self.progress.close()
        result, step = self.result, self.step
        result.steps = step
        if not result.preempted:
            self.pending.flush_usage()
            self.log_usage(reset=False)
            result.final_eval["after"] = self.evaluate(figures=True)
            if self.dist.is_main:
                after = result.final_eval["after"]
                write_summary(
                    self.run_dir / "run_summary.json", self.cfg, step, self.stats, self.budget, after, self.usage
                )
                # end of run only: export, log (and register) the model in MLflow
                log_trained_model(
                    self.tracker,
                    self.ckpt_root / ckpt.tag_for(step),
                    self.run_dir / "model.safetensors",
                    result.final_eval["after"],
                )
        self.tracker.finish("KILLED" if result.preempted else "FINISHED")
        if self.dist.is_main:
            log.info("run directory: %s (checkpoints in %s)", self.run_dir, self.ckpt_root)
        return result
