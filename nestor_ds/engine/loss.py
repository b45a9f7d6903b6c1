"""The training objective: masked relative L2 of the predicted frames plus weighted router losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nestor_ds.eval.metrics import l2re


@dataclass
class LossConfig:
    """Weights of the load-balancing and router z-losses added to the masked relative L2 loss."""

    image_lb_weight: float = 3e-2  # image routers' load-balancing loss E * sum f_i P_i (authors' pre-training value)
    token_lb_weight: float = 1e-4  # token routers' load-balancing loss (the same form)
    token_z_weight: float = 0.0  # token routers' z-loss, mean of logsumexp(logits)^2 (ST-MoE): keeps logits small


def training_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    channel_mask: torch.Tensor,
    aux_losses: dict[str, torch.Tensor],
    cfg: LossConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``loss = mean over samples of the relative L2 over real channels``
    ``+ w_img * image_lb + w_tok * token_lb + w_z * token_z``.

    Returns the loss and its detached parts for logging.
    """
    # each sample counts once, whatever its number of real channels: the batch mean then splits exactly over
    # data-parallel ranks (2 ranks x B/2 give the gradient of 1 rank x B)
    err_BC = l2re(pred, target, channel_mask)
    mask_BC = channel_mask.to(err_BC.dtype)
    rel_l2 = ((err_BC * mask_BC).sum(1) / mask_BC.sum(1).clamp_min(1)).mean().to(pred.dtype)
    zero = pred.new_zeros(())
    image_lb = aux_losses.get("image_lb", zero)
    token_lb = aux_losses.get("token_lb", zero)
    token_z = aux_losses.get("token_z", zero)
    loss = rel_l2 + cfg.image_lb_weight * image_lb + cfg.token_lb_weight * token_lb + cfg.token_z_weight * token_z
    parts = {"loss": loss, "rel_l2": rel_l2, "image_lb": image_lb, "token_lb": token_lb, "token_z": token_z}
    return loss, {k: v.detach().float() for k, v in parts.items()}


def inject_noise(x: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """DPOT's input-noise injection: ``x + scale * ||x||_2 * N(0, 1)``, the norm per sample and channel.

    ``x`` is ``[B, X, Y, T, C]``; the generator is seeded per step so a resumed run draws the same noise. The noise
    is drawn where the generator lives: pass a generator on ``x``'s device (:func:`noise_generator`) and nothing
    crosses the host-device link.
    """
    if scale <= 0:
        return x
    norm = x.pow(2).sum(dim=(1, 2, 3), keepdim=True).sqrt()
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)
    return x + scale * norm * noise


def noise_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (one per step and micro-batch: resume replays the draws;
    seeding is a host-side operation, no device sync)."""
    return torch.Generator(device=device).manual_seed(seed)
