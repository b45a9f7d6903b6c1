"""A training run set up to its loop: process group, DeepSpeed engine, resume, MLflow and the data stream.

Why its own module: set-up is done once, in an order where each part needs the ones before (the engine needs the
model and its expert-parallel groups, resume needs the engine, tracking needs the resumed MLflow run id, the data
stream the resumed position). :class:`RunSetup` holds what it built; ``bookkeeping.py`` adds what the loop records
(metrics, usage, evaluation, checkpoints) and ``trainer.py`` the loop itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from nestor_ds.checkpoint import save_resume as ckpt
from nestor_ds.checkpoint.elastic import RunLayout
from nestor_ds.engine.compile import apply_compile
from nestor_ds.engine.distributed import (
    DistInfo,
    derive_seed,
    init_distributed,
    resolve_ep_size,
    set_threads,
    setup_expert_parallel,
)
from nestor_ds.engine.ds_config import check_ds_config, load_ds_config
from nestor_ds.engine.hot_loop import DeviceFeed
from nestor_ds.engine.optim import build_optimizer, build_param_groups
from nestor_ds.engine.perf import PerfMeter
from nestor_ds.engine.report import USAGE_LOG, TrainResult
from nestor_ds.engine.run_config import RunConfig, format_config
from nestor_ds.log import get_logger

log = get_logger(__name__)

# prepare(model, cfg, dist) -> {"group name": (params, lr multiplier)}; called before the engine is built.
PrepareHook = Callable[[torch.nn.Module, RunConfig, DistInfo], dict[str, tuple[list[torch.nn.Parameter], float]]]
# batches(start_micro_step) -> iterator of batch dicts for this rank; default: the shard stream of cfg.data.
BatchSource = Callable[[int], Iterator[dict[str, torch.Tensor]]]


class RunSetup:
    """One run on this rank, set up in the order ``start_training`` calls the steps (each needs the ones before)."""

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
        saved_digest = client.get("config_digest")
        if saved_digest not in (None, self.cfg.digest(), self.cfg.digest(legacy=True)) and self.dist.is_main:
            log.warning(
                "the configuration differs from the checkpoint's (digest %s vs %s): the trajectory will not "
                "match an uninterrupted run",
                saved_digest,
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
