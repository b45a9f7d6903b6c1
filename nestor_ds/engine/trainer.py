"""The one training loop, shared by pre-training (``train.py``) and fine-tuning (``finetune.py``).

An entry builds a :class:`RunConfig`, optionally a ``prepare`` hook (fine-tune: load weights, freeze, choose
learning-rate groups), and calls :func:`run_training`. The :class:`Trainer` is built in three layers, one job each:
``run_setup.py`` sets up the process group, expert parallelism, the DeepSpeed engine, resume, MLflow and the data
stream; ``bookkeeping.py`` records what the loop produces (logging steps, expert usage, evaluation through
``evaluation.py``, checkpoints, and the end of the run: final evaluation, ``run_summary.json``, model export to
MLflow); this module runs the loop: optimizer steps (``step.py``), when to log, evaluate and save, preemption and
budgets.

Determinism: every random draw of step ``s`` on rank ``r`` comes from generators seeded by
``derive_seed(seed, purpose, r, s)``, the data stream is a function of (seed, rank, worker, step) and the
learning rate a function of the step, so a run resumed from step ``k`` replays exactly the steps an
uninterrupted run would have taken.
"""

from __future__ import annotations

import time
from typing import Any

from nestor_ds.engine.bookkeeping import Bookkeeping
from nestor_ds.engine.optim import apply_lr, lr_at
from nestor_ds.engine.peers import exit_on_lost_peer
from nestor_ds.engine.preemption import Preemption
from nestor_ds.engine.report import TrainResult
from nestor_ds.engine.run_config import RunConfig
from nestor_ds.engine.run_setup import BatchSource, PrepareHook
from nestor_ds.engine.step import optimizer_step

__all__ = ["BatchSource", "PrepareHook", "TrainResult", "Trainer", "run_training", "start_training"]


def run_training(cfg: RunConfig, ds_config_path: str, evaluate_before: bool = False, **setup: Any) -> TrainResult:
    """Train ``cfg`` with DeepSpeed; returns what tests and entries need (run dir, losses, final evaluation).

    ``setup``: :func:`start_training`'s keywords (entry, run_name, resume, prepare, parent_run_id, batch_source).
    ``evaluate_before``: score the weights before the first step too (fine-tuning's "before" column)."""
    trainer, client = start_training(cfg, ds_config_path, **setup)
    if evaluate_before and trainer.start_step == 0:
        trainer.result.final_eval["before"] = trainer.evaluate(prefix="eval_before")
    trainer.start_loop(client)
    with (
        Preemption(step=trainer.start_step) as preempt,
        exit_on_lost_peer(trainer.dist.rank, trainer.dist.world_size, trainer.ckpt_root),
    ):
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


class Trainer(Bookkeeping):
    """The set-up run (``run_setup.py``), its records (``bookkeeping.py``) and the loop over optimizer steps."""

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
