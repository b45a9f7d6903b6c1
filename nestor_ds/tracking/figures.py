"""Review figures, built as bare `matplotlib.figure.Figure` objects (Agg, no pyplot state).

Using `Figure` directly instead of pyplot means no global figure registry: the training loop can make
a figure every evaluation without leaking memory or needing a display, and nothing must be closed.
Inputs may be numpy arrays or torch tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless; harmless when already selected

import numpy as np
from matplotlib.figure import Figure

from nestor_ds.tracking.expert_stats import mutual_information_bits


def _np(a) -> np.ndarray:
    """Tensor or array-like -> float64 numpy array on the host."""
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _row_shares(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (rows without counts stay zero)."""
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def _annotate(ax, values: np.ndarray, fmt: str = "{:.2f}") -> None:
    """Write each cell's value on a heat map (only when the grid is small enough to read)."""
    if values.size > 144:
        return
    for (i, j), v in np.ndenumerate(values):
        ax.text(
            j,
            i,
            fmt.format(v),
            ha="center",
            va="center",
            fontsize=8,
            color="white" if v > 0.5 * max(values.max(), 1e-12) else "black",
        )


def prediction_panels(pred_XYC, true_XYC, channel_names: Sequence[str], title: str = "") -> Figure:
    """One row per channel: prediction | truth | |error|, prediction and truth on one colour scale.

    The per-channel relative L2 error is written on each row so the picture and the metric agree.
    """
    pred, true = _np(pred_XYC), _np(true_XYC)
    if pred.shape != true.shape or pred.ndim != 3:
        raise ValueError(f"prediction_panels: pred {pred.shape} and true {true.shape} must both be [X, Y, C]")
    channels = pred.shape[-1]
    names = list(channel_names) + [f"c{i}" for i in range(len(channel_names), channels)]
    fig = Figure(figsize=(10, 3.0 * channels + 0.6), layout="constrained")
    axes = fig.subplots(channels, 3, squeeze=False)
    for c in range(channels):
        p, t = pred[..., c], true[..., c]
        err = np.abs(p - t)
        rel = np.linalg.norm(p - t) / max(np.linalg.norm(t), 1e-12)
        lo, hi = min(p.min(), t.min()), max(p.max(), t.max())
        # Arrays are [X, Y]: transpose so x runs horizontally and y upwards.
        for ax, img, label, kw in (
            (axes[c, 0], p, "prediction", {"vmin": lo, "vmax": hi, "cmap": "viridis"}),
            (axes[c, 1], t, "truth", {"vmin": lo, "vmax": hi, "cmap": "viridis"}),
            (axes[c, 2], err, f"|error|  (rel L2 {rel:.3g})", {"cmap": "magma"}),
        ):
            im = ax.imshow(img.T, origin="lower", **kw)
            ax.set_title(f"{names[c]}: {label}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def expert_usage_heatmap(
    counts_MEimg, dataset_names: Sequence[str], expert_names: Sequence[str] | None = None, title: str = ""
) -> Figure:
    """Share of each dataset's routings that go to each image expert; title carries I(dataset; expert).

    A diagonal-ish picture (each row concentrated on few experts, rows differing) means the experts
    specialise by physics; identical rows mean they do not.
    """
    counts = _np(counts_MEimg)
    d, e = counts.shape
    experts = list(expert_names) if expert_names is not None else [f"E{j}" for j in range(e)]
    shares = _row_shares(counts)
    mi = mutual_information_bits(counts)
    fig = Figure(figsize=(1.0 + 0.7 * e + 2.0, 1.2 + 0.45 * d), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(e), experts, rotation=45, ha="right")
    ax.set_yticks(range(d), list(dataset_names)[:d])
    ax.set_xlabel("image expert")
    _annotate(ax, shares)
    fig.colorbar(im, ax=ax, label="share of dataset's routings")
    max_mi = np.log2(min(d, e)) if min(d, e) > 1 else 0.0
    ax.set_title(
        f"{title + chr(10) if title else ''}specialisation I(dataset;expert) = {mi:.3f} bits (max {max_mi:.2f})",
        fontsize=9,
    )
    return fig


def token_expert_heatmap(counts_EimgEtok, title: str = "token-level routing") -> Figure:
    """Share of each image expert's tokens sent to each token expert (rows = image experts)."""
    counts = _np(counts_EimgEtok)
    e_img, e_tok = counts.shape
    shares = _row_shares(counts)
    fig = Figure(figsize=(2.5 + 0.6 * e_tok, 1.2 + 0.45 * e_img), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(shares, cmap="Greens", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(e_tok), [f"t{j}" for j in range(e_tok)])
    ax.set_yticks(range(e_img), [f"E{i}" for i in range(e_img)])
    ax.set_xlabel("token expert")
    ax.set_ylabel("image expert")
    _annotate(ax, shares)
    fig.colorbar(im, ax=ax, label="share of image expert's tokens")
    ax.set_title(title, fontsize=9)
    return fig


def rollout_error_curve(curves: dict[str, Sequence[float]], title: str = "autoregressive rollout") -> Figure:
    """L2RE against rollout step, one line per dataset; a stable model grows slowly, not exponentially."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    positive = True
    for name, values in curves.items():
        v = _np(values).ravel()
        positive &= bool(v.size == 0 or (v > 0).all())
        ax.plot(np.arange(1, v.size + 1), v, marker="o", markersize=3, label=name)
    if positive and curves:
        ax.set_yscale("log")
    ax.set_xlabel("rollout step")
    ax.set_ylabel("L2RE")
    ax.grid(True, which="both", alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    ax.set_title(title)
    return fig
