"""Flow-GRPO maths (Liu et al. 2025, arXiv 2505.05470), as pure functions: no models, no I/O.

A rectified-flow model (SD 3.x, FLUX) is trained on ``x_s = (1 - s) x0 + s eps`` (``s`` the sigma
in [0, 1], ``s = 1`` pure noise) to predict the velocity ``v = eps - x0``; diffusers samples it with
the deterministic Euler ODE ``x_next = x + (s_next - s) v`` (``FlowMatchEulerDiscreteScheduler``).
Online RL needs stochastic steps with a density, so Flow-GRPO turns the ODE into an SDE with the same
marginals. Each function below names the part of SPEC section 7 it implements:

- :func:`flow_step_sigmas`: the per-sample sigma lookup ``s, s_next`` of a timestep ``[B]``;
- :func:`sde_std`, :func:`sde_step_distribution`, :func:`sde_step_with_logprob`: "ODE -> SDE"
  (``std_s``, the step's mean, the Gaussian log-density averaged over latent dimensions, fp32);
- :func:`sde_kl`: "KL to the reference policy in closed form per step";
- :func:`group_advantages`: "GRPO: advantage ``(r - mean_group) / (std + 1e-4)``" (per group or
  ``global_std``), the clip to +-5, and non-finite rewards kept out;
- :func:`sde_window`: "Flow-GRPO-Fast" (SDE on a window of steps, ODE elsewhere);
- :func:`flow_predict_x0`, :func:`flow_interpolate`, :func:`flow_velocity_target`: what FK steering
  (reward on the predicted clean image) and a Flow-DPO loss need from a flow model.

Shapes use ``B`` for the batch and ``...`` for the latent dimensions (``C, h, w`` for SD3;
the same after unpacking for FLUX). docs/flow_grpo.md maps every formula to SPEC section 7.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

from alignment.ddpo import gaussian_kl, gaussian_log_prob


def _check_schedule(scheduler: Any) -> None:
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("Call scheduler.set_timesteps(num_inference_steps) before stepping.")
    if getattr(scheduler.config, "invert_sigmas", False):
        raise ValueError(
            "invert_sigmas=True schedules run from s = 0 to 1; the flow SDE needs a "
            "FlowMatchEulerDiscreteScheduler with invert_sigmas=False."
        )


def flow_step_sigmas(
    scheduler: Any, timestep: float | torch.Tensor, sample: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample sigmas of one step of a ``FlowMatchEulerDiscreteScheduler`` schedule.

    For each ``t_b`` the step index ``i_b`` is the index of ``t_b`` in ``scheduler.timesteps``
    (the nearest entry, which must lie within ``0.005 * num_train_timesteps`` and half the
    smallest gap between two timesteps, so timesteps stored in bf16 still resolve); then ``s = sigmas[i]``, ``s_next = sigmas[i + 1]``
    (the schedule's terminal 0 after the last step) and ``s_max = sigmas[1]`` (the second sigma of
    the schedule, used by :func:`sde_std` at ``s = 1``).

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` after ``set_timesteps(n)``.
        timestep: a float, a tensor ``[]`` or ``[B]`` (one per sample), in the scheduler's
            units (``sigma * num_train_timesteps``, as ``scheduler.timesteps``).
        sample: ``x_s``, ``[B, ...]`` (gives ``B``, the device and the number of dimensions).

    Returns:
        ``(s [B, 1, ..., 1], s_next [B, 1, ..., 1], s_max [])``, float32 on ``sample.device``.

    Raises:
        ValueError: no schedule set, or a timestep that is not in it.
    """
    _check_schedule(scheduler)
    device = sample.device
    ts = scheduler.timesteps.to(device, torch.float32)
    sigmas = scheduler.sigmas.to(device, torch.float32)
    t = torch.as_tensor(timestep, device=device).float().reshape(-1)
    if t.numel() == 1:
        t = t.expand(sample.shape[0])
    if t.numel() != sample.shape[0]:
        raise ValueError(f"{t.numel()} timesteps for a batch of {sample.shape[0]} samples.")
    values, inverse = torch.unique(t, return_inverse=True)
    gap, idx = (values[:, None] - ts[None, :]).abs().min(dim=1)
    tol = 5e-3 * scheduler.config.num_train_timesteps
    if len(ts) > 1:
        tol = min(tol, 0.5 * float((ts[:-1] - ts[1:]).abs().min()))
    if bool((gap > tol).any()):
        bad = values[gap > tol][:3].tolist()
        raise ValueError(
            f"Timesteps {bad} are not in the scheduler's schedule {ts[:4].tolist()}...: call "
            "set_timesteps(n) with the step count used when sampling."
        )
    idx = idx[inverse]
    shape = (-1,) + (1,) * (sample.ndim - 1)
    return sigmas[idx].reshape(shape), sigmas[idx + 1].reshape(shape), sigmas[1]


