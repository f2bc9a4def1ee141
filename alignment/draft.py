"""Differentiable-reward fine-tuning: DRaFT-K / AlignProp and ReFL (the sampling and the losses).

DRaFT-K (Clark et al. 2023) / AlignProp (Prabhudesai et al. 2023): sample with DDIM; the first
``T - K`` steps run without a graph, the last ``K`` with one, each UNet call (and the VAE decode)
wrapped in activation checkpointing so memory stays about one UNet call; the reward of the decoded
image is back-propagated into the LoRA (or UNet) weights. ``K = 1`` is often enough.

ReFL (Xu et al. 2023, ImageReward): run ``s`` steps without a graph, ``s`` drawn uniformly from
a late window ``[refl_min_step, refl_max_step)`` of the ``T`` steps, then one UNet call with a
graph at ``t_s`` and the one-step prediction of the clean latent

    x0_hat = (x_t - sqrt(1 - abar_t) * eps_theta(x_t, t)) / sqrt(abar_t)

(epsilon models; :func:`predict_x0`), decoded and scored.

Losses of the rewards ``r [N]`` (:func:`reward_loss`): ``"neg"``: ``-mean(r)`` (DRaFT, AlignProp);
``"relu"``: ``mean(relu(margin - r))`` (ReFL's ``phi``). The reward is any callable
``fn(images [N, 3, H, W] in [0, 1], prompts) -> [N]`` that is differentiable in the pixels, e.g.
``RewardScorer.as_reward_fn(perspective_or_weights, differentiable=True)``
(:func:`differentiable_reward_fn` builds one by name).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from alignment.ddpo import ddim_step_with_logprob

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]


def predict_x0(
    scheduler: Any, model_output: torch.Tensor, timestep: torch.Tensor | int, sample: torch.Tensor
) -> torch.Tensor:
    """One-step clean-latent prediction ``x0_hat`` from the UNet output at ``x_t``.

    epsilon: ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``; v-prediction:
    ``x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v``; sample: the output itself.

    Args:
        scheduler: a diffusers scheduler with ``alphas_cumprod`` and ``config.prediction_type``.
        model_output: ``[B, C, h, w]``; timestep: int, ``[]`` or ``[B]``; sample: ``x_t``
            ``[B, C, h, w]``.

    Returns:
        ``[B, C, h, w]`` (float32).
    """
    t = torch.as_tensor(timestep, device=sample.device).long()
    abar = scheduler.alphas_cumprod.to(sample.device)[t].float()
    while abar.ndim < sample.ndim:
        abar = abar[..., None]
    x, out = sample.float(), model_output.float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x - (1 - abar).sqrt() * out) / abar.sqrt()
    if kind == "v_prediction":
        return abar.sqrt() * x - (1 - abar).sqrt() * out
    if kind == "sample":
        return out
    raise ValueError(f"unknown prediction_type {kind!r}")


def reward_loss(rewards: torch.Tensor, loss_type: str = "neg", margin: float = 1.0) -> torch.Tensor:
    """``"neg"``: ``-mean(r)``; ``"relu"``: ``mean(relu(margin - r))`` (ReFL). ``r``: ``[N]``."""
    if loss_type == "neg":
        return -rewards.mean()
    if loss_type == "relu":
        return F.relu(margin - rewards).mean()
    raise ValueError(f"loss_type must be 'neg' or 'relu', got {loss_type!r}.")


def _call(fn: Callable, use_checkpoint: bool, *args: Any) -> Any:
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def sample_with_grad(
    policy: Any,
    prompts: Sequence[str],
    num_steps: int = 50,
    grad_steps: int = 1,
    eta: float = 0.0,
    guidance_scale: float = 5.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    use_checkpoint: bool = True,
    stop_step: int | None = None,
    latents: torch.Tensor | None = None,
) -> dict[str, Any]:
    """DDIM sampling with a graph through the last ``grad_steps`` steps (DRaFT-K), or ReFL's
    one-step ``x0_hat`` at step ``stop_step``.

    Args:
        policy: a :class:`~alignment.policy.DiffusionPolicy`.
        prompts: ``B`` prompts.
        num_steps: DDIM steps ``T``.
        grad_steps: ``K``, the steps with a graph (DRaFT); ignored with ``stop_step``.
        eta: DDIM stochasticity (0: deterministic, as DRaFT).
        guidance_scale: CFG scale (``<= 1``: off).
        generator: RNG(s) for the initial noise (and the step noise when ``eta > 0``).
        use_checkpoint: activation checkpointing around each UNet call with a graph and the
            decode.
        stop_step: ReFL: run steps ``0 .. stop_step - 1`` without a graph, then predict ``x0``
            from ``x_{t_stop}`` with one UNet call with a graph.
        latents: initial noise ``[B, C, h, w]`` (drawn when None).

    Returns:
        ``{"images": [B, 3, H, W] in [0, 1] with a graph, "latents": the final (or predicted)
        clean latents, "unet_calls": int}``.
    """
    embeds = policy.encode_prompts(prompts)
    b = embeds.shape[0]
    negative = policy.negative_embeds(b) if guidance_scale > 1.0 else None
    timesteps = policy.set_timesteps(num_steps)
    if latents is None:
        latents = policy.initial_latents(b, generator=generator)
    x = latents * policy.scheduler.init_noise_sigma
    if stop_step is not None and not 0 <= stop_step < num_steps:
        raise ValueError(f"stop_step must be in [0, {num_steps}), got {stop_step}.")
    first_grad = stop_step if stop_step is not None else num_steps - max(0, int(grad_steps))

    def unet(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return policy.predict_noise(x_in, t, embeds, guidance_scale, negative)

    calls = 0
    for i, t in enumerate(timesteps):
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= first_grad):
            eps = _call(unet, use_checkpoint, x, t)
            calls += 1
            if stop_step is not None and i == stop_step:
                x = predict_x0(policy.scheduler, eps, t, x)
                break
            x, _ = ddim_step_with_logprob(policy.scheduler, eps, t, x, eta=eta, generator=generator)
        if i < first_grad:
            x = x.detach()
    images = _call(policy.decode, use_checkpoint, x)
    return {"images": images, "latents": x, "unet_calls": calls}


def differentiable_reward_fn(
    name: str, device: str | torch.device | None = None, **kwargs: Any
) -> RewardFn:
    """A reward differentiable in the pixels, by name.

    ``"llava_reward"`` (kwargs ``path``, ``perspective`` (a name or ``{name: weight}``),
    ``device``, ``dtype``): a frozen LLaVA-Reward model through
    ``RewardScorer.as_reward_fn(..., differentiable=True)``; ``"brightness"``: the mean pixel
    (a toy); anything else goes to :func:`alignment.rewards.get_reward_fn` (e.g.
    ``"package.module:function"``) and must itself be differentiable (checked at the first step).
    ``device`` (the trainers pass ``accelerator.device``) places the reward model; None: this
    process's device (:func:`reward.guards.process_device`).
    """
    if name == "llava_reward":
        from reward.scorer import RewardScorer

        dtype = kwargs.get("dtype")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        scorer = RewardScorer.from_pretrained(
            kwargs["path"],
            device=device,
            dtype=dtype,
            trust_remote_code=kwargs.get("trust_remote_code"),
        )
        scorer.model.requires_grad_(False)
        # no perspective: the folder's only one, else overall (reward.scorer.default_perspective)
        return scorer.as_reward_fn(kwargs.get("perspective"), differentiable=True)
    if name == "brightness":
        return mean_brightness
    from alignment.rewards import get_reward_fn

    return get_reward_fn(name, device=device, **kwargs)


def mean_brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Toy differentiable reward: the mean pixel of each image, ``[N, 3, H, W] -> [N]``."""
    return images.float().mean(dim=(1, 2, 3))


__all__ = [
    "differentiable_reward_fn",
    "mean_brightness",
    "predict_x0",
    "reward_loss",
    "sample_with_grad",
]
