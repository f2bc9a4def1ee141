"""Flow-GRPO (Liu et al. 2025, arXiv 2505.05470; SPEC section 7) on the online-RL trainer base.

The loop is :class:`~alignment.online_trainer.OnlineRLTrainerBase`'s (sample -> reward -> gather ->
advantages -> PPO update, per epoch); GRPO supplies these parts:

1. **Groups that span processes.** ``images_per_prompt = G`` images share a prompt. Image ``i`` of
   an epoch, counted over every process (sampling batch ``b`` of process ``p`` holds images
   ``(b * P + p) * B ...``), belongs to group ``i // G``, whose prompt is entry ``g`` of the
   epoch's prompt permutation (stream ``(seed, "groups", epoch)``: distinct prompts while the
   prompt set lasts). So a group may be spread over processes and batches; the rewards of every
   process are gathered before the advantages are computed.
2. **Sampling**: the policy's SDE sampler at ``noise_level`` (a flow policy: Flow-GRPO's SDE,
   :mod:`alignment.flow`; an SD 1.x policy: DDIM at ``eta = noise_level``) with ``num_steps``
   steps (*denoising reduction*: 10 for training, ``eval_num_steps = 40`` for evaluation). With
   ``sde_window_size = k > 0`` (**Flow-GRPO-Fast**) only a window of ``k`` consecutive steps
   (start uniform in ``[sde_window_lo, sde_window_hi - k]``, stream ``(seed, "sde_window", epoch,
   global batch)``) is stochastic, the rest is the ODE, and only the window's transitions are
   stored and trained.
3. **Advantages** (:func:`alignment.flow.group_advantages`): ``(r - mean_group) / (std + 1e-4)``
   with the group's std, or the whole epoch's with ``global_std``; a non-finite reward gets 0 and
   stays out of the statistics; clipped to ``+-adv_clip_max`` in the update.
4. **Update**: PPO's clipped surrogate on the first ``num_train_timesteps`` stored steps in
   sampling order (``timestep_fraction`` 0.99 of 10 steps trains the first 9, as the reference),
   plus ``kl_coef`` (Flow-GRPO's beta) times the closed-form KL to the reference policy
   (:func:`alignment.flow.sde_kl`: LoRA switched off, or the frozen copy kept for
   full-transformer training).
5. **EMA** of the trained weights (diffusers' ``EMAModel``, decay ``ema_decay`` = 0.9 with its
   ``(1 + n) / (10 + n)`` warm-up, updated every ``ema_update_every`` optimiser steps): the
   weights the held-out evaluation (every ``eval_every`` epochs: ODE, ``eval_num_steps``, fixed
   seeds, logged as ``eval/reward_mean``) and the export use. Checkpoints store it
   (``ema.safetensors``), so a resumed run continues it.

The same trainer takes a :class:`~alignment.flow_policy.FlowPolicy` (SD 3.x / FLUX: Flow-GRPO) or
a :class:`~alignment.policy.DiffusionPolicy` (SD 1.x: GRPO with DDIM's SDE), built from
``pretrained_model`` by the shared
:meth:`~alignment.trainer_utils.PolicyTrainerBase.build_policy` (as every trainer's) or passed in.

Memory (flow policies; :class:`~alignment.trainer_utils.FlowPolicyOptions`, shared with
Diffusion-DPO): every training and evaluation prompt is encoded once before training
(``cache_prompts``) and the text encoders then leave the accelerator (``offload_text_encoders``:
SD3's T5-XXL alone is 4.7B parameters), through
:meth:`~alignment.trainer_utils.PolicyTrainerBase.cache_prompts`; ``gradient_checkpointing`` and
``use_8bit_adam`` (bitsandbytes) are the other two options (README: what SD3.5-M needs on one
24 GB GPU).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from alignment.flow import group_advantages, sde_window
from alignment.flow_policy import FLOW_LORA_TARGETS
from alignment.online_trainer import OnlineRLConfig, OnlineRLTrainerBase
from alignment.seeding import stream_generator
from alignment.trainer_utils import BUNDLED_WEIGHTS, LORA_ALPHA_HELP, FlowPolicyOptions

EMA_FILE = "ema.safetensors"


@dataclass
class GRPOConfig(FlowPolicyOptions, OnlineRLConfig):
    """Settings of a Flow-GRPO run (YAML + command line through ``trl.TrlParser``).

    The defaults are the reference's SD3.5-M settings (yifan123/flow_grpo, ``config/grpo.py``) per
    process on 8 processes: 9 images per sampling batch, 16 batches, groups of 24 (48 prompts x 24
    = 1152 images per epoch), train batches of 9 with 8 accumulated (two optimiser steps per
    epoch), 10 sampling steps, 40 for evaluation, CFG 4.5, noise level 0.7, LoRA rank 32 / alpha
    64 on the joint attention, lr 3e-4, beta 0.04, global std, EMA.
    """

    # the shared fields with Flow-GRPO's defaults
    pretrained_model: str = field(
        default=str(BUNDLED_WEIGHTS / "tiny-world-sd3"),
        metadata={
            "help": "SD 3.x / FLUX hub id (e.g. stabilityai/stable-diffusion-3.5-medium) or "
            "diffusers folder ('tiny-sd3', 'tiny-flux': tiny random ones built in code); an SD "
            "1.x pipeline ('tiny' too) trains with DDIM's SDE. Default: the bundled tiny-world "
            "SD 3-architecture model (offline)."
        },
    )
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank."})
    lora_alpha: float | None = field(default=64.0, metadata={"help": LORA_ALPHA_HELP})
    lora_target_modules: str = field(
        default=",".join(FLOW_LORA_TARGETS),
        metadata={
            "help": "Comma-separated module names that get LoRA (default: the joint-attention "
            "projections of the image and text streams)."
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Gradient checkpointing of the transformer (less memory, ~30% slower)."},
    )
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate."})
    adam_weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    num_steps: int = field(
        default=10,
        metadata={
            "help": "Sampling steps of the training rollouts (denoising reduction: fewer than "
            "eval_num_steps)."
        },
    )
    guidance_scale: float = field(
        default=4.5, metadata={"help": "CFG scale of the rollouts (SD3: <= 1 is CFG-free)."}
    )
    sample_batch_size: int = field(default=9, metadata={"help": "Images per sampling batch."})
    num_batches_per_epoch: int = field(
        default=16, metadata={"help": "Sampling batches per epoch and process."}
    )
    images_per_prompt: int = field(
        default=24,
        metadata={
            "help": "Group size G: images per prompt. Groups may span batches and processes; G "
            "must divide the images of an epoch over all processes."
        },
    )
    train_batch_size: int = field(default=9, metadata={"help": "Samples per train batch."})
    gradient_accumulation_steps: int = field(
        default=8, metadata={"help": "Train batches per optimiser step."}
    )
    timestep_fraction: float = field(
        default=0.99,
        metadata={
            "help": "Fraction of the stored (SDE) steps trained, the first ones in sampling "
            "order (0.99 of 10: the first 9)."
        },
    )
    kl_coef: float = field(
        default=0.04,
        metadata={
            "help": "Flow-GRPO's beta: weight of the KL to the reference policy (0.04 GenEval/OCR, "
            "0.01 PickScore; 0: off)."
        },
    )
    output_dir: str = field(default="outputs/grpo", metadata={"help": "Run folder."})
    tracker_project: str = field(default="grpo", metadata={"help": "Tracker project name."})
    # --- GRPO's own
    noise_level: float = field(
        default=0.7,
        metadata={
            "help": "SDE noise level a of a flow policy (0.7; FLUX 0.9 in the reference), or "
            "DDIM eta of an SD 1.x policy (1.0)."
        },
    )
    global_std: bool = field(
        default=True,
        metadata={"help": "Divide by the std of all of the epoch's rewards, not the group's."},
    )
    sde_window_size: int = field(
        default=0,
        metadata={
            "help": "Flow-GRPO-Fast: the number of consecutive SDE steps (the rest ODE); only "
            "they are stored and trained. 0: every step is an SDE step."
        },
    )
    sde_window_lo: int = field(
        default=0, metadata={"help": "First step the Fast window may start at."}
    )
    sde_window_hi: int | None = field(
        default=None,
        metadata={"help": "The Fast window ends by this step (None: num_steps; reference: half)."},
    )
    ema: bool = field(
        default=True,
        metadata={"help": "Keep an EMA of the trained weights for evaluation and export."},
    )
    ema_decay: float = field(default=0.9, metadata={"help": "EMA decay (after its warm-up)."})
    ema_update_every: int = field(
        default=8, metadata={"help": "Update the EMA every N optimiser steps."}
    )
    eval_prompts: str | None = field(
        default=None,
        metadata={
            "help": "Held-out prompt source ('short', 'parti', a file; None: the training "
            "prompts) for the evaluation."
        },
    )
    num_eval_images: int = field(
        default=16, metadata={"help": "Evaluation images (one per prompt, fixed seeds)."}
    )
    eval_num_steps: int = field(
        default=40, metadata={"help": "ODE steps of the evaluation (and of the exported model)."}
    )
    eval_guidance_scale: float | None = field(
        default=None, metadata={"help": "CFG of the evaluation (None: guidance_scale)."}
    )
    eval_every: int = field(
        default=10,
        metadata={
            "help": "Evaluate (EMA weights, ODE) every N epochs and at the end; 0: never. The "
            "first epoch's record also holds the base policy's eval/reward_mean_initial."
        },
    )

    RANGES: ClassVar[dict[str, str]] = {
        "images_per_prompt": ">= 2",
        "noise_level": "> 0",
        "sde_window_size": ">= 0",
        "sde_window_lo": ">= 0",
        "sde_window_hi": ">= 1",
        "ema_decay": "[0, 1)",
        "ema_update_every": ">= 1",
        "num_eval_images": ">= 1",
        "eval_num_steps": ">= 1",
        "eval_guidance_scale": ">= 0",
        "eval_every": ">= 0",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sde_window_size:
            lo, hi = self.sde_window_lo, self.window_hi
            if not lo < hi <= self.num_steps or hi - lo < self.sde_window_size:
                raise ValueError(
                    f"The Fast window of {self.sde_window_size} steps must fit in steps "
                    f"[sde_window_lo, sde_window_hi) = [{lo}, {hi}) within num_steps "
                    f"({self.num_steps}): widen the range or shrink sde_window_size."
                )

    def check_groups(self) -> None:
        """Groups may span batches and processes: the trainer checks that ``images_per_prompt``
        divides the images of an epoch once it knows the process count."""

    @property
    def window_hi(self) -> int:
        return self.num_steps if self.sde_window_hi is None else self.sde_window_hi

    @property
    def stored_steps(self) -> int:
        """Transitions stored per image: the Fast window's, or every step's."""
        return self.sde_window_size or self.num_steps

    @property
    def num_train_timesteps(self) -> int:
        return max(1, int(self.stored_steps * self.timestep_fraction))


class GRPOTrainer(OnlineRLTrainerBase):
    """Flow-GRPO on a flow policy (SD 3.x, FLUX) or GRPO on an SD 1.x policy (see the module).

    Args:
        config: the run's settings.
        policy: a :class:`~alignment.flow_policy.FlowPolicy` or
            :class:`~alignment.policy.DiffusionPolicy` (default: built from the config).
        reward_fn: a reward callable ``fn(images [N, 3, H, W], prompts) -> [N]`` (default: the
            registry's ``config.reward`` on this process's device).
        prompts: training prompts (default: ``load_prompts(config.prompts, ...)``).
        eval_prompts: held-out prompts (default: ``config.eval_prompts``, else the training
            prompts), of which the first ``num_eval_images`` are evaluated.
    """

    config: GRPOConfig

    def __init__(
        self,
        config: GRPOConfig,
        policy: Any = None,
        reward_fn: Callable | None = None,
        prompts: Sequence[str] | None = None,
        eval_prompts: Sequence[str] | None = None,
    ) -> None:
        from alignment.prompts import load_prompts

        super().__init__(config, policy, reward_fn, prompts)
        cfg, acc = self.config, self.accelerator
        per_epoch = cfg.sample_batch_size * cfg.num_batches_per_epoch * acc.num_processes
        if per_epoch % cfg.images_per_prompt:
            raise ValueError(
                f"images_per_prompt ({cfg.images_per_prompt}) must divide the images of an epoch "
                f"over all processes (sample_batch_size x num_batches_per_epoch x processes = "
                f"{cfg.sample_batch_size} x {cfg.num_batches_per_epoch} x {acc.num_processes} = "
                f"{per_epoch}), so that every group is complete: change num_batches_per_epoch or "
                "images_per_prompt."
            )
        if eval_prompts is None:
            eval_prompts = load_prompts(cfg.eval_prompts) if cfg.eval_prompts else self.prompts
        self.eval_prompts = list(eval_prompts)[: cfg.num_eval_images]
        self.cache_prompts([*self.prompts, *self.eval_prompts])
        self._names = [n for n, p in self.trained_named_parameters() if p.requires_grad]
        self.ema = None
        if cfg.ema:
            from diffusers.training_utils import EMAModel

            with self.gathered():
                self.ema = EMAModel(self.trainable, decay=cfg.ema_decay)
            acc.register_save_state_pre_hook(self._save_ema)
            acc.register_load_state_pre_hook(self._load_ema)
        self._order: tuple[int, list[int]] | None = None
        self._group_metrics: dict[str, float] = {}
        self._initial_eval: dict[str, float] = {}

    # ------------------------------------------------------------------------------ policy
    def trained_named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """``(name, parameter)`` of the trained module (names as in its state dict)."""
        return self.policy.trained_model.named_parameters()

    # ------------------------------------------------------------------------------ sampling
    def choose_prompts(self, batch: int) -> list[str]:
        """Image ``i`` of the epoch (counted over every process) gets the prompt of group
        ``i // G``: entry ``(i // G) mod len(prompts)`` of the epoch's permutation of the prompt
        set (stream ``(seed, "groups", epoch)``)."""
        cfg = self.config
        if self._order is None or self._order[0] != self.epoch:
            g = stream_generator(cfg.seed, "groups", self.epoch)
            self._order = (self.epoch, torch.randperm(len(self.prompts), generator=g).tolist())
        order = self._order[1]
        first = self._stream_index(batch) * cfg.sample_batch_size
        group = [(first + j) // cfg.images_per_prompt for j in range(cfg.sample_batch_size)]
        return [self.prompts[order[g % len(order)]] for g in group]

    def sde_steps(self, batch: int) -> list[int]:
        """The SDE steps of sampling batch ``batch``: all of them, or the Fast window drawn from
        the stream ``(seed, "sde_window", epoch, global batch)``."""
        cfg = self.config
        if not cfg.sde_window_size:
            return list(range(cfg.num_steps))
        g = stream_generator(cfg.seed, "sde_window", self.epoch, self._stream_index(batch))
        return sde_window(
            cfg.num_steps, cfg.sde_window_size, (cfg.sde_window_lo, cfg.window_hi), generator=g
        )

    def sample_batch(
        self, prompts: list[str], generator: list[torch.Generator] | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.config
        steps = self.sde_steps(self.sampling_batch)
        out = self.policy.sample(
            prompts,
            cfg.num_steps,
            cfg.noise_level,
            cfg.guidance_scale,
            generator=generator,
            height=cfg.resolution,
            sde_steps=steps,
        )
        idx = torch.tensor(steps, device=out.latents.device)
        timesteps = out.timesteps.to(out.latents.device)[idx]
        return out.images, {
            "embeds": out.prompt_embeds,
            "latents": out.latents[:, idx],
            "next_latents": out.latents[:, idx + 1],
            "log_probs": out.log_probs[:, idx],
            "timesteps": timesteps.unsqueeze(0).expand(len(prompts), -1),
        }

    # ------------------------------------------------------------------------------ the update
    def step_distribution(
        self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        return self.policy.step_distribution(
            latents, timesteps, embeds, cfg.guidance_scale, cfg.noise_level, num_steps=cfg.num_steps
        )

    def transition_log_prob(
        self,
        latents: torch.Tensor,
        next_latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log_prob, mean, std)`` from the policy's own ``log_prob`` (a flow policy's ``std``
        is ``std_s``, for which the base's KL is :func:`alignment.flow.sde_kl`)."""
        cfg = self.config
        return self.policy.log_prob(
            latents,
            next_latents,
            timesteps,
            embeds,
            cfg.guidance_scale,
            cfg.noise_level,
            num_steps=cfg.num_steps,
            return_stats=True,
        )

    def timestep_order(self, n: int, steps: int) -> torch.Tensor:
        """The stored steps in sampling order (the first ``num_train_timesteps`` are trained)."""
        return torch.arange(steps, device=self.accelerator.device).expand(n, -1)

    def advantage_rule(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """:func:`~alignment.flow.group_advantages` over the gathered rewards, grouped by prompt
        (one group with ``per_prompt_stat_tracking`` off); also records how many groups had no
        spread (their advantages are 0)."""
        cfg = self.config
        keys = prompts if cfg.per_prompt_stat_tracking else [""] * len(prompts)
        adv = group_advantages(torch.as_tensor(rewards), keys, global_std=cfg.global_std)
        groups: dict[str, list[float]] = {}
        for key, r in zip(keys, rewards.tolist()):
            groups.setdefault(key, []).append(r)
        stds = [float(np.std(v)) for v in groups.values()]
        self._group_metrics = {
            "groups/count": float(len(groups)),
            "groups/zero_std_fraction": float(np.mean([s == 0.0 for s in stds])),
            "groups/reward_std_mean": float(np.mean(stds)),
        }
        return adv.numpy()

    def backward_and_step(self, loss: torch.Tensor) -> bool | None:
        """The base's guarded step, then the EMA update every ``ema_update_every`` steps."""
        stepped = super().backward_and_step(loss)
        every = self.config.ema_update_every
        if stepped and self.ema is not None and (self.global_step + 1) % every == 0:
            # the parameters are gathered here; EMAModel.step's own ZeRO-3 branch is kept off
            # (it names a `deepspeed` that diffusers imports only if ZeRO-3 was already on when
            # diffusers.training_utils was first imported)
            with self.gathered(), self.frozen_outside_zero3():
                self.ema.step(self.trainable)
        return stepped

    # ------------------------------------------------------------------------------ EMA
    def _zero3(self) -> bool:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return self.is_deepspeed and plugin is not None and plugin.zero_stage == 3

    def gathered(self, modify: bool = False) -> Any:
        """Context in which the trained parameters are whole (ZeRO-3 gathers its partitions;
        with ``modify`` rank 0's changes are partitioned back on exit); a no-op otherwise."""
        if not self._zero3():
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(
            self.trainable, modifier_rank=0 if modify else None
        )

    def ema_state(self) -> dict[str, torch.Tensor]:
        """The EMA weights by parameter name (empty without EMA)."""
        if self.ema is None:
            return {}
        return dict(zip(self._names, self.ema.shadow_params))

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Within this context the policy runs with the EMA weights (restored on exit)."""
        if self.ema is None:
            yield
            return
        with self.gathered(modify=True):
            stored = [p.detach().clone() for p in self.trainable]
            self.ema.copy_to(self.trainable)
        try:
            yield
        finally:
            with self.gathered(modify=True):
                for p, s in zip(self.trainable, stored):
                    p.data.copy_(s)

    def _save_ema(self, models: list, weights: list, output_dir: str) -> None:
        from safetensors.torch import save_file

        if self.accelerator.is_main_process:
            state = {k: v.detach().cpu().contiguous() for k, v in self.ema_state().items()}
            meta = {"optimization_step": str(self.ema.optimization_step)}
            save_file(state, str(Path(output_dir) / EMA_FILE), metadata=meta)

    def _load_ema(self, models: list, input_dir: str) -> None:
        from safetensors import safe_open

        path = Path(input_dir) / EMA_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was written without EMA. Resume with "
                "--ema false, or start a new run."
            )
        with safe_open(str(path), framework="pt", device="cpu") as f:
            stored = set(f.keys())
            missing = [n for n in self._names if n not in stored]
            if missing:
                raise KeyError(f"{path} lacks the EMA of {missing[:3]}: another model or LoRA?")
            device = self.ema.shadow_params[0].device
            self.ema.shadow_params = [f.get_tensor(n).to(device) for n in self._names]
            self.ema.optimization_step = int(f.metadata()["optimization_step"])

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Held-out reward of the EMA weights: ODE sampling (``eval_num_steps``, CFG
        ``eval_guidance_scale``) of the evaluation prompts, image ``i`` from the stream
        ``(seed, "eval", i)``, the prompts shared out over the processes (padded to equal counts:
        a ZeRO-3 forward needs every rank). Call on every process; returns ``eval/reward_mean``
        and ``eval/reward_std`` (finite rewards) and logs the images as an ``eval`` grid."""
        from alignment.logging_utils import log_image_grid

        cfg, acc = self.config, self.accelerator
        n, procs = len(self.eval_prompts), acc.num_processes
        share = math.ceil(n / procs)
        mine = [
            min(i, n - 1) for i in range(acc.process_index * share, (acc.process_index + 1) * share)
        ]
        valid = [acc.process_index * share + j < n for j in range(share)]
        g = cfg.guidance_scale if cfg.eval_guidance_scale is None else cfg.eval_guidance_scale
        rewards, images = [], []
        self.unet.eval()
        with self.ema_weights(), torch.no_grad(), acc.autocast():
            for s in range(0, share, cfg.sample_batch_size):
                idx = mine[s : s + cfg.sample_batch_size]
                prompts = [self.eval_prompts[i] for i in idx]
                gens = [stream_generator(cfg.seed, "eval", i, device=acc.device) for i in idx]
                out = self.policy.sample(
                    prompts, cfg.eval_num_steps, 0.0, g, generator=gens, height=cfg.resolution
                )
                imgs = out.images.float()
                r = torch.as_tensor(self.reward_fn(imgs, prompts), dtype=torch.float32)
                rewards.append(r.reshape(-1).to(acc.device))
                images.append(imgs)
        local = torch.cat(rewards)
        ok = torch.tensor(valid, device=acc.device)
        all_r = acc.gather(local).cpu()
        all_ok = acc.gather(ok).cpu()
        r = all_r[all_ok & torch.isfinite(all_r)]
        if acc.is_main_process and cfg.log_images_every:
            m = min(cfg.num_log_images, len(self.eval_prompts), share)
            log_image_grid(
                acc,
                "eval",
                torch.cat(images)[:m],
                [self.eval_prompts[i] for i in mine[:m]],
                local[:m].tolist(),
                self.epoch,
                save_dir=self.output_dir / "eval",
            )
        mean = float(r.mean()) if r.numel() else float("nan")
        std = float(r.std(unbiased=False)) if r.numel() else float("nan")
        return {"eval/reward_mean": mean, "eval/reward_std": std}

    def maybe_resume(self) -> bool:
        """The base's resume; a weights-only resume (which restores no accelerate state) reads
        the checkpoint's EMA too. A fresh run evaluates the base policy first."""
        from alignment.checkpointing import resolve_checkpoint

        cfg = self.config
        loaded = super().maybe_resume()
        if loaded and cfg.resume_weights_only and self.ema is not None:
            self._load_ema([], str(resolve_checkpoint(self.output_dir, cfg.resume_from)))
        if not loaded and self.config.eval_every:
            base = self.evaluate()
            self._initial_eval = {f"{k}_initial": v for k, v in base.items()}
        return loaded

    def epoch_metrics(self) -> dict[str, float]:
        """The group statistics of the epoch, and the evaluation every ``eval_every`` epochs
        and after the last one (the first record also carries the base policy's)."""
        cfg = self.config
        out = {**self._initial_eval, **self._group_metrics}
        self._initial_eval = {}
        done = self.epoch + 1
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.num_epochs):
            out.update(self.evaluate())
        return out

    # ------------------------------------------------------------------------------ export
    def export(self, export_dir: str) -> None:
        """Export the tuned pipeline with the EMA weights when kept (see
        :mod:`alignment.export`); call on every process."""
        from alignment.export import export_from_accelerator

        export_from_accelerator(
            self.accelerator, self.unet, self.policy, export_dir, overrides=self.ema_state()
        )


__all__ = ["GRPOConfig", "GRPOTrainer"]