def sde_std(sigma: torch.Tensor, sigma_max: torch.Tensor, noise_level: float) -> torch.Tensor:
    """Flow-GRPO's diffusion coefficient ``std_s`` (SPEC 7, "ODE -> SDE").

    ``std_s = a * sqrt(s / (1 - s'))`` with ``s' = s`` except at ``s = 1``, where ``s' = s_max``
    (the schedule's second sigma, :func:`flow_step_sigmas`) keeps it finite. Shapes: ``sigma`` any,
    ``sigma_max`` a scalar tensor; returns ``sigma``'s shape, float32.
    """
    sigma = sigma.float()
    denom = 1 - torch.where(sigma == 1, sigma_max.to(sigma), sigma)
    return noise_level * torch.sqrt(sigma / denom)


def sde_step_distribution(
    scheduler: Any,
    model_output: torch.Tensor,
    timestep: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.7,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean and stds of the Gaussian SDE step ``p(x_next | x_s)``.

    With ``v`` the velocity (model output after CFG), ``s, s_next`` from :func:`flow_step_sigmas`,
    ``dt = s_next - s < 0`` and ``std_s`` from :func:`sde_std`::

        mean     = x + [v + std_s^2 / (2 s) * (x + (1 - s) v)] * dt
        step_std = std_s * sqrt(-dt)

    (``x + (1 - s) v`` is the predicted noise ``eps_hat``; the bracket is the drift of the reverse
    SDE whose marginals equal the ODE's.) With ``noise_level = 0`` the mean is the Euler ODE step
    ``x + v dt`` (``scheduler.step``) and both stds are 0. Arithmetic in float32.

    Args:
        scheduler: ``FlowMatchEulerDiscreteScheduler`` after ``set_timesteps``.
        model_output: ``v``, ``[B, ...]``.
        timestep: ``[]`` or ``[B]`` (see :func:`flow_step_sigmas`).
        sample: ``x_s``, ``[B, ...]``.
        noise_level: ``a`` (0.7 in Flow-GRPO).

    Returns:
        ``(mean [B, ...], std_s [B, 1, ..., 1], step_std [B, 1, ..., 1])``, float32.
    """
    sigma, sigma_next, sigma_max = flow_step_sigmas(scheduler, timestep, sample)
    x = sample.float()
    v = model_output.float()
    dt = sigma_next - sigma
    std_s = sde_std(sigma, sigma_max, noise_level)
    mean = x + (v + std_s**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    return mean, std_s, std_s * torch.sqrt(-dt)


def sde_step_with_logprob(
    scheduler: Any,
    model_output: torch.Tensor,
    timestep: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Flow-GRPO SDE step ``x_s -> x_next`` and the log-density of the step taken.

    With ``mean, std_s, step_std`` from :func:`sde_step_distribution`::

        x_next = mean + step_std * z,   z ~ N(0, I)                (when ``prev_sample`` is None)
        log p  = mean_{...}[ -(x_next - mean)^2 / (2 step_std^2) - log step_std - log sqrt(2 pi) ]

    The log-density is the *mean* over latent dimensions (as DDPO, :func:`alignment.ddpo.
    gaussian_log_prob`), ``x_next`` enters detached (gradients flow through ``mean`` only), all
    arithmetic is float32 (bf16 overflows here) and the returned ``prev_sample`` has
    ``sample``'s dtype. With ``noise_level = 0`` the step is the scheduler's Euler step, no noise
    is drawn (the generator is untouched, so the sampler reproduces the diffusers pipeline) and the
    log-prob is 0.

    Args:
        scheduler: ``FlowMatchEulerDiscreteScheduler`` after ``set_timesteps``.
        model_output: the velocity after CFG, ``[B, ...]``.
        timestep: ``[]`` or ``[B]``, one per sample (see :func:`flow_step_sigmas`).
        sample: ``x_s``, ``[B, ...]``.
        noise_level: ``a`` (0.7).
        prev_sample: ``x_next`` to score, ``[B, ...]``; sampled when None.
        generator: RNG (or one per sample) for ``z``.

    Returns:
        ``(prev_sample [B, ...], log_prob [B] float32, prev_sample_mean [B, ...] float32,
        std [B, 1, ..., 1] float32)`` where ``std`` is ``std_s`` (the reference's ``std_dev_t``;
        the step's own std is ``std_s * sqrt(-dt)``), as :func:`sde_kl` expects it.
    """
    mean, std_s, step_std = sde_step_distribution(
        scheduler, model_output, timestep, sample, noise_level
    )
    if prev_sample is None:
        if noise_level > 0:
            from diffusers.utils.torch_utils import randn_tensor

            noise = randn_tensor(
                mean.shape, generator=generator, device=mean.device, dtype=torch.float32
            )
            prev_sample = (mean + step_std * noise).to(sample.dtype)
        else:
            prev_sample = mean.to(sample.dtype)
    if noise_level == 0:
        return prev_sample, torch.zeros(sample.shape[0], device=sample.device), mean, std_s
    return prev_sample, gaussian_log_prob(prev_sample, mean, step_std), mean, std_s


def sde_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's per-step KL penalty to the reference policy (SPEC 7, "GRPO").

    ``kl = mean_{...}[ (mean - mean_ref)^2 ] / (2 std^2)`` per sample, with ``std = std_s`` as
    :func:`sde_step_with_logprob` returns it: the reference implementation's normalisation, for
    which its ``beta`` (0.04 GenEval/OCR, 0.01 PickScore) is tuned. The two steps are Gaussians with
    the same std ``std_s * sqrt(-dt)``, so this equals the *exact* KL ``KL(p || p_ref)`` of the step
    times ``-dt``; pass ``std_s * sqrt(-dt)`` (``step_std``) for the exact KL.

    Shapes: ``mean, mean_ref [B, ...]``, ``std [B, 1, ..., 1]`` -> ``[B]`` float32.
    """
    return gaussian_kl(mean, mean_ref, std.float())


def group_advantages(
    rewards: torch.Tensor,
    groups: Sequence[Hashable] | torch.Tensor,
    global_std: bool = False,
    eps: float = 1e-4,
    clip: float | None = None,
) -> torch.Tensor:
    """GRPO's group-relative advantages (SPEC 7, "GRPO").

    For sample ``i`` of group ``g`` (the images of one prompt)::

        A_i = (r_i - mean_g) / (std + eps)

    where ``mean_g`` is the group's mean reward and ``std`` the group's population std, or with
    ``global_std`` the population std of the whole batch (all groups); then ``A`` is clipped to
    ``[-clip, clip]`` when ``clip`` is given (5 in Flow-GRPO). Non-finite rewards (NaN, inf: a
    failed reward call) get advantage 0 and are left out of every mean and std; a group with no
    finite reward gets 0 throughout. Compute on the rewards of *all* processes (gather first)
    when groups span processes.

    Args:
        rewards: ``[N]``.
        groups: ``N`` group keys (prompts or ids), or a tensor ``[N]``.
        global_std: normalise by the batch's std instead of each group's.
        eps: added to the std (1e-4 in Flow-GRPO).
        clip: clip bound for ``|A|`` (None: no clip).

    Returns:
        ``[N]`` float32 advantages on ``rewards``' device.
    """
    r = torch.as_tensor(rewards).detach().double().reshape(-1)
    keys = groups.tolist() if isinstance(groups, torch.Tensor) else list(groups)
    if len(keys) != r.numel():
        raise ValueError(f"{len(keys)} group keys but {r.numel()} rewards.")
    index: dict[Hashable, int] = {}
    gid = torch.tensor([index.setdefault(k, len(index)) for k in keys], device=r.device)
    finite = torch.isfinite(r)
    rf = torch.where(finite, r, torch.zeros_like(r))
    n_groups = len(index)
    count = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(
        0, gid, finite.double()
    )
    total = torch.zeros_like(count).index_add_(0, gid, rf)
    mean = total / count.clamp(min=1)
    centred = torch.where(finite, rf - mean[gid], torch.zeros_like(r))
    if global_std:
        std = rf[finite].std(unbiased=False) if bool(finite.any()) else r.new_tensor(0.0)
        denom = std.expand_as(r)
    else:
        var = torch.zeros_like(count).index_add_(0, gid, centred**2) / count.clamp(min=1)
        denom = var.sqrt()[gid]
    adv = centred / (denom + eps)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.float()


def sde_window(
    num_steps: int,
    window_size: int,
    window_range: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The SDE steps of Flow-GRPO-Fast (SPEC 7): ``window_size`` consecutive step indices.

    The window is ``[k, k + window_size)`` with ``k`` drawn uniformly from
    ``[lo, hi - window_size]``, ``(lo, hi) = window_range`` (default ``(0, num_steps)``); the other
    steps run the ODE. ``window_size = 0`` means every step is an SDE step (plain Flow-GRPO).

    Returns:
        The sorted step indices (0 = the first step, from pure noise).
    """
    if window_size <= 0:
        return list(range(num_steps))
    lo, hi = window_range if window_range is not None else (0, num_steps)
    lo, hi = max(0, lo), min(num_steps, hi)
    if hi - lo < window_size:
        raise ValueError(
            f"An SDE window of {window_size} steps does not fit in steps [{lo}, {hi}) of "
            f"{num_steps}: widen sde_window_range or shrink sde_window_size."
        )
    k = lo + int(torch.randint(0, hi - window_size - lo + 1, (1,), generator=generator))
    return list(range(k, k + window_size))


def flow_predict_x0(
    scheduler: Any,
    model_output: torch.Tensor,
    timestep: float | torch.Tensor,
    sample: torch.Tensor,
) -> torch.Tensor:
    """The clean image a flow model predicts from ``x_s``: ``x0_hat = x_s - s * v``.

    From ``x_s = (1 - s) x0 + s eps`` and ``v = eps - x0``. FK steering scores the decoded
    ``x0_hat`` at its resampling steps (no extra model call). Shapes: ``[B, ...]`` -> ``[B, ...]``
    float32; ``timestep`` ``[]`` or ``[B]`` as in :func:`flow_step_sigmas`.
    """
    sigma, _, _ = flow_step_sigmas(scheduler, timestep, sample)
    return sample.float() - sigma * model_output.float()


def flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The rectified-flow forward process ``x_s = (1 - s) x0 + s eps`` (Flow-DPO's noised pairs).

    Shapes: ``x0, noise [B, ...]``, ``sigma [B]`` (or a scalar) -> ``[B, ...]``.
    """
    s = torch.as_tensor(sigma, device=x0.device, dtype=x0.dtype)
    s = s.reshape(s.shape + (1,) * (x0.ndim - s.ndim)) if s.ndim else s
    return (1 - s) * x0 + s * noise


def flow_velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target ``v = eps - x0`` (a Flow-DPO loss compares the policy's
    and the reference's squared errors to it). Shapes: ``[B, ...]`` -> ``[B, ...]``."""
    return noise - x0


__all__ = [
    "flow_interpolate",
    "flow_predict_x0",
    "flow_step_sigmas",
    "flow_velocity_target",
    "group_advantages",
    "sde_kl",
    "sde_std",
    "sde_step_distribution",
    "sde_step_with_logprob",
    "sde_window",
]
