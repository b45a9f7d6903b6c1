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
