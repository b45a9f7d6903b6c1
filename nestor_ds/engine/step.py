"""One optimizer step: ``accum`` micro-batches forward and backward through the DeepSpeed engine.

Why its own module: this is the hot loop. It reads nothing back to the host (loss parts, gradient norms and routing
go to ``hot_loop.DeviceLog`` until a logging step), and every random draw is seeded from (seed, purpose, rank,
step, micro-batch), so a resumed run replays the same steps. Batches are ``x_BXYTC`` inputs, ``y_BXYTC`` targets
(T = T_ar) and a ``channel_mask`` [B, C] of real channels.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from nestor_ds.engine.compile import CompilePlan
from nestor_ds.engine.distributed import derive_seed
from nestor_ds.engine.hot_loop import PART_NAMES, DeviceLog
from nestor_ds.engine.loss import inject_noise, noise_generator, training_loss
from nestor_ds.engine.run_config import RunConfig


def optimizer_step(
    engine: Any,
    batches: Iterator[dict[str, torch.Tensor]],
    cfg: RunConfig,
    rank: int,
    step: int,
    accum: int,
    input_dtype: torch.dtype,
    pending: DeviceLog,
    compiled: CompilePlan | None = None,
    local_norm: bool = False,
    clip: float = 0.0,
) -> torch.Tensor:
    """One optimizer step = ``accum`` micro-batches (DeepSpeed steps the optimizer at the boundary).

    Every random draw is seeded by (seed, purpose, rank, step, micro-batch): a resumed run replays them exactly;
    the input noise is drawn on the device. Returns this rank's loss parts averaged over the micro-batches as a
    1-D device tensor (order PART_NAMES); reads nothing back to the host. ``local_norm``: DeepSpeed reports no
    gradient norm (ZeRO-0 in fp32), so the norm of the gradients about to be applied is taken here, on the device.
    ``clip`` > 0 (with ``local_norm``): the trainer took gradient clipping over from DeepSpeed (one process, ZeRO-0,
    fp32), and the same norm both clips and is logged.
    """
    device = engine.device
    step_parts: torch.Tensor | None = None
    for micro_i in range(accum):
        if compiled is not None:
            compiled.step_begin()
        batch = next(batches)
        torch.manual_seed(derive_seed(cfg.train.seed, "step", rank, step, micro_i))
        noise_gen = noise_generator(device, derive_seed(cfg.train.seed, "noise", rank, step, micro_i))
        x_BXYTC = inject_noise(batch["x"].to(device, non_blocking=True), cfg.train.input_noise, noise_gen)
        x_BXYTC = x_BXYTC.to(dtype=input_dtype)
        mask_BC = batch["channel_mask"].to(device, non_blocking=True)
        out = engine(x_BXYTC, mask_BC)
        y_BXYTC = batch["y"].to(device, non_blocking=True)
        loss, parts = training_loss(out.pred.float(), y_BXYTC, mask_BC, out.aux_losses, cfg.loss)
        engine.backward(loss)
        if local_norm and micro_i == accum - 1:  # after the boundary's gradient all-reduce, before the step
            _zero_missing_grads(engine.module)
            if clip > 0:  # one norm for clipping and logging (torch's foreach kernels), not DeepSpeed's and ours
                params = [p for p in engine.module.parameters() if p.grad is not None]
                pending.note_local_grad_norm(torch.nn.utils.clip_grad_norm_(params, clip, foreach=True))
            else:
                pending.note_local_grad_norm(_grad_norm(engine.module))
        engine.step()
        # the skipped-window count (data.on_bad_sample: skip) is summed over the micro-batches, the loss parts averaged
        counts = {"skipped_samples": _skipped_count(batch, device)}
        micro_parts = torch.stack([parts[k] / accum if k in parts else counts[k] for k in PART_NAMES])
        step_parts = micro_parts if step_parts is None else step_parts + micro_parts
        pending.add_micro(out.routing, batch["dataset_id"], copy=compiled is not None and compiled.cuda_graphs)
    assert step_parts is not None
    return step_parts


def _zero_missing_grads(module: torch.nn.Module) -> None:
    """A zero gradient for every parameter that got none (an image expert no sample of the step chose).

    DeepSpeed gives such parameters a zero gradient under ZeRO 1-3 (flat gradient buffers) and under ZeRO-0 on
    several ranks (its all-reduce fills them), so Adam moves them by their momentum there; torch's Adam skips a
    parameter whose gradient is None. Only one fp32 ZeRO-0 process would keep None, so without this 1 rank would
    follow another trajectory than N ranks with the same global batch (and than an elastic resume on N ranks)."""
    for p in module.parameters():
        if p.grad is None and p.requires_grad:
            p.grad = torch.zeros_like(p)


def _grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """L2 norm of this rank's gradients as a device scalar (under expert parallelism: the experts this rank holds)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def _skipped_count(batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Windows of this micro-batch skipped as bad data (zeroed and masked out by the stream), as a device scalar."""
    if "skipped" not in batch:  # batch sources other than the shard stream
        return torch.zeros((), device=device)
    return batch["skipped"].to(device, non_blocking=True).sum().float()
