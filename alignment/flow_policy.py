"""``FlowPolicy``: the policy wrapper of flow-matching pipelines (SD 3.x, FLUX.1) for online RL.

The same role as :class:`alignment.policy.DiffusionPolicy` for SD 1.5, with the same method names
where the meaning is the same (``encode_prompts``, ``negative_embeds``, ``set_timesteps``,
``latent_shape``, ``decode``, ``sample``, ``step_distribution``, ``log_prob``, ``reference``,
``trainable_parameters``, ``to``, ``device``, ``from_pretrained``), so trainers and the
inference-time scaling code can take either. It wraps diffusers' ``StableDiffusion3Pipeline`` or
``FluxPipeline`` and adds what Flow-GRPO needs (SPEC section 7; maths in :mod:`alignment.flow`):

- :meth:`FlowPolicy.encode_prompts` -> :class:`FlowEmbeds` (token embeddings and the pooled
  vector), computed once per prompt and cached (on ``cache_device``, the CPU by default);
  :meth:`FlowPolicy.offload_text_encoders` then moves the text encoders off the accelerator (SD3's
  T5-XXL alone is 4.7B parameters), and only prompts not yet cached are encoded there;
- :meth:`FlowPolicy.predict_velocity`: the transformer's velocity with classifier-free guidance
  (SD3: an unconditional and a conditional half in one batch) or CFG-free (SD3 at
  ``guidance_scale <= 1``; FLUX.1-dev always, with its guidance embedding);
- :meth:`FlowPolicy.sample`: Flow-GRPO's SDE sampler with every step's latents and log-probs, an
  optional window of SDE steps with the ODE elsewhere (Flow-GRPO-Fast: ``sde_steps``), and the ODE
  itself at ``noise_level = 0`` (evaluation; it reproduces the diffusers pipeline's images);
- :meth:`FlowPolicy.log_prob` / :meth:`FlowPolicy.step_distribution`: the log-prob (and mean, std
  for the KL) of a stored transition under the current transformer, CFG as in sampling;
- :meth:`FlowPolicy.reference`: the reference policy (LoRA adapter off, or a frozen copy);
- LoRA on the joint-attention projections (:data:`FLOW_LORA_TARGETS`, rank 32 / alpha 64 as
  Flow-GRPO) or the whole transformer; gradient checkpointing; frozen weights in ``weight_dtype``.

Latents are always ``[B, C, h, w]`` (FLUX's 2x2 packing into tokens happens inside
:meth:`FlowPolicy.predict_velocity`), so the SDE maths and the stored trajectories have one shape
for both families.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from alignment.flow import sde_step_with_logprob
from alignment.policy_base import PolicyBase

#: Flow-GRPO's LoRA targets: the joint-attention projections of the image and text streams.
FLOW_LORA_TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)

#: ``from_pretrained`` names that build a tiny pipeline in code (:mod:`alignment.tiny_flow`).
TINY_NAMES = ("tiny-sd3", "tiny-flux")
_KINDS = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


@dataclass
class FlowEmbeds:
    """Text conditioning of a flow transformer for a batch of ``B`` prompts.

    Attributes:
        embeds: ``[B, L, D]`` token embeddings (SD3: CLIP-L + CLIP-G padded to T5's width, then T5;
            FLUX: T5).
        pooled: ``[B, P]`` pooled embedding (SD3: CLIP-L and CLIP-G concatenated; FLUX: CLIP-L).

    Indexing (``e[idx]``), ``len``, ``.shape`` (of ``embeds``), :meth:`to`, :meth:`expand` and
    :meth:`cat` work as on a tensor along the batch, so trainers can store and re-batch it.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.embeds.shape

    def __getitem__(self, idx: Any) -> FlowEmbeds:
        return FlowEmbeds(self.embeds[idx], self.pooled[idx])

    def to(self, *args: Any, **kwargs: Any) -> FlowEmbeds:
        return FlowEmbeds(self.embeds.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    def expand(self, batch_size: int) -> FlowEmbeds:
        """A batch-1 conditioning repeated (as a view) to ``batch_size`` rows."""
        return FlowEmbeds(
            self.embeds.expand(batch_size, -1, -1), self.pooled.expand(batch_size, -1)
        )

    @staticmethod
    def cat(items: Sequence[FlowEmbeds]) -> FlowEmbeds:
        return FlowEmbeds(
            torch.cat([i.embeds for i in items]), torch.cat([i.pooled for i in items])
        )


@dataclass
class FlowSampleOutput:
    """What :meth:`FlowPolicy.sample` returns (``T`` = number of steps).

    Attributes:
        images: ``[B, 3, H, W]`` float32 in [0, 1] (carries a graph when sampled with ``grad``).
        latents: ``[B, T + 1, C, h, w]`` float32: ``x_1 (noise), ..., x_0`` (detached).
        log_probs: ``[B, T]`` float32 log-prob of each step taken (0 on ODE steps).
        timesteps: ``[T]`` float32, the scheduler's timesteps (``sigma * 1000``) in sampling order.
        sde_mask: ``[T]`` bool, True on the SDE steps (all of them unless ``sde_steps`` was given;
            none at ``noise_level = 0``).
        prompt_embeds: the conditional :class:`FlowEmbeds`.
        negative_prompt_embeds: the unconditional :class:`FlowEmbeds`, or None without CFG.
    """

    images: torch.Tensor
    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    sde_mask: torch.Tensor
    prompt_embeds: FlowEmbeds
    negative_prompt_embeds: FlowEmbeds | None


def is_flow_policy(policy: Any) -> bool:
    """Whether ``policy`` is a flow-matching policy (it predicts a velocity: a
    :class:`FlowPolicy`) rather than a noise-predicting :class:`~alignment.policy.DiffusionPolicy`."""
    return hasattr(policy, "predict_velocity")


def pipeline_kind(name_or_path: str) -> str | None:
    """``"sd3"``, ``"flux"`` or None (another pipeline) for a tiny name, a local diffusers folder
    or a cached hub id, read from its ``model_index.json`` without loading weights."""
    if name_or_path in TINY_NAMES:
        return name_or_path.removeprefix("tiny-")
    index = Path(name_or_path) / "model_index.json"
    if index.is_file():
        return _KINDS.get(json.loads(index.read_text(encoding="utf-8")).get("_class_name"))
    if Path(name_or_path).exists() or name_or_path == "tiny":
        return None
    try:
        from diffusers import DiffusionPipeline

        return _KINDS.get(DiffusionPipeline.load_config(name_or_path).get("_class_name"))
    except (OSError, ValueError):
        return None


def load_frozen_policy(name_or_path: str | Path, device: str | torch.device | None = None) -> Any:
    """The frozen policy of a diffusers pipeline (no LoRA): a :class:`FlowPolicy` for SD 3.x /
    FLUX (:func:`pipeline_kind`), else a :class:`~alignment.policy.DiffusionPolicy` (SD 1.x)."""
    name_or_path = str(name_or_path)
    kwargs = {"use_lora": False} if device is None else {"use_lora": False, "device": device}
    if pipeline_kind(name_or_path) is not None:
        return FlowPolicy.from_pretrained(name_or_path, **kwargs)
    from alignment.policy import DiffusionPolicy

    return DiffusionPolicy.from_pretrained(name_or_path, **kwargs)


def load_flow_pipeline(
    name_or_path: str,
    revision: str | None = None,
    torch_dtype: torch.dtype | None = None,
    **tiny_kwargs: Any,
):
    """Load a ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (CPU).

    ``name_or_path`` is a hub id, a local diffusers folder, ``"tiny-sd3"`` or ``"tiny-flux"``
    (built in code by :mod:`alignment.tiny_flow` with ``tiny_kwargs``). ``torch_dtype`` loads the
    weights in that dtype (bf16 halves the 19 GB of SD 3.5's text encoders in fp32).
    """
    if name_or_path == "tiny-sd3":
        from alignment.tiny_flow import tiny_sd3_pipeline

        pipe = tiny_sd3_pipeline(**tiny_kwargs)
    elif name_or_path == "tiny-flux":
        from alignment.tiny_flow import tiny_flux_pipeline

        pipe = tiny_flux_pipeline(**tiny_kwargs)
    else:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(
                name_or_path, revision=revision, torch_dtype=torch_dtype
            )
        except OSError as err:
            raise OSError(
                f"Could not load a flow pipeline from {name_or_path!r}: {err}. Give a local "
                "diffusers folder (model_index.json), a cached hub id such as "
                "'stabilityai/stable-diffusion-3.5-medium' (offline mode is on in tests), "
                "'tiny-sd3' or 'tiny-flux'."
            ) from err
    if type(pipe).__name__ not in _KINDS:
        raise TypeError(
            f"{name_or_path!r} is a {type(pipe).__name__}; FlowPolicy takes a "
            "StableDiffusion3Pipeline or a FluxPipeline (use alignment.policy.DiffusionPolicy "
            "for Stable Diffusion 1.x/2.x)."
        )
    return pipe


class FlowPolicy(PolicyBase):
    """A flow-matching text-to-image policy (SD 3.x or FLUX.1) for Flow-GRPO and friends.

    The LoRA / full set-up, :meth:`reference`, :meth:`trainable_parameters` and the forward
    module are :class:`~alignment.policy_base.PolicyBase`'s (shared with
    :class:`~alignment.policy.DiffusionPolicy`).

    Args:
        pipeline: a ``StableDiffusion3Pipeline`` or ``FluxPipeline``.
        use_lora: train a LoRA adapter on the transformer (else the whole transformer).
        lora_rank, lora_alpha: LoRA rank and alpha (alpha defaults to ``2 * rank``: Flow-GRPO's
            32 / 64).
        lora_target_modules: transformer module names to adapt (:data:`FLOW_LORA_TARGETS`).
        lora_dropout: LoRA dropout.
        keep_reference: in full-transformer mode, keep a frozen copy so that :meth:`reference`
            works (LoRA needs no copy: the adapter is switched off).
        weight_dtype: dtype of the frozen weights (VAE, text encoders, the transformer under LoRA);
            trainable weights stay float32.
        device: where the modules live.
        gradient_checkpointing: the transformer's gradient checkpointing (memory for compute).
        max_sequence_length: T5 tokens per prompt (default: the pipeline's, 256 for SD3 and 512
            for FLUX, capped by the T5 tokenizer's ``model_max_length``).
        resolution: default image size in pixels (default: SD3's ``sample_size * vae factor``,
            FLUX's 1024; the tiny FLUX built by name uses 32).
        cache_device: where cached prompt embeddings live (CPU: a real SD3 prompt is ~2.7 MB in
            bf16; set ``max_cached_prompts`` for large prompt sets).
        max_cached_prompts: keep at most this many prompts (least recently used leave first);
            None keeps all.
        source: where the pipeline came from (hub id / folder / tiny name), kept for export.
    """

    trained_attr: ClassVar[str] = "transformer"
    trained_name: ClassVar[str] = "transformer"
    lora_alpha_per_rank: ClassVar[float] = 2.0

    def __init__(
        self,
        pipeline: Any,
        *,
        use_lora: bool = True,
        lora_rank: int = 32,
        lora_alpha: float | None = None,
        lora_target_modules: Sequence[str] = FLOW_LORA_TARGETS,
        lora_dropout: float = 0.0,
        keep_reference: bool = False,
        weight_dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        gradient_checkpointing: bool = False,
        max_sequence_length: int | None = None,
        resolution: int | None = None,
        cache_device: str | torch.device = "cpu",
        max_cached_prompts: int | None = None,
        source: str | None = None,
    ) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        kind = _KINDS.get(type(pipeline).__name__)
        if kind is None:
            raise TypeError(
                f"FlowPolicy takes a StableDiffusion3Pipeline or FluxPipeline, got "
                f"{type(pipeline).__name__}."
            )
        self.kind = kind
        self.pipeline = pipeline
        self.source = source
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
        self.text_encoders = [
            m
            for m in (
                pipeline.text_encoder,
                pipeline.text_encoder_2,
                getattr(pipeline, "text_encoder_3", None),
            )
            if m is not None
        ]
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if resolution is None:
            if kind == "sd3":
                resolution = self.transformer.config.sample_size * self.vae_scale_factor
            else:
                resolution = pipeline.default_sample_size * self.vae_scale_factor
        self.resolution = int(resolution)
        t5_tok = pipeline.tokenizer_3 if kind == "sd3" else pipeline.tokenizer_2
        default_len = 256 if kind == "sd3" else 512
        if t5_tok is not None:
            default_len = min(default_len, t5_tok.model_max_length)
        self.max_sequence_length = max_sequence_length or default_len
        for m in (self.vae, *self.text_encoders):
            m.requires_grad_(False).eval()
            if weight_dtype != torch.float32:
                m.to(dtype=weight_dtype)
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
        self._text_device: torch.device | None = None  # None: follow the policy
        self.cache_device = torch.device(cache_device)
        self.max_cached_prompts = max_cached_prompts
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._schedule_key: tuple[int, int] | None = None
        if device is not None:
            self.to(device)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        revision: str | None = None,
        weight_dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> FlowPolicy:
        """Load from a hub id, a local diffusers folder, ``"tiny-sd3"`` or ``"tiny-flux"`` (see
        :func:`load_flow_pipeline`); other keyword arguments go to the constructor."""
        pipe = load_flow_pipeline(
            name_or_path,
            revision=revision,
            torch_dtype=None if weight_dtype == torch.float32 else weight_dtype,
        )
        if name_or_path == "tiny-flux" and kwargs.get("resolution") is None:
            kwargs["resolution"] = 32
        return cls(pipe, source=name_or_path, weight_dtype=weight_dtype, **kwargs)

    # ----------------------------------------------------------------------------- plumbing
    def to(self, device: str | torch.device) -> FlowPolicy:
        """Move the transformer, VAE, reference copy and (unless offloaded) the text encoders."""
        for m in (self.transformer, self.vae, self.reference_model):
            if m is not None:
                m.to(device)
        if self._text_device is None:
            for m in self.text_encoders:
                m.to(device)
        return self

    def offload_text_encoders(self, device: str | torch.device = "cpu") -> None:
        """Keep the text encoders on ``device`` from now on (cached prompts need no encoder;
        new ones are encoded there and their embeddings moved to the policy's device)."""
        self._text_device = torch.device(device)
        for m in self.text_encoders:
            m.to(self._text_device)

    def set_forward_transformer(self, module: Any) -> None:
        """Use ``module`` (e.g. the transformer returned by ``accelerator.prepare``) for forward
        passes (:meth:`set_forward_model`); ``policy.transformer`` stays the plain model."""
        self.set_forward_model(module)

    # ----------------------------------------------------------------------------- text
    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self._text_device or self.device
        if self.kind == "sd3":
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                prompt_3=None,
                device=device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
        else:
            embeds, pooled, _ = self.pipeline.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                device=device,
                max_sequence_length=self.max_sequence_length,
            )
        return embeds, pooled

    def encode_prompts(self, prompts: Sequence[str]) -> FlowEmbeds:
        """Text conditioning of ``B`` prompts (:class:`FlowEmbeds` on the policy's device).

        Each distinct prompt is encoded once and cached; later calls only stack cached rows.
        """
        prompts = list(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            embeds, pooled = self._encode(missing)
            for i, p in enumerate(missing):
                self._cache[p] = (embeds[i].to(self.cache_device), pooled[i].to(self.cache_device))
        for p in prompts:
            self._cache.move_to_end(p)
        out = FlowEmbeds(
            torch.stack([self._cache[p][0] for p in prompts]).to(self.device),
            torch.stack([self._cache[p][1] for p in prompts]).to(self.device),
        )
        if self.max_cached_prompts is not None:
            while len(self._cache) > self.max_cached_prompts:
                self._cache.popitem(last=False)
        return out

    def cache_prompts(self, prompts: Sequence[str], batch_size: int = 32) -> None:
        """Encode a prompt set ahead of training in batches of ``batch_size`` (then
        :meth:`offload_text_encoders` frees the accelerator of them)."""
        unique = list(dict.fromkeys(prompts))
        for s in range(0, len(unique), batch_size):
            self.encode_prompts(unique[s : s + batch_size])

    def negative_embeds(self, batch_size: int) -> FlowEmbeds:
        """Unconditional (empty prompt) conditioning, ``batch_size`` rows (cached)."""
        return self.encode_prompts([""]).expand(batch_size)

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether sampling at ``guidance_scale`` runs an unconditional pass (SD3 above 1; FLUX's
        guidance is embedded, never)."""
        return self.kind == "sd3" and guidance_scale > 1.0

    def evals_per_step(self, guidance_scale: float) -> int:
        """Transformer passes per image and step: 2 with CFG, else 1."""
        return 2 if self.uses_cfg(guidance_scale) else 1

    # ----------------------------------------------------------------------------- the model
    def _pack(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return self.pipeline._pack_latents(x, b, c, h, w)

    def _unpack(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        f = self.vae_scale_factor
        return self.pipeline._unpack_latents(x, h * f, w * f, f)

    def predict_velocity(
        self,
        latents: torch.Tensor,
        t: float | torch.Tensor,
        embeds: FlowEmbeds,
        guidance_scale: float = 1.0,
        negative_embeds: FlowEmbeds | None = None,
    ) -> torch.Tensor:
        """The transformer's velocity ``v`` at ``x_s``, with guidance.

        SD3 with ``guidance_scale > 1``: ``v = v_u + g (v_c - v_u)``, the unconditional and
        conditional halves in one batched call (negative: the empty prompt unless given); else one
        conditional call. FLUX: one call with ``guidance_scale`` in the guidance embedding (when
        the transformer has one; FLUX.1-schnell ignores it).

        Args:
            latents: ``x_s``, ``[B, C, h, w]``; t: timestep (``[]`` or ``[B]``, scheduler units);
            embeds: ``B`` rows; negative_embeds: ``B`` rows (SD3 CFG only).

        Returns:
            ``[B, C, h, w]`` in the transformer's dtype.
        """
        model = self.forward_model()
        dtype = self.forward_dtype()
        b, _, h, w = latents.shape
        t = torch.as_tensor(t, device=latents.device, dtype=torch.float32)
        t = t.expand(b) if t.ndim == 0 else t
        x = latents.to(dtype)
        cond = embeds.to(dtype=dtype)
        if self.kind == "flux":
            ids = self.pipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, dtype)
            guidance = None
            if self.transformer.config.guidance_embeds:
                guidance = torch.full((b,), float(guidance_scale), device=x.device)
            out = model(
                hidden_states=self._pack(x),
                timestep=t.to(dtype) / 1000,  # FluxPipeline rounds t to the dtype first
                guidance=guidance,
                pooled_projections=cond.pooled,
                encoder_hidden_states=cond.embeds,
                txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=dtype),
                img_ids=ids,
                return_dict=False,
            )[0]
            return self._unpack(out, h, w)
        if self.uses_cfg(guidance_scale):
            neg = self.negative_embeds(b) if negative_embeds is None else negative_embeds
            neg = neg.to(dtype=dtype)
            out = model(
                hidden_states=torch.cat([x, x]),
                timestep=torch.cat([t, t]),
                encoder_hidden_states=torch.cat([neg.embeds, cond.embeds]),
                pooled_projections=torch.cat([neg.pooled, cond.pooled]),
                return_dict=False,
            )[0]
            uncond, text = out.chunk(2)
            return uncond + guidance_scale * (text - uncond)
        return model(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode latents ``[B, C, h, w]`` to images ``[B, 3, H, W]`` float32 in [0, 1]
        (``x / scaling_factor + shift_factor``, as the pipelines do)."""
        cfg = self.vae.config
        z = latents.to(self.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return (self.vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)

    def latent_shape(self, batch_size: int, height: int | None = None) -> tuple[int, ...]:
        """``(B, C, h, w)`` of the latents of ``height``-pixel square images."""
        f = self.vae_scale_factor
        size = (height or self.resolution) // f
        if self.kind == "flux":
            size = 2 * (size // 2)  # FLUX packs 2x2 patches
        return (batch_size, self.vae.config.latent_channels, size, size)

    def set_timesteps(self, num_steps: int, height: int | None = None) -> torch.Tensor:
        """Set the schedule of ``num_steps`` steps for ``height``-pixel images (the resolution
        matters when the scheduler shifts dynamically: FLUX) and return its timesteps ``[T]``.

        Exactly the diffusers pipelines' schedules: SD3 ``set_timesteps(n)`` (with ``mu`` from
        the image sequence length under dynamic shifting); FLUX ``sigmas = linspace(1, 1 / n, n)``
        shifted with ``mu`` from the packed sequence length.
        """
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        height = height or self.resolution
        key = (num_steps, height)
        if self._schedule_key != key:
            _, _, h, w = self.latent_shape(1, height)
            cfg = self.scheduler.config
            kwargs: dict[str, Any] = {}
            if self.kind == "flux":
                seq = (h // 2) * (w // 2)
                if not cfg.get("use_flow_sigmas", False):
                    kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
            else:
                p = self.transformer.config.patch_size
                seq = (h // p) * (w // p)
            if cfg.get("use_dynamic_shifting", False):
                kwargs["mu"] = calculate_shift(
                    seq,
                    cfg.get("base_image_seq_len", 256),
                    cfg.get("max_image_seq_len", 4096),
                    cfg.get("base_shift", 0.5),
                    cfg.get("max_shift", 1.15 if self.kind == "flux" else 1.16),
                )
            self.scheduler.set_timesteps(num_steps, device=self.device, **kwargs)
            self._schedule_key = key
        return self.scheduler.timesteps.to(self.device)

    # ----------------------------------------------------------------------------- sampling
    def sample(
        self,
        prompts: Sequence[str],
        num_steps: int = 10,
        noise_level: float = 0.7,
        guidance_scale: float = 4.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: FlowEmbeds | None = None,
        grad: bool | int = False,
        height: int | None = None,
        sde_steps: Sequence[int] | None = None,
        negative_prompt_embeds: FlowEmbeds | None = None,
    ) -> FlowSampleOutput:
        """Flow-GRPO sampling with the log-prob of every step (see :class:`FlowSampleOutput`).

        Step ``i`` is :func:`alignment.flow.sde_step_with_logprob` at ``noise_level`` when ``i``
        is an SDE step, else the Euler ODE step (log-prob 0). ``noise_level = 0`` is the ODE
        throughout: the diffusers pipeline's own sampler (same images for the same generator).

        Args:
            prompts: ``B`` prompts (ignored when ``prompt_embeds`` is given, except for ``B``).
            num_steps: denoising steps ``T`` (Flow-GRPO: 10 for training, 40 for evaluation).
            noise_level: the SDE's ``a`` (0.7).
            guidance_scale: SD3's CFG scale (4.5; ``<= 1`` is CFG-free) or FLUX's embedded one.
            generator: RNG (or one per sample) for the initial noise and each SDE step's noise.
            latents: initial noise ``[B, C, h, w]`` (drawn when None).
            prompt_embeds: precomputed :class:`FlowEmbeds`.
            grad: False (no graph), True (graph through all steps and the decoder) or an int K
                (the last K steps only).
            height: image size in pixels (default ``resolution``).
            sde_steps: the step indices that are SDE steps (Flow-GRPO-Fast's window, e.g.
                :func:`alignment.flow.sde_window`); None: all of them.
            negative_prompt_embeds: unconditional :class:`FlowEmbeds` (default: empty prompt).
        """
        embeds = self.encode_prompts(prompts) if prompt_embeds is None else prompt_embeds
        batch = len(embeds)
        negative = None
        if self.uses_cfg(guidance_scale):
            negative = (
                self.negative_embeds(batch)
                if negative_prompt_embeds is None
                else negative_prompt_embeds
            )
        timesteps = self.set_timesteps(num_steps, height)
        if latents is None:
            latents = self.initial_latents(batch, height, generator)
        sde = self.sde_step_set(num_steps, sde_steps)
        if noise_level == 0:
            sde = set()

        def step(i: int, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            v = self.predict_velocity(x, t, embeds, guidance_scale, negative)
            a = noise_level if i in sde else 0.0
            x_next, log_prob, _, _ = sde_step_with_logprob(
                self.scheduler, v, t, x, noise_level=a, generator=generator
            )
            return x_next, log_prob

        images, all_latents, log_probs = self.run_steps(latents.float(), timesteps, step, grad)
        return FlowSampleOutput(
            images=images,
            latents=all_latents,
            log_probs=log_probs,
            timesteps=timesteps.float(),
            sde_mask=torch.tensor([i in sde for i in range(num_steps)]),
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
        )

    def step_distribution(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: FlowEmbeds,
        guidance_scale: float,
        noise_level: float = 0.7,
        num_steps: int | None = None,
        negative_embeds: FlowEmbeds | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``[B, C, h, w]`` and ``std_s`` ``[B, 1, 1, 1]`` of the SDE step from ``latents``
        under the current transformer (CFG as in sampling); see
        :func:`alignment.flow.sde_step_distribution`. ``num_steps``: the step count used when
        sampling (default: the scheduler's current schedule)."""
        _, _, mean, std = self._transition(
            latents,
            None,
            timesteps,
            embeds,
            guidance_scale,
            noise_level,
            num_steps,
            negative_embeds,
        )
        return mean, std

    def log_prob(
        self,
        latents: torch.Tensor,
        next_latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: FlowEmbeds,
        guidance_scale: float,
        noise_level: float = 0.7,
        num_steps: int | None = None,
        negative_embeds: FlowEmbeds | None = None,
        return_stats: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-prob ``[B]`` of the stored SDE transitions ``latents -> next_latents`` under the
        current transformer (CFG as in sampling). Gradients flow when grad mode is on.

        Args:
            latents, next_latents: ``[B, C, h, w]``; timesteps: ``[B]`` (one per sample);
            embeds: ``B`` rows; num_steps: the step count used when sampling (default: the
            scheduler's current schedule; the image size comes from the latents);
            return_stats: also return the step's ``mean`` and ``std_s`` (for
            :func:`alignment.flow.sde_kl`) from the same forward pass.

        Returns:
            ``log_prob`` or ``(log_prob [B], mean [B, C, h, w], std [B, 1, 1, 1])``.
        """
        _, log_prob, mean, std = self._transition(
            latents,
            next_latents,
            timesteps,
            embeds,
            guidance_scale,
            noise_level,
            num_steps,
            negative_embeds,
        )
        return (log_prob, mean, std) if return_stats else log_prob

    def _transition(
        self, latents, next_latents, timesteps, embeds, guidance_scale, noise_level, steps, neg
    ):
        if steps is not None:
            self.set_timesteps(steps, latents.shape[-1] * self.vae_scale_factor)
        v = self.predict_velocity(latents, timesteps, embeds, guidance_scale, neg)
        if next_latents is None:
            next_latents = latents  # any value: only the mean and std are used
        return sde_step_with_logprob(
            self.scheduler, v, timesteps, latents, noise_level, prev_sample=next_latents
        )


__all__ = [
    "FLOW_LORA_TARGETS",
    "FlowEmbeds",
    "FlowPolicy",
    "FlowSampleOutput",
    "is_flow_policy",
    "load_flow_pipeline",
    "pipeline_kind",
]
