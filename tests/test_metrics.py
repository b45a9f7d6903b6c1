"""Metrics against hand computation: persistence forecast, single Fourier modes, masked channels."""

from __future__ import annotations

import math

import pytest
import torch

from nestor_ds.eval.metrics import (
    SpectrumConfig,
    band_edges,
    energy_spectrum,
    l2re,
    l2re_per_step,
    masked_mean,
    spectrum_band_error,
)
from nestor_ds.procs import free_port


def decaying_trajectory(steps: int, c: float = 0.8, n: int = 16) -> torch.Tensor:
    """u(t) = c^t * g(x, y) as [1, X, Y, T, 1]: persistence errors are |1 - c^k| / c^k by hand."""
    xs = torch.linspace(0, 2 * math.pi, n + 1)[:-1]
    g = torch.sin(xs)[:, None] * torch.cos(2 * xs)[None, :] + 0.3
    return torch.stack([g * c**t for t in range(steps)], dim=-1)[None, ..., None]


def test_persistence_forecast_matches_hand_computation():
    c, K = 0.8, 4
    traj = decaying_trajectory(K + 1, c)
    x0, future = traj[..., :1, :], traj[..., 1:, :]
    persistence = x0.expand_as(future)  # predict the last seen frame forever

    one_step = l2re(persistence[..., :1, :], future[..., :1, :])
    assert one_step.shape == (1, 1)
    assert one_step.item() == pytest.approx((1 - c) / c, rel=1e-6)

    curve = l2re_per_step(persistence, future)
    assert curve.shape == (1, K, 1)
    want = [abs(1 - c**k) / c**k for k in range(1, K + 1)]
    assert curve[0, :, 0].tolist() == pytest.approx(want, rel=1e-6)

    rollout = l2re(persistence, future)
    num = math.sqrt(sum((1 - c**k) ** 2 for k in range(1, K + 1)))
    den = math.sqrt(sum(c ** (2 * k) for k in range(1, K + 1)))
    assert rollout.item() == pytest.approx(num / den, rel=1e-6)


def test_l2re_ignores_masked_channels():
    torch.manual_seed(0)
    true = torch.randn(2, 8, 8, 1, 3)
    pred = true.clone()
    pred[..., 0] *= 1.5  # channel 0: error exactly 0.5
    true[..., 2] = 0.0  # channel 2 is padding: zero truth, garbage prediction
    pred[..., 2] = 100.0
    mask = torch.tensor([[True, True, False], [True, True, False]])

    err = l2re(pred, true, mask)
    assert err[:, 0].tolist() == pytest.approx([0.5, 0.5])
    assert err[:, 1].tolist() == pytest.approx([0.0, 0.0])
    assert err[:, 2].tolist() == [0.0, 0.0]
    assert masked_mean(err, mask).item() == pytest.approx(0.25)  # (0.5 + 0) / 2 real channels
    # without the mask the padding channel would dominate: the mask is what makes the number right
    assert masked_mean(l2re(pred, true), None).item() > 1e6

    # one sample with only one real channel: per-sample masks count pairs, not samples
    mask2 = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_mean(l2re(pred, true, mask2), mask2).item() == pytest.approx((0.5 + 0.0 + 0.5) / 3)


def single_mode(n: int, kx: int, ky: int = 0, amp: float = 1.0) -> torch.Tensor:
    """amp * cos(2 pi (kx x + ky y) / n) as [1, n, n, 1, 1]."""
    i = torch.arange(n, dtype=torch.float64)
    f = amp * torch.cos(2 * math.pi * (kx * i[:, None] + ky * i[None, :]) / n)
    return f[None, :, :, None, None]


@pytest.mark.parametrize("k, band", [(3, 0), (10, 0), (11, 1), (16, 1), (22, 2), (30, 2)])
def test_single_fourier_mode_lands_in_its_band(k, band):
    n = 64  # k_max = 32: low = 1..10, mid = 11..21, high = 22..32
    assert band_edges(32, SpectrumConfig()) == [(1, 10), (11, 21), (22, 32)]
    f = single_mode(n, k)
    spec = energy_spectrum(f)[0, :, 0]
    assert spec.argmax().item() == k
    assert spec.sum().item() == pytest.approx(f.square().mean().item())  # Parseval: mean square = 1/2
    assert spec[k].item() == pytest.approx(0.5)

    err = spectrum_band_error(2 * f, f)[0, :, 0]  # twice the amplitude = 4x the energy: error 3
    expected = [0.0, 0.0, 0.0]
    expected[band] = 3.0
    assert err.tolist() == pytest.approx(expected, abs=1e-9)


