"""DRaFT-K / AlignProp / ReFL fine-tuning on accelerate (see :mod:`alignment.draft`).

Each optimiser step: ``gradient_accumulation_steps`` micro-batches of ``train_batch_size``
random prompts are sampled with a graph through the last ``K = grad_steps`` DDIM steps (or, with
``method: refl``, the one-step ``x0`` prediction at a random late step), decoded, scored by a
differentiable reward and the loss (``-r`` or ``relu(margin - r)``) back-propagated into the LoRA
(or full UNet) weights. An SD 3.x / FLUX pipeline (a :class:`~alignment.flow_policy.FlowPolicy`)
is tuned the same way through its Euler ODE (``eta`` is then the SDE's noise level, 0 by
default), with a graph through its last K steps (DRaFT-K; ReFL is SD 1.x/2.x only). Checkpoints, resume, logging and export are the shared ones
(:mod:`alignment.trainer_utils`, :mod:`alignment.checkpointing`, :mod:`alignment.export`).

Randomness comes from :mod:`alignment.seeding` streams, not from the process: the prompt and the
initial noise of global sample ``k`` (the processes take consecutive slices of one stream whose
position the trainer state counts) are keyed by ``k``, so a run resumed on another number of
processes continues with the samples the uninterrupted run would have drawn; ReFL's stop step is
keyed by ``(optimiser step, micro-batch)`` and therefore the same on every process (under
DeepSpeed ZeRO-3 every process must make the same number of UNet calls).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from alignment.draft import differentiable_reward_fn, reward_loss, sample_with_grad
from alignment.trainer_utils import (
    FlowPolicyOptions,
    PolicyTrainConfig,
    PolicyTrainerBase,
    parse_json_kwargs,
)


@dataclass
class DraftConfig(FlowPolicyOptions, PolicyTrainConfig):
    """Settings of a DRaFT / AlignProp / ReFL run (YAML + CLI through ``trl.TrlParser``)."""

    method: str = field(
        default="draft",
        metadata={
            "help": "'draft' (truncated backprop through the last K steps; AlignProp "
            "with K = num_steps) or 'refl' (one-step x0 at a random late step)."
        },
    )
    grad_steps: int = field(default=1, metadata={"help": "DRaFT-K: steps with a graph (K)."})
    checkpoint_unet: bool = field(
        default=True,
        metadata={
            "help": "Activation checkpointing around each UNet call with a graph and the "
            "VAE decode."
        },
    )
    refl_min_step: int | None = field(
        default=None,
        metadata={"help": "ReFL: earliest stop step (default: 3/4 of num_steps)."},
    )
    refl_max_step: int | None = field(
        default=None, metadata={"help": "ReFL: stop steps are < this (default: num_steps)."}
    )
    loss_type: str = field(
        default="neg",
        metadata={"help": "'neg' (-reward, DRaFT/AlignProp) or 'relu' (relu(margin - r), ReFL)."},
    )
    reward_margin: float = field(default=1.0, metadata={"help": "Margin of the 'relu' loss."})
    reward_scale: float = field(default=1.0, metadata={"help": "Multiply the loss by this."})
    prompts: str = field(
        default="short",
        metadata={"help": "Prompt source: 'short', 'parti', or a .txt/.tsv/.json(l) file."},
    )
    prompt_category: str | None = field(default=None, metadata={"help": "Category filter."})
    reward: str = field(
        default="brightness",
        metadata={
            "help": "Differentiable reward: 'llava_reward' (reward_kwargs path, "
            "perspective), 'brightness' (toy), or 'module:function'."
        },
    )
    reward_kwargs: str | None = field(
        default=None, metadata={"help": "Reward keyword arguments as JSON or a YAML mapping."}
    )
    num_steps: int = field(default=50, metadata={"help": "DDIM sampling steps."})
    eta: float = field(
        default=0.0,
        metadata={
            "help": "DDIM eta (0: deterministic); for an SD 3.x / FLUX policy the SDE's noise "
            "level (0: the Euler ODE)."
        },
    )
    guidance_scale: float = field(default=5.0, metadata={"help": "CFG scale."})
    eval_every: int = field(
        default=0, metadata={"help": "Mean reward on fixed prompts/seeds every N steps (0: off)."}
    )
    eval_prompts: int = field(default=4, metadata={"help": "Evaluation prompts (first N)."})
    eval_seeds: int = field(default=2, metadata={"help": "Evaluation seeds per prompt."})
    tracker_project: str = field(default="draft", metadata={"help": "Tracker project."})
    output_dir: str = field(default="outputs/draft", metadata={"help": "Run folder."})

    RANGES: ClassVar[dict[str, str]] = {
        "grad_steps": ">= 1",
        "refl_min_step": ">= 0",
        "refl_max_step": ">= 1",
        "reward_scale": "> 0",
        "num_steps": ">= 1",
        "eta": ">= 0",
        "guidance_scale": ">= 0",
        "eval_every": ">= 0",
        "eval_prompts": ">= 1",
        "eval_seeds": ">= 1",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reward_kwargs = parse_json_kwargs(self.reward_kwargs, "reward_kwargs")
        if self.method not in ("draft", "refl"):
            raise ValueError(f"method must be 'draft' or 'refl', got {self.method!r}.")
        if not 1 <= self.grad_steps <= self.num_steps:
            raise ValueError(f"grad_steps must be in [1, num_steps={self.num_steps}].")
        lo, hi = self.refl_window()
        if not 0 <= lo < hi <= self.num_steps:
            raise ValueError(f"ReFL window [{lo}, {hi}) must lie in [0, {self.num_steps}).")

    def refl_window(self) -> tuple[int, int]:
        lo = self.refl_min_step if self.refl_min_step is not None else (3 * self.num_steps) // 4
        hi = self.refl_max_step if self.refl_max_step is not None else self.num_steps
        return lo, hi


class DraftTrainer(PolicyTrainerBase):
    """Builds policy, differentiable reward, prompts and accelerator from a :class:`DraftConfig`
    and trains.

    Args:
        config: the run's settings.
        policy: an existing :class:`~alignment.policy.DiffusionPolicy` (default: built).
        reward_fn: a differentiable reward (default: :func:`differentiable_reward_fn` on
            ``accelerator.device``).
        prompts: a prompt list (default: ``load_prompts(config.prompts, ...)``).
    """

    def __init__(
        self,
        config: DraftConfig,
        policy: Any = None,
        reward_fn: Callable | None = None,
        prompts: Sequence[str] | None = None,
    ) -> None:
        # (llava_reward and brightness have differentiable versions of their own, built below)
        builtin = config.reward in ("llava_reward", "brightness")
        self.load_prompts_and_check_reward(
            config, prompts, None if reward_fn or builtin else config.reward
        )
        self.setup(config, policy)
        if self.is_flow and config.method == "refl":
            raise ValueError(
                "method='refl' predicts x0 from a DDIM step (SD 1.x/2.x); for an SD 3.x / FLUX "
                "policy use method='draft' (grad_steps = K)."
            )
        self.reward_fn = reward_fn
        # what the error of a reward without a graph names: the callable passed, else the config's
        self._reward_name = getattr(reward_fn, "__name__", None) or config.reward
        if self.reward_fn is None:
            with self.frozen_outside_zero3():
                self.reward_fn = differentiable_reward_fn(
                    config.reward, **self.reward_kwargs(config.reward_kwargs)
                )
        self._checked = False

    def next_batch(self) -> tuple[list[str], list[torch.Generator]]:
        """This process's next micro-batch: the prompts and initial-noise generators of its
        global samples (:meth:`next_sample_ids`). Call on every process once per micro-batch."""
        from alignment.seeding import stream_generator

        cfg = self.config
        prompts, gens = [], []
        for k in self.next_sample_ids():
            g = stream_generator(cfg.seed, "draft_prompt", k)
            prompts.append(self.prompts[int(torch.randint(len(self.prompts), (), generator=g))])
            gens.append(stream_generator(cfg.seed, "draft_noise", k))  # CPU: same on any device
        return prompts, gens

    def refl_stop_step(self, micro_batch: int) -> int:
        """ReFL's stop step for micro-batch ``micro_batch`` of the current optimiser step:
        uniform in the window, from the stream ``(seed, "refl_stop", step, micro_batch)``,
        the same on every process."""
        from alignment.seeding import stream_generator

        lo, hi = self.config.refl_window()
        g = stream_generator(self.config.seed, "refl_stop", self.global_step, micro_batch)
        return lo + int(torch.randint(hi - lo, (), generator=g))

    def compute_loss(
        self,
        prompts: list[str],
        generator: list[torch.Generator] | None = None,
        stop_step: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch: sample ``prompts`` with a graph (initial noise from
        ``generator``, default the global RNG), score, :func:`reward_loss`. ReFL stops at
        ``stop_step`` (default: :meth:`refl_stop_step` ``(0)``)."""
        cfg, acc = self.config, self.accelerator
        stop = None
        if cfg.method == "refl":
            stop = stop_step if stop_step is not None else self.refl_stop_step(0)
        with acc.autocast():
            if self.is_flow:  # the flow policy's sampler keeps a graph through its last K steps
                images = self.policy.sample(
                    prompts,
                    cfg.num_steps,
                    cfg.eta,
                    cfg.guidance_scale,
                    generator=generator,
                    grad=cfg.grad_steps,
                ).images
            else:
                images = sample_with_grad(
                    self.policy,
                    prompts,
                    cfg.num_steps,
                    cfg.grad_steps,
                    cfg.eta,
                    cfg.guidance_scale,
                    generator=generator,
                    use_checkpoint=cfg.checkpoint_unet,
                    stop_step=stop,
                )["images"]
            rewards = self.reward_fn(images, prompts).float()
        if not self._checked:
            if not rewards.requires_grad:
                raise ValueError(
                    f"The reward {self._reward_name!r} is not differentiable (no graph to the "
                    "pixels). Use llava_reward (RewardScorer.as_reward_fn(..., "
                    "differentiable=True)), world_oracle with differentiable=True, brightness, "
                    "or a 'module:function' written in torch."
                )
            self._checked = True
        # a non-finite reward is counted and left out of the loss; none finite: a NaN loss, and
        # the guarded step skips the update
        finite = torch.isfinite(rewards.detach())
        kept = rewards[finite] if finite.any() else rewards
        loss = reward_loss(kept, cfg.loss_type, cfg.reward_margin) * cfg.reward_scale
        info = {
            "loss": loss.item(),
            "reward_mean": kept.mean().item(),
            "reward_std": kept.std().item() if kept.numel() > 1 else 0.0,
            "rewards/nonfinite": float((~finite).sum()),
        }
        if stop is not None:
            info["refl_stop_step"] = float(stop)
        return loss, info

    def evaluate(self) -> float:
        """Mean reward of the policy on fixed prompts and seeds (no graph)."""
        cfg = self.config
        self.unet.eval()
        out = []
        prompts = self.prompts[: cfg.eval_prompts]
        for seed in range(cfg.eval_seeds):
            gens = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(len(prompts))]
            with torch.no_grad(), self.accelerator.autocast():
                s = self.policy.sample(
                    prompts, cfg.num_steps, cfg.eta, cfg.guidance_scale, generator=gens
                )
                out.append(self.reward_fn(s.images.float(), prompts).float().cpu())
        r = torch.cat(out)
        return float(r[torch.isfinite(r)].mean())

    def train(self) -> list[dict[str, float]]:
        """Run (or resume) training; checkpoint, log, export. Returns the per-step history."""
        cfg, acc = self.config, self.accelerator
        self.init_trackers()
        self.maybe_resume()
        if cfg.eval_every and self.global_step == 0:
            self.log({"step": 0, "eval/reward_mean": self.evaluate()})
        bar = self.pbar(
            range(self.global_step, cfg.max_steps),
            desc=cfg.method,
            initial=self.global_step,
            total=cfg.max_steps,
        )
        for _ in bar:
            self.unet.train()
            infos = []
            for a in range(cfg.gradient_accumulation_steps):
                prompts, gens = self.next_batch()
                stop = self.refl_stop_step(a) if cfg.method == "refl" else None
                with acc.accumulate(self.unet):
                    loss, info = self.compute_loss(prompts, gens, stop)
                    self.backward_and_step(loss)
                infos.append(info)
            self.global_step += 1
            record = self.step_record(infos)
            if cfg.eval_every and self.global_step % cfg.eval_every == 0:
                record["eval/reward_mean"] = self.evaluate()
            if self.global_step % cfg.log_every == 0 or "eval/reward_mean" in record:
                self.log(record)
            if cfg.log_images_every and self.global_step % cfg.log_images_every == 0:
                self.log_policy_samples(self.prompts, cfg.num_steps, cfg.eta, cfg.guidance_scale)
            bar.set_postfix(reward=f"{record['reward_mean']:.4g}")
            if self.should_save():
                self.save_checkpoint()
        self.finish()
        return self.history


__all__ = ["DraftConfig", "DraftTrainer"]
