"""AFNO's complex-free spectral mixing ("dft" matmuls, "fft" fp32 islands) equals the complex-FFT version."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestor_ds.model import build_model, get_preset
from nestor_ds.model.afno import SpectralMixing, complex_block
from nestor_ds.model.spectral import (
    dft_forward_modes,
    dft_inverse_modes,
    dft_matrices,
    irfft2_modes,
    kept_modes,
    rfft2_modes,
)


def complex_reference(m: SpectralMixing, x_BDHW: torch.Tensor) -> torch.Tensor:
    """The spectral mixing as DPOT writes it: complex rfft2, complex block MLP on the kept modes, irfft2."""
    B, D, H, W = x_BDHW.shape
    xf = torch.fft.rfft2(x_BDHW.float(), dim=(2, 3), norm="ortho")
    Kx, Ky = kept_modes(H, W, m.modes)
    xk = xf[:, :, :Kx, :Ky].reshape(B, m.nb, m.bs, Kx, Ky).permute(1, 0, 3, 4, 2).reshape(m.nb, -1, m.bs)
    h = torch.cat([xk.real, xk.imag], dim=-1)
    b1 = m.b1.permute(1, 0, 2).reshape(m.nb, 1, -1)
    b2 = m.b2.permute(1, 0, 2).reshape(m.nb, 1, -1)
    h = F.gelu(torch.bmm(h, complex_block(m.w1)) + b1)
    h = torch.bmm(h, complex_block(m.w2)) + b2
    h = F.softshrink(h, m.sparsity)
    yk = torch.complex(h[..., : m.bs], h[..., m.bs :])
    yk = yk.reshape(m.nb, B, Kx, Ky, m.bs).permute(1, 0, 4, 2, 3).reshape(B, D, Kx, Ky)
    yf = xf.new_zeros(B, D, H, W // 2 + 1)
    yf[:, :, :Kx, :Ky] = yk
    return torch.fft.irfft2(yf, s=(H, W), dim=(2, 3), norm="ortho")


@pytest.mark.parametrize("h,w,modes", [(16, 16, 32), (16, 16, 5), (8, 12, 3), (7, 9, 32)])
def test_real_transforms_equal_torch_fft_values_and_gradients(h, w, modes):
    """Both complex-free transform pairs against torch.fft, forward and transposed (backward), float32."""
    Kx, Ky = kept_modes(h, w, modes)
    mats = dft_matrices(h, w, Kx, Ky)
    g = torch.Generator().manual_seed(h * w + modes)
    x = torch.randn(3, h, w, generator=g, requires_grad=True)
    y = torch.randn(3, 2, Kx, Ky, generator=g, requires_grad=True)
    gx, gy = torch.randn(3, 2, Kx, Ky, generator=g), torch.randn(3, h, w, generator=g)

    xf = torch.fft.rfft2(x, norm="ortho")[:, :Kx, :Ky]
    ref_fwd = torch.stack([xf.real, xf.imag], dim=1)
    full = torch.zeros(3, h, w // 2 + 1, dtype=torch.complex64)
    full[:, :Kx, :Ky] = torch.complex(y[:, 0], y[:, 1])
    ref_inv = torch.fft.irfft2(full, s=(h, w), norm="ortho")
    (ref_dx,) = torch.autograd.grad((ref_fwd * gx).sum(), x)
    (ref_dy,) = torch.autograd.grad((ref_inv * gy).sum(), y)
    for fwd, inv in (
        (lambda t: dft_forward_modes(t, mats), lambda t: dft_inverse_modes(t, mats)),
        (lambda t: rfft2_modes(t, Kx, Ky), lambda t: irfft2_modes(t, h, w)),
    ):
        out_f, out_i = fwd(x), inv(y)
        torch.testing.assert_close(out_f, ref_fwd, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out_i, ref_inv, atol=1e-5, rtol=1e-5)
        (dx,) = torch.autograd.grad((out_f * gx).sum(), x)
        (dy,) = torch.autograd.grad((out_i * gy).sum(), y)
        torch.testing.assert_close(dx, ref_dx, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dy, ref_dy, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spectral", ["dft", "fft"])
@pytest.mark.parametrize("grid,modes,other", [(16, 32, 8), (8, 3, 12)])
def test_spectral_mixing_equals_complex_fft_version(spectral, grid, modes, other):
    """Value and input gradient to 1e-5, weight gradients to 1e-5 of their largest entry (fp32), at the
    precomputed grid and at another one."""
    torch.manual_seed(0)
    m = SpectralMixing(32, num_blocks=4, modes=modes, sparsity=0.01, scale=0.3)
    m.set_mode(spectral, grid)
    for size in (grid, other):
        x = torch.randn(2, 32, size, size, requires_grad=True)
        gy = torch.randn(2, 32, size, size)
        outs = []
        for fn in (m, lambda t: complex_reference(m, t)):
            y = fn(x)
            grads = torch.autograd.grad((y * gy).sum(), [x, *m.parameters()])
            outs.append((y, grads))
        (y, grads), (y_ref, grads_ref) = outs
        assert y.abs().max() > 1e-3  # the mixing is not trivially zero after soft-shrinkage
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grads[0], grads_ref[0], atol=1e-5, rtol=1e-5)
        # weight gradients sum ~300 products: 1e-5 of their scale
        for a, b in zip(grads[1:], grads_ref[1:], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-5)


def test_modes_share_state_dict_and_outputs():
    """afno_spectral changes no parameter name: a checkpoint of one mode loads into the other, same prediction."""
    torch.manual_seed(0)
    a = build_model(get_preset("afno-tiny", {"afno_spectral": "dft"}))
    b = build_model(get_preset("afno-tiny", {"afno_spectral": "fft"}))
    assert list(a.state_dict()) == list(b.state_dict())
    assert not any("fw_W2Ky" in k for k in a.state_dict())
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 32, 32, a.cfg.t_in, a.cfg.in_channels)
    torch.testing.assert_close(a(x).pred, b(x).pred, atol=1e-5, rtol=1e-5)


def test_bad_spectral_mode_is_one_clear_error():
    with pytest.raises(ValueError, match="afno_spectral='complex'"):
        get_preset("afno-tiny", {"afno_spectral": "complex"})
