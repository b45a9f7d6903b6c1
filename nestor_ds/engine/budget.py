"""Training budgets: stop after ``train.time_budget_s`` seconds of training or ``train.flop_budget`` FLOPs, with
the learning-rate schedule following the fraction of the budget spent (so a budgeted run anneals properly).

Why it looks like this:
- Time is training time only: evaluation and checkpoint saves are excluded (the loop's step-time intervals).
  Equal-compute comparisons (``tools/study.py``) then compare what the optimiser got, not how often it was scored.
- Ranks must stop at the same step and use the same learning rate (their replicas would drift apart otherwise),
  but reading clocks is local. So the ranks *agree* on the seconds spent at chosen steps (an all-reduce MAX on the
  host, taken at logging steps, which already synchronise), and between two agreements every rank extrapolates
  with the agreed seconds per step. Check steps come closer as the budget runs out (half the estimated remaining
  steps each time), so a run stops within about one step of its budget at a cost of O(log steps) agreements.
- FLOPs are counted analytically (3 x forward FLOPs per sample, as ``engine/perf.py``): deterministic, so a
  FLOP-budgeted run, resumed, replays the same steps exactly. A time-budgeted run resumes with the seconds already
  spent (saved in the checkpoint); where it stops then depends on the measured speed, as it must.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Budget:
    time_s: float | None  # training seconds allowed (None: no time budget)
    flops: float | None  # training FLOPs allowed (None: no FLOP budget)
    flops_per_step: float  # analytic training FLOPs of one optimizer step, all ranks together
    seconds: float = 0.0  # agreed training seconds spent up to `checked_step`
    step_time: float = 0.0  # agreed seconds per step over the last agreed interval
    checked_step: int = 0  # step of the last agreement

    @property
    def active(self) -> bool:
        return self.time_s is not None or self.flops is not None

    def spent_flops(self, step: int) -> float:
        return step * self.flops_per_step

    def spent_seconds(self, step: int) -> float:
        """Seconds spent at `step`: agreed up to the last check, extrapolated since (the same on every rank)."""
        return self.seconds + (step - self.checked_step) * self.step_time

    def fraction(self, step: int) -> float | None:
        """Share of the budget spent after `step` optimizer steps (the larger of time and FLOPs), or None."""
        parts = []
        if self.time_s is not None:
            parts.append(self.spent_seconds(step) / self.time_s)
        if self.flops is not None:
            parts.append(self.spent_flops(step) / self.flops)
        return min(1.0, max(parts)) if parts else None

    def exhausted(self, step: int) -> bool:
        """True once the budget is spent (time: as agreed at the last check, taken at this step)."""
        if self.flops is not None and self.spent_flops(step) >= self.flops:
            return True
        return self.time_s is not None and step == self.checked_step and self.seconds >= self.time_s

    def agree(self, step: int, local_seconds: float, steps: int) -> None:
        """Collective (when a process group is up): add the slowest rank's `local_seconds` spent on the last `steps`
        steps. Call on every rank at the same step."""
        from nestor_ds.collectives import all_reduce_host

        t = all_reduce_host(torch.tensor([float(local_seconds)], dtype=torch.float64), torch.distributed.ReduceOp.MAX)
        self.seconds += float(t.item())
        self.step_time = float(t.item()) / max(1, steps)
        self.checked_step = step

    def needs_check(self, step: int) -> bool:
        """Whether `step` must be an agreement step (time budget only; every logging step agrees too): half the
        estimated remaining steps after the last check, at least one."""
        if self.time_s is None:
            return False
        if self.step_time <= 0:
            return step == self.checked_step + 1
        remaining = (self.time_s - self.seconds) / self.step_time
        return step >= self.checked_step + max(1, int(remaining / 2))

    def state(self, step: int) -> dict[str, Any]:
        """What a checkpoint at `step` keeps: the seconds spent so far and the agreed step time."""
        return {"seconds": self.spent_seconds(step), "step_time": self.step_time}

    def load(self, state: dict[str, Any] | None, step: int) -> None:
        """Continue from a checkpoint's client state (saved at `step`)."""
        if state:
            self.seconds, self.step_time = float(state["seconds"]), float(state["step_time"])
            self.checked_step = step

    def metrics(self, step: int) -> dict[str, float]:
        out = {"budget/seconds": self.spent_seconds(step), "budget/flops": self.spent_flops(step)}
        frac = self.fraction(step)
        if frac is not None:
            out["budget/fraction"] = frac
        return out
