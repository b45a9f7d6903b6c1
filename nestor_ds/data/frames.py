"""Frames of a window -> batch tensors: bilinear resize, the frame-major -> grid-major copy, normalisation.

Shared by the training stream (stream.py) and the evaluation pass (evalset.py), so that training and
evaluation batches are prepared by exactly the same code.

Shape legend: B samples in a batch, T frames, X, Y grid points, C channels of the run (data.channels),
c the dataset's own channels (c <= C; the rest is zero padding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from nestor_ds.data.trajectories import DatasetInfo


def resize_frames(frames_TXYc: np.ndarray, resolution: int) -> np.ndarray:
    """Bilinear resize of frames [T, X, Y, c] to [T, res, res, c] (align_corners=False, no antialias), as DPOT.

    Returns the input unchanged when it is already at the resolution.
    """
    _, X, Y, _ = frames_TXYc.shape
    if X == resolution and Y == resolution:
        return frames_TXYc
    if not frames_TXYc.flags.writeable:  # memory-mapped shard: torch wants writable memory
        frames_TXYc = frames_TXYc.copy()
    t_TcXY = torch.from_numpy(np.ascontiguousarray(frames_TXYc)).permute(0, 3, 1, 2)
    out = F.interpolate(t_TcXY, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=False)
    return out.permute(0, 2, 3, 1).contiguous().numpy()


def write_frames(dst_XYTC: np.ndarray, src_TXYc: np.ndarray) -> None:
    """dst[x, y, t, :c] = src[t, x, y, :]: the frame-major -> grid-major transpose of one sample.

    Each grid point's c channels (c*4 contiguous bytes) are moved as one item, which makes this copy
    several times faster than an element-wise float transpose. Channels >= c of dst are left as they
    are (the caller zero-fills them).
    """
    T, X, Y, c = src_TXYc.shape
    C = dst_XYTC.shape[-1]
    src = np.ascontiguousarray(src_TXYc, dtype=np.float32).view(f"V{4 * c}").reshape(T, X * Y)
    if c == C:
        dst = dst_XYTC.view(f"V{4 * C}").reshape(X * Y, T)
    else:
        item = np.dtype({"names": ["v"], "formats": [f"V{4 * c}"], "offsets": [0], "itemsize": 4 * C})
        dst = dst_XYTC.view(item).reshape(X * Y, T)["v"]
    dst[...] = src.T


def new_batch_tensor(shape: tuple[int, ...], zero: bool) -> torch.Tensor:
    """A float32 batch tensor (zero-filled when some channels stay padding).

    Allocated by numpy, which asks for transparent huge pages on large arrays: a fresh 10 MB batch then
    costs a few page faults instead of thousands (measured 1.5-2x faster assembly than torch.empty).
    """
    return torch.from_numpy((np.zeros if zero else np.empty)(shape, dtype=np.float32))


def normalize_(batch: torch.Tensor, mean_BC: np.ndarray, std_BC: np.ndarray) -> None:
    """In place (v - mean) / std per sample and channel of a [B, ..., C] batch; padded channels carry mean 0, std 1."""
    a = batch.numpy()
    shape = (a.shape[0],) + (1,) * (a.ndim - 2) + (a.shape[-1],)
    a -= mean_BC.reshape(shape)
    a /= std_BC.reshape(shape)


def padded_stats(info: DatasetInfo, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean [C], std [C]) of a dataset for `normalize_`: its own c channels, then mean 0, std 1 for padding."""
    c = info.shape[3]
    mean = np.zeros(channels, np.float32)
    std = np.ones(channels, np.float32)
    mean[:c], std[:c] = info.mean, info.std
    return mean, std
