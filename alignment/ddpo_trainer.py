"""DDPO (Black et al. 2023) for Stable Diffusion on accelerate: config and training loop.

One epoch:

1. **Sample** ``num_batches_per_epoch`` batches of ``sample_batch_size`` prompts per process with
   DDIM (``eta``, CFG ``guidance_scale``), keeping every latent and each step's log-prob. Rewards
   of a batch are computed in a worker thread while the next batch samples (``async_reward``).
2. **Advantages**: rewards are gathered from all processes and normalised per prompt
   (:class:`~alignment.ddpo.PerPromptStatTracker`; batch statistics until a prompt has
   ``stat_min_count`` rewards), then clipped to ``+-adv_clip_max``.
3. **Train** ``num_inner_epochs`` times over the shuffled samples in batches of
   ``train_batch_size``; each sample gets its own random permutation of the timesteps, of which
   the first ``timestep_fraction * num_steps`` are trained. The PPO clipped loss of each trained
   timestep is back-propagated on its own (memory stays one UNet call), and one optimiser step
   spans all trained timesteps of ``gradient_accumulation_steps`` train batches. CFG is applied
   in training exactly as in sampling. An optional KL penalty ``kl_coef * KL(policy || ref)``
   uses the exact per-step Gaussian KL against the reference (LoRA switched off).

Only the trained UNet goes through ``accelerator.prepare`` (DeepSpeed ZeRO-2/3 included); the
text encoder, VAE and the reward model stay outside it.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignment.ddpo import (
    PerPromptStatTracker,
    clip_advantages,
    gaussian_kl,
    gaussian_log_prob,
    ppo_clip_loss,
    ppo_stats,
    temporal_discount_weights,
)


@dataclass
class DDPOConfig:
    """Settings of a DDPO run (YAML + command line through ``trl.TrlParser``)."""

    # --- model
    pretrained_model: str = field(
        default="runwayml/stable-diffusion-v1-5",
        metadata={"help": "Hub id, local diffusers folder, or 'tiny' (a tiny random pipeline)."},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the model."})
    use_lora: bool = field(
        default=True, metadata={"help": "Train a LoRA adapter on the UNet (else the full UNet)."}
    )
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank."})
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA alpha (default: equal to the rank, scale 1)."}
    )
    lora_target_modules: str = field(
        default="to_q,to_k,to_v,to_out.0",
        metadata={"help": "Comma-separated UNet module names that get LoRA."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "UNet gradient checkpointing (less memory, slower)."}
    )
    # --- prompts and reward
    prompts: str = field(
        default="short",
        metadata={"help": "Prompt source: 'short', 'parti', or a .txt/.tsv/.json(l) file."},
    )
    prompt_category: str | None = field(
        default=None, metadata={"help": "Category filter (comma-separated), e.g. 'Animals'."}
    )
    reward: str = field(
        default="jpeg_compressibility",
        metadata={"help": "Reward name (alignment.rewards registry) or 'module:function'."},
    )
    reward_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of the reward as JSON (or a mapping in YAML), e.g. "
            '\'{"path": "out/reward", "perspective": "alignment"}\' for llava_reward.'
        },
    )
    async_reward: bool = field(
        default=True,
        metadata={"help": "Compute a batch's rewards in a thread while the next batch samples."},
    )
    # --- sampling
    num_steps: int = field(default=50, metadata={"help": "DDIM sampling steps."})
    eta: float = field(default=1.0, metadata={"help": "DDIM eta (1.0: stochastic, as DDPO)."})
    guidance_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance."})
    sample_batch_size: int = field(default=8, metadata={"help": "Images per sampling batch."})
    num_batches_per_epoch: int = field(
        default=4, metadata={"help": "Sampling batches per epoch and process."}
    )
    # --- training
    images_per_prompt: int = field(
        default=1,
        metadata={
            "help": "Images sampled per prompt in a sampling batch (1: every image its own random "
            "prompt, as DDPO). With k > 1 and stat_min_count <= k, each image's advantage "
            "compares it with the other images of its prompt."
        },
    )
    num_epochs: int = field(default=100, metadata={"help": "Epochs (sample + train rounds)."})
    train_batch_size: int = field(default=4, metadata={"help": "Samples per training batch."})
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Train batches per optimiser step (each with all trained timesteps)."},
    )
    num_inner_epochs: int = field(default=1, metadata={"help": "Passes over each epoch's samples."})
    timestep_fraction: float = field(
        default=1.0, metadata={"help": "Fraction of the timesteps trained per sample."}
    )
    timesteps_per_call: int = field(
        default=1,
        metadata={
            "help": "Trained timesteps batched into one UNet call (1: one backward per timestep, "
            "least memory, as the reference; larger: bigger batches, fewer calls, same gradient)."
        },
    )
    clip_range: float = field(
        default=1e-4, metadata={"help": "PPO ratio clip (for mean-over-dims log-probs)."}
    )
    temporal_discount: float = field(
        default=1.0,
        metadata={
            "help": "Weight gamma^k on the k-th denoising step's loss (normalised to mean 1; "
            "1.0: plain DDPO). Below 1 favours the first, layout-deciding steps."
        },
    )
    adv_clip_max: float = field(default=5.0, metadata={"help": "Clip advantages to +- this."})
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    use_8bit_adam: bool = field(
        default=False, metadata={"help": "bitsandbytes' 8-bit AdamW (needs bitsandbytes + GPU)."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    kl_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the KL penalty against the reference UNet (0: off)."},
    )
    per_prompt_stat_tracking: bool = field(
        default=True, metadata={"help": "Normalise rewards per prompt (else per batch)."}
    )
    stat_buffer_size: int = field(default=32, metadata={"help": "Per-prompt reward buffer."})
    stat_min_count: int = field(
        default=16, metadata={"help": "Rewards a prompt needs before its own statistics are used."}
    )
    mixed_precision: str | None = field(
        default=None,
        metadata={"help": "'no', 'fp16' or 'bf16'; None takes accelerate's launch setting."},
    )
    compile_unet: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the UNet forward (GPU speed-up; compiling takes a while)."
        },
    )
    channels_last: bool = field(
        default=False, metadata={"help": "Keep the UNet in channels-last memory format."}
    )
    allow_tf32: bool = field(default=True, metadata={"help": "TF32 matmuls on Ampere+ GPUs."})
    seed: int = field(default=42, metadata={"help": "Random seed (per process offset)."})
    # --- output, logging, checkpoints
    output_dir: str = field(default="outputs/ddpo", metadata={"help": "Run folder."})
    save_every: int = field(
        default=10, metadata={"help": "Checkpoint every N epochs (and at the end); 0: never."}
    )
    keep_last: int = field(default=2, metadata={"help": "Checkpoints to keep."})
    resume_from: str | None = field(
        default=None,
        metadata={"help": "'latest' (newest checkpoint in output_dir, if any) or a checkpoint."},
    )
    resume_weights_only: bool = field(
        default=False,
        metadata={
            "help": "With resume_from: restore only the trained weights and the trainer state "
            "(step, statistics, history) with a fresh optimiser; resumes a DeepSpeed checkpoint "
            "on another number of processes or ZeRO stage."
        },
    )
    export_dir: str | None = field(
        default=None, metadata={"help": "Write the tuned pipeline (LoRA merged + LoRA file) here."}
    )
    log_with: str = field(
        default="tensorboard",
        metadata={"help": "accelerate trackers: 'tensorboard', 'wandb', 'all' or 'none'."},
    )
    tracker_project: str = field(default="ddpo", metadata={"help": "Tracker project name."})
    log_images_every: int = field(
        default=1, metadata={"help": "Log a captioned sample grid every N epochs (0: never)."}
    )
    num_log_images: int = field(default=8, metadata={"help": "Images in the logged grid."})
    progress_bar: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})

    def __post_init__(self) -> None:
        if isinstance(self.reward_kwargs, str) and self.reward_kwargs.strip():
            try:
                self.reward_kwargs = json.loads(self.reward_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(f"reward_kwargs must be JSON: {err}") from err
        if self.images_per_prompt < 1 or self.sample_batch_size % self.images_per_prompt:
            raise ValueError(
                f"images_per_prompt ({self.images_per_prompt}) must be >= 1 and divide "
                f"sample_batch_size ({self.sample_batch_size})."
            )
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError("timestep_fraction must be in (0, 1].")
        n = self.sample_batch_size * self.num_batches_per_epoch
        if n % self.train_batch_size:
            raise ValueError(
                f"sample_batch_size * num_batches_per_epoch ({n}) must be a multiple of "
                f"train_batch_size ({self.train_batch_size})."
            )
        if (n // self.train_batch_size) % self.gradient_accumulation_steps:
            raise ValueError(
                f"The {n // self.train_batch_size} train batches per epoch must be a multiple of "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps})."
            )

    @property
    def num_train_timesteps(self) -> int:
        return max(1, int(self.num_steps * self.timestep_fraction))


@contextlib.contextmanager
def frozen_models_outside_zero3(accelerator: Any) -> Iterator[None]:
    """Build models here to keep them whole under DeepSpeed ZeRO-3.

    With a ZeRO-3 config, accelerate registers it with transformers, whose ``from_pretrained``
    then partitions every model it loads (``zero.Init``), the text encoder and the reward model
    included, though they never enter the DeepSpeed engine. Inside this context that registration
    is lifted (and restored on exit).
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.dschf = None
        plugin.set_deepspeed_weakref()


