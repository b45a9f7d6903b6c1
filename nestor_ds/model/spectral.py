"""The truncated 2-D real Fourier transforms of AFNO, with no complex tensor in any compiled graph.

Shape legend: N = B*D fields, H/W token grid, K kept rows (k_y = 0..K-1), M kept columns of the half spectrum
(k_x = 0..M-1), 2 = (real, imag). Norm "ortho" throughout (as DPOT).

    forward_modes(x_NHW)  -> X_N2KM = [Re, Im] of rfft2(x)[:, :K, :M]
    inverse_modes(X_N2KM) -> x_NHW  = irfft2(X zero-padded to the full half spectrum, s=(H, W))

Why: torch.compile (Inductor) does not generate code for complex tensors and cuFFT has no bf16, so the complex
FFT path forces graph breaks and fp32 casts in the middle of every AFNO block. Two complex-free forms of the same
two linear maps, selected by ``ModelConfig.afno_spectral``:

- ``"dft"``: separable real DFT as matmuls with precomputed cos/sin matrices (one [W, 2M] matrix on the last
  axis, one [2K, 2H] block matrix on the rows). At a 16x16 token grid this is a few percent of the block's FLOPs,
  runs on tensor cores in the input dtype (bf16 on GPU) and compiles into the surrounding graph.
- ``"fft"``: torch.fft in an fp32 island: one opaque custom op per direction (``nestor::rfft2_modes``,
  ``nestor::irfft2_modes``) whose inputs and outputs are real; Dynamo and Inductor see an extern call, so there
  is no graph break and no complex dtype in the graph. Their backward is the transposed linear map (an inverse FFT
  of the zero-padded modes, and a forward FFT weighted by the c2r multiplicities), again an opaque op.

Both equal the complex FFT (``torch.fft.rfft2`` / ``irfft2``) to float32 round-off, value and gradient
(tests/test_spectral.py).
"""
from __future__ import annotations

import math

import torch

SPECTRAL_MODES = ("dft", "fft")


