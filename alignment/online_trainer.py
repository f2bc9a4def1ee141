"""The online-RL loop shared by DDPO and the policy-gradient trainers to come (Flow-GRPO).

One epoch of :class:`OnlineRLTrainerBase`:

1. **Sample** ``num_batches_per_epoch`` batches of ``sample_batch_size`` images per process
   (``images_per_prompt`` of each prompt), keeping every stored transition and its log-prob. The
   prompts and the noise of sample ``g`` of epoch ``e`` come from the streams
   ``stream_generator(seed, "prompts" | "sample", e, g)`` (:mod:`alignment.seeding`), ``g``
   counting over every process: the same on any process count, so a run resumed on another count
   draws defined noise and never epoch 0's again. Rewards of a batch are computed in a worker
   thread (which first makes the process's device its CUDA device) while the next batch samples.
2. **Advantages**: rewards are gathered from every process. A non-finite reward is counted
   (``rewards/nonfinite``), kept out of the statistics and the per-prompt tracker, and gets
   advantage 0; the finite ones go through :meth:`advantage_rule` (per-prompt normalisation,
   :class:`~alignment.ddpo.PerPromptStatTracker`, or batch normalisation), then each process
   takes its own rows.
3. **Policy update**: ``num_inner_epochs`` passes over the shuffled samples in batches of
   ``train_batch_size``; each sample trains ``timestep_fraction`` of its timesteps in a random
   order, ``timesteps_per_call`` of them per forward call. The loss is PPO's clipped surrogate of
   the log-probs of the stored transitions under the current policy (plus ``kl_coef`` times the
   KL to the reference); one optimiser step spans all trained timesteps of
   ``gradient_accumulation_steps`` train batches and is skipped (counted,
   ``train/skipped_steps``) when its loss or gradient is not finite on any process.
4. Metrics reduced over processes, logged per epoch; a captioned sample grid every
   ``log_images_every`` epochs; a checkpoint every ``save_every`` epochs (never of non-finite
   weights); at the end the history, the reward curve and the export.

A subclass supplies the policy-specific parts as small methods: :meth:`sample_batch` (the sampling
call and the transitions to store), :meth:`step_distribution` / :meth:`transition_log_prob` (the
log-prob of a stored transition), :meth:`kl_to_reference`, :meth:`advantage_rule`,
:meth:`timestep_order` / :meth:`timestep_weights`, :meth:`choose_prompts` (how images form
groups) and :meth:`epoch_metrics` (e.g. a held-out evaluation). The policy (SD 1.x/2.x or, with a
config that carries :class:`~alignment.trainer_utils.FlowPolicyOptions`, SD 3.x / FLUX) is built
and prepared by :class:`~alignment.trainer_utils.PolicyTrainerBase`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from alignment.ddpo import (
    PerPromptStatTracker,
    clip_advantages,
    gaussian_kl,
    gaussian_log_prob,
    ppo_clip_loss,
    ppo_stats,
)
from alignment.seeding import stream_generator
from alignment.trainer_utils import (
    PolicyTrainerBase,
    TrainConfig,
    parse_json_kwargs,
    reduce_metrics,
)
from reward.guards import indexed_device, set_thread_device


@dataclass
class OnlineRLConfig(TrainConfig):
    """Settings of an online-RL run: prompts, reward, sampling, advantages, the PPO update."""

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
    num_steps: int = field(default=50, metadata={"help": "Sampling steps."})
    guidance_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance."})
    sample_batch_size: int = field(default=8, metadata={"help": "Images per sampling batch."})
    num_batches_per_epoch: int = field(
        default=4, metadata={"help": "Sampling batches per epoch and process."}
    )
    images_per_prompt: int = field(
        default=1,
        metadata={
            "help": "Images sampled per prompt in a sampling batch (1: every image its own random "
            "prompt, as DDPO). With k > 1 and stat_min_count <= k, each image's advantage "
            "compares it with the other images of its prompt."
        },
    )
    # --- training
    num_epochs: int = field(default=100, metadata={"help": "Epochs (sample + train rounds)."})
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
    adv_clip_max: float = field(default=5.0, metadata={"help": "Clip advantages to +- this."})
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
    compile_unet: bool = field(
        default=False,
        metadata={
            "help": "torch.compile the UNet forward (GPU speed-up; compiling takes a while)."
        },
    )
    channels_last: bool = field(
        default=False, metadata={"help": "Keep the UNet in channels-last memory format."}
    )
    # --- output
    save_every: int = field(
        default=10, metadata={"help": "Checkpoint every N epochs (and at the end); 0: never."}
    )
    log_images_every: int = field(
        default=1, metadata={"help": "Log a captioned sample grid every N epochs (0: never)."}
    )
    num_log_images: int = field(default=8, metadata={"help": "Images in the logged grid."})

    RANGES: ClassVar[dict[str, str]] = {
        "num_steps": ">= 1",
        "guidance_scale": ">= 0",
        "sample_batch_size": ">= 1",
        "num_batches_per_epoch": ">= 1",
        "images_per_prompt": ">= 1",
        "num_epochs": ">= 1",
        "num_inner_epochs": ">= 1",
        "timestep_fraction": "(0, 1]",
        "timesteps_per_call": ">= 1",
        "clip_range": "> 0",
        "adv_clip_max": "> 0",
        "kl_coef": ">= 0",
        "stat_buffer_size": ">= 1",
        "stat_min_count": ">= 1",
        "save_every": ">= 0",
        "log_images_every": ">= 0",
        "num_log_images": ">= 1",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reward_kwargs = parse_json_kwargs(self.reward_kwargs, "reward_kwargs")
        self.check_groups()
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

    def check_groups(self) -> None:
        """The images of one prompt lie in one sampling batch: ``images_per_prompt`` divides
        ``sample_batch_size`` (a trainer whose groups span batches and processes, GRPO,
        replaces this check)."""
        if self.sample_batch_size % self.images_per_prompt:
            raise ValueError(
                f"images_per_prompt ({self.images_per_prompt}) must divide "
                f"sample_batch_size ({self.sample_batch_size})."
            )

    @property
    def num_train_timesteps(self) -> int:
        return max(1, int(self.num_steps * self.timestep_fraction))

    @property
    def calls_per_sample(self) -> int:
        """Forward calls per trained sample (its trained timesteps in chunks)."""
        k = self.num_train_timesteps
        return math.ceil(k / min(k, self.timesteps_per_call))


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


def _cat(items: Sequence[Any]) -> Any:
    """Concatenate per-batch values along the batch: tensors, lists, or a type with ``cat``
    (e.g. a flow policy's prompt-embedding pair)."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(items))
    if isinstance(first, list):
        return [x for item in items for x in item]
    return type(first).cat(list(items))


class OnlineRLTrainerBase(PolicyTrainerBase):
    """Sample -> reward -> gather -> advantages -> PPO update, per epoch (see the module).

    Args:
        config: the run's settings (an :class:`OnlineRLConfig`).
        policy: an existing policy (default: :meth:`build_policy` from the config).
        reward_fn: a reward callable ``fn(images [N, 3, H, W], prompts) -> [N]`` (default:
            ``get_reward_fn(config.reward, device=accelerator.device, **config.reward_kwargs)``).
        prompts: a prompt list (default: ``load_prompts(config.prompts, config.prompt_category)``).
    """

    config: OnlineRLConfig
    step_key: ClassVar[str] = "epoch"
    #: keys of the stored transitions with a time axis (``[N, T, ...]``)
    time_keys: ClassVar[tuple[str, ...]] = ("latents", "next_latents", "log_probs", "timesteps")

    def __init__(
        self,
        config: OnlineRLConfig,
        policy: Any = None,
        reward_fn: Callable | None = None,
        prompts: Sequence[str] | None = None,
    ) -> None:
        from alignment.rewards import get_reward_fn

        self.load_prompts_and_check_reward(config, prompts, None if reward_fn else config.reward)
        if not self.prompts:
            raise ValueError("No prompts to train on.")
        self.setup(
            config,
            policy,
            keep_reference=config.kl_coef > 0,
            accumulation_steps=config.gradient_accumulation_steps * config.calls_per_sample,
        )
        cfg, acc = config, self.accelerator
        if reward_fn is None:
            with self.frozen_outside_zero3():
                reward_fn = get_reward_fn(cfg.reward, **self.reward_kwargs(cfg.reward_kwargs))
        self.reward_fn = reward_fn
        self.stat_tracker = PerPromptStatTracker(cfg.stat_buffer_size, cfg.stat_min_count)
        self.epoch = 0
        self.sampling_batch = 0  # the batch of the epoch being sampled (see sample_epoch)
        # the reward thread works on this process's GPU (resolved here: accelerate's index-less
        # ``cuda`` of a single process means this thread's current device, not the worker's)
        self._pool = (
            ThreadPoolExecutor(
                max_workers=1,
                initializer=set_thread_device,
                initargs=(indexed_device(acc.device),),
            )
            if cfg.async_reward
            else None
        )

    # ------------------------------------------------------------------------------ hooks
    def trained_module(self, policy: Any) -> torch.nn.Module:
        """The base's, a UNet kept in channels-last memory format with ``channels_last``."""
        module = super().trained_module(policy)
        if self.config.channels_last and not self.is_flow:
            module.to(memory_format=torch.channels_last)
        return module

    def use_prepared_module(self, policy: Any, module: Any) -> None:
        """The base's, through ``torch.compile`` with ``compile_unet``."""
        super().use_prepared_module(
            policy, torch.compile(module) if self.config.compile_unet else module
        )

    def _stream_index(self, batch: int) -> int:
        """Sampling batch ``batch`` of this process counted over every process of the epoch."""
        acc = self.accelerator
        return batch * acc.num_processes + acc.process_index

    def choose_prompts(self, batch: int) -> list[str]:
        """The prompts of sampling batch ``batch`` of this epoch: ``sample_batch_size /
        images_per_prompt`` prompts drawn uniformly (with replacement) from the stream
        ``(seed, "prompts", epoch, global batch)``, each repeated ``images_per_prompt`` times."""
        cfg = self.config
        k = cfg.images_per_prompt
        g = stream_generator(cfg.seed, "prompts", self.epoch, self._stream_index(batch))
        chosen = torch.randint(len(self.prompts), (cfg.sample_batch_size // k,), generator=g)
        return [self.prompts[i] for i in chosen.tolist() for _ in range(k)]

    def sample_generators(self, batch: int, size: int) -> list[torch.Generator] | None:
        """One generator per image of sampling batch ``batch``: the stream ``(seed, "sample",
        epoch, global sample index)`` (initial noise and every step's noise), so that an image's
        noise depends on neither the process count nor the global RNG."""
        cfg, acc = self.config, self.accelerator
        first = self._stream_index(batch) * size
        return [
            stream_generator(cfg.seed, "sample", self.epoch, first + i, device=acc.device)
            for i in range(size)
        ]

    def sample_batch(
        self, prompts: list[str], generator: list[torch.Generator] | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Sample one batch: ``(images [B, 3, H, W] in [0, 1], stored)`` where ``stored`` holds per
        sample ``embeds``, and ``latents``, ``next_latents``, ``log_probs`` (``[B, T, ...]``, the
        transitions taken and their log-probs at sampling time) and ``timesteps`` ``[B, T]``.
        Runs under ``no_grad`` and autocast."""
        raise NotImplementedError

    def step_distribution(
        self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``[B, C, h, w]`` and std ``[B, 1, 1, 1]`` of the policy's Gaussian step from
        ``latents`` at ``timesteps`` under the current weights."""
        raise NotImplementedError

    def transition_log_prob(
        self,
        latents: torch.Tensor,
        next_latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log_prob [B], mean, std)`` of the stored transitions ``latents -> next_latents``
        under the current weights (the Gaussian log-density averaged over dimensions)."""
        mean, std = self.step_distribution(latents, timesteps, embeds)
        return gaussian_log_prob(next_latents, mean, std), mean, std

    def kl_to_reference(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: Any,
        mean: torch.Tensor,
        std: torch.Tensor,
    ) -> torch.Tensor:
        """Mean over the batch of the per-step KL between the policy's and the reference's
        Gaussian steps (same std): ``mean_B[ mean_dims (mu - mu_ref)^2 / (2 std^2) ]``."""
        with torch.no_grad(), self.policy.reference():
            ref_mean, _ = self.step_distribution(latents, timesteps, embeds)
        return gaussian_kl(mean, ref_mean, std).mean()

    def timestep_order(self, n: int, steps: int) -> torch.Tensor:
        """``[n, steps]``: per sample, the order in which its timesteps are trained (the first
        ``num_train_timesteps`` are); default a fresh random permutation per sample."""
        device = self.accelerator.device
        return torch.stack([torch.randperm(steps, device=device) for _ in range(n)])

    def timestep_weights(self, order: torch.Tensor, steps: int) -> torch.Tensor | None:
        """Per trained row loss weights ``[n, steps]`` matching ``order`` (None: all 1)."""
        return None

    def advantage_rule(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """Advantages ``[M]`` of ``M`` finite rewards of every process (in process order):
        normalised per prompt (:class:`~alignment.ddpo.PerPromptStatTracker`), or by the batch's
        mean and std with ``per_prompt_stat_tracking`` off."""
        if self.config.per_prompt_stat_tracking:
            return self.stat_tracker.update(prompts, rewards)
        return (rewards - rewards.mean()) / (rewards.std() + 1e-6)

    def epoch_metrics(self) -> dict[str, float]:
        """Further metrics of the epoch just trained (called on every process after its update,
        before the record is logged), e.g. a held-out evaluation; default none."""
        return {}

    # ------------------------------------------------------------------------------ epoch parts
    def sample_epoch(self) -> tuple[dict[str, Any], dict[str, float]]:
        """Sample one epoch (rewards possibly overlapping sampling). Returns the samples
        (stored transitions concatenated over batches, ``prompts``, ``rewards`` ``[N]``,
        ``first_images``) and timings."""
        cfg, acc = self.config, self.accelerator
        self.unet.eval()
        batches: list[dict[str, Any]] = []
        futures: list[Future | _Done] = []
        first_images = None
        t0 = time.perf_counter()
        for b in self.pbar(range(cfg.num_batches_per_epoch), desc="sampling", leave=False):
            self.sampling_batch = b  # for sample_batch hooks that key streams by the batch
            prompts = self.choose_prompts(b)
            with torch.no_grad(), acc.autocast():
                images, stored = self.sample_batch(prompts, self.sample_generators(b, len(prompts)))
            images = images.float()
            if self._pool is not None:
                futures.append(self._pool.submit(_reward_call, self.reward_fn, images, prompts))
            else:
                futures.append(_Done(_reward_call(self.reward_fn, images, prompts)))
            if first_images is None:
                first_images = images
            batches.append({**stored, "prompts": prompts})
        t_sample = time.perf_counter() - t0
        t1 = time.perf_counter()
        results = [f.result() for f in futures]
        t_wait = time.perf_counter() - t1
        samples = {k: _cat([b[k] for b in batches]) for k in batches[0]}
        samples["rewards"] = torch.cat([r for r, _ in results])
        samples["first_images"] = first_images
        timings = {
            "time/sampling": t_sample,
            "time/reward": float(sum(t for _, t in results)),
            "time/reward_wait": t_wait if self._pool is not None else sum(t for _, t in results),
        }
        return samples, timings

    def compute_advantages(
        self, prompts: list[str], rewards: torch.Tensor
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Gather rewards from every process and return this process's advantages ``[N]`` plus
        the gathered rewards (numpy, non-finite ones included). Non-finite rewards get
        advantage 0 and stay out of the statistics and the tracker (:meth:`advantage_rule` sees
        only the finite ones)."""
        acc = self.accelerator
        index = {p: i for i, p in enumerate(self.prompts)}
        ids = torch.tensor([index.get(p, -1) for p in prompts], device=acc.device)
        all_rewards = acc.gather(rewards.to(acc.device)).cpu().numpy()
        all_ids = acc.gather(ids).cpu().numpy()
        finite = np.isfinite(all_rewards)
        adv = np.zeros(all_rewards.shape, dtype=np.float32)
        if finite.any():
            all_prompts = [self.prompts[i] for i in all_ids[finite]]
            adv[finite] = self.advantage_rule(all_prompts, all_rewards[finite])
        adv = torch.as_tensor(adv, dtype=torch.float32).reshape(acc.num_processes, -1)
        return adv[acc.process_index].to(acc.device), all_rewards

    def train_on_samples(self, samples: dict[str, Any], advantages: torch.Tensor) -> dict:
        """The inner epochs of PPO updates on one epoch's samples; returns the metrics averaged
        over this process's updates and then over every process (``loss``, ``approx_kl``,
        ``clipfrac``, and ``kl`` with a KL penalty)."""
        cfg, acc = self.config, self.accelerator
        n, steps = samples["latents"].shape[:2]
        k = cfg.num_train_timesteps
        chunk = min(k, cfg.timesteps_per_call)
        n_chunks = math.ceil(k / chunk)
        keys = ["embeds", *self.time_keys]
        self.unet.train()
        info: dict[str, list[float]] = {"loss": [], "approx_kl": [], "clipfrac": [], "kl": []}
        total = cfg.num_inner_epochs * (n // cfg.train_batch_size) * k
        bar = self.pbar(total=total, desc="training", leave=False)
        for _ in range(cfg.num_inner_epochs):
            perm = torch.randperm(n, device=acc.device)
            data = {key: samples[key][perm] for key in keys}
            adv_all = advantages[perm]
            order = self.timestep_order(n, steps)
            rows = torch.arange(n, device=acc.device)[:, None]
            for key in self.time_keys:
                data[key] = data[key][rows, order]
            weights = self.timestep_weights(order, steps)
            for b in range(0, n, cfg.train_batch_size):
                sl = slice(b, b + cfg.train_batch_size)
                embeds = data["embeds"][sl]
                adv = clip_advantages(adv_all[sl], cfg.adv_clip_max)
                for j0 in range(0, k, chunk):
                    j1 = min(k, j0 + chunk)
                    c = j1 - j0
                    # [b, c, ...] -> [b * c, ...]: c timesteps of each sample in one forward call
                    x = data["latents"][sl, j0:j1].flatten(0, 1)
                    x_next = data["next_latents"][sl, j0:j1].flatten(0, 1)
                    t = data["timesteps"][sl, j0:j1].flatten(0, 1)
                    old_lp = data["log_probs"][sl, j0:j1].flatten(0, 1)
                    emb = embeds[torch.arange(len(adv), device=acc.device).repeat_interleave(c)]
                    a = adv.repeat_interleave(c, dim=0)
                    w = None if weights is None else weights[sl, j0:j1].flatten(0, 1)
                    with acc.accumulate(self.unet):
                        with acc.autocast():
                            log_prob, mean, std = self.transition_log_prob(x, x_next, t, emb)
                            # sum over the chunk's timesteps of the per-timestep PPO loss, scaled
                            # so that the optimiser step averages over all k trained timesteps
                            loss = ppo_clip_loss(a, log_prob, old_lp, cfg.clip_range, w) * c
                            if cfg.kl_coef > 0:
                                kl = self.kl_to_reference(x, t, emb, mean, std)
                                loss = loss + cfg.kl_coef * kl * c
                                info["kl"].append(kl.item())
                            loss = loss * n_chunks / k
                        self.backward_and_step(loss)
                    stats = ppo_stats(log_prob, old_lp, cfg.clip_range)
                    info["loss"].append(loss.item() * k / n_chunks / c)
                    info["approx_kl"].append(stats["approx_kl"].item())
                    info["clipfrac"].append(stats["clipfrac"].item())
                    if acc.sync_gradients:
                        self.global_step += 1
                    bar.update(c)
        bar.close()
        local = {key: float(np.mean(v)) for key, v in info.items() if v}
        return reduce_metrics(acc, local)

    # ------------------------------------------------------------------------------ state
    def checkpoint_index(self) -> int:
        return self.epoch

    def progress_text(self) -> str:
        return f"epoch {self.epoch}"

    def trainer_state(self) -> dict[str, Any]:
        return {
            **super().trainer_state(),
            "epoch": self.epoch,
            "stat_tracker": self.stat_tracker.state_dict(),
        }

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        super().load_trainer_state(state)
        self.epoch = int(state["epoch"])
        self.stat_tracker.load_state_dict(state["stat_tracker"])

    def plot_curves(self) -> None:
        from alignment.logging_utils import plot_reward_curve

        plot_reward_curve(self.history, self.output_dir / "reward_curve.png")

    # ------------------------------------------------------------------------------ loop
    def train(self) -> list[dict[str, float]]:
        """Run (or resume) training; checkpoint, log, export. Returns the per-epoch history."""
        cfg = self.config
        self.init_trackers()
        self.maybe_resume()
        epochs = self.pbar(
            range(self.epoch, cfg.num_epochs),
            desc="epochs",
            initial=self.epoch,
            total=cfg.num_epochs,
        )
        try:
            for _ in epochs:
                samples, timings = self.sample_epoch()
                adv, all_rewards = self.compute_advantages(samples["prompts"], samples["rewards"])
                finite = all_rewards[np.isfinite(all_rewards)]
                t0 = time.perf_counter()
                train_info = self.train_on_samples(samples, adv)
                timings["time/training"] = time.perf_counter() - t0
                extra = self.epoch_metrics()
                record = {
                    "epoch": self.epoch,
                    "reward_mean": float(finite.mean()) if finite.size else float("nan"),
                    "reward_std": float(finite.std()) if finite.size else float("nan"),
                    "global_step": self.global_step,
                    **train_info,
                    **timings,
                    "rewards/nonfinite": float(all_rewards.size - finite.size),
                    **self.guard_metrics(),
                    **extra,
                }
                self.log(record)
                if cfg.log_images_every and self.epoch % cfg.log_images_every == 0:
                    m = min(cfg.num_log_images, samples["first_images"].shape[0])
                    self.log_sample_grid(
                        samples["first_images"][:m],
                        samples["prompts"][:m],
                        samples["rewards"][:m].tolist(),
                        self.epoch,
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
        self.finish()
        return self.history


__all__ = ["OnlineRLConfig", "OnlineRLTrainerBase"]
