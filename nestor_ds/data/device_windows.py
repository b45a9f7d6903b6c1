"""Device windowing: the device side of `TrainStream.packed_batches` (``data.device_windows: true``).

Why: cutting windows on the host sends every window's frames to the device, so a trajectory with W windows crosses
the host-to-device link about W times; sending each trajectory once and cutting its windows where the model runs moves
1/W of those bytes and spares the host the per-window copies (docs/data_pipeline.md, "Loader capacity"). The batches
equal the host-assembled ones bit for bit (tests/test_device_windows.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nestor_ds.data.config import DataConfig


class WindowCutter:
    """Device side of device windowing: keeps each trajectory of the packed batches on `device` (resized once to
    the run resolution) and cuts, pads and normalises the batch there, with the operations of
    `TrainStream.assemble` in the same order, so the batch equals the host-assembled one.

    Feed it the packed batches of one `packed_batches` pass in order (trajectories are sent once and released after
    their last window). Memory: the trajectories behind the shuffle buffers (docs/data_pipeline.md, "Memory:" under
    "Training stream")."""

    def __init__(self, cfg: DataConfig, stats: list[tuple[np.ndarray, np.ndarray]], device: torch.device | str):
        self.cfg, self.device = cfg, torch.device(device)
        self.mean = torch.from_numpy(np.stack([m for m, _ in stats])).to(self.device)  # [M, C]
        self.std = torch.from_numpy(np.stack([s for _, s in stats])).to(self.device)
        self.cache: dict[tuple[int, int], torch.Tensor] = {}  # (worker, key) -> [T, res, res, c] on the device

    def __call__(self, packed: dict) -> dict[str, torch.Tensor]:
        cfg, dev = self.cfg, self.device
        res, C, t_in, length = cfg.resolution, cfg.channels, cfg.t_in, cfg.t_in + cfg.t_ar
        w = int(packed["worker"])
        for k, data in zip(packed["new_keys"].tolist(), packed["new_data"], strict=True):
            traj = data.to(dev, non_blocking=True)
            if traj.shape[1] != res or traj.shape[2] != res:  # per-frame bilinear resize, as resize_frames
                t_TcXY = traj.permute(0, 3, 1, 2)
                traj = F.interpolate(t_TcXY, size=(res, res), mode="bilinear", align_corners=False, antialias=False)
                traj = traj.permute(0, 2, 3, 1).contiguous()
            self.cache[(w, k)] = traj
        keys, t0s = packed["key"].tolist(), packed["t0"].tolist()
        dataset_id, skipped = packed["dataset_id"], packed["skipped"]
        B = len(keys)
        x = torch.zeros((B, res, res, t_in, C), device=dev)
        y = torch.zeros((B, res, res, length - t_in, C), device=dev)
        mask = torch.zeros(B, C, dtype=torch.bool)
        for b, (k, t0) in enumerate(zip(keys, t0s, strict=True)):
            if skipped[b]:
                continue
            window = self.cache[(w, k)][t0 : t0 + length]  # [L, res, res, c]
            c = window.shape[3]
            x[b, ..., :c] = window[:t_in].permute(1, 2, 0, 3)
            y[b, ..., :c] = window[t_in:].permute(1, 2, 0, 3)
            mask[b, :c] = True
        if cfg.normalize:
            d = dataset_id.to(dev)
            mean, std = self.mean[d][:, None, None, None, :], self.std[d][:, None, None, None, :]
            x.sub_(mean).div_(std)
            y.sub_(mean).div_(std)
        for k in packed["release"].tolist():
            del self.cache[(w, k)]
        return {"x": x, "y": y, "channel_mask": mask, "dataset_id": dataset_id, "skipped": skipped}
