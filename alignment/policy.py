"""``DiffusionPolicy``: a thin policy wrapper around diffusers' ``StableDiffusionPipeline``.

It owns the pipeline's modules (``unet``, ``vae``, ``text_encoder``, ``tokenizer``) and a
``DDIMScheduler`` built from the pipeline's scheduler config, and exposes what every reward
fine-tuning method needs:

- :meth:`DiffusionPolicy.encode_prompts` -> text embeddings ``[B, L, D]``;
- :meth:`DiffusionPolicy.predict_noise` ``(latents, t, embeds, guidance_scale)`` with CFG;
- :meth:`DiffusionPolicy.decode` ``(latents) -> images [B, 3, H, W] in [0, 1]``;
- :meth:`DiffusionPolicy.sample`: DDIM sampling at a given ``eta`` and CFG scale returning the
  images, every step's latents, the per-step log-probs and the timesteps; one code path with and
  without gradients (``grad=True`` for all steps, ``grad=K`` for the last K steps, as DRaFT does);
- :meth:`DiffusionPolicy.log_prob`: the log-prob of a stored transition under the current UNet
  (CFG as in sampling), for PPO-style training;
- :meth:`DiffusionPolicy.reference`: a context in which the UNet is the reference (LoRA adapter
  switched off, or a frozen copy for full-UNet training), for KL penalties and DPO references.

LoRA is added with peft through diffusers' ``unet.add_adapter``; with ``use_lora=False`` the whole
UNet is trainable (set-up shared with the flow policy: :mod:`alignment.policy_base`). Trainers that
wrap the UNet (``accelerator.prepare``, DeepSpeed) hand the wrapped module back with
``set_forward_model`` (or its alias :meth:`DiffusionPolicy.set_forward_unet`); ``policy.unet``
stays the plain ``UNet2DConditionModel``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from alignment.ddpo import ddim_posterior, ddim_step_with_logprob, gaussian_log_prob
from alignment.policy_base import PolicyBase

#: Default LoRA targets: the UNet's attention projections (as in DDPO and diffusers' examples).
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class SampleOutput:
    """What :meth:`DiffusionPolicy.sample` returns (``T`` = number of DDIM steps).

    Attributes:
        images: ``[B, 3, H, W]`` float32 in [0, 1] (carries a graph when sampled with ``grad``).
        latents: ``[B, T + 1, C, h, w]``: ``x_T, ..., x_0`` (detached).
        log_probs: ``[B, T]`` float32 log-prob of each step taken (detached; 0 when ``eta == 0``).
        timesteps: ``[T]`` long, the DDIM timesteps in sampling order.
        prompt_embeds: ``[B, L, D]`` conditional text embeddings.
        negative_prompt_embeds: ``[B, L, D]`` unconditional embeddings, or None without CFG.
    """

    images: torch.Tensor
    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None


def load_pipeline(name_or_path: str, revision: str | None = None, **tiny_kwargs: Any):
    """Load a ``StableDiffusionPipeline`` (float32, CPU, no safety checker).

    ``name_or_path`` is a hub id, a local folder, or ``"tiny"`` (build
    :func:`alignment.tiny.tiny_sd_pipeline` in code with ``tiny_kwargs``).
    """
    if name_or_path == "tiny":
        from alignment.tiny import tiny_sd_pipeline

        return tiny_sd_pipeline(**tiny_kwargs)
    from diffusers import StableDiffusionPipeline

    try:
        return StableDiffusionPipeline.from_pretrained(
            name_or_path, revision=revision, safety_checker=None, requires_safety_checker=False
        )
    except OSError as err:
        raise OSError(
            f"Could not load a Stable Diffusion pipeline from {name_or_path!r}: {err}. Give a local "
            "diffusers folder (model_index.json), a cached hub id (offline mode is on in tests), "
            "or 'tiny'."
        ) from err


class DiffusionPolicy(PolicyBase):
    """A Stable Diffusion policy: sampling with log-probs, CFG, LoRA and a reference model.

    The LoRA / full set-up, :meth:`reference`, :meth:`trainable_parameters` and the forward
    module are :class:`~alignment.policy_base.PolicyBase`'s (shared with
    :class:`~alignment.flow_policy.FlowPolicy`).

    Args:
        pipeline: a ``StableDiffusionPipeline`` (its scheduler config becomes a DDIM scheduler).
        use_lora: train a LoRA adapter on the UNet (else the whole UNet is trainable).
        lora_rank, lora_alpha: LoRA rank and alpha (alpha defaults to the rank: scale 1).
        lora_target_modules: UNet module names to adapt.
        lora_dropout: LoRA dropout.
        keep_reference: in full-UNet mode, keep a frozen copy of the initial UNet so that
            :meth:`reference` works (LoRA needs no copy: the adapter is switched off).
        weight_dtype: dtype of the frozen weights (VAE, text encoder, the UNet base under LoRA);
            trainable weights stay float32 (use autocast for mixed precision).
        device: where the modules live.
        gradient_checkpointing: enable the UNet's gradient checkpointing.
        source: where the pipeline came from (hub id / folder / "tiny"), kept for export.
    """

    trained_attr: ClassVar[str] = "unet"
    trained_name: ClassVar[str] = "UNet"
    lora_alpha_per_rank: ClassVar[float] = 1.0

    def __init__(
        self,
        pipeline: Any,
        *,
        use_lora: bool = True,
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
        lora_dropout: float = 0.0,
        keep_reference: bool = False,
        weight_dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        gradient_checkpointing: bool = False,
        source: str | None = None,
    ) -> None:
        from diffusers import DDIMScheduler

        self.pipeline = pipeline
        self.source = source
        self.unet = pipeline.unet
        self.vae = pipeline.vae
        self.text_encoder = pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        self.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.vae.eval()
        self.text_encoder.eval()
        self.setup_trained_model(
            use_lora=use_lora,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_target_modules=lora_target_modules,
            lora_dropout=lora_dropout,
            keep_reference=keep_reference,
            weight_dtype=weight_dtype,
            gradient_checkpointing=gradient_checkpointing,
        )
        if weight_dtype != torch.float32:
            self.vae.to(dtype=weight_dtype)
            self.text_encoder.to(dtype=weight_dtype)
        self._negative_cache: dict[tuple, torch.Tensor] = {}
        if device is not None:
            self.to(device)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, revision: str | None = None, **kwargs: Any
    ) -> DiffusionPolicy:
        """Load from a hub id, a local diffusers folder, or ``"tiny"`` (see :func:`load_pipeline`)."""
        return cls(load_pipeline(name_or_path, revision=revision), source=name_or_path, **kwargs)

    # ----------------------------------------------------------------------------- plumbing
    def to(self, device: str | torch.device) -> DiffusionPolicy:
        for m in (self.unet, self.vae, self.text_encoder, self.reference_model):
            if m is not None:
                m.to(device)
        self._negative_cache.clear()
        return self

    def set_forward_unet(self, module: Any) -> None:
        """Use ``module`` (e.g. the UNet returned by ``accelerator.prepare``) for forward passes
        (:meth:`set_forward_model`)."""
        self.set_forward_model(module)

    # ----------------------------------------------------------------------------- building blocks
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings ``[B, L, D]`` (prompts padded/truncated to the tokenizer's max length)."""
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def negative_embeds(self, batch_size: int) -> torch.Tensor:
        """Unconditional (empty prompt) embeddings ``[B, L, D]``, cached."""
        key = (str(self.device),)
        if key not in self._negative_cache:
            self._negative_cache[key] = self.encode_prompts([""])
        return self._negative_cache[key].expand(batch_size, -1, -1)

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: int | torch.Tensor,
        embeds: torch.Tensor,
        guidance_scale: float = 1.0,
        negative_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """UNet noise prediction with classifier-free guidance.

        ``eps = eps_u + s * (eps_c - eps_u)`` with the unconditional and conditional halves run
        in one batched UNet call; without CFG (``s <= 1``) one conditional call.

        Args:
            latents: ``[B, C, h, w]``; t: timestep (int, ``[]`` or ``[B]``);
            embeds: ``[B, L, D]``; negative_embeds: ``[B, L, D]`` (default: empty prompt).

        Returns:
            ``[B, C, h, w]``.
        """
        unet = self.forward_model()
        t = torch.as_tensor(t, device=latents.device)
        if t.ndim == 0:
            t = t.expand(latents.shape[0])
        dtype = self.forward_dtype()
        latents = latents.to(dtype)
        embeds = embeds.to(dtype)
        if guidance_scale > 1.0:
            if negative_embeds is None:
                negative_embeds = self.negative_embeds(latents.shape[0])
            x = torch.cat([latents, latents])
            out = unet(
                self.scheduler.scale_model_input(x, t),
                torch.cat([t, t]),
                encoder_hidden_states=torch.cat([negative_embeds.to(dtype), embeds]),
            ).sample
            uncond, cond = out.chunk(2)
            return uncond + guidance_scale * (cond - uncond)
        x = self.scheduler.scale_model_input(latents, t)
        return unet(x, t, encoder_hidden_states=embeds).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode latents ``[B, C, h, w]`` to images ``[B, 3, H, W]`` float32 in [0, 1]."""
        vae = self.vae
        x = vae.decode(latents.to(next(vae.parameters()).dtype) / vae.config.scaling_factor).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def set_timesteps(self, num_steps: int) -> torch.Tensor:
        """Set the DDIM schedule (if it changed) and return its timesteps ``[T]``."""
        if self.scheduler.num_inference_steps != num_steps:
            self.scheduler.set_timesteps(num_steps, device=self.device)
        return self.scheduler.timesteps.to(self.device)

    def latent_shape(self, batch_size: int, height: int | None = None) -> tuple[int, ...]:
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = (height or self.unet.config.sample_size * f) // f
        return (batch_size, self.unet.config.in_channels, size, size)

    # ----------------------------------------------------------------------------- sampling
    def sample(
        self,
        prompts: Sequence[str],
        num_steps: int = 50,
        eta: float = 1.0,
        guidance_scale: float = 5.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        grad: bool | int = False,
        height: int | None = None,
        sde_steps: Sequence[int] | None = None,
    ) -> SampleOutput:
        """DDIM sampling with the log-prob of every step (see :class:`SampleOutput`).

        Args:
            prompts: ``B`` prompts (ignored when ``prompt_embeds`` is given, except for ``B``).
            num_steps: DDIM steps ``T``.
            eta: DDIM stochasticity (1.0 for DDPO; 0.0 deterministic, log-probs are then 0).
            guidance_scale: CFG scale (``<= 1`` disables CFG).
            generator: RNG for the initial noise and each step's noise (draws in the same order as
                ``StableDiffusionPipeline.__call__``, so both give the same image for one seed).
            latents: initial noise ``[B, C, h, w]`` (drawn when None).
            prompt_embeds: precomputed ``[B, L, D]``.
            grad: False (no graph), True (graph through all steps and the decoder) or an int K
                (graph through the last K steps only).
            height: image size (default: the UNet's sample size times the VAE factor).
            sde_steps: the step indices sampled at ``eta`` (a window as in Flow-GRPO-Fast, see
                :func:`alignment.flow.sde_window`); the others are deterministic DDIM steps
                (``eta = 0``, log-prob 0). None: every step at ``eta``.
        """
        embeds = self.encode_prompts(prompts) if prompt_embeds is None else prompt_embeds
        batch = embeds.shape[0]
        negative = self.negative_embeds(batch) if guidance_scale > 1.0 else None
        timesteps = self.set_timesteps(num_steps)
        if latents is None:
            latents = self.initial_latents(batch, height, generator)
        latents = latents * self.scheduler.init_noise_sigma
        sde = self.sde_step_set(num_steps, sde_steps)

        def step(i: int, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            eps = self.predict_noise(x, t, embeds, guidance_scale, negative)
            return ddim_step_with_logprob(
                self.scheduler, eps, t, x, eta=eta if i in sde else 0.0, generator=generator
            )

        images, all_latents, log_probs = self.run_steps(latents, timesteps, step, grad)
        return SampleOutput(
            images=images,
            latents=all_latents,
            log_probs=log_probs,
            timesteps=timesteps,
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
        )

    def step_distribution(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: torch.Tensor,
        guidance_scale: float,
        eta: float = 1.0,
        num_steps: int | None = None,
        negative_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``[B, C, h, w]`` and std ``[B, 1, 1, 1]`` of the DDIM step from ``latents`` under
        the current UNet (CFG as in sampling); see :func:`alignment.ddpo.ddim_posterior`."""
        if num_steps is not None:
            self.set_timesteps(num_steps)
        eps = self.predict_noise(latents, timesteps, embeds, guidance_scale, negative_embeds)
        return ddim_posterior(self.scheduler, eps, timesteps, latents, eta=eta)

    def log_prob(
        self,
        latents: torch.Tensor,
        next_latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: torch.Tensor,
        guidance_scale: float,
        eta: float = 1.0,
        num_steps: int | None = None,
        negative_embeds: torch.Tensor | None = None,
        return_stats: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-prob ``[B]`` of the stored transitions ``latents -> next_latents`` under the current
        UNet (CFG as in sampling). Gradients flow when grad mode is on.

        Args:
            latents, next_latents: ``[B, C, h, w]``; timesteps: ``[B]`` (one per sample);
            embeds: ``[B, L, D]``; num_steps: the DDIM step count used when sampling (defaults to
            the scheduler's current one); return_stats: also return the step's ``mean`` and
            ``std`` from the same forward pass (for a KL penalty), as
            :meth:`alignment.flow_policy.FlowPolicy.log_prob` does.

        Returns:
            ``log_prob`` or ``(log_prob [B], mean [B, C, h, w], std [B, 1, 1, 1])``.
        """
        mean, std = self.step_distribution(
            latents, timesteps, embeds, guidance_scale, eta, num_steps, negative_embeds
        )
        log_prob = gaussian_log_prob(next_latents, mean, std)
        return (log_prob, mean, std) if return_stats else log_prob
