"""DDPO maths (Black et al. 2023), as pure functions: no models, no I/O.

- :func:`ddim_step_with_logprob`: one DDIM step and the log-density of the step taken
  (built on :func:`ddim_posterior` and :func:`gaussian_log_prob`);
- :func:`gaussian_kl`: the exact per-step KL between two DDIM transitions (KL penalty);
- :func:`ppo_clip_loss`, :func:`ppo_stats`: the clipped surrogate and its diagnostics;
- :class:`PerPromptStatTracker`: per-prompt reward normalisation (with ``state_dict`` for resume);
- :func:`clip_advantages`.

Shapes use ``B`` for the batch and ``C, H, W`` for latent channels and size.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _per_sample(values: torch.Tensor, index: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather ``values[index]`` and reshape to ``[B, 1, ..., 1]`` (``ndim`` dims) for broadcasting."""
    out = values.to(index.device)[index.long()]
    return out.reshape(out.shape + (1,) * (ndim - out.ndim))


def ddim_posterior(
    scheduler: Any,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the DDIM step's Gaussian ``p(x_{t-1} | x_t)``.

    With ``a_t = alphas_cumprod[t]``, ``a_p = alphas_cumprod[t - T/n]`` (``final_alpha_cumprod``
    when that index is negative) and ``eps`` the predicted noise (converted from the scheduler's
    ``prediction_type``)::

        x0_hat = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)          (clipped if the scheduler clips)
        sigma  = eta * sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        mu     = sqrt(a_p) * x0_hat + sqrt(1 - a_p - sigma^2) * eps

    Args:
        scheduler: a ``diffusers.DDIMScheduler`` after ``set_timesteps(n)``.
        model_output: UNet output (after CFG), ``[B, C, H, W]``.
        timestep: ``t``: an int or a tensor ``[]`` / ``[B]`` (one per sample).
        sample: ``x_t``, ``[B, C, H, W]``.
        eta: DDIM stochasticity.

    Returns:
        ``(mu [B, C, H, W] float32, sigma [B, 1, 1, 1] float32)``.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("Call scheduler.set_timesteps(num_inference_steps) before stepping.")
    cfg = scheduler.config
    ndim = sample.ndim
    t = torch.as_tensor(timestep, device=sample.device).long()
    if t.ndim == 0:
        t = t.expand(sample.shape[0])
    prev_t = t - cfg.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.to(sample.device, torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32).to(sample.device)
    a_t = _per_sample(alphas, t, ndim)
    has_prev = (prev_t >= 0).reshape(prev_t.shape + (1,) * (ndim - 1))
    a_p = torch.where(has_prev, _per_sample(alphas, prev_t.clamp(min=0), ndim), final)
    b_t = 1 - a_t
    x_t = sample.float()
    out = model_output.float()
    if cfg.prediction_type == "epsilon":
        x0 = (x_t - b_t.sqrt() * out) / a_t.sqrt()
        eps = out
    elif cfg.prediction_type == "sample":
        x0 = out
        eps = (x_t - a_t.sqrt() * x0) / b_t.sqrt()
    elif cfg.prediction_type == "v_prediction":
        x0 = a_t.sqrt() * x_t - b_t.sqrt() * out
        eps = a_t.sqrt() * out + b_t.sqrt() * x_t
    else:
        raise ValueError(f"Unsupported prediction_type {cfg.prediction_type!r}.")
    if cfg.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    variance = (1 - a_p) / b_t * (1 - a_t / a_p)
    std = eta * variance.clamp(min=0).sqrt()
    mean = a_p.sqrt() * x0 + (1 - a_p - std**2).clamp(min=0).sqrt() * eps
    return mean, std


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Isotropic Gaussian log-density, averaged over all but the batch dimension.

    ``log p = mean_{C,H,W}[ -(x - mu)^2 / (2 sigma^2) - log sigma - log sqrt(2 pi) ]``.
    ``x`` enters detached. Shapes: ``x, mean [B, ...]``, ``std`` broadcastable; returns ``[B]``.
    """
    lp = -((x.detach().float() - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, x.ndim)))


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two Gaussians with the same isotropic std, averaged over dimensions.

    ``KL(N(mu_p, s^2) || N(mu_q, s^2)) = mean_{C,H,W}[ (mu_p - mu_q)^2 / (2 s^2) ]`` per sample:
    the exact per-step KL between the policy's and the reference's DDIM transitions (they share
    ``sigma_t``). Shapes: ``[B, ...]`` -> ``[B]``.
    """
    kl = (mean_p.float() - mean_q.float()) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, mean_p.ndim)))