def kept_modes(h: int, w: int, modes: int) -> tuple[int, int]:
    """(K, M): DPOT's kept block of the rfft2 layout, rows 0..K-1 and half-spectrum columns 0..M-1."""
    return min(modes, h), min(modes, w // 2 + 1)


# --------------------------------------------------------------------------------------------- real DFT matrices


def dft_matrices(h: int, w: int, k: int, m: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The four real matrices of the separable truncated DFT (built in float64, then cast).

    fw_W2M [W, 2M]   columns (c, k_x): cos, -sin of 2 pi k_x w / W, / sqrt(W)     (rfft along x)
    fh_2K2H [2K, 2H] rows (c_out, k_y), columns (h, c_in)                        (fft along y)
    gh_2H2K [2H, 2K] rows (h, c_out), columns (c_in, k_y)                        (ifft along y)
    gw_2MW [2M, W]   rows (c, k_x): alpha cos, -alpha sin, / sqrt(W); alpha = 1 at k_x = 0 and Nyquist, else 2
                     (the c2r transform: the imaginary parts at k_x = 0 and Nyquist drop out as sin = 0 there)
    """
    f64, cpu = torch.float64, torch.device("cpu")    # explicit: also right under a `with torch.device("meta")`
    phi_WM = 2 * math.pi * torch.outer(torch.arange(w, dtype=f64, device=cpu), torch.arange(m, dtype=f64, device=cpu)) / w
    fw = torch.cat([phi_WM.cos(), -phi_WM.sin()], dim=1) / math.sqrt(w)
    theta_KH = 2 * math.pi * torch.outer(torch.arange(k, dtype=f64, device=cpu), torch.arange(h, dtype=f64, device=cpu)) / h
    c, s = theta_KH.cos() / math.sqrt(h), theta_KH.sin() / math.sqrt(h)
    # forward along y: Re' = C Re + S Im, Im' = C Im - S Re   (e^{-i theta})
    fh = torch.stack([torch.stack([c, s], dim=-1), torch.stack([-s, c], dim=-1)], dim=0).reshape(2 * k, 2 * h)
    # inverse along y: Re' = C^T Re - S^T Im, Im' = S^T Re + C^T Im   (e^{+i theta}); rows (h, c_out)
    gh = torch.stack([torch.stack([c.T, -s.T], dim=1), torch.stack([s.T, c.T], dim=1)], dim=1).reshape(2 * h, 2 * k)
    alpha_M = _c2r_weights(w, m, cpu).to(f64)
    gw = torch.cat([alpha_M[:, None] * phi_WM.T.cos(), -alpha_M[:, None] * phi_WM.T.sin()], dim=0) / math.sqrt(w)
    return {name: t.to(device=device, dtype=dtype) for name, t in
            (("fw_W2M", fw), ("fh_2K2H", fh), ("gh_2H2K", gh), ("gw_2MW", gw))}


def dft_forward_modes(x_NHW: torch.Tensor, mats: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N, H, W] -> [N, 2, K, M] with two matmuls and no permutation."""
    N, H, _ = x_NHW.shape
    fw, fh = mats["fw_W2M"].to(x_NHW.dtype), mats["fh_2K2H"].to(x_NHW.dtype)
    M, K = fw.shape[1] // 2, fh.shape[0] // 2
    a_N2HM = (x_NHW @ fw).view(N, 2 * H, M)            # rows (h, c): the layout fh contracts over
    return (fh @ a_N2HM).view(N, 2, K, M)


def dft_inverse_modes(y_N2KM: torch.Tensor, mats: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N, 2, K, M] -> [N, H, W] with two matmuls and no permutation."""
    N, _, K, M = y_N2KM.shape
    gh, gw = mats["gh_2H2K"].to(y_N2KM.dtype), mats["gw_2MW"].to(y_N2KM.dtype)
    H = gh.shape[0] // 2
    z_N2HM = gh @ y_N2KM.reshape(N, 2 * K, M)          # rows (h, c)
    return z_N2HM.view(N, H, 2 * M) @ gw


# --------------------------------------------------------------------------------------------- fp32 FFT islands


def _complex_forward(x_NHW: torch.Tensor, k: int, m: int) -> torch.Tensor:
    xf = torch.fft.rfft2(x_NHW, norm="ortho")[:, :k, :m]
    return torch.stack([xf.real, xf.imag], dim=1)


def _complex_inverse(y_N2KM: torch.Tensor, h: int, w: int) -> torch.Tensor:
    N, _, K, M = y_N2KM.shape
    yk = torch.complex(y_N2KM[:, 0], y_N2KM[:, 1])
    if (K, M) != (h, w // 2 + 1):
        full = yk.new_zeros(N, h, w // 2 + 1)
        full[:, :K, :M] = yk
        yk = full
    return torch.fft.irfft2(yk, s=(h, w), norm="ortho")


def _c2r_weights(w: int, m: int, device: torch.device) -> torch.Tensor:
    """alpha_M of the c2r transform along x: 1 at k_x = 0 (and at Nyquist when kept), 2 elsewhere."""
    alpha = torch.full((m,), 2.0, device=device)
    alpha[0] = 1.0
    if w % 2 == 0 and m == w // 2 + 1:
        alpha[-1] = 1.0
    return alpha


@torch.library.custom_op("nestor::rfft2_modes", mutates_args=())
def rfft2_modes(x_NHW: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """fp32 [Re, Im] of rfft2(x)[:, :k, :m] as [N, 2, k, m] (an opaque op for torch.compile)."""
    return _complex_forward(x_NHW.float(), k, m)


@rfft2_modes.register_fake
def _(x_NHW: torch.Tensor, k: int, m: int) -> torch.Tensor:
    return x_NHW.new_empty((x_NHW.shape[0], 2, k, m), dtype=torch.float32)


@torch.library.custom_op("nestor::rfft2_modes_t", mutates_args=())
def rfft2_modes_t(grad_N2KM: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Transpose of rfft2_modes: [N, 2, k, m] -> [N, h, w]."""
    # transpose of (fft along y) o (r2c along x) = Re of (ifft along y, c2c ifft along x) of the zero-padded modes
    N, _, K, M = grad_N2KM.shape
    full = torch.zeros(N, h, w, dtype=torch.complex64, device=grad_N2KM.device)
    full[:, :K, :M] = torch.complex(grad_N2KM[:, 0].float(), grad_N2KM[:, 1].float())
    return torch.fft.ifft2(full, norm="ortho").real.contiguous()


@rfft2_modes_t.register_fake
def _(grad_N2KM: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return grad_N2KM.new_empty((grad_N2KM.shape[0], h, w), dtype=torch.float32)


@torch.library.custom_op("nestor::irfft2_modes", mutates_args=())
def irfft2_modes(y_N2KM: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """fp32 irfft2 (s=(h, w)) of the kept modes [N, 2, k, m], zero elsewhere -> [N, h, w]."""
    return _complex_inverse(y_N2KM.float(), h, w)


@irfft2_modes.register_fake
def _(y_N2KM: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return y_N2KM.new_empty((y_N2KM.shape[0], h, w), dtype=torch.float32)


@torch.library.custom_op("nestor::irfft2_modes_t", mutates_args=())
def irfft2_modes_t(grad_NHW: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """Transpose of irfft2_modes: [N, h, w] -> [N, 2, k, m]."""
    # transpose of (ifft along y) o (c2r along x) = (fft along y) o (alpha * r2c along x), kept modes only
    w = grad_NHW.shape[2]
    return _complex_forward(grad_NHW.float(), k, m) * _c2r_weights(w, m, grad_NHW.device)


@irfft2_modes_t.register_fake
def _(grad_NHW: torch.Tensor, k: int, m: int) -> torch.Tensor:
    return grad_NHW.new_empty((grad_NHW.shape[0], 2, k, m), dtype=torch.float32)


def _rfft_setup(ctx, inputs, output) -> None:
    x = inputs[0]
    ctx.hw, ctx.dtype = tuple(x.shape[1:]), x.dtype


def _rfft_backward(ctx, grad):
    return rfft2_modes_t(grad, *ctx.hw).to(ctx.dtype), None, None


def _irfft_setup(ctx, inputs, output) -> None:
    y = inputs[0]
    ctx.km, ctx.dtype = tuple(y.shape[2:]), y.dtype


def _irfft_backward(ctx, grad):
    return irfft2_modes_t(grad, *ctx.km).to(ctx.dtype), None, None


rfft2_modes.register_autograd(_rfft_backward, setup_context=_rfft_setup)
irfft2_modes.register_autograd(_irfft_backward, setup_context=_irfft_setup)
