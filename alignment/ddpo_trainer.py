"""DDPO (Black et al. 2023) for Stable Diffusion on accelerate: config and trainer.

The loop is :class:`~alignment.online_trainer.OnlineRLTrainerBase`'s (sample -> reward ->
gather -> advantages -> PPO update, per epoch; see there); DDPO supplies its policy-specific parts:

1. **Sampling** with DDIM (``eta``, CFG ``guidance_scale``), keeping every latent and each step's
   log-prob (:meth:`DiffusionPolicy.sample`), the noise of each image from its own stream
   (:func:`alignment.seeding.stream_generator`).
2. **Advantages**: rewards normalised per prompt (:class:`~alignment.ddpo.PerPromptStatTracker`;
   batch statistics until a prompt has ``stat_min_count`` rewards), clipped to
   ``+-adv_clip_max``; a non-finite reward gets advantage 0 and is counted.
3. **Log-prob of a stored transition**: the DDIM posterior's Gaussian under the current UNet, CFG
   applied exactly as in sampling; the PPO clipped loss of each trained timestep, optionally
   weighted by ``temporal_discount^k`` and with ``kl_coef * KL(policy || ref)`` (the exact
   per-step Gaussian KL against the reference: LoRA switched off).

Only the trained UNet goes through ``accelerator.prepare`` (DeepSpeed ZeRO-2/3 included); the
text encoder, VAE and the reward model stay outside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from alignment.ddpo import temporal_discount_weights
from alignment.online_trainer import OnlineRLConfig, OnlineRLTrainerBase
from alignment.trainer_utils import frozen_models_outside_zero3  # noqa: F401  (re-exported)


@dataclass
class DDPOConfig(OnlineRLConfig):
    """Settings of a DDPO run (YAML + command line through ``trl.TrlParser``)."""

    # DDPO's defaults for fields of the shared configs
    use_lora: bool = field(
        default=True, metadata={"help": "Train a LoRA adapter on the UNet (else the full UNet)."}
    )
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank."})
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate."})
    adam_weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Train batches per optimiser step (each with all trained timesteps)."},
    )
    num_steps: int = field(default=50, metadata={"help": "DDIM sampling steps."})
    output_dir: str = field(default="outputs/ddpo", metadata={"help": "Run folder."})
    tracker_project: str = field(default="ddpo", metadata={"help": "Tracker project name."})
    # --- DDPO's own
    eta: float = field(
        default=1.0,
        metadata={"help": "DDIM eta (> 0: DDPO needs a stochastic policy; 1.0 as DDPO)."},
    )
    temporal_discount: float = field(
        default=1.0,
        metadata={
            "help": "Weight gamma^k on the k-th denoising step's loss (normalised to mean 1; "
            "1.0: plain DDPO). Below 1 favours the first, layout-deciding steps."
        },
    )

    RANGES: ClassVar[dict[str, str]] = {"eta": "> 0", "temporal_discount": "(0, 1]"}


class DDPOTrainer(OnlineRLTrainerBase):
    """Builds the policy, reward, prompts and accelerator from a :class:`DDPOConfig` and trains.

    Args:
        config: the run's settings.
        policy: an existing :class:`~alignment.policy.DiffusionPolicy` (default: built from
            ``config.pretrained_model``).
        reward_fn: a reward callable (default: ``get_reward_fn(config.reward,
            device=accelerator.device, **reward_kwargs)``).
        prompts: a prompt list (default: ``load_prompts(config.prompts, config.prompt_category)``).

    Public pieces of the loop (see :class:`~alignment.online_trainer.OnlineRLTrainerBase`):
    :meth:`sample_epoch`, :meth:`compute_advantages`, :meth:`train_on_samples`, :meth:`train`,
    :meth:`save_checkpoint`, :meth:`maybe_resume`, :meth:`export`.
    """

    config: DDPOConfig

    def __init__(
        self,
        config: DDPOConfig,
        policy: Any = None,
        reward_fn: Callable | None = None,
        prompts: Sequence[str] | None = None,
    ) -> None:
        super().__init__(config, policy, reward_fn, prompts)

    def sample_batch(
        self, prompts: list[str], generator: list[torch.Generator] | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.config
        out = self.policy.sample(
            prompts, cfg.num_steps, cfg.eta, cfg.guidance_scale, generator=generator
        )
        return out.images, {
            "embeds": out.prompt_embeds,
            "latents": out.latents[:, :-1],
            "next_latents": out.latents[:, 1:],
            "log_probs": out.log_probs,
            "timesteps": out.timesteps.unsqueeze(0).expand(len(prompts), -1),
        }

    def step_distribution(
        self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        return self.policy.step_distribution(
            latents, timesteps, embeds, cfg.guidance_scale, cfg.eta
        )

    def timestep_weights(self, order: torch.Tensor, steps: int) -> torch.Tensor:
        return temporal_discount_weights(order, self.config.temporal_discount, steps)


def evaluate_policy(
    policy: Any,
    reward_fn: Callable,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_steps: int,
    guidance_scale: float,
    eta: float = 1.0,
) -> torch.Tensor:
    """Rewards ``[len(seeds), len(prompts)]`` of ``policy`` on fixed prompts and seeds."""
    out = []
    for seed in seeds:
        gens = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(len(prompts))]
        with torch.no_grad():
            s = policy.sample(list(prompts), num_steps, eta, guidance_scale, generator=gens)
        out.append(torch.as_tensor(reward_fn(s.images, list(prompts)), dtype=torch.float32))
    return torch.stack(out)


__all__ = ["DDPOConfig", "DDPOTrainer", "evaluate_policy"]
