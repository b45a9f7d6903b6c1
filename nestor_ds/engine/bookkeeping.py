"""What the training loop records: logging steps (metrics.jsonl, progress bar, MLflow), expert usage, evaluations,
checkpoints and the end of the run (final evaluation, ``run_summary.json``, the model in MLflow).

Why apart from the loop: these are the loop's only reads of the device and its only collectives besides the step
(``trainer.py`` decides when; this module says what is written). :class:`Bookkeeping` extends the set-up
(``run_setup.py``) with the state they share: the budget, the progress bar and the deferred log (``DeviceLog``).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from nestor_ds.checkpoint import save_resume as ckpt
from nestor_ds.engine.budget import Budget
from nestor_ds.engine.evaluation import evaluate_eager
from nestor_ds.engine.hot_loop import DeviceLog
from nestor_ds.engine.report import USAGE_LOG, Progress, TrainResult, append_usage_row, write_summary
from nestor_ds.engine.run_setup import RunSetup
from nestor_ds.log import get_logger

log = get_logger(__name__)


class Bookkeeping(RunSetup):
    """The set-up run plus what its loop records; ``start_loop`` opens the budget, progress bar and deferred log."""

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