def _reward_call(fn: Callable, images: torch.Tensor, prompts: list[str]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    r = fn(images, prompts)
    r = torch.as_tensor(r, dtype=torch.float32).detach().cpu().reshape(-1)
    return r, time.perf_counter() - t0


class _Done:
    """A finished future (synchronous reward path)."""

    def __init__(self, value: Any) -> None:
        self._value = value

    def result(self) -> Any:
        return self._value


class DDPOTrainer:
    """Builds the policy, reward, prompts and accelerator from a :class:`DDPOConfig` and trains.

    Args:
        config: the run's settings.
        policy: an existing :class:`~alignment.policy.DiffusionPolicy` (default: built from
            ``config.pretrained_model``).
        reward_fn: a reward callable (default: ``get_reward_fn(config.reward, **reward_kwargs)``).
        prompts: a prompt list (default: ``load_prompts(config.prompts, config.prompt_category)``).
    """

    def __init__(
        self,
        config: DDPOConfig,
        policy: Any = None,
        reward_fn: Callable | None = None,
        prompts: Sequence[str] | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

        from alignment.policy import DiffusionPolicy
        from alignment.prompts import load_prompts
        from alignment.rewards import get_reward_fn
        from reward.distributed import process_group_kwargs

        self.config = cfg = config
        self.output_dir = Path(cfg.output_dir)
        log_with = None if cfg.log_with == "none" else cfg.log_with
        if log_with in ("wandb", "all"):
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                log_with = "tensorboard"
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            log_with=log_with,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
            gradient_accumulation_steps=cfg.gradient_accumulation_steps
            * math.ceil(
                cfg.num_train_timesteps / min(cfg.num_train_timesteps, cfg.timesteps_per_call)
            ),
            kwargs_handlers=process_group_kwargs(),  # gloo for DeepSpeed on CPUs
        )
        acc = self.accelerator
        self.is_deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        set_seed(cfg.seed, device_specific=True)
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            acc.mixed_precision, torch.float32
        )
        with frozen_models_outside_zero3(acc):
            if policy is None:
                policy = DiffusionPolicy.from_pretrained(
                    cfg.pretrained_model,
                    revision=cfg.revision,
                    use_lora=cfg.use_lora,
                    lora_rank=cfg.lora_rank,
                    lora_alpha=cfg.lora_alpha,
                    lora_target_modules=[m.strip() for m in cfg.lora_target_modules.split(",")],
                    keep_reference=cfg.kl_coef > 0 and not cfg.use_lora,
                    weight_dtype=weight_dtype if cfg.use_lora else torch.float32,
                    gradient_checkpointing=cfg.gradient_checkpointing,
                )
            self.policy = policy
            policy.to(acc.device)
            if policy.use_lora is False and weight_dtype != torch.float32:
                policy.vae.to(dtype=weight_dtype)
                policy.text_encoder.to(dtype=weight_dtype)
            kwargs = cfg.reward_kwargs if isinstance(cfg.reward_kwargs, dict) else {}
            self.reward_fn = (
                reward_fn if reward_fn is not None else get_reward_fn(cfg.reward, **kwargs)
            )
        self.prompts = (
            list(prompts) if prompts is not None else load_prompts(cfg.prompts, cfg.prompt_category)
        )
        if not self.prompts:
            raise ValueError("No prompts to train on.")
        self.stat_tracker = PerPromptStatTracker(cfg.stat_buffer_size, cfg.stat_min_count)

        params = policy.trainable_parameters()
        if cfg.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise ImportError(
                    "use_8bit_adam needs bitsandbytes: `pip install bitsandbytes` (CUDA), or set "
                    "use_8bit_adam=false."
                ) from err
            opt_cls = bnb.optim.AdamW8bit
        else:
            opt_cls = torch.optim.AdamW
        optimizer = opt_cls(
            params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
        if self.is_deepspeed:
            ds = acc.state.deepspeed_plugin.deepspeed_config
            if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                ds["train_micro_batch_size_per_gpu"] = cfg.train_batch_size
            if ds.get("gradient_clipping", "auto") == "auto":
                ds["gradient_clipping"] = cfg.max_grad_norm
        if cfg.channels_last:
            policy.unet.to(memory_format=torch.channels_last)
        self.unet, self.optimizer = acc.prepare(policy.unet, optimizer)
        policy.set_forward_unet(torch.compile(self.unet) if cfg.compile_unet else self.unet)
        self.trainable = params
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        self._pool = ThreadPoolExecutor(max_workers=1) if cfg.async_reward else None

    # ------------------------------------------------------------------------------ pieces
    def _pbar(self, iterable: Any = None, **kw: Any) -> Any:
        from tqdm.auto import tqdm

        disable = not (self.config.progress_bar and self.accelerator.is_local_main_process)
        return tqdm(iterable, disable=disable, dynamic_ncols=True, **kw)

    def trainer_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "stat_tracker": self.stat_tracker.state_dict(),
            "history": self.history,
            "config": asdict(self.config),
        }

    def save_checkpoint(self) -> Path:
        from alignment.checkpointing import save_checkpoint

        return save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.epoch,
            self.trainer_state(),
            keep_last=self.config.keep_last,
        )

    def maybe_resume(self) -> bool:
        """Resume from ``config.resume_from`` if set (``"latest"`` without a checkpoint starts
        fresh). Returns whether a checkpoint was loaded."""
        from alignment.checkpointing import resume_if_requested

        loaded = resume_if_requested(
            self.accelerator,
            self.output_dir,
            self.config.resume_from,
            weights_only=self.config.resume_weights_only,
        )
        if loaded is None:
            return False
        path, state = loaded
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.stat_tracker.load_state_dict(state["stat_tracker"])
        self.history = list(state["history"])
        self.accelerator.print(f"Resumed from {path} at epoch {self.epoch}.")
        return True

    def sample_epoch(self) -> tuple[dict[str, Any], dict[str, float]]:
        """Sample one epoch (rewards possibly overlapping sampling). Returns the samples
        (tensors concatenated over batches) and timings."""
        cfg, policy, acc = self.config, self.policy, self.accelerator
        self.unet.eval()
        batches: list[dict[str, Any]] = []
        futures: list[Future | _Done] = []
        t0 = time.perf_counter()
        for _ in self._pbar(range(cfg.num_batches_per_epoch), desc="sampling", leave=False):
            k = cfg.images_per_prompt
            chosen = [random.choice(self.prompts) for _ in range(cfg.sample_batch_size // k)]
            prompts = [p for p in chosen for _ in range(k)]
            with torch.no_grad(), acc.autocast():
                out = policy.sample(
                    prompts, num_steps=cfg.num_steps, eta=cfg.eta, guidance_scale=cfg.guidance_scale
                )
            images = out.images.float()
            if self._pool is not None:
                futures.append(self._pool.submit(_reward_call, self.reward_fn, images, prompts))
            else:
                futures.append(_Done(_reward_call(self.reward_fn, images, prompts)))
            batches.append(
                {
                    "prompts": prompts,
                    "embeds": out.prompt_embeds,
                    "latents": out.latents[:, :-1],
                    "next_latents": out.latents[:, 1:],
                    "log_probs": out.log_probs,
                    "timesteps": out.timesteps.unsqueeze(0).expand(len(prompts), -1),
                    "images": images if not batches else None,
                }
            )
        t_sample = time.perf_counter() - t0
        t1 = time.perf_counter()
        results = [f.result() for f in futures]
        t_wait = time.perf_counter() - t1
        rewards = torch.cat([r for r, _ in results])
        samples = {
            k: torch.cat([b[k] for b in batches])
            for k in ("embeds", "latents", "next_latents", "log_probs", "timesteps")
        }
        samples["prompts"] = [p for b in batches for p in b["prompts"]]
        samples["rewards"] = rewards
        samples["first_images"] = batches[0]["images"]
        timings = {
            "time/sampling": t_sample,
            "time/reward": float(sum(t for _, t in results)),
            "time/reward_wait": t_wait if self._pool is not None else sum(t for _, t in results),
        }
        return samples, timings

    def compute_advantages(self, prompts: list[str], rewards: torch.Tensor) -> tuple:
        """Gather rewards from every process, normalise, and return this process's advantages
        ``[N]`` plus the gathered rewards (numpy)."""
        acc, cfg = self.accelerator, self.config
        index = {p: i for i, p in enumerate(self.prompts)}
        ids = torch.tensor([index.get(p, -1) for p in prompts], device=acc.device)
        all_rewards = acc.gather(rewards.to(acc.device)).cpu().numpy()
        all_ids = acc.gather(ids).cpu().numpy()
        if cfg.per_prompt_stat_tracking:
            all_prompts = [self.prompts[i] for i in all_ids]
            adv = self.stat_tracker.update(all_prompts, all_rewards)
        else:
            adv = (all_rewards - all_rewards.mean()) / (all_rewards.std() + 1e-6)
        adv = torch.as_tensor(adv, dtype=torch.float32).reshape(acc.num_processes, -1)
        return adv[acc.process_index].to(acc.device), all_rewards

    def train_on_samples(self, samples: dict[str, Any], advantages: torch.Tensor) -> dict:
        """The inner epochs of PPO updates on one epoch's samples; returns averaged metrics."""
        cfg, acc, policy = self.config, self.accelerator, self.policy
        n, steps = samples["latents"].shape[:2]
        k = cfg.num_train_timesteps
        chunk = min(k, cfg.timesteps_per_call)
        n_chunks = math.ceil(k / chunk)
        self.unet.train()
        info: dict[str, list[float]] = {"loss": [], "approx_kl": [], "clipfrac": [], "kl": []}
        total = cfg.num_inner_epochs * (n // cfg.train_batch_size) * k
        bar = self._pbar(total=total, desc="training", leave=False)
        for _ in range(cfg.num_inner_epochs):
            perm = torch.randperm(n, device=acc.device)
            data = {
                key: samples[key][perm]
                for key in ("embeds", "latents", "next_latents", "log_probs", "timesteps")
            }
            adv_all = advantages[perm]
            tperm = torch.stack([torch.randperm(steps, device=acc.device) for _ in range(n)])
            rows = torch.arange(n, device=acc.device)[:, None]
            for key in ("latents", "next_latents", "log_probs", "timesteps"):
                data[key] = data[key][rows, tperm]
            step_weights = temporal_discount_weights(tperm, cfg.temporal_discount, steps)
            for b in range(0, n, cfg.train_batch_size):
                sl = slice(b, b + cfg.train_batch_size)
                embeds = data["embeds"][sl]
                adv = clip_advantages(adv_all[sl], cfg.adv_clip_max)
                for j0 in range(0, k, chunk):
                    j1 = min(k, j0 + chunk)
                    c = j1 - j0
                    # [b, c, ...] -> [b * c, ...]: c timesteps of each sample in one UNet call
                    x = data["latents"][sl, j0:j1].flatten(0, 1)
                    x_next = data["next_latents"][sl, j0:j1].flatten(0, 1)
                    t = data["timesteps"][sl, j0:j1].flatten(0, 1)
                    old_lp = data["log_probs"][sl, j0:j1].flatten(0, 1)
                    emb = embeds.repeat_interleave(c, dim=0)
                    a = adv.repeat_interleave(c, dim=0)
                    w = step_weights[sl, j0:j1].flatten(0, 1)
                    with acc.accumulate(self.unet):
                        with acc.autocast():
                            mean, std = policy.step_distribution(
                                x, t, emb, cfg.guidance_scale, cfg.eta
                            )
                            log_prob = gaussian_log_prob(x_next, mean, std)
                            # sum over the chunk's timesteps of the per-timestep PPO loss, scaled
                            # so that the optimiser step averages over all k trained timesteps
                            loss = ppo_clip_loss(a, log_prob, old_lp, cfg.clip_range, w) * c
                            if cfg.kl_coef > 0:
                                with torch.no_grad(), policy.reference():
                                    ref_mean, _ = policy.step_distribution(
                                        x, t, emb, cfg.guidance_scale, cfg.eta
                                    )
                                kl = gaussian_kl(mean, ref_mean, std).mean()
                                loss = loss + cfg.kl_coef * kl * c
                                info["kl"].append(kl.item())
                            loss = loss * n_chunks / k
                        acc.backward(loss)
                        if acc.sync_gradients:
                            acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    stats = ppo_stats(log_prob, old_lp, cfg.clip_range)
                    info["loss"].append(loss.item() * k / n_chunks / c)
                    info["approx_kl"].append(stats["approx_kl"].item())
                    info["clipfrac"].append(stats["clipfrac"].item())
                    if acc.sync_gradients:
                        self.global_step += 1
                    bar.update(c)
        bar.close()
        return {key: float(np.mean(v)) for key, v in info.items() if v}

    # ------------------------------------------------------------------------------ loop
    def train(self) -> list[dict[str, float]]:
        """Run (or resume) training; checkpoint, log, export. Returns the per-epoch history."""
        from alignment.logging_utils import log_image_grid, plot_reward_curve

        cfg, acc = self.config, self.accelerator
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if acc.log_with:
            flat = {
                k: (v if isinstance(v, int | float | str | bool) else str(v))
                for k, v in asdict(cfg).items()
            }
            acc.init_trackers(cfg.tracker_project, config=flat)
        self.maybe_resume()
        epochs = self._pbar(
            range(self.epoch, cfg.num_epochs),
            desc="epochs",
            initial=self.epoch,
            total=cfg.num_epochs,
        )
        try:
            for _ in epochs:
                samples, timings = self.sample_epoch()
                adv, all_rewards = self.compute_advantages(samples["prompts"], samples["rewards"])
                t0 = time.perf_counter()
                train_info = self.train_on_samples(samples, adv)
                timings["time/training"] = time.perf_counter() - t0
                record = {
                    "epoch": self.epoch,
                    "reward_mean": float(all_rewards.mean()),
                    "reward_std": float(all_rewards.std()),
                    "global_step": self.global_step,
                    **train_info,
                    **timings,
                }
                self.history.append(record)
                if acc.log_with:
                    acc.log({k: v for k, v in record.items() if k != "epoch"}, step=self.epoch)
                if (
                    cfg.log_images_every
                    and self.epoch % cfg.log_images_every == 0
                    and acc.is_main_process
                ):
                    m = min(cfg.num_log_images, samples["first_images"].shape[0])
                    log_image_grid(
                        acc,
                        "samples",
                        samples["first_images"][:m],
                        samples["prompts"][:m],
                        samples["rewards"][:m].tolist(),
                        self.epoch,
                        save_dir=self.output_dir / "samples",
                    )
                epochs.set_postfix(reward=f"{record['reward_mean']:.4g}")
                self.epoch += 1
                if cfg.save_every and (
                    self.epoch % cfg.save_every == 0 or self.epoch == cfg.num_epochs
                ):
                    self.save_checkpoint()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        if acc.is_main_process and self.history:
            plot_reward_curve(self.history, self.output_dir / "reward_curve.png")
            with open(self.output_dir / "history.json", "w", encoding="utf-8") as f:
                json.dump(self.history, f, indent=1)
        if cfg.export_dir:
            self.export(cfg.export_dir)
        acc.wait_for_everyone()
        acc.end_training()
        return self.history

    def export(self, export_dir: str) -> None:
        """Export the tuned pipeline (see :mod:`alignment.export`); call on every process."""
        from alignment.export import export_from_accelerator

        export_from_accelerator(self.accelerator, self.unet, self.policy, export_dir)


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
