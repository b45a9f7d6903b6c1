"""What the training step keeps on the device between logging steps, and how batches reach the device.

Why: on a GPU every ``.item()``, ``float(t)``, ``.tolist()`` or ``.cpu()`` of a device tensor waits for the whole
queue of kernels to finish, so a step that reads its loss, gradient norm or routing counts cannot overlap the next
step's launches. Here the step only appends device tensors; :meth:`DeviceLog.flush` reads everything since the
last flush in one transfer (one host-side all-reduce for the loss parts), every ``train.log_every`` steps.

- :class:`DeviceLog`: per-step loss parts (+ gradient norm) and routing records, read once per logging interval.
- :class:`DeviceFeed`: batches copied from pinned host memory with ``non_blocking=True``, one batch ahead, so the
  host-to-device copy of step s+1 is queued while step s computes (CUDA only; on CPU batches pass through).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from nestor_ds.collectives import all_reduce_mean

# training_loss's parts and the skipped-window count (data.on_bad_sample: skip), sorted
PART_NAMES = ("image_lb", "loss", "rel_l2", "skipped_samples", "token_lb", "token_z")


class DeviceLog:
    """Per-step loss parts, gradient norms and routing, kept where they were computed until :meth:`flush`."""

    def __init__(self, usage: Any = None) -> None:
        self.usage = usage  # ExpertUsage (tracking) fed at flush time
        self._rows: list[torch.Tensor] = []  # loss parts of one optimizer step (this rank), order PART_NAMES
        self._norms: list[Any] = []  # grad norm of that step: tensor, float or None (DeepSpeed's choice)
        self._steps: list[tuple[int, float]] = []  # (step, lr)
        self._routing: list[tuple[list, torch.Tensor]] = []
        self._local_norm: torch.Tensor | None = None  # see note_local_grad_norm

    def add_micro(self, routing: list, dataset_id_B: torch.Tensor, copy: bool = False) -> None:
        """Routing of one micro-batch (device tensors; counted into the expert statistics at flush).

        ``copy``: clone the tensors first. Needed under CUDA graphs, whose outputs live in memory that the next
        replay overwrites, while these records wait until the next logging step.
        """
        if routing and copy:
            routing = [
                dataclasses.replace(
                    r,
                    **{
                        f.name: getattr(r, f.name).clone()
                        for f in dataclasses.fields(r)
                        if torch.is_tensor(getattr(r, f.name))
                    },
                )
                for r in routing
            ]
        if routing:
            self._routing.append((routing, dataset_id_B))

    def add_step(self, step: int, lr: float, step_parts: torch.Tensor, grad_norm: Any) -> None:
        """Loss parts of one optimizer step as a 1-D tensor ordered as PART_NAMES, on any device."""
        self._steps.append((step, lr))
        self._rows.append(step_parts.detach())
        self._norms.append(grad_norm.detach() if torch.is_tensor(grad_norm) else grad_norm)

    def note_local_grad_norm(self, norm: torch.Tensor) -> None:
        """A gradient norm the step computed itself (when DeepSpeed reports none), picked up by add_step's caller."""
        self._local_norm = norm.detach()

    def take_local_grad_norm(self) -> torch.Tensor | None:
        norm, self._local_norm = self._local_norm, None
        return norm

    def flush_usage(self) -> None:
        """Move the pending routing records into the expert statistics (reads them: a sync on GPU)."""
        if self.usage is not None:
            for routing, dataset_id in self._routing:
                self.usage.update_from_routing(routing, dataset_id)
        self._routing.clear()

    def flush(self) -> list[tuple[int, dict[str, float]]]:
        """(step, metrics) of every step since the last flush, loss parts averaged over all ranks.

        Collective when a process group is up: every rank must flush at the same steps.
        """
        self.flush_usage()
        if not self._steps:
            return []
        rows = torch.stack(self._rows)  # one row per pending step, one column per loss part
        tensor_norms = [i for i, n in enumerate(self._norms) if torch.is_tensor(n)]
        if tensor_norms:  # one transfer for both: norms appended as an extra column
            grad_norms = torch.full((len(self._rows),), float("nan"), dtype=rows.dtype, device=rows.device)
            grad_norms[tensor_norms] = torch.stack([self._norms[i].to(rows) for i in tensor_norms])
            rows = torch.cat([rows, grad_norms[:, None]], dim=1)
        host = rows.float().cpu()  # the one device -> host transfer
        n_parts = len(PART_NAMES)
        table = torch.cat([all_reduce_mean(host[:, :n_parts].contiguous()), host[:, n_parts:]], dim=1).tolist()
        out = []
        for (step, lr), norm, values in zip(self._steps, self._norms, table, strict=True):
            m = {f"train/{k}": v for k, v in zip(PART_NAMES, values, strict=False)}  # values: parts [+ grad norm]
            m["train/lr"] = lr
            if norm is not None:
                m["train/grad_norm"] = values[n_parts] if torch.is_tensor(norm) else float(norm)
            out.append((step, m))
        self._rows.clear()
        self._norms.clear()
        self._steps.clear()
        return out


class DeviceFeed:
    """Iterator over batch dicts with ``keys`` already on ``device`` (pinned, non-blocking, one batch ahead).

    Other keys (``dataset_id``) stay on the host: they are only read by the statistics. On a non-CUDA device the
    batches pass through unchanged (the data already lives where the model runs).
    """

    def __init__(
        self,
        batches: Iterator[dict[str, torch.Tensor]],
        device: torch.device,
        keys: tuple[str, ...] = ("x", "y", "channel_mask"),
    ) -> None:
        self.batches, self.device, self.keys = batches, device, keys
        self.active = device.type == "cuda"
        self._next: dict[str, torch.Tensor] | None = None

    def __iter__(self) -> DeviceFeed:
        return self

    def _load(self) -> dict[str, torch.Tensor]:
        batch = dict(next(self.batches))
        for k in self.keys:
            t = batch[k]
            if t.device.type != "cpu":  # cut on the device already (data.device_windows)
                continue
            if not t.is_pinned():
                t = t.pin_memory()
            batch[k] = t.to(self.device, non_blocking=True)
        return batch

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self.active:
            return next(self.batches)
        current = self._next if self._next is not None else self._load()
        self._next = self._load()
        return current
