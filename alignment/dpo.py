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

**The flow-matching form** (SD 3.x, FLUX; "Flow-DPO"). A rectified-flow model predicts the
velocity of ``x_s = (1 - s) x0 + s eps`` (``s`` the sigma in [0, 1], 1 = pure noise), whose
regression target is ``v = eps - x0``. For a pair with the *same* noise ``eps`` and sigma ``s``:

    x_s^w = (1 - s) x0_w + s eps,     x_s^l = (1 - s) x0_l + s eps
    err   = mean over (C, h, w) of (eps - x0 - v_theta(x_s, s, c)) ** 2          (shape [B])

and the loss is the one above with these errors (:func:`flow_dpo_loss`). Unlike the
noise-prediction form, the two images of a pair have *different* targets (``eps - x0_w`` vs
``eps - x0_l``), so the gradient of ``err_w - err_l`` with respect to the prediction,
``2 (x0_w - x0_l)``, does not vanish even where the model is insensitive to its input: the flow
form gives far larger logits per unit of weight change, and its beta is correspondingly smaller.
**Flow convention here: ``beta = 100`` with the 1/2 inside** (:data:`FLOW_DPO_BETA`), the value
of Flow-GRPO's SD 3.5-M DPO (yifan123/flow_grpo ``config/dpo.py``, ``train.beta = 100`` with
``-0.5 * beta * (...)`` in ``scripts/train_sd3_dpo.py``; the text-to-image Flow-DPO
implementation that VideoAlign, arXiv 2501.13918, points to); 50 without the 1/2.

The sigma is drawn as SD3's training draws it (:func:`flow_training_sigmas`): ``u`` logit-normal
(``sigmoid(m + s z)``, ``z ~ N(0, 1)``, m = 0, s = 1: SD3's "rf/lognorm(0.00, 1.00)", diffusers'
``compute_density_for_timestep_sampling("logit_normal")``) or uniform, then the entry
``floor(u N)`` of the scheduler's N = 1000 training sigmas (which carry its shift: 3.0 for SD3).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from alignment.flow import flow_velocity_target

LOSS_TYPES = ("sigmoid", "hinge", "ipo")
#: how the flow form draws its sigma (:func:`flow_training_sigmas`)
TIMESTEP_SAMPLING = ("logit_normal", "uniform")
#: beta (1/2 inside) of the noise-prediction form: Diffusion-DPO's SD 1.5 setting
DIFFUSION_DPO_BETA = 5000.0
#: beta (1/2 inside) of the flow-matching form: Flow-GRPO's SD 3.5-M DPO setting
FLOW_DPO_BETA = 100.0


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
    beta: float = DIFFUSION_DPO_BETA,
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


def flow_matching_error(
    v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Per-image flow-matching error ``mean over (C, h, w) of (eps - x0 - v_pred) ** 2``.

    Shapes: ``v_pred, x0, noise [B, C, h, w]`` -> ``[B]`` float32 (the target is
    :func:`alignment.flow.flow_velocity_target`).
    """
    return per_image_error(flow_velocity_target(x0.float(), noise.float()), v_pred)


def flow_dpo_loss(
    model_v_w: torch.Tensor,
    model_v_l: torch.Tensor,
    ref_v_w: torch.Tensor,
    ref_v_l: torch.Tensor,
    x0_w: torch.Tensor,
    x0_l: torch.Tensor,
    noise: torch.Tensor,
    beta: float = FLOW_DPO_BETA,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The flow-matching form of the Diffusion-DPO loss (see the module docstring).

    ``err = mean((eps - x0 - v) ** 2)`` per image for the policy's and the reference's velocities
    at the pair's shared ``x_s`` (:func:`flow_matching_error`), then
    ``-log sigmoid(-beta/2 * ((err_w - err_l) - (ref_err_w - ref_err_l)))`` averaged over the
    pairs (or the hinge / IPO variant), as :func:`diffusion_dpo_loss`.

    Args:
        model_v_w, model_v_l: ``[B, C, h, w]`` the policy's velocities at ``x_s^w``, ``x_s^l``
            (with a graph).
        ref_v_w, ref_v_l: ``[B, C, h, w]`` the reference's velocities at the same points.
        x0_w, x0_l: ``[B, C, h, w]`` the clean latents of the preferred and the rejected image.
        noise: ``[B, C, h, w]`` the noise ``eps`` both images of a pair share.
        beta: 1/2 inside; 100 is the flow convention (:data:`FLOW_DPO_BETA`).
        loss_type: ``"sigmoid"``, ``"hinge"`` or ``"ipo"``.

    Returns:
        ``(loss, implicit_accuracy)`` as :func:`diffusion_dpo_loss`.
    """
    return diffusion_dpo_loss(
        flow_matching_error(model_v_w, x0_w, noise),
        flow_matching_error(model_v_l, x0_l, noise),
        flow_matching_error(ref_v_w, x0_w, noise),
        flow_matching_error(ref_v_l, x0_l, noise),
        beta,
        loss_type,
    )


def flow_training_sigmas(
    r: torch.Tensor,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training sigma (and its timestep) of each pair, from one uniform draw ``r`` per pair.

    ``u = r`` (``"uniform"``) or ``u = sigmoid(logit_mean + logit_std * Phi^-1(r))``
    (``"logit_normal"``: ``Phi^-1(r)`` is a standard normal draw, so ``u`` is logit-normal as
    diffusers' ``compute_density_for_timestep_sampling`` draws it); then the index
    ``i = min(floor(u N), N - 1)`` into the scheduler's training schedule, as diffusers' SD3 /
    FLUX training scripts (``indices = (u * num_train_timesteps).long()``).

    Args:
        r: ``[B]`` uniform draws in [0, 1).
        sigmas: ``[N]`` (or longer) the training sigmas of a freshly built
            ``FlowMatchEulerDiscreteScheduler`` (descending from 1, its shift applied).
        timesteps: ``[N]`` the matching timesteps (``sigma * num_train_timesteps``).
        scheme: ``"logit_normal"`` (SD3's training density) or ``"uniform"``.

    Returns:
        ``(sigma [B], timestep [B])`` float32.
    """
    if scheme not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep sampling must be one of {TIMESTEP_SAMPLING}, got {scheme!r}.")
    r = r.float()
    if scheme == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * torch.special.ndtri(r))
    else:
        u = r
    n = len(timesteps)
    idx = (u * n).long().clamp(0, n - 1).to(timesteps.device)
    return sigmas[idx].float(), timesteps[idx].float()


__all__ = [
    "DIFFUSION_DPO_BETA",
    "FLOW_DPO_BETA",
    "LOSS_TYPES",
    "TIMESTEP_SAMPLING",
    "denoising_target",
    "diffusion_dpo_loss",
    "dpo_logits",
    "flow_dpo_loss",
    "flow_matching_error",
    "flow_training_sigmas",
    "per_image_error",
]