def test_diagonal_mode_uses_radial_wavenumber():
    f = single_mode(64, 12, 16)  # |k| = 20 -> mid band
    spec = energy_spectrum(f)[0, :, 0]
    assert spec.argmax().item() == 20
    err = spectrum_band_error(torch.zeros_like(f), f)[0, :, 0]  # predicting nothing: error 1 in that band
    assert err.tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_shape_errors_are_one_line():
    with pytest.raises(ValueError, match=r"pred \(1, 4, 4, 1, 2\) and true \(1, 4, 4, 1, 3\)"):
        l2re(torch.zeros(1, 4, 4, 1, 2), torch.zeros(1, 4, 4, 1, 3))
    with pytest.raises(ValueError, match="channel_mask"):
        l2re(torch.zeros(1, 4, 4, 1, 2), torch.zeros(1, 4, 4, 1, 2), torch.ones(2, 2, dtype=torch.bool))


# --- the evaluation pass on real (tiny) shards -------------------------------------------------------


class Persistence(torch.nn.Module):
    """Baseline forecaster: the last input frame, forever (a real model, not a stand-in for one)."""

    def forward(self, x, channel_mask=None):
        from types import SimpleNamespace

        return SimpleNamespace(pred=x[..., -1:, :])

    def rollout(self, x, steps, channel_mask=None):
        return x[..., -1:, :].expand(*x.shape[:3], steps, x.shape[4])


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from nestor_ds.data import DataConfig, DatasetSpec

    from shard_fixtures import build_dataset

    root = tmp_path_factory.mktemp("eval_shards")
    path = build_dataset(root, "pers", n=10, t=7, res=8, c=2, per_shard=2, test_fraction=0.5)
    cfg = DataConfig(
        datasets=[DatasetSpec(name="pers", path=str(path), rollout_steps=3)], t_in=2, resolution=8, channels=4
    )
    return cfg


def hand_persistence(cfg, K, windows):
    """Expected one-step and rollout L2RE of persistence, written out with numpy from the stored trajectories
    (read with plain tarfile, not through the evaluation batches): windows "first" = start frame t_in only,
    "all" = every start frame s >= t_in; rollout scores the windows with K frames left."""
    import numpy as np

    from nestor_ds.data import read_trajectories

    t_in = cfg.t_in
    one, roll, curve = [], [], []
    for fields, _ in read_trajectories(cfg.datasets[0].path, "test"):
        f = fields.astype(np.float64)  # [T, X, Y, c]; stored at the evaluation resolution, no normalisation
        T = f.shape[0]
        for s in [t_in] if windows == "first" else range(t_in, T):
            last = f[s - 1]
            for c in range(f.shape[3]):
                one.append(np.linalg.norm(f[s, ..., c] - last[..., c]) / np.linalg.norm(f[s, ..., c]))
                if s + K <= T:
                    t = f[s : s + K, ..., c]
                    e = t - last[None, ..., c]
                    roll.append(np.linalg.norm(e) / np.linalg.norm(t))
                    curve.append([np.linalg.norm(e[k]) / np.linalg.norm(t[k]) for k in range(K)])
    c = fields.shape[3]
    return np.mean(one), np.mean(roll), np.mean(curve, axis=0), len(one) // c, len(roll) // c


@pytest.mark.parametrize("windows", ["first", "all"])
def test_evaluate_model_persistence_matches_hand_computation(tiny_shards, windows):
    from nestor_ds.eval import evaluate_model

    report = evaluate_model(
        Persistence(),
        tiny_shards.datasets,
        tiny_shards,
        rollout_steps=None,
        batch_size=2,
        progress=False,
        windows=windows,
    )
    r = report["datasets"]["pers"]
    one, roll, curve, n, n_roll = hand_persistence(tiny_shards, K=3, windows=windows)  # K = the dataset's rollout_steps
    # 5 test trajectories of T = 7 frames, t_in = 2: first -> 5 windows; all -> 5 start frames each, 3 with K frames
    # left
    assert (n, n_roll) == ((5, 5) if windows == "first" else (25, 15))
    assert r["n_samples"] == n and r["n_rollout_windows"] == n_roll and r["rollout_steps"] == 3
    assert r["windows"] == report["settings"]["windows"] == windows
    assert len(r["channels"]) == 2  # padding channels are not reported
    assert r["l2re_1step"] == pytest.approx(one, rel=1e-6)
    assert r["l2re_rollout"] == pytest.approx(roll, rel=1e-6)
    assert r["l2re_curve"] == pytest.approx(list(curve), rel=1e-6)
    assert set(r["spectrum_err_rollout"]) == {"low", "mid", "high"}
    assert report["mean"]["l2re_1step"] == pytest.approx(one, rel=1e-6)
    # a DataConfig works as `datasets` too (the engine's call), and the result does not depend on the batch size
    again = evaluate_model(
        Persistence(), tiny_shards, rollout_steps=None, batch_size=3, progress=False, windows=windows
    )
    assert again["datasets"]["pers"]["l2re_rollout"] == pytest.approx(r["l2re_rollout"], rel=1e-12)


