"""The truncated 2-D real Fourier transforms of AFNO, with no complex tensor in any compiled graph.

Shape legend (the project's): B samples, D width (AFNO transforms each of the B*D fields independently; every
function here takes any leading dims), H, W token grid, Kx kept rows (k_x = 0..Kx-1, along H), Ky kept columns
of the half spectrum (k_y = 0..Ky-1, along W), 2 = (real, imag). Norm "ortho" throughout (as DPOT).

    forward_modes(x_BDHW)      -> X_BD2KxKy = [Re, Im] of rfft2(x)[..., :Kx, :Ky]
    inverse_modes(X_BD2KxKy)   -> x_BDHW    = irfft2(X zero-padded to the full half spectrum, s=(H, W))

Why: torch.compile (Inductor) does not generate code for complex tensors and cuFFT has no bf16, so the complex
FFT path forces graph breaks and fp32 casts in the middle of every AFNO block. Two complex-free forms of the same
two linear maps, selected by ``ModelConfig.afno_spectral``:

- ``"dft"``: separable real DFT as matmuls with precomputed cos/sin matrices (one [W, 2Ky] matrix on the last
  axis, one [2Kx, 2H] block matrix on the rows). At a 16x16 token grid this is a few percent of the block's FLOPs,
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
DFT_MATRICES = ("fw_W2Ky", "fh_2Kx2H", "gh_2H2Kx", "gw_2KyW")  # the names dft_matrices returns, in this order


def kept_modes(h: int, w: int, modes: int) -> tuple[int, int]:
    """(Kx, Ky): DPOT's kept block of the rfft2 layout, rows 0..Kx-1 and half-spectrum columns 0..Ky-1."""
    return min(modes, h), min(modes, w // 2 + 1)


# --------------------------------------------------------------------------------------------- real DFT matrices


def dft_matrices(
    h: int, w: int, kx: int, ky: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The four real matrices of the separable truncated DFT (built in float64, then cast).

    fw_W2Ky [W, 2Ky]      columns (c, k_y): cos, -sin of 2 pi k_y w / W, / sqrt(W)   (rfft along W)
    fh_2Kx2H [2Kx, 2H]    rows (c_out, k_x), columns (h, c_in)                       (fft along H)
    gh_2H2Kx [2H, 2Kx]    rows (h, c_out), columns (c_in, k_x)                       (ifft along H)
    gw_2KyW [2Ky, W]      rows (c, k_y): alpha cos, -alpha sin, / sqrt(W); alpha = 1 at k_y = 0 and Nyquist, else 2
                          (the c2r transform: the imaginary parts at k_y = 0 and Nyquist drop out as sin = 0 there)
    """
    f64, cpu = torch.float64, torch.device("cpu")  # explicit: also right under a `with torch.device("meta")`
    phi_WKy = (
        2 * math.pi * torch.outer(torch.arange(w, dtype=f64, device=cpu), torch.arange(ky, dtype=f64, device=cpu)) / w
    )
    fw = torch.cat([phi_WKy.cos(), -phi_WKy.sin()], dim=1) / math.sqrt(w)
    theta_KxH = (
        2 * math.pi * torch.outer(torch.arange(kx, dtype=f64, device=cpu), torch.arange(h, dtype=f64, device=cpu)) / h
    )
    c, s = theta_KxH.cos() / math.sqrt(h), theta_KxH.sin() / math.sqrt(h)
    # forward along H: Re' = C Re + S Im, Im' = C Im - S Re   (e^{-i theta})
    fh = torch.stack([torch.stack([c, s], dim=-1), torch.stack([-s, c], dim=-1)], dim=0).reshape(2 * kx, 2 * h)
    # inverse along H: Re' = C^T Re - S^T Im, Im' = S^T Re + C^T Im   (e^{+i theta}); rows (h, c_out)
    gh = torch.stack([torch.stack([c.T, -s.T], dim=1), torch.stack([s.T, c.T], dim=1)], dim=1).reshape(2 * h, 2 * kx)
    alpha_Ky = _c2r_weights(w, ky, cpu).to(f64)
    gw = torch.cat([alpha_Ky[:, None] * phi_WKy.T.cos(), -alpha_Ky[:, None] * phi_WKy.T.sin()], dim=0) / math.sqrt(w)
    return {name: t.to(device=device, dtype=dtype) for name, t in zip(DFT_MATRICES, (fw, fh, gh, gw), strict=True)}


def dft_forward_modes(x_BDHW: torch.Tensor, mats: dict[str, torch.Tensor]) -> torch.Tensor:
    """[..., H, W] -> [..., 2, Kx, Ky] with two matmuls and no permutation."""
    lead, H = x_BDHW.shape[:-2], x_BDHW.shape[-2]
    fw, fh = mats["fw_W2Ky"].to(x_BDHW.dtype), mats["fh_2Kx2H"].to(x_BDHW.dtype)
    Ky, Kx = fw.shape[1] // 2, fh.shape[0] // 2
    a_BD2HKy = (x_BDHW @ fw).view(*lead, 2 * H, Ky)  # rows (h, c): the layout fh contracts over
    return (fh @ a_BD2HKy).view(*lead, 2, Kx, Ky)


def dft_inverse_modes(y_BD2KxKy: torch.Tensor, mats: dict[str, torch.Tensor]) -> torch.Tensor:
    """[..., 2, Kx, Ky] -> [..., H, W] with two matmuls and no permutation."""
    lead, (Kx, Ky) = y_BD2KxKy.shape[:-3], y_BD2KxKy.shape[-2:]
    gh, gw = mats["gh_2H2Kx"].to(y_BD2KxKy.dtype), mats["gw_2KyW"].to(y_BD2KxKy.dtype)
    H = gh.shape[0] // 2
    z_BD2HKy = gh @ y_BD2KxKy.reshape(*lead, 2 * Kx, Ky)  # rows (h, c)
    return z_BD2HKy.view(*lead, H, 2 * Ky) @ gw


# --------------------------------------------------------------------------------------------- fp32 FFT islands


def _complex_forward(x_BDHW: torch.Tensor, kx: int, ky: int) -> torch.Tensor:
    xf = torch.fft.rfft2(x_BDHW, norm="ortho")[..., :kx, :ky]
    return torch.stack([xf.real, xf.imag], dim=-3)


def _complex_inverse(y_BD2KxKy: torch.Tensor, h: int, w: int) -> torch.Tensor:
    lead, (Kx, Ky) = y_BD2KxKy.shape[:-3], y_BD2KxKy.shape[-2:]
    yk = torch.complex(y_BD2KxKy[..., 0, :, :], y_BD2KxKy[..., 1, :, :])
    if (Kx, Ky) != (h, w // 2 + 1):
        full = yk.new_zeros(*lead, h, w // 2 + 1)
        full[..., :Kx, :Ky] = yk
        yk = full
    return torch.fft.irfft2(yk, s=(h, w), norm="ortho")


def _c2r_weights(w: int, ky: int, device: torch.device) -> torch.Tensor:
    """alpha_Ky of the c2r transform along W: 1 at k_y = 0 (and at Nyquist when kept), 2 elsewhere."""
    alpha = torch.full((ky,), 2.0, device=device)
    alpha[0] = 1.0
    if w % 2 == 0 and ky == w // 2 + 1:
        alpha[-1] = 1.0
    return alpha


@torch.library.custom_op("nestor::rfft2_modes", mutates_args=())
def rfft2_modes(x_BDHW: torch.Tensor, kx: int, ky: int) -> torch.Tensor:
    """fp32 [Re, Im] of rfft2(x)[..., :kx, :ky] as [..., 2, kx, ky] (an opaque op for torch.compile)."""
    return _complex_forward(x_BDHW.float(), kx, ky)


@rfft2_modes.register_fake
def _(x_BDHW: torch.Tensor, kx: int, ky: int) -> torch.Tensor:
    return x_BDHW.new_empty((*x_BDHW.shape[:-2], 2, kx, ky), dtype=torch.float32)


@torch.library.custom_op("nestor::rfft2_modes_t", mutates_args=())
def rfft2_modes_t(grad_BD2KxKy: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Transpose of rfft2_modes: [..., 2, kx, ky] -> [..., h, w]."""
    # transpose of (fft along H) o (r2c along W) = Re of (ifft along H, c2c ifft along W) of the zero-padded modes
    lead, (Kx, Ky) = grad_BD2KxKy.shape[:-3], grad_BD2KxKy.shape[-2:]
    full = torch.zeros(*lead, h, w, dtype=torch.complex64, device=grad_BD2KxKy.device)
    full[..., :Kx, :Ky] = torch.complex(grad_BD2KxKy[..., 0, :, :].float(), grad_BD2KxKy[..., 1, :, :].float())
    return torch.fft.ifft2(full, norm="ortho").real.contiguous()


@rfft2_modes_t.register_fake
def _(grad_BD2KxKy: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return grad_BD2KxKy.new_empty((*grad_BD2KxKy.shape[:-3], h, w), dtype=torch.float32)


@torch.library.custom_op("nestor::irfft2_modes", mutates_args=())
def irfft2_modes(y_BD2KxKy: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """fp32 irfft2 (s=(h, w)) of the kept modes [..., 2, kx, ky], zero elsewhere -> [..., h, w]."""
    return _complex_inverse(y_BD2KxKy.float(), h, w)


@irfft2_modes.register_fake
def _(y_BD2KxKy: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return y_BD2KxKy.new_empty((*y_BD2KxKy.shape[:-3], h, w), dtype=torch.float32)


@torch.library.custom_op("nestor::irfft2_modes_t", mutates_args=())
def irfft2_modes_t(grad_BDHW: torch.Tensor, kx: int, ky: int) -> torch.Tensor:
    """Transpose of irfft2_modes: [..., h, w] -> [..., 2, kx, ky]."""
    # transpose of (ifft along H) o (c2r along W) = (fft along H) o (alpha * r2c along W), kept modes only
    w = grad_BDHW.shape[-1]
    return _complex_forward(grad_BDHW.float(), kx, ky) * _c2r_weights(w, ky, grad_BDHW.device)


@irfft2_modes_t.register_fake
def _(grad_BDHW: torch.Tensor, kx: int, ky: int) -> torch.Tensor:
    return grad_BDHW.new_empty((*grad_BDHW.shape[:-2], 2, kx, ky), dtype=torch.float32)


def _rfft_setup(ctx, inputs, output) -> None:
    x = inputs[0]
    ctx.hw, ctx.dtype = tuple(x.shape[-2:]), x.dtype


def _rfft_backward(ctx, grad):
    return rfft2_modes_t(grad, *ctx.hw).to(ctx.dtype), None, None


def _irfft_setup(ctx, inputs, output) -> None:
    y = inputs[0]
    ctx.kxky, ctx.dtype = tuple(y.shape[-2:]), y.dtype


def _irfft_backward(ctx, grad):
    return irfft2_modes_t(grad, *ctx.kxky).to(ctx.dtype), None, None


rfft2_modes.register_autograd(_rfft_backward, setup_context=_rfft_setup)
irfft2_modes.register_autograd(_irfft_backward, setup_context=_irfft_setup)