def ddim_step_with_logprob(
    scheduler: Any,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step ``x_t -> x_{t-1}`` and the log-density of ``x_{t-1}`` under that step.

    With ``mu, sigma`` from :func:`ddim_posterior`::

        x_{t-1} = mu + sigma * z,   z ~ N(0, I)                    (when ``prev_sample`` is None)
        log p  = mean_{C,H,W} [ -(x_{t-1} - mu)^2 / (2 sigma^2) - log sigma - log sqrt(2 pi) ]

    The log-density is the *mean* over latent dimensions (as in the reference implementations,
    for which DDPO's ``clip_range = 1e-4`` is tuned), not the sum. ``x_{t-1}`` enters detached, so
    gradients flow only through ``mu`` (the policy). Arithmetic is done in float32; the returned
    ``prev_sample`` has ``sample``'s dtype. With ``eta == 0`` the step is deterministic and the
    returned log-prob is 0. The noise is drawn exactly as ``DDIMScheduler.step`` draws it.

    Args:
        scheduler: a ``diffusers.DDIMScheduler`` after ``set_timesteps(n)``.
        model_output: UNet output (after CFG), ``[B, C, H, W]``.
        timestep: the current timestep ``t``: an int or a tensor ``[]`` / ``[B]`` (one per sample).
        sample: ``x_t``, ``[B, C, H, W]``.
        eta: DDIM stochasticity (1.0 for DDPO).
        prev_sample: ``x_{t-1}`` to score, ``[B, C, H, W]``; sampled when None.
        generator: RNG (or one per sample) for the noise ``z``.

    Returns:
        ``(prev_sample [B, C, H, W], log_prob [B] float32)``.
    """
    mean, std = ddim_posterior(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        if eta > 0:
            from diffusers.utils.torch_utils import randn_tensor

            noise = randn_tensor(
                model_output.shape,
                generator=generator,
                device=model_output.device,
                dtype=model_output.dtype,
            )
            prev_sample = (mean + std * noise.float()).to(sample.dtype)
        else:
            prev_sample = mean.to(sample.dtype)
    if eta == 0:
        return prev_sample, torch.zeros(sample.shape[0], device=sample.device)
    return prev_sample, gaussian_log_prob(prev_sample, mean, std)


def ppo_clip_loss(
    advantages: torch.Tensor,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    clip_range: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """PPO's clipped surrogate loss for one timestep of a batch.

    ``ratio = exp(log_prob - old_log_prob)``;
    ``loss = mean_B( w * max(-A * ratio, -A * clip(ratio, 1 - clip_range, 1 + clip_range)) )``.

    Args:
        advantages: ``A``, ``[B]``.
        log_prob: log-probs under the current policy, ``[B]`` (carries the gradient).
        old_log_prob: log-probs at sampling time, ``[B]``.
        clip_range: ``eps`` (1e-4 in DDPO, for mean-over-dimensions log-probs).
        weights: per-row weights ``w``, ``[B]`` (None: all 1), e.g.
            :func:`temporal_discount_weights`.

    Returns:
        A scalar tensor.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_row = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_row = per_row * weights
    return torch.mean(per_row)


def temporal_discount_weights(
    step_index: torch.Tensor, discount: float, num_steps: int
) -> torch.Tensor:
    """Per-timestep loss weights that favour the first (noisiest) denoising steps.

    ``w_k = gamma^k / mean_{j < T}(gamma^j)`` for the sampling step ``k`` (0 = the first step
    from pure noise, ``T = num_steps``), so the weights average 1 over a trajectory and
    ``gamma = 1`` is plain DDPO. The first steps decide the layout and colours; the last ones,
    whose tiny ``sigma_t`` makes mean-over-dims log-probs most sensitive, mostly add gradient
    noise (the temporal discounting of Yang et al., "A Dense Reward View on Aligning
    Text-to-Image Diffusion with Preference", ICML 2024). Shapes: ``step_index`` any -> same.
    """
    if not 0 < discount <= 1:
        raise ValueError(f"temporal discount must be in (0, 1], got {discount}.")
    norm = sum(discount**j for j in range(num_steps)) / num_steps
    return discount ** step_index.float() / norm


def ppo_stats(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, clip_range: float
) -> dict[str, torch.Tensor]:
    """Diagnostics of a PPO step (no gradient).

    ``approx_kl = 0.5 * mean((log_prob - old_log_prob)^2)``;
    ``clipfrac = mean(|ratio - 1| > clip_range)``. Inputs ``[B]``, outputs scalars.
    """
    with torch.no_grad():
        diff = (log_prob - old_log_prob).float()
        return {
            "approx_kl": 0.5 * torch.mean(diff**2),
            "clipfrac": torch.mean((torch.abs(torch.exp(diff) - 1.0) > clip_range).float()),
        }


def clip_advantages(advantages: torch.Tensor, max_abs: float) -> torch.Tensor:
    """``clamp(A, -max_abs, max_abs)`` elementwise (DDPO uses 5). Shape is kept."""
    return torch.clamp(advantages, -max_abs, max_abs)


class PerPromptStatTracker:
    """Normalise rewards per prompt with a running buffer (DDPO's advantage estimator).

    For each prompt ``p`` in the batch, its rewards join a FIFO buffer of the last
    ``buffer_size`` rewards seen for ``p``. Then::

        A_i = (r_i - mean) / (std + 1e-6)

    where ``mean, std`` (population std) are the buffer's once it holds at least ``min_count``
    rewards, and the whole batch's before that.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        if buffer_size < 1 or min_count < 1:
            raise ValueError("buffer_size and min_count must be >= 1.")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: np.ndarray | torch.Tensor) -> np.ndarray:
        """Add a batch and return its advantages.

        Args:
            prompts: ``B`` prompts.
            rewards: ``[B]`` rewards.

        Returns:
            ``[B]`` float32 advantages (numpy).
        """
        rewards = np.asarray(
            rewards.detach().cpu().float() if isinstance(rewards, torch.Tensor) else rewards,
            dtype=np.float64,
        )
        prompts = np.asarray(list(prompts), dtype=object)
        if len(prompts) != len(rewards):
            raise ValueError(f"{len(prompts)} prompts but {len(rewards)} rewards.")
        advantages = np.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std() + 1e-6
        for prompt in dict.fromkeys(prompts.tolist()):
            mask = prompts == prompt
            buf = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(rewards[mask].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(buf), np.std(buf) + 1e-6
            advantages[mask] = (rewards[mask] - mean) / std
        return advantages.astype(np.float32)

    def get_stats(self) -> dict[str, dict[str, float]]:
        """``{prompt: {"mean", "std", "count"}}`` of the current buffers."""
        return {
            p: {"mean": float(np.mean(b)), "std": float(np.std(b)), "count": len(b)}
            for p, b in self.stats.items()
        }

    def clear(self) -> None:
        self.stats = {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (for checkpoints)."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "stats": {p: list(b) for p, b in self.stats.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer_size = int(state["buffer_size"])
        self.min_count = int(state["min_count"])
        self.stats = {
            p: deque((float(x) for x in v), maxlen=self.buffer_size)
            for p, v in state["stats"].items()
        }
