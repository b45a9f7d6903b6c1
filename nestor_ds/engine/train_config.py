"""Training-loop settings (the YAML's ``train`` section): length, noise, evaluation, checkpoint and logging cadence,
compilation and budgets. Beside the loop (``trainer.py``) that reads them; ``run_config.py`` composes it."""

from __future__ import annotations

from dataclasses import dataclass

from nestor_ds.typed_config import check


@dataclass
class TrainConfig:
    """Loop length, noise, evaluation, checkpoint and logging cadence."""

    seed: int = 0  # initial weights, data order and noise all derive from it (same seed, same run)
    max_steps: int = 200  # optimizer steps to train; the lr schedule decays over them (or over a budget, below)
    input_noise: float = 5e-4  # DPOT's noise injection: x += s * ||x||_2 * N(0, 1), per sample and channel
    log_every: int = 10  # steps between logging steps (losses, gradient norm, throughput read to the host and logged)
    eval_every: int = 100  # 0 disables periodic evaluation (the final one still runs)
    # expert usage (MLflow experts/..., a row of expert_usage.jsonl) every N steps without evaluating; 0: only at
    # evaluations and the end of the run. Each row covers the steps since the previous one
    usage_every: int = 0
    eval_batch_size: int = 4  # windows per evaluation batch (per rank)
    eval_max_trajectories: int | None = 8  # test trajectories scored per dataset at each evaluation; None -> all
    eval_rollout_steps: int | None = 5  # None -> every dataset's rollout_steps
    # all: every start frame with t_in frames before it (DPOT-style) | first: one per trajectory
    eval_windows: str = "all"
    ckpt_every: int = 100  # steps between checkpoints (the last step and a preemption also save one)
    keep_last: int = 3  # checkpoints kept: the most recently saved ones (older ones are deleted)
    output_dir: str = "runs"  # each run writes <output_dir>/<run name>/ (checkpoints, metrics, summary)
    threads_per_rank: int | None = None  # torch intra-op threads; None -> cores / local ranks
    stop_at: int | None = None  # stop cleanly after this step, as a preemption would (staged runs, tests)
    compile: bool = False  # regional torch.compile of the model's blocks (nestor_ds/engine/compile.py)
    cuda_graphs: bool = False  # CUDA graphs for the compiled regions (needs compile, CUDA and static routing)
    time_budget_s: float | None = None  # stop after this many seconds of training (evaluation/saves excluded)
    flop_budget: float | None = None  # stop after this many training FLOPs (3 x forward, analytic)
    # a `python -m nestor_ds.routing.place --order-out` file: on resuming the checkpoint it was computed from, re-order
    # each token MoE's experts (weights, fp32 masters, Adam's moments) for a balanced expert-parallel group; ZeRO-1/2
    expert_order: str | None = None
    # bound on any wait in a collective (the process-group timeout of every group): a rank whose peer died or froze
    # (a lost node) stops within it, naming the peer, instead of hanging; raise it when one rank can work alone for
    # longer between collectives (first-use sha256 of very large shards, slow checkpoint storage). docs/multinode.md
    collective_timeout_s: float = 120.0

    def validate(self) -> None:
        check(self.max_steps > 0, "train.max_steps", "must be > 0")
        check(self.ckpt_every > 0, "train.ckpt_every", "must be > 0")
        check(self.keep_last >= 1, "train.keep_last", "must be >= 1")
        check(self.log_every > 0, "train.log_every", "must be > 0")
        check(self.usage_every >= 0, "train.usage_every", "must be >= 0 (0: expert usage only at evaluations)")
        check(
            not self.cuda_graphs or self.compile,
            "train.cuda_graphs",
            "needs train.compile: true (the graphs are captured from the compiled regions)",
        )
        check(
            self.eval_windows in ("all", "first"),
            "train.eval_windows",
            f"must be all or first, got {self.eval_windows!r}",
        )
        check(
            isinstance(self.collective_timeout_s, (int, float)) and self.collective_timeout_s > 0,
            "train.collective_timeout_s",
            f"must be a positive number of seconds, got {self.collective_timeout_s!r}",
        )
        for key in ("time_budget_s", "flop_budget"):
            value = getattr(self, key)
            check(
                value is None or (isinstance(value, (int, float)) and value > 0),
                f"train.{key}",
                f"must be a positive number or null, got {value!r}",
            )
