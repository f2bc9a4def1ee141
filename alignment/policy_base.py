"""What the two policy wrappers share: the trained model's set-up (LoRA or full), the trainable
parameters, the reference policy, the module forward passes run through, and the sampling loop's
frame.

:class:`~alignment.policy.DiffusionPolicy` trains SD 1.x/2.x's ``unet``,
:class:`~alignment.flow_policy.FlowPolicy` SD 3.x / FLUX's ``transformer``; both are diffusers
models with peft's ``add_adapter`` / ``disable_adapters``, so the set-up is one piece of code:

- LoRA (``use_lora``): the base weights frozen in ``weight_dtype``, a peft adapter (Gaussian init,
  so that the adapter starts as the identity: ``lora_B = 0``) whose weights stay float32;
  ``lora_alpha`` defaults to :attr:`PolicyBase.lora_alpha_per_rank` times the rank (1 for SD's
  UNet: scale 1, as DDPO and diffusers' examples; 2 for flow transformers: Flow-GRPO's rank 32 /
  alpha 64);
- full training: every weight trainable in float32, optionally with a frozen copy kept as the
  reference (``keep_reference``);
- :meth:`PolicyBase.reference`: the adapter switched off, or the frozen copy;
- :meth:`PolicyBase.set_forward_model`: the wrapped module a trainer got back from
  ``accelerator.prepare`` (DDP, DeepSpeed) for forward passes; ``trained_model`` stays the plain
  diffusers model;
- :meth:`PolicyBase.run_steps`: the sampling loop (a graph through the last ``K`` steps only, every
  step's latents and log-prob kept, the decode) around a policy's own step (DDIM / the flow SDE),
  with :meth:`PolicyBase.initial_latents` and :meth:`PolicyBase.sde_step_set`.

What differs stays in the policies: the schedulers and their steps, text encoding, CFG, the
model call (noise vs velocity), FLUX's packing, the prompt cache.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch


class PolicyBase:
    """The parts DiffusionPolicy and FlowPolicy share (see the module). A policy sets its model as
    the attribute named :attr:`trained_attr` and its ``vae``, calls :meth:`setup_trained_model`
    once, and provides ``latent_shape`` and ``decode``."""

    #: the attribute that holds the trained model (``"unet"``, ``"transformer"``)
    trained_attr: ClassVar[str]
    #: the model's name in messages ("UNet", "transformer")
    trained_name: ClassVar[str]
    #: ``lora_alpha`` when None: this times the rank
    lora_alpha_per_rank: ClassVar[float] = 1.0

    use_lora: bool
    lora_config: Any
    vae: Any

    @property
    def trained_model(self) -> torch.nn.Module:
        """The plain diffusers model being tuned (``policy.unet`` / ``policy.transformer``)."""
        return getattr(self, self.trained_attr)

    @property
    def reference_model(self) -> torch.nn.Module | None:
        """The frozen copy used as the reference in full training (None under LoRA or without
        ``keep_reference``)."""
        return self._reference_model

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def setup_trained_model(
        self,
        *,
        use_lora: bool,
        lora_rank: int,
        lora_alpha: float | None,
        lora_target_modules: Sequence[str],
        lora_dropout: float,
        keep_reference: bool,
        weight_dtype: torch.dtype,
        gradient_checkpointing: bool,
    ) -> None:
        """LoRA adapter or full training of :attr:`trained_model`, the reference copy, gradient
        checkpointing (see the module)."""
        model = self.trained_model
        self.use_lora = use_lora
        self.lora_config = None
        self._reference_model: torch.nn.Module | None = None
        if use_lora:
            from peft import LoraConfig

            model.requires_grad_(False)
            if weight_dtype != torch.float32:
                model.to(dtype=weight_dtype)
            self.lora_config = LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha
                if lora_alpha is not None
                else self.default_lora_alpha(lora_rank),
                lora_dropout=lora_dropout,
                init_lora_weights="gaussian",
                target_modules=list(lora_target_modules),
            )
            model.add_adapter(self.lora_config)
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            model.float().requires_grad_(True)
            if keep_reference:
                self._reference_model = copy.deepcopy(model).requires_grad_(False).eval()
        if gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self._forward_model: Any = model
        self._in_reference = False

    @classmethod
    def default_lora_alpha(cls, rank: int) -> float:
        """``lora_alpha`` when none is given: :attr:`lora_alpha_per_rank` times ``rank``."""
        return cls.lora_alpha_per_rank * rank

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters an optimiser should update (LoRA weights, or the whole model)."""
        return [p for p in self.trained_model.parameters() if p.requires_grad]

    def set_forward_model(self, module: Any) -> None:
        """Run forward passes through ``module`` (e.g. the model ``accelerator.prepare``
        returned); :attr:`trained_model` stays the plain diffusers model."""
        self._forward_model = module

    def forward_model(self) -> Any:
        """The module a forward pass calls now: the frozen copy inside :meth:`reference` in full
        training, else the one :meth:`set_forward_model` gave (the plain model by default)."""
        if self._in_reference and not self.use_lora:
            return self._reference_model
        return self._forward_model

    def forward_dtype(self) -> torch.dtype:
        """The dtype of the module a forward pass calls now (:meth:`forward_model`): inputs are
        cast to it. Under DeepSpeed bf16 / fp16 the engine casts the trained model's weights
        while the frozen reference copy of full training keeps float32."""
        return next(self.forward_model().parameters()).dtype

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within this context the policy is the reference (adapter off / frozen copy): for KL
        penalties and DPO references."""
        name = self.trained_name
        if not self.use_lora and self._reference_model is None:
            raise RuntimeError(
                f"Full-{name} training has no reference model: build the policy with "
                f"keep_reference=True (costs a {name} copy) or use LoRA."
            )
        if self.use_lora:
            self.trained_model.disable_adapters()
        self._in_reference = True
        try:
            yield
        finally:
            self._in_reference = False
            if self.use_lora:
                self.trained_model.enable_adapters()

    # ----------------------------------------------------------------------------- sampling frame
    def initial_latents(
        self,
        batch_size: int,
        height: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Gaussian noise ``[B, C, h, w]`` (float32, on the policy's device) drawn as the diffusers
        pipelines draw it (``randn_tensor``: one generator for all or one per sample), so a
        policy and its pipeline start from the same noise for the same generator."""
        from diffusers.utils.torch_utils import randn_tensor

        shape = self.latent_shape(batch_size, height)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    @staticmethod
    def sde_step_set(num_steps: int, sde_steps: Sequence[int] | None) -> set[int]:
        """The stochastic steps of a ``num_steps`` schedule: ``sde_steps`` (each in
        ``[0, num_steps)``, else ``ValueError``), or every step when None."""
        sde = set(range(num_steps)) if sde_steps is None else {int(i) for i in sde_steps}
        if any(not 0 <= i < num_steps for i in sde):
            raise ValueError(f"sde_steps {sorted(sde)} must lie in [0, {num_steps}).")
        return sde

    def run_steps(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        step: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        grad: bool | int = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sampling loop: ``x_{i+1}, log_prob_i = step(i, t_i, x_i)`` for each of the ``T``
        timesteps, then the decode.

        ``grad``: False (no graph), True (a graph through every step and the decode) or an int
        ``K`` (the last ``K`` steps only, as DRaFT-K). Returns ``(images [B, 3, H, W],
        latents [B, T + 1, C, h, w] (detached, x_T first), log_probs [B, T] (detached))``.
        """
        num_steps = len(timesteps)
        grad_steps = num_steps if grad is True else int(grad)
        all_latents, all_log_probs = [latents.detach()], []
        for i, t in enumerate(timesteps):
            with torch.set_grad_enabled(i >= num_steps - grad_steps):
                latents, log_prob = step(i, t, latents)
            all_latents.append(latents.detach())
            all_log_probs.append(log_prob.detach())
        with torch.set_grad_enabled(grad_steps > 0):
            images = self.decode(latents)
        return images, torch.stack(all_latents, dim=1), torch.stack(all_log_probs, dim=1)


__all__ = ["PolicyBase"]
