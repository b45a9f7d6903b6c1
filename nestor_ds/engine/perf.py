"""Throughput accounting: samples/s, tokens/s, achieved TFLOP/s and (on GPUs) model-FLOPs utilisation.

Training FLOPs per sample = 3 x the analytic forward FLOPs of the model config (backward ~ 2x forward), the
convention of nanoGPT's ``estimate_mfu``; the forward count comes from ``nestor_ds.model.flops`` (one place).
"""

from __future__ import annotations

from typing import Any

import torch

from nestor_ds.model.config import ModelConfig

# Dense bf16 tensor-core peaks (FLOP/s) for MFU; unknown devices report no MFU rather than a wrong one.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of a CUDA device (FLOP/s), None for CPUs and unknown devices."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


class PerfMeter:
    def __init__(self, cfg: ModelConfig, samples_per_step: int, device: torch.device) -> None:
        from nestor_ds.model.flops import account

        self.stats = account(cfg).as_dict()
        self.samples_per_step = samples_per_step
        self.tokens_per_sample = (cfg.resolution // cfg.patch_size) ** 2
        self.peak = peak_flops(device)

    def model_stats(self) -> dict[str, Any]:
        """Analytic counts of the whole model (under expert parallelism a rank holds only its experts)."""
        return {k: self.stats[k] for k in ("total_params", "active_params", "flops_per_sample")}

    def step(self, seconds: float) -> dict[str, float]:
        """Throughput of one optimizer step taking ``seconds`` (the trainer passes the mean over a logging interval:
        it times on the host only when it reads the device anyway)."""
        sps = self.samples_per_step / max(seconds, 1e-9)
        flops = 3.0 * self.stats["flops_per_sample"] * sps
        out = {
            "perf/samples_per_s": sps,
            "perf/tokens_per_s": sps * self.tokens_per_sample,
            "perf/step_time_s": seconds,
            "perf/tflops": flops / 1e12,
        }
        if self.peak:
            out["perf/mfu"] = flops / (self.peak * max(1, torch.distributed.get_world_size()))
        return out
