"""Metrics against hand computation: persistence forecast, single Fourier modes, masked channels."""

from __future__ import annotations

import math

import pytest
import torch

from nestor_ds.eval.metrics import (SpectrumConfig, band_edges, energy_spectrum, l2re, l2re_per_step, masked_mean,
                                    spectrum_band_error)


def decaying_trajectory(steps: int, c: float = 0.8, n: int = 16) -> torch.Tensor:
    """u(t) = c^t * g(x, y) as [1, X, Y, T, 1]: persistence errors are |1 - c^k| / c^k by hand."""
    xs = torch.linspace(0, 2 * math.pi, n + 1)[:-1]
    g = torch.sin(xs)[:, None] * torch.cos(2 * xs)[None, :] + 0.3
    return torch.stack([g * c ** t for t in range(steps)], dim=-1)[None, ..., None]


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
    want = [abs(1 - c ** k) / c ** k for k in range(1, K + 1)]
    assert curve[0, :, 0].tolist() == pytest.approx(want, rel=1e-6)

    rollout = l2re(persistence, future)
    num = math.sqrt(sum((1 - c ** k) ** 2 for k in range(1, K + 1)))
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
    from shard_fixtures import build_dataset

    from nestor_ds.data import DataConfig, DatasetSpec

    root = tmp_path_factory.mktemp("eval_shards")
    path = build_dataset(root, "pers", n=10, t=7, res=8, c=2, per_shard=2, test_fraction=0.5)
    cfg = DataConfig(datasets=[DatasetSpec(name="pers", path=str(path), rollout_steps=3)], t_in=2, resolution=8,
                     channels=4)
    return cfg


def hand_persistence(cfg, K):
    """Expected one-step and rollout L2RE of persistence, written out with numpy over the eval batches."""
    import numpy as np

    from nestor_ds.data import build_eval_batches

    one, roll, curve = [], [], []
    for b in build_eval_batches(cfg.datasets[0], cfg, 0, 100):
        x, y = b["x"].numpy().astype(np.float64), b["y"].numpy().astype(np.float64)
        last = x[..., -1, :]
        for s in range(x.shape[0]):
            for c in range(2):  # the real channels; 2 and 3 are padding
                t = y[s, :, :, :K, c]
                e = t - last[s, :, :, c][..., None]
                one.append(np.linalg.norm(e[..., 0]) / np.linalg.norm(t[..., 0]))
                roll.append(np.linalg.norm(e) / np.linalg.norm(t))
                curve.append([np.linalg.norm(e[..., k]) / np.linalg.norm(t[..., k]) for k in range(K)])
    return np.mean(one), np.mean(roll), np.mean(curve, axis=0), len(one) // 2


def test_evaluate_model_persistence_matches_hand_computation(tiny_shards):
    from nestor_ds.eval import evaluate_model

    report = evaluate_model(Persistence(), tiny_shards.datasets, tiny_shards, rollout_steps=None, batch_size=2,
                            progress=False)
    r = report["datasets"]["pers"]
    one, roll, curve, n = hand_persistence(tiny_shards, K=3)  # K = the dataset's rollout_steps (5 available)
    assert r["n_samples"] == n == 5 and r["rollout_steps"] == 3
    assert len(r["channels"]) == 2  # padding channels are not reported
    assert r["l2re_1step"] == pytest.approx(one, rel=1e-6)
    assert r["l2re_rollout"] == pytest.approx(roll, rel=1e-6)
    assert r["l2re_curve"] == pytest.approx(list(curve), rel=1e-6)
    assert set(r["spectrum_err_rollout"]) == {"low", "mid", "high"}
    assert report["mean"]["l2re_1step"] == pytest.approx(one, rel=1e-6)
    # a DataConfig works as `datasets` too (the engine's call), and the result is deterministic
    again = evaluate_model(Persistence(), tiny_shards, rollout_steps=None, batch_size=3, progress=False)
    assert again["datasets"]["pers"]["l2re_rollout"] == pytest.approx(r["l2re_rollout"], rel=1e-12)


def _dist_worker(rank: int, port: int, cfg, out: str) -> None:
    import json

    import torch.distributed as dist

    from nestor_ds.eval import evaluate_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    report = evaluate_model(Persistence(), cfg.datasets, cfg, rollout_steps=2, batch_size=2, rank=rank,
                            world_size=2, progress=False)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def test_distributed_reduction_equals_single_process(tiny_shards, tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    from nestor_ds.eval import evaluate_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker, args=(port, tiny_shards, str(tmp_path / "r")), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"r.{i}").read_text()) for i in range(2))
    single = evaluate_model(Persistence(), tiny_shards.datasets, tiny_shards, rollout_steps=2, batch_size=2,
                            progress=False)
    assert r0["datasets"] == r1["datasets"]  # every rank returns the full report
    a, b = r0["datasets"]["pers"], single["datasets"]["pers"]
    assert a["n_samples"] == b["n_samples"] == 5  # 3 + 2 trajectories: uneven ranks (lock-step padding)
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
