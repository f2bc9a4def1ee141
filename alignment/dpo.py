"""Diffusion-DPO maths (Wallace et al. 2023), as pure functions.

For a preferred image ``w`` and a rejected image ``l`` of one prompt, noised with the *same* noise
``eps`` at the *same* timestep ``t``, the per-image denoising error of a model is

    err = mean over (C, h, w) of (eps - eps_theta(x_t, t, c)) ** 2            (shape [B])

computed for the trained policy (``model_err_*``) and for the frozen reference (``ref_err_*``).
The implicit reward margin of the pair is

    logits = -1/2 * ((model_err_w - model_err_l) - (ref_err_w - ref_err_l))   (shape [B])

(positive when the policy improved on the preferred image more than on the rejected one, relative
to the reference), and the losses are

    sigmoid (Diffusion-DPO):  -log sigmoid(beta * logits)
    hinge (SLiC-style):       relu(1 - beta * logits)
    ipo   (Azar et al.):      (logits - 1 / (2 * beta)) ** 2

averaged over the batch. **The 1/2 is inside** ``logits``, so ``beta = 5000`` suits SD 1.5 (the
Diffusion-DPO paper's setting); code written without the 1/2 uses ``beta = 2500`` for the same
loss. The implicit accuracy is the fraction of pairs with ``logits > 0``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def denoising_target(
    scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet is trained to output at ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.

    By the scheduler's ``config.prediction_type``: ``"epsilon"``: ``eps``; ``"v_prediction"``:
    ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0``; ``"sample"``: ``x0``. ``abar_t`` is
    ``scheduler.alphas_cumprod[t]`` per sample.

    Shapes: ``x0, noise [B, C, h, w]``, ``timesteps [B]`` -> ``[B, C, h, w]`` (float32).
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise.float()
    if kind == "sample":
        return x0.float()
    if kind != "v_prediction":
        raise ValueError(f"Unsupported prediction_type {kind!r}: epsilon, v_prediction or sample.")
    abar = scheduler.alphas_cumprod.to(x0.device)[timesteps.long()].float()
    abar = abar.reshape(abar.shape + (1,) * (x0.ndim - abar.ndim))
    return abar.sqrt() * noise.float() - (1 - abar).sqrt() * x0.float()


def per_image_error(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image: ``[B, C, h, w], [B, C, h, w] -> [B]`` (float32)."""
    if target.shape != pred.shape:
        raise ValueError(f"target {tuple(target.shape)} and pred {tuple(pred.shape)} differ.")
    return (target.float() - pred.float()).pow(2).flatten(1).mean(dim=1)


def dpo_logits(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
) -> torch.Tensor:
    """``-1/2 * ((model_err_w - model_err_l) - (ref_err_w - ref_err_l))``, all ``[B] -> [B]``."""
    return -0.5 * ((model_err_w - model_err_l) - (ref_err_w - ref_err_l))


def diffusion_dpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float = 5000.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Diffusion-DPO loss of a batch of pairs and its implicit accuracy.

    Args:
        model_err_w, model_err_l: ``[B]`` per-image errors of the policy on the preferred and the
            rejected image (:func:`per_image_error`), with a graph.
        ref_err_w, ref_err_l: ``[B]`` the same for the reference model (no graph needed).
        beta: KL strength. The 1/2 is inside (see the module docstring): 5000 suits SD 1.5, which
            is 2500 in the convention without the 1/2.
        loss_type: ``"sigmoid"`` (Diffusion-DPO), ``"hinge"`` or ``"ipo"``.

    Returns:
        ``(loss, implicit_accuracy)``: scalar mean loss, and the fraction of pairs with
        ``logits > 0`` (a float tensor, no graph).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}.")
    logits = dpo_logits(model_err_w, model_err_l, ref_err_w.detach(), ref_err_l.detach())
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    elif loss_type == "hinge":
        losses = F.relu(1.0 - beta * logits)
    else:
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    accuracy = (logits.detach() > 0).float().mean()
    return losses.mean(), accuracy


__all__ = [
    "LOSS_TYPES",
    "denoising_target",
    "diffusion_dpo_loss",
    "dpo_logits",
    "per_image_error",
]
