"""Device windowing (``data.device_windows: true``): the host side (`Packer`, behind `TrainStream.packed_batches`)
and the device side (`WindowCutter`).

Why: cutting windows on the host sends every window's frames to the device, so a trajectory with W windows crosses
the host-to-device link about W times; sending each trajectory once and cutting its windows where the model runs moves
1/W of those bytes and spares the host the per-window copies (docs/data_pipeline.md, "Loader capacity"). A float16
shard is sent as stored (half the bytes again, no host conversion) and converted on the device; float16 -> float32 is
exact, so the batches equal the host-assembled ones bit for bit (tests/test_device_windows.py).

Shape legend: B samples in a batch, T frames, X, Y grid points, c a dataset's channels, C the run's channels,
M datasets.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from nestor_ds.data.config import DataConfig
from nestor_ds.data.trajectories import Trajectory

if TYPE_CHECKING:
    from nestor_ds.data.stream import TrainStream

_FP16_EXPONENT = 0x7C00  # float16 bits: NaN or Inf <=> all five exponent bits set
Sent = tuple[int, "np.ndarray | None"]  # a trajectory on the device: (key, `finite_frames` of it)


def finite_frames(arr_TXYc: np.ndarray) -> np.ndarray | None:
    """Which frames hold no NaN/Inf: None when all of them do (the usual case, so a window needs no check of its
    own), else a [T] bool array. One pass over the stored values, exact for either stored dtype:

    float16: a value is NaN/Inf iff its exponent bits are all set, an integer test on the stored bits (measured
    on a 128x128x4 trajectory: 0.15 ms, against 0.27 ms for a float32-accumulated torch sum and 2.0-2.6 ms for
    numpy's isfinite or sum, which convert float16 element by element). float32: `isfinite(...).all()` per frame
    (0.32 ms on freshly mapped pages, against 0.44 ms for the float32 sum used before)."""
    T = arr_TXYc.shape[0]
    flat = arr_TXYc.reshape(T, -1)
    if flat.dtype == np.float16:
        finite = ((flat.view(np.uint16) & _FP16_EXPONENT) != _FP16_EXPONENT).all(axis=1)
    else:
        finite = np.isfinite(flat).all(axis=1)
    return None if finite.all() else finite


class Packer:
    """Host side of device windowing for one logical worker: which trajectories the device holds, and how many of
    each trajectory's windows are still to come.

    Every trajectory yields exactly windows_per_trajectory windows, so after its last one it is released (the
    device frees it); windows still in a shuffle buffer when an epoch ends are never used, so all trajectories of
    that epoch are released at the next batch. Keys grow without reuse within a stream. Per window the work is a
    few dict operations; the batch's index tensors are built once from lists (a torch element write costs
    microseconds each)."""

    def __init__(self, owner: TrainStream, worker: int):
        self.owner, self.worker = owner, worker
        self.k = owner.cfg.windows_per_trajectory
        self.length = owner.cfg.t_in + owner.cfg.t_ar
        self.used: dict[Trajectory, int] = {}  # windows taken so far, for trajectories with windows still to come
        self.sent: dict[Trajectory, Sent] = {}
        self.next_key = 0
        self.release: list[int] = []  # keys to free with the next packed batch

    def new_epoch(self) -> None:
        self.release += [key for key, _ in self.sent.values()]
        self.used.clear()
        self.sent.clear()

    def _take(self, traj: Trajectory) -> None:
        n = self.used.get(traj, 0) + 1
        if n < self.k:
            self.used[traj] = n
            return
        self.used.pop(traj, None)
        if traj in self.sent:
            self.release.append(self.sent.pop(traj)[0])

    def skip(self, windows: list[tuple[int, Trajectory, int]]) -> None:
        """A batch passed over by a resume fast-forward: count its windows, send nothing."""
        for _, traj, _ in windows:
            self._take(traj)

    def _send(self, traj: Trajectory, new_keys: list[int], new_data: list[torch.Tensor]) -> Sent:
        """Add a trajectory to this batch's new ones, as stored (float16 stays float16), checked frame by frame."""
        arr = traj.load_stored()
        sent = self.sent[traj] = (self.next_key, finite_frames(arr))
        new_keys.append(self.next_key)
        new_data.append(_as_tensor(arr))
        self.next_key += 1
        return sent

    def pack(self, windows: list[tuple[int, Trajectory, int]]) -> dict:
        """One packed batch (`TrainStream.packed_batches` describes its keys)."""
        keys: list[int] = []
        skipped: list[bool] = []
        new_keys: list[int] = []
        new_data: list[torch.Tensor] = []
        for d, traj, t0 in windows:
            k, finite = self.sent.get(traj) or self._send(traj, new_keys, new_data)
            keys.append(k)
            if finite is not None and not finite[t0 : t0 + self.length].all():
                skipped.append(self.owner._bad_window(d, traj, t0, traj.load()[t0 : t0 + self.length]))
            else:
                skipped.append(False)
            self._take(traj)
        release, self.release = self.release, []
        return {
            "worker": torch.tensor(self.worker),
            "new_keys": torch.tensor(new_keys, dtype=torch.long),
            "new_data": new_data,
            "key": torch.tensor(keys, dtype=torch.long),
            "t0": torch.tensor([t0 for _, _, t0 in windows], dtype=torch.long),
            "dataset_id": torch.tensor([d for d, _, _ in windows], dtype=torch.long),
            "skipped": torch.tensor(skipped, dtype=torch.bool),
            "release": torch.tensor(release, dtype=torch.long),
        }


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    """A tensor sharing the trajectory's memory (often a read-only view of a mapped shard) without a copy: the one
    copy that is needed is made on the way to the device anyway (into shared memory by a DataLoader worker, into
    pinned memory by the pin thread or by the host-to-device copy itself), and the cutter only reads it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


class WindowCutter:
    """Device side of device windowing: keeps each trajectory of the packed batches on `device` (float32, resized
    once to the run resolution) and cuts, pads and normalises the batch there, with the operations of
    `TrainStream.assemble` in the same order, so the batch equals the host-assembled one.

    Feed it the packed batches of one `packed_batches` pass in order (trajectories are sent once and released after
    their last window). Memory: the trajectories behind the shuffle buffers (docs/data_pipeline.md, "Memory:" under
    "Training stream")."""

    def __init__(self, cfg: DataConfig, stats: list[tuple[np.ndarray, np.ndarray]], device: torch.device | str):
        self.cfg, self.device = cfg, torch.device(device)
        self.mean = torch.from_numpy(np.stack([m for m, _ in stats])).to(self.device)  # [M, C]
        self.std = torch.from_numpy(np.stack([s for _, s in stats])).to(self.device)
        self.cache: dict[tuple[int, int], torch.Tensor] = {}  # (worker, key) -> [T, res, res, c] on the device

    def _receive(self, data: torch.Tensor) -> torch.Tensor:
        """A sent trajectory [T, X, Y, c] on the device as float32 (float16 converted there: exact, as the host
        path's numpy conversion), resized per frame (bilinear, as resize_frames) to [T, res, res, c]."""
        res = self.cfg.resolution
        traj = data.to(self.device, non_blocking=True).to(torch.float32)
        if traj.shape[1] != res or traj.shape[2] != res:
            t_TcXY = traj.permute(0, 3, 1, 2)
            traj = F.interpolate(t_TcXY, size=(res, res), mode="bilinear", align_corners=False, antialias=False)
            traj = traj.permute(0, 2, 3, 1).contiguous()
        return traj

    def __call__(self, packed: dict) -> dict[str, torch.Tensor]:
        cfg, dev = self.cfg, self.device
        res, C, t_in, length = cfg.resolution, cfg.channels, cfg.t_in, cfg.t_in + cfg.t_ar
        w = int(packed["worker"])
        for k, data in zip(packed["new_keys"].tolist(), packed["new_data"], strict=True):
            self.cache[(w, k)] = self._receive(data)
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