def test_all_windows_batches_hold_every_start_frame(tiny_shards):
    """windows='all': one sample per (trajectory, start frame), targets cut at the trajectory's end with zeros."""
    import numpy as np

    from nestor_ds.data import build_eval_batches, read_trajectories

    batches = list(build_eval_batches(tiny_shards.datasets[0], tiny_shards, 0, 4, windows="all", horizon=3))
    starts = [(i, s) for b in batches for i, s in zip(b["traj_index"].tolist(), b["start_frame"].tolist(), strict=True)]
    assert starts == [(i, s) for i in range(5) for s in range(2, 7)]
    steps = [n for b in batches for n in b["y_steps"].tolist()]
    assert steps == [3, 3, 3, 2, 1] * 5
    fields = next(read_trajectories(tiny_shards.datasets[0].path, "test"))[0]  # trajectory 0: [T, X, Y, c]
    first = batches[1]  # samples 4..7: (0, 6), (1, 2), (1, 3), (1, 4)
    assert first["start_frame"][0] == 6 and first["y_steps"][0] == 1
    np.testing.assert_array_equal(first["x"][0, ..., :2].numpy(), fields[4:6].transpose(1, 2, 0, 3))
    np.testing.assert_array_equal(first["y"][0, :, :, 0, :2].numpy(), fields[6])
    assert not first["y"][0, :, :, 1:].any()


class RecordingPersistence(Persistence):
    """Persistence that remembers every input window it was asked to forecast (one digest per sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def rollout(self, x, steps, channel_mask=None):
        import hashlib

        self.seen.update(hashlib.sha1(s.numpy().tobytes()).hexdigest() for s in x)
        return super().rollout(x, steps, channel_mask)


def _dist_worker(rank: int, port: int, cfg, out: str) -> None:
    import json

    import torch.distributed as dist

    from nestor_ds.eval import evaluate_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = RecordingPersistence()
    # no rank/world_size given: the split is torch.distributed's
    report = evaluate_model(model, cfg.datasets, cfg, rollout_steps=2, batch_size=2, progress=False)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"report": report, "seen": sorted(model.seen)}, f)
    dist.destroy_process_group()


def test_distributed_reduction_equals_single_process(tiny_shards, tmp_path):
    import json

    import torch.multiprocessing as mp

    from nestor_ds.eval import evaluate_model

    port = free_port()
    mp.spawn(_dist_worker, args=(port, tiny_shards, str(tmp_path / "r")), nprocs=2, join=True)
    (r0, seen0), (r1, seen1) = (
        (d["report"], set(d["seen"])) for d in (json.loads((tmp_path / f"r.{i}").read_text()) for i in range(2))
    )
    model = RecordingPersistence()
    single = evaluate_model(model, tiny_shards.datasets, tiny_shards, rollout_steps=2, batch_size=2, progress=False)
    assert not seen0 & seen1 and seen0 | seen1 == model.seen  # disjoint shares that together cover the test split
    assert r0["datasets"] == r1["datasets"]  # every rank returns the full report
    a, b = r0["datasets"]["pers"], single["datasets"]["pers"]
    # 3 + 2 trajectories of 5 windows each: uneven ranks (lock-step padding); 4 windows each with 2 frames left
    assert a["n_samples"] == b["n_samples"] == 25 and a["n_rollout_windows"] == b["n_rollout_windows"] == 20
    for key in ("l2re_1step", "l2re_rollout"):
        assert a[key] == pytest.approx(b[key], rel=1e-12)
    assert a["l2re_curve"] == pytest.approx(b["l2re_curve"], rel=1e-12)


def test_band_error_stays_finite_where_the_truth_has_no_energy():
    """Smooth truth (one low mode) + a faint high-k ripple in the prediction: the high band scores the ripple's
    share of the energy, not ripple / (almost nothing)."""
    low = single_mode(64, 2, 0)
    ripple = 1e-2 * single_mode(64, 28, 0)
    err = spectrum_band_error(low + ripple, low)[0, :, 0].tolist()
    assert err[0] == pytest.approx(0.0, abs=1e-9) and err[1] == pytest.approx(0.0, abs=1e-9)
    assert err[2] == pytest.approx(1e-4, rel=1e-6)  # energy ratio (1e-2)^2
