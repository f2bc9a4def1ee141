"""`make demo`: the whole chain on the bundled tiny world, on the CPU, in minutes.

1. load the tiny text-to-image models pre-trained on the world (``alignment/world/weights/
   tiny-world-sd3``, SD 3 architecture, and ``tiny-world-sd``, SD 1.5 architecture) and the tiny
   LLaVA-Reward trained on the world's pairs for the four perspectives
   (``alignment/world/weights/tiny-world-reward``; ``--reward train`` retrains it);
2. measure the oracle's alignment score on held-out captions (colour-shape pairs never seen in
   pre-training, at layouts never fine-tuned on) and fixed seeds, plus its seed-to-seed noise
   (the same measure on disjoint seeds), for the base model each method tunes;
3. fine-tune with DRaFT on the LLaVA-Reward's gradient (the default, SD 3 model; ``--method``
   also runs Flow-GRPO and online DPO on it, and DDPO, GRPO, online DPO, DRaFT-1 and best-of-N
   on the SD 1.5 model, for a comparison table);
4. measure again on the same captions and seeds, export the tuned pipeline, and write
   ``report.md`` (reward curve, before/after grid, numbers) and ``summary.json``.

    python -m alignment.demo                       # DRaFT on the SD 3 model, ~1.5 min on 2 cores
    python -m alignment.demo --method all          # every method, ~20 min
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from alignment.world import BUNDLED_WEIGHTS as WEIGHTS

if TYPE_CHECKING:
    import torch

METHODS = (
    "flow_draft",
    "flow_grpo",
    "flow_dpo",
    "ddpo",
    "grpo",
    "dpo_online",
    "draft",
    "best_of_n",
)
#: Methods that tune the flow-matching (SD 3 architecture) world policy, ``cfg.flow_policy``.
FLOW_METHODS = ("flow_draft", "flow_grpo", "flow_dpo")
#: The oracle's scores reported per model: the factors of its alignment, and fidelity.
PARTS = ("background", "colour", "shape", "position", "fidelity")


@dataclass
class DemoConfig:
    """Settings of the tiny-world demo (YAML via ``--config`` or command-line flags)."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Where everything goes."})
    policy: str = field(
        default=str(WEIGHTS / "tiny-world-sd"), metadata={"help": "Diffusers folder to tune."}
    )
    flow_policy: str = field(
        default=str(WEIGHTS / "tiny-world-sd3"),
        metadata={
            "help": "Diffusers StableDiffusion3Pipeline folder that the flow_* methods tune "
            "(the SD 3-architecture world policy)."
        },
    )
    flow_draft_steps: int = field(
        default=120,
        metadata={
            "help": "Optimiser steps of DRaFT on the flow policy (flow_draft; 240 gained no "
            "more than 120)."
        },
    )
    flow_draft_batch: int = field(
        default=16,
        metadata={
            "help": "Images per DRaFT step on the flow policy. 16 gained +0.07 to +0.09 on every "
            "evaluation seed across training seeds; 8 (half the time) gained as much on "
            "average, but one seed of a run as little as +0.02."
        },
    )
    flow_draft_learning_rate: float = field(
        default=3e-4,
        metadata={
            "help": "DRaFT's learning rate on the flow policy (LoRA; at 1e-3 the policy learns "
            "to please the reward more than the oracle)."
        },
    )
    flow_draft_lora_rank: int = field(
        default=8,
        metadata={
            "help": "LoRA rank of DRaFT on the flow policy (alpha = 2 x rank). Ranks 8 to 64 "
            "gave the same held-out alignment within the spread of the LoRA's random start."
        },
    )
    flow_draft_kwargs: str = field(
        default="{}",
        metadata={
            "help": "JSON of further DraftConfig fields for the flow DRaFT run, e.g. "
            '\'{"lora_target_modules": "to_q,to_k,to_v,ff.net.2"}\' or \'{"use_lora": false}\' '
            "(steps, learning rate, rank, batch: their own flags).",
        },
    )
    flow_epochs: int = field(default=20, metadata={"help": "Flow-GRPO epochs (flow_grpo)."})
    flow_learning_rate: float = field(
        default=1e-3,
        metadata={"help": "Learning rate (LoRA) of Flow-GRPO and online DPO on the flow policy."},
    )
    flow_kwargs: str = field(
        default="{}",
        metadata={
            "help": "JSON of further GRPOConfig fields for the Flow-GRPO run, e.g. "
            '\'{"noise_level": 1.0, "global_std": true}\'.'
        },
    )
    reward: str = field(
        default=str(WEIGHTS / "tiny-world-reward"),
        metadata={
            "help": "LLaVA-Reward folder, 'train' (retrain on the world's pairs), 'oracle' "
            "(the world's own alignment score, for comparison) or 'oracle:<part>' (one "
            "factor of it: background, colour, shape or position; for experiments)."
        },
    )
    reward_weights: str = field(
        default='{"alignment": 1.0}',
        metadata={"help": "Perspective weights of the reward as JSON."},
    )
    reward_contrast_tau: float = field(
        default=10.0,
        metadata={
            "help": "Use the LLaVA-Reward contrastively (alignment.rewards.contrastive_reward): "
            "the log-probability, under softmax(r / tau), that an image shows its caption "
            "rather than the caption with one attribute changed, summed over the 4 attributes. "
            "What the reward pays for whatever the caption says (crisp shapes) then cancels. "
            "0: the reward's own score."
        },
    )
    method: str = field(
        default="flow_draft",
        metadata={
            "help": f"One of {', '.join(METHODS)}, a comma list, or 'all'. flow_*: the SD "
            "3-architecture policy (flow_policy); the others: the SD 1.5-architecture one."
        },
    )
    epochs: int = field(
        default=20,
        metadata={
            "help": "DDPO epochs (the held-out oracle alignment did not rise reliably at 15, "
            "20, 30 or 60; alignment/world/weights/README.md, third round)."
        },
    )
    ddpo_kwargs: str = field(
        default="{}",
        metadata={
            "help": "JSON of further DDPOConfig fields for the DDPO run, e.g. "
            '\'{"images_per_prompt": 4, "per_prompt_stat_tracking": true}\'.'
        },
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "DDPO learning rate (LoRA)."})
    dpo_steps: int = field(
        default=30, metadata={"help": "Optimiser steps of online Diffusion-DPO (dpo_online)."}
    )
    num_steps: int = field(default=10, metadata={"help": "DDIM steps (sampling and training)."})
    guidance_scale: float = field(default=3.0, metadata={"help": "Classifier-free guidance."})
    eval_prompts: int = field(
        default=45,
        metadata={
            "help": "Held-out prompts evaluated, evenly spread over the 45 (all of them by "
            "default: a subset of 24 or 16 gave gains of opposite signs for the same policy)."
        },
    )
    eval_seeds: int = field(default=4, metadata={"help": "Seeds per held-out prompt."})
    noise_seed_sets: int = field(
        default=4,
        metadata={"help": "Disjoint seed sets of the base policy for the seed-to-seed noise."},
    )
    eval_every: int = field(
        default=5,
        metadata={
            "help": "Measure the held-out oracle alignment every this many DDPO epochs (the "
            "right panel of training_curves.png; 0: only before and after)."
        },
    )
    curve_seeds: int = field(
        default=1, metadata={"help": "Seeds per held-out prompt in those interim measurements."}
    )
    rl_prompts: str = field(
        default="held_out_pairs",
        metadata={
            "help": "Prompts the policy is fine-tuned on: 'train' (the captions of "
            "pre-training) or 'held_out_pairs' (captions of the held-out colour-shape pairs at "
            "the (position, background) combinations that are not evaluated; the evaluated "
            "captions stay unseen)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of everything."})

    def __post_init__(self) -> None:
        # refused now, not after the base evaluation and the methods before it have run
        unknown = [m for m in self.methods() if m not in METHODS]
        if unknown:
            raise ValueError(
                f"--method {self.method!r}: unknown {', '.join(map(repr, unknown))}; use one of "
                f"{', '.join(METHODS)}, a comma list of them, or 'all'."
            )
        if self.flow_draft_batch < 1:
            raise ValueError(f"flow_draft_batch = {self.flow_draft_batch}: use 1 or more images.")
        if not (math.isfinite(self.reward_contrast_tau) and self.reward_contrast_tau >= 0):
            raise ValueError(
                f"reward_contrast_tau = {self.reward_contrast_tau!r}: use 0 (the reward's own "
                "score) or a temperature > 0."
            )

    def methods(self) -> list[str]:
        """The methods to run, in order."""
        if self.method == "all":
            return list(METHODS)
        return [m.strip() for m in self.method.split(",") if m.strip()]


def _load_reward(cfg: DemoConfig, out: Path):
    """Resolve ``cfg.reward`` once: ``(scorer, folder)``, or ``(None, None)`` for the oracle.
    ``'train'`` trains the world reward into ``out/reward`` first."""
    if cfg.reward == "oracle" or cfg.reward.startswith("oracle:"):
        return None, None
    from reward.scorer import RewardScorer

    path = cfg.reward
    if path == "train":
        from alignment.world.reward_model import train_world_reward

        path = str(train_world_reward(out / "reward"))
    return RewardScorer.from_pretrained(path), path


def _reward_label(scorer, cfg: DemoConfig) -> str:
    """What the training reward is, for the figure's axis."""
    if scorer is None:
        return cfg.reward
    return "LLaVA-Reward contrast" if cfg.reward_contrast_tau > 0 else "LLaVA-Reward (alignment)"


def _reward_fn(scorer, cfg: DemoConfig, differentiable: bool = False):
    """The run's reward callable: the scorer's weighted perspectives, or the oracle's alignment
    (``'oracle'``) or one of its parts (``'oracle:<part>'``)."""
    if scorer is None:
        from alignment.world.oracle import oracle_reward

        return oracle_reward(cfg.reward.partition(":")[2] or "alignment", differentiable)
    fn = scorer.as_reward_fn(json.loads(cfg.reward_weights), differentiable=differentiable)
    if cfg.reward_contrast_tau > 0:
        from alignment.rewards import contrastive_reward
        from alignment.world.grammar import attribute_alternatives

        fn = contrastive_reward(fn, attribute_alternatives, cfg.reward_contrast_tau)
    return fn


def _evaluate(policy, prompts, seeds, cfg, reward=None) -> dict:
    """Oracle scores of ``policy`` on fixed prompts and seeds: ``{"alignment": Tensor[S, P],
    "parts": {part: mean}, "part_rows": {part: Tensor[S, P]}, "reward": Tensor[S, P] | None,
    "images": Tensor[P, 3, H, W], "scores": {key: Tensor[P]}}`` (parts: background, colour,
    shape, position, fidelity; ``reward``: the training reward ``reward(images, prompts)`` of the
    same images, when given; images and scores: the first seed's)."""
    import torch

    from alignment.ddpo_trainer import evaluate_policy
    from alignment.world.oracle import oracle_scores

    scored: list[dict] = []
    rewarded: list[torch.Tensor] = []
    first: list[torch.Tensor] = []

    def alignment(images, prompts):  # keeps every part of the oracle's scores
        scored.append(oracle_scores(images, prompts))
        if reward is not None:
            rewarded.append(torch.as_tensor(reward(images, prompts)).float().cpu())
        if not first:
            first.append(images.detach().float().cpu())
        return scored[-1]["alignment"]

    from alignment.flow_policy import is_flow_policy

    # DDIM at eta 1 (the SDE the SD policies are tuned with); flow policies: the ODE
    eta = 0.0 if is_flow_policy(policy) else 1.0
    rows = evaluate_policy(
        policy, alignment, prompts, seeds, cfg.num_steps, cfg.guidance_scale, eta=eta
    )
    part_rows = {k: torch.stack([p[k].float() for p in scored]) for k in PARTS}
    return {
        "alignment": rows,
        "parts": {k: round(float(v.mean()), 4) for k, v in part_rows.items()},
        "part_rows": part_rows,
        "reward": torch.stack(rewarded) if rewarded else None,
        "images": first[0],
        "scores": scored[0],
    }


def _std(values) -> float:
    """Sample standard deviation (ddof 1) of scalar tensors; 0 for fewer than two."""
    import torch

    return torch.stack(list(values)).std().item() if len(values) > 1 else 0.0


def on_policy_agreement(reward: torch.Tensor, oracle: torch.Tensor, margin: float = 0.1) -> dict:
    """How often the reward orders a policy's own images of one prompt as the oracle does.

    ``reward``, ``oracle``: ``Tensor[S, P]`` (seed ``s``, prompt ``p``). Over the pairs
    ``(s, t)``, ``s < t``, of each prompt whose oracle scores differ by at least ``margin``
    (``|o[s, p] - o[t, p]| >= margin``): ``agreement = mean(sign(r[s, p] - r[t, p]) ==
    sign(o[s, p] - o[t, p]))`` (a reward tie counts as a disagreement). Returns
    ``{"agreement": float | None, "pairs": int}`` (None without such pairs). Unlike the held-out
    accuracy on renders, this is measured where a policy fine-tuned on the reward lives.
    """
    import torch

    if not margin > 0:
        raise ValueError(f"on_policy_agreement: margin={margin!r}; use a margin > 0.")
    if reward.shape != oracle.shape or reward.ndim != 2:
        raise ValueError(
            f"on_policy_agreement: reward {tuple(reward.shape)} and oracle "
            f"{tuple(oracle.shape)} must both be [seeds, prompts]."
        )
    s, t = torch.triu_indices(reward.shape[0], reward.shape[0], offset=1)
    d_oracle = oracle[s] - oracle[t]  # [pairs of seeds, P]
    d_reward = reward[s] - reward[t]
    counted = d_oracle.abs() >= margin
    pairs = int(counted.sum())
    if pairs == 0:
        return {"agreement": None, "pairs": 0}
    agree = (d_reward * d_oracle > 0) & counted
    return {"agreement": agree.sum().item() / pairs, "pairs": pairs}


def _mean_and_stderr(rows) -> dict:
    """``{"mean", "stderr"}`` of a ``Tensor[S, P]`` of scores over its prompt-seed pairs."""
    n = rows.numel()
    se = rows.std().item() / n**0.5 if n > 1 else 0.0
    return {"mean": rows.mean().item(), "stderr": se}


#: Methods whose history has one record per optimiser step (grouped by :func:`draft_epochs`).
_STEP_METHODS = ("flow_draft", "draft")
#: DRaFT-1 on the SD 1.5 policy: images per optimiser step; both DRaFTs: steps per reported epoch.
_DRAFT_BATCH, _DRAFT_EPOCH_STEPS = 8, 8
#: Methods whose run draws training_curves.png (when it is the first method).
_CURVE_METHODS = ("ddpo", "flow_draft")


def draft_epochs(history: list[dict], steps: int) -> list[dict]:
    """Per-step records (``{"step", "reward_mean", "reward_std"}``, each over the same number of
    images) grouped into epochs of ``steps`` steps: ``{"epoch": last step, "reward_mean": mean
    of the step means, "reward_std": pooled std of all the epoch's images}`` with
    ``pooled^2 = mean(std_k^2) + mean((mean_k - mean)^2)`` (population variances; a last, shorter
    group is kept)."""
    import statistics

    out = []
    for i in range(0, len(history), steps):
        block = history[i : i + steps]
        means = [h["reward_mean"] for h in block]
        mean = statistics.fmean(means)
        within = statistics.fmean([h.get("reward_std", 0.0) ** 2 for h in block])
        between = statistics.fmean([(m - mean) ** 2 for m in means])
        out.append(
            {
                "epoch": block[-1]["step"],
                "reward_mean": mean,
                "reward_std": (within + between) ** 0.5,
            }
        )
    return out


def reward_rise(means: list[float], window: int = 5) -> dict:
    """How far the training reward rose: the mean of the last ``window`` per-epoch means against
    the first ``window``, in standard errors.

    ``first = mean(m[:w])``, ``last = mean(m[-w:])``, ``se = sqrt(var(m[:w]) / w + var(m[-w:]) / w)``
    (sample variances, ddof 1, of the per-epoch means: epoch-to-epoch scatter counts as noise),
    ``z = (last - first) / se``. Needs at least ``2 * window`` epochs (``None`` otherwise).
    """
    import statistics

    if window < 2 or len(means) < 2 * window:
        return None
    a, b = list(means[:window]), list(means[-window:])
    first, last = statistics.fmean(a), statistics.fmean(b)
    se = (statistics.variance(a) / window + statistics.variance(b) / window) ** 0.5
    return {
        "first": first,
        "last": last,
        "diff": last - first,
        "stderr": se,
        "z": (last - first) / se if se > 0 else float("inf"),
        "window": window,
    }


def _overrides(text: str, config_cls, flag: str) -> dict:
    """``text`` (JSON) parsed and checked against ``config_cls``'s fields (the demo's own
    settings are the defaults these replace); ``flag`` names the option in errors."""
    from dataclasses import fields

    extra = json.loads(text)
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(
            f"{flag}: {unknown} are not {config_cls.__name__} fields; see "
            f"{config_cls.__module__.replace('.', '/')}.py (e.g. images_per_prompt, kl_coef)."
        )
    return extra


#: DraftConfig fields that --flow_draft_kwargs may not set: the demo's own flags set them, or
#: it uses them beside the trainer (the held-out curve's points, the figure's epochs).
_FLOW_DRAFT_OWN = {
    "max_steps": "--flow_draft_steps",
    "learning_rate": "--flow_draft_learning_rate",
    "lora_rank": "--flow_draft_lora_rank",
    "num_steps": "--num_steps",
    "guidance_scale": "--guidance_scale",
    "train_batch_size": "--flow_draft_batch",
    "gradient_accumulation_steps": "the figure's epochs (8 steps of --flow_draft_batch images)",
    "log_every": "the figure's epochs (8 steps of --flow_draft_batch images)",
}


def _flow_draft_overrides(cfg: DemoConfig) -> dict:
    """``cfg.flow_draft_kwargs`` checked against DraftConfig's fields and :data:`_FLOW_DRAFT_OWN`."""
    from alignment.draft_trainer import DraftConfig

    extra = _overrides(cfg.flow_draft_kwargs, DraftConfig, "flow_draft_kwargs")
    own = sorted(set(extra) & set(_FLOW_DRAFT_OWN))
    if own:
        raise ValueError(
            "flow_draft_kwargs: "
            + "; ".join(f"{k} is set by {_FLOW_DRAFT_OWN[k]}" for k in own)
            + ". Use those instead."
        )
    return extra


def _ddpo_overrides(cfg: DemoConfig) -> dict:
    """``cfg.ddpo_kwargs`` checked against DDPOConfig's fields."""
    from alignment.ddpo_trainer import DDPOConfig

    return _overrides(cfg.ddpo_kwargs, DDPOConfig, "ddpo_kwargs")


def _online_settings(cfg: DemoConfig) -> dict:
    """The rollout, LoRA and optimiser settings DDPO and GRPO share in the demo: 32 samples per
    epoch, 4 images of each prompt, one optimiser step per epoch, LoRA rank 8 (alpha 8)."""
    return dict(
        num_steps=cfg.num_steps,
        guidance_scale=cfg.guidance_scale,
        num_epochs=cfg.epochs,
        sample_batch_size=16,
        num_batches_per_epoch=2,
        images_per_prompt=4,
        train_batch_size=16,
        gradient_accumulation_steps=2,
        timesteps_per_call=cfg.num_steps,
        lora_rank=8,
        lora_alpha=8.0,
        lora_target_modules="to_q,to_k,to_v,to_out.0,conv_out",
        learning_rate=cfg.learning_rate,
        clip_range=1e-3,
        save_every=0,
    )


def _ddpo_settings(cfg: DemoConfig) -> dict:
    """The demo's DDPOConfig fields (beyond model, output and seed), ``cfg.ddpo_kwargs`` applied."""
    settings = dict(
        _online_settings(cfg),
        # advantages against the prompt's own 4 images
        per_prompt_stat_tracking=True,
        stat_min_count=4,
        # weight 0.5^k on denoising step k: the first steps decide colour and layout; the
        # last ones only add gradient noise (at 1.0 the oracle's alignment did not move)
        temporal_discount=0.5,
        log_images_every=2,
    )
    settings.update(_ddpo_overrides(cfg))
    return settings


def _evaluating_ddpo_trainer(evaluate, every: int, last_epoch: int):
    """A :class:`~alignment.ddpo_trainer.DDPOTrainer` that also calls ``evaluate(policy) ->
    dict`` after every ``every``-th epoch before ``last_epoch`` (the caller measures the last one
    itself) and keeps the results in ``trainer.evaluations`` (``{"epoch", **result}``)."""
    from alignment.ddpo_trainer import DDPOTrainer

    class EvaluatingDDPOTrainer(DDPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.evaluations: list[dict] = []

        def train_on_samples(self, samples, advantages):
            info = super().train_on_samples(samples, advantages)
            done = self.epoch + 1  # epochs finished once this update is applied
            if every and done % every == 0 and done < last_epoch:
                self.unet.eval()
                self.evaluations.append({"epoch": done, **evaluate(self.policy)})
            return info

    return EvaluatingDDPOTrainer


def _evaluating_draft_trainer(evaluate, every: int, last_step: int):
    """A :class:`~alignment.draft_trainer.DraftTrainer` that also calls ``evaluate(policy) ->
    dict`` after every ``every``-th optimiser step before ``last_step`` and keeps the results in
    ``trainer.evaluations`` (``{"epoch": step, **result}``, the curve's x being the step)."""
    from alignment.draft_trainer import DraftTrainer

    class EvaluatingDraftTrainer(DraftTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.evaluations: list[dict] = []

        def step_record(self, infos):
            record = super().step_record(infos)
            done = self.global_step  # steps taken, this one included
            if every and done % every == 0 and done < last_step:
                self.unet.eval()
                self.evaluations.append({"epoch": done, **evaluate(self.policy)})
            return record

    return EvaluatingDraftTrainer


def _train(
    method: str,
    cfg: DemoConfig,
    out: Path,
    train_prompts: list[str],
    scorer,
    evaluate=None,
    export: bool = False,
):
    """Fine-tune a fresh LoRA policy with ``method`` on ``scorer``'s reward (None: the oracle);
    return the tuned policy, its history and the interim evaluations (DDPO and DRaFT on the flow
    policy with ``evaluate``: ``evaluate(policy)`` at points of the run). ``export``: write the
    tuned pipeline to ``out/export``."""
    common = dict(
        pretrained_model=cfg.policy,
        output_dir=str(out / method),
        export_dir=str(out / "export") if export else None,
        seed=cfg.seed,
        log_with="tensorboard",
        progress_bar=False,
        mixed_precision="no",
    )
    if method == "ddpo":
        from alignment.ddpo_trainer import DDPOConfig, DDPOTrainer

        settings = dict(common, **_ddpo_settings(cfg))
        trainer_cls = (
            _evaluating_ddpo_trainer(evaluate, cfg.eval_every, settings["num_epochs"])
            if evaluate is not None and cfg.eval_every
            else DDPOTrainer
        )
        trainer = trainer_cls(
            DDPOConfig(**settings),
            reward_fn=_reward_fn(scorer, cfg),
            prompts=train_prompts,
        )
    elif method == "grpo":
        from alignment.grpo_trainer import GRPOConfig, GRPOTrainer

        # GRPO on the SD 1.5-architecture policy (DDIM's SDE at eta = noise_level): DDPO's
        # rollouts, LoRA and learning rate, advantages within groups of 4, KL to the base
        trainer = GRPOTrainer(
            GRPOConfig(
                **common,
                **_online_settings(cfg),
                noise_level=1.0,
                timestep_fraction=1.0,
                kl_coef=0.04,
                ema=False,
                eval_every=0,
            ),
            reward_fn=_reward_fn(scorer, cfg),
            prompts=train_prompts,
        )
    elif method == "flow_grpo":
        from alignment.grpo_trainer import GRPOConfig, GRPOTrainer

        # Flow-GRPO on the SD 3-architecture world policy: SDE sampling at noise level 0.7,
        # groups of 4 images per prompt, KL to the base, LoRA on the joint-attention projections
        online = _online_settings(cfg)
        online.update(num_epochs=cfg.flow_epochs, learning_rate=cfg.flow_learning_rate)
        del online["lora_target_modules"]  # GRPOConfig's default: the joint-attention projections
        settings = dict(
            common,
            pretrained_model=cfg.flow_policy,
            **online,
            noise_level=0.7,
            timestep_fraction=1.0,
            kl_coef=0.01,
            ema=False,
            eval_every=0,
        )
        settings.update(_overrides(cfg.flow_kwargs, GRPOConfig, "flow_kwargs"))
        trainer = GRPOTrainer(
            GRPOConfig(**settings),
            reward_fn=_reward_fn(scorer, cfg),
            prompts=train_prompts,
        )
    elif method in ("dpo_online", "flow_dpo"):
        from alignment.dpo_trainer import DPOConfig, DPOTrainer

        # online Diffusion-DPO: pairs of the policy's own images ranked by the reward (the flow
        # form on the SD 3-architecture policy for flow_dpo)
        policy = cfg.flow_policy if method == "flow_dpo" else cfg.policy
        trainer = DPOTrainer(
            DPOConfig(
                **dict(common, pretrained_model=policy),
                data="online",
                num_steps=cfg.num_steps,
                guidance_scale=cfg.guidance_scale,
                max_steps=cfg.dpo_steps,
                train_batch_size=8,
                images_per_prompt=4,
                prompts_per_refresh=8,
                refresh_every=5,
                learning_rate=1e-3,
                save_every=0,
                eval_every=0,
            ),
            reward_fn=_reward_fn(scorer, cfg),
            prompts=train_prompts,
        )
    elif method == "flow_draft":
        from alignment.draft_trainer import DraftConfig, DraftTrainer
        from alignment.flow_policy import FLOW_LORA_TARGETS

        # DRaFT-K through every Euler step of the SD 3-architecture world policy (K = num_steps,
        # AlignProp's full chain), the LLaVA-Reward's differentiable path, LoRA on the
        # joint-attention projections; the held-out curve at 4 points
        every = max(1, cfg.flow_draft_steps // 4) if evaluate is not None and cfg.eval_every else 0
        trainer_cls = (
            _evaluating_draft_trainer(evaluate, every, cfg.flow_draft_steps)
            if every
            else DraftTrainer
        )
        settings = dict(
            common,
            pretrained_model=cfg.flow_policy,
            num_steps=cfg.num_steps,
            guidance_scale=cfg.guidance_scale,
            max_steps=cfg.flow_draft_steps,
            train_batch_size=cfg.flow_draft_batch,
            grad_steps=cfg.num_steps,
            learning_rate=cfg.flow_draft_learning_rate,
            adam_weight_decay=0.0,
            lora_rank=cfg.flow_draft_lora_rank,
            lora_alpha=2.0 * cfg.flow_draft_lora_rank,
            lora_target_modules=",".join(FLOW_LORA_TARGETS),
            log_every=1,
            save_every=0,
            eval_every=0,
        )
        settings.update(_flow_draft_overrides(cfg))
        trainer = trainer_cls(
            DraftConfig(**settings),
            reward_fn=_reward_fn(scorer, cfg, differentiable=True),
            prompts=train_prompts,
        )
    elif method == "draft":
        from alignment.draft_trainer import DraftConfig, DraftTrainer

        trainer = DraftTrainer(
            DraftConfig(
                **common,
                num_steps=cfg.num_steps,
                guidance_scale=cfg.guidance_scale,
                max_steps=30,
                train_batch_size=_DRAFT_BATCH,
                grad_steps=1,
                learning_rate=1e-3,
                save_every=0,
                eval_every=0,
            ),
            reward_fn=_reward_fn(scorer, cfg, differentiable=True),
            prompts=train_prompts,
        )
    else:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}.")
    history = trainer.train()
    return trainer.policy, history, getattr(trainer, "evaluations", [])


def rl_and_eval_captions(split, rl_prompts: str) -> tuple[list[str], list[str]]:
    """``(fine-tuning captions, evaluation captions)`` of a world split.

    ``'train'``: the split's train captions and all its held-out ones. ``'held_out_pairs'``: the
    held-out (colour, shape) pairs on both sides, split by (position, background): combination
    ``(i, j)`` of position ``i`` and background ``j`` is fine-tuned on when ``i + j`` is even
    (8 of 15; :func:`~alignment.world.grammar.layout_parity`), evaluated otherwise (7 of 15), so
    every position and background is on both sides and no evaluated caption is ever a
    fine-tuning prompt.
    """
    from alignment.world.grammar import layout_parity

    if rl_prompts == "train":
        return split.train_captions, split.held_out_captions
    if rl_prompts != "held_out_pairs":
        raise ValueError(f"rl_prompts={rl_prompts!r}: use 'train' or 'held_out_pairs'.")
    by_parity = ([], [])
    for scene in split.held_out:
        by_parity[layout_parity(scene)].append(scene.caption)
    return by_parity


def run(cfg: DemoConfig) -> dict:
    import torch

    from alignment.world.figures import training_figure, verdict_grid
    from alignment.world.grammar import split_scenes

    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = split_scenes()
    train_prompts, captions = rl_and_eval_captions(split, cfg.rl_prompts)
    n_eval = min(cfg.eval_prompts, len(captions))
    held = [captions[i * len(captions) // n_eval] for i in range(n_eval)]
    seeds = list(range(cfg.eval_seeds))
    curve_seeds = seeds[: max(1, cfg.curve_seeds)]
    methods = cfg.methods()
    _ddpo_overrides(cfg)  # the JSON overrides checked before anything runs
    if "flow_grpo" in methods:
        from alignment.grpo_trainer import GRPOConfig

        _overrides(cfg.flow_kwargs, GRPOConfig, "flow_kwargs")
    if "flow_draft" in methods:
        _flow_draft_overrides(cfg)

    t0 = time.perf_counter()
    scorer, reward_path = _load_reward(cfg, out)  # once: 'train' would retrain it per method
    reward_fn = _reward_fn(scorer, cfg)  # the training reward, also scored on the held-out images
    bases: dict[str, dict] = {}

    def base_of(method: str) -> dict:
        """The base policy a method tunes, measured once: its held-out scores over
        ``noise_seed_sets`` disjoint seed sets (``sets[0]`` on the evaluation seeds)."""
        kind = "flow" if method in FLOW_METHODS else "sd"
        if kind not in bases:
            from alignment.flow_policy import load_frozen_policy

            policy = load_frozen_policy(cfg.flow_policy if kind == "flow" else cfg.policy)
            sets = [_evaluate(policy, held, seeds, cfg, reward_fn)] + [
                _evaluate(policy, held, [100 * k + s for s in seeds], cfg, reward_fn)
                for k in range(1, cfg.noise_seed_sets)
            ]
            bases[kind] = {
                "kind": kind,
                "policy": policy,
                "sets": sets,
                "before": sets[0]["alignment"],
                # seed-to-seed noise: std of the same mean over the disjoint seed sets
                "noise": _std([e["alignment"].mean() for e in sets]),
                "parts_noise": {k: _std([e["part_rows"][k].mean() for e in sets]) for k in PARTS},
            }
        return bases[kind]

    first = base_of(methods[0])
    summary: dict = {
        "config": asdict(cfg),
        "held_out_prompts": held,
        "train_prompts": len(train_prompts),
        "seeds": seeds,
        "oracle_alignment_before": first["before"].mean().item(),
        "oracle_alignment_noise": first["noise"],
        "oracle_parts_before": first["sets"][0]["parts"],
        "oracle_parts_noise": first["parts_noise"],
        "reward_before": first["sets"][0]["reward"].mean().item(),
        "reward_noise": _std([e["reward"].mean() for e in first["sets"]]),
        # over the base's images of every seed set (16 per prompt at the defaults)
        "reward_on_policy_agreement": on_policy_agreement(
            torch.cat([e["reward"] for e in first["sets"]]),
            torch.cat([e["alignment"] for e in first["sets"]]),
        ),
        "methods": {},
    }
    # the grid's columns: 8 varied held-out prompts, images of the first evaluation seed
    cols = list(range(0, len(held), max(1, len(held) // 8)))[:8]
    grid = [(_BEFORE[first["kind"]], first["sets"][0])]

    def interim(policy) -> dict:  # the held-out curve during training (the curve's seeds only)
        return _mean_and_stderr(_evaluate(policy, held, curve_seeds, cfg)["alignment"])

    for method in methods:
        base = base_of(method)
        sets, before = base["sets"], base["before"]
        if not any(label == _BEFORE[base["kind"]] for label, _ in grid):
            grid.append((_BEFORE[base["kind"]], sets[0]))
        start = time.perf_counter()
        evaluations: list[dict] = []
        if method == "best_of_n":
            from alignment.scaling import best_of_n
            from alignment.world.oracle import oracle_alignment

            res = best_of_n(
                base["policy"],
                held,
                reward_fn,
                n=4,
                num_steps=cfg.num_steps,
                guidance_scale=cfg.guidance_scale,
                seed=cfg.seed,
            )
            after = oracle_alignment(res.images, held).unsqueeze(0)
            parts, part_gains, history, reward_after = None, None, [], None
        else:
            policy, history, evaluations = _train(
                method, cfg, out, train_prompts, scorer, interim, export=method == methods[0]
            )
            evaluated = _evaluate(policy, held, seeds, cfg, reward_fn)
            after, parts = evaluated["alignment"], evaluated["parts"]
            reward_after = evaluated["reward"]
            part_gains = {  # per seed: the mean over the prompts, after - before
                k: (v.mean(1) - sets[0]["part_rows"][k].mean(1)).tolist()
                for k, v in evaluated["part_rows"].items()
            }
            grid.append((f"after {_LABELS.get(method, method)}", evaluated))
        diff = (after - before.mean(0, keepdim=True)) if after.shape[0] == 1 else after - before
        if method in _STEP_METHODS:  # DRaFT logs every step: grouped into epochs
            history = draft_epochs(history, _DRAFT_EPOCH_STEPS)
        rewards = [h["reward_mean"] for h in history if "reward_mean" in h]
        summary["methods"][method] = {
            "policy": cfg.flow_policy if base["kind"] == "flow" else cfg.policy,
            "oracle_alignment_before": before.mean().item(),
            "oracle_alignment_noise": base["noise"],
            "oracle_parts_before": sets[0]["parts"],
            "oracle_alignment_after": after.mean().item(),
            "gain": after.mean().item() - before.mean().item(),
            "gain_stderr": (diff.std() / diff.numel() ** 0.5).item(),
            "gain_per_seed": (after.mean(1) - before.mean(1)).tolist()
            if after.shape[0] == before.shape[0]
            else None,
            "oracle_parts_after": parts,
            "part_gain_per_seed": part_gains,
            # the training reward on the held-out images, after - before, per seed
            "reward_after": None if reward_after is None else reward_after.mean().item(),
            "reward_on_policy_agreement_after": None
            if reward_after is None
            else on_policy_agreement(reward_after, after),
            "reward_gain_per_seed": None
            if reward_after is None
            else (reward_after.mean(1) - sets[0]["reward"].mean(1)).tolist(),
            "seconds": round(time.perf_counter() - start, 1),
            "reward_first_epoch": rewards[0] if rewards else None,
            "reward_last_epoch": rewards[-1] if rewards else None,
            "reward_rise": reward_rise(rewards),
            "held_out_curve": [
                {"epoch": 0, **_mean_and_stderr(before[: len(curve_seeds)])},
                *evaluations,
                {
                    "epoch": history[-1]["epoch"] if method in _STEP_METHODS else len(history),
                    **_mean_and_stderr(after[: len(curve_seeds)]),
                },
            ]
            if history and after.shape[0] == before.shape[0]
            else None,
        }
        if method == methods[0] and method in _CURVE_METHODS and history:
            per_step = method in _STEP_METHODS
            training_figure(
                history,
                summary["methods"][method]["held_out_curve"],
                out / "training_curves.png",
                reward_label=_reward_label(scorer, cfg),
                samples_per_epoch=cfg.flow_draft_batch * _DRAFT_EPOCH_STEPS
                if per_step
                else _ddpo_settings(cfg)["sample_batch_size"]
                * _ddpo_settings(cfg)["num_batches_per_epoch"],
                x_label=f"optimiser step (epoch = {_DRAFT_EPOCH_STEPS} steps, "
                f"{cfg.flow_draft_batch * _DRAFT_EPOCH_STEPS} images)"
                if per_step
                else "epoch",
            )
    summary["reward_accuracy_vs_oracle"] = _reward_accuracy(reward_path)
    summary["reward_accuracy_per_mismatch"] = _reward_accuracy(reward_path, "per_mismatch")
    main = summary["methods"][methods[0]]
    summary["oracle_alignment_after"] = main["oracle_alignment_after"]
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    verdict_grid(
        [held[j] for j in cols],
        [(label, ev["images"][cols]) for label, ev in grid],
        [{k: v[cols] for k, v in ev["scores"].items()} for _, ev in grid],
    ).save(out / "before_after.png")
    from reward.files import atomic_write_text

    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "report.md", _report(summary, methods))
    return summary


_BEFORE = {"sd": "before (SD 1.5 arch.)", "flow": "before (SD3 arch.)"}
_LABELS = {
    "flow_draft": "DRaFT (SD3)",
    "flow_grpo": "Flow-GRPO (SD3)",
    "flow_dpo": "online DPO (SD3)",
    "ddpo": "DDPO",
    "grpo": "GRPO",
    "dpo_online": "online DPO",
    "draft": "DRaFT-1",
}


def _reward_accuracy(folder: str | None, key: str = "accuracy") -> dict | None:
    """From the reward folder's ``world_report.json``: held-out pairwise accuracy against the
    oracle per perspective (``key="accuracy"``), or the alignment perspective's per kind of
    mismatch (``key="per_mismatch"``: background, colour, shape, position). None for the oracle
    (no folder) or a folder without that report."""
    path = Path(folder) / "world_report.json" if folder else None
    if path is None or not path.is_file():
        return None
    report = json.loads(path.read_text())
    if key == "accuracy":
        return {k: v["accuracy"] for k, v in report.items()}
    return report.get("alignment", {}).get(key)


_PROMPTS_LINE = {
    "train": "Fine-tuned on the {n} train captions; measured on {m} held-out captions "
    "(colour-shape pairs never seen in pre-training or fine-tuning)",
    "held_out_pairs": "Fine-tuned on {n} captions of the held-out colour-shape pairs (never seen "
    "in pre-training) at 8 of the 15 (position, background) layouts; measured on the {m} "
    "captions of those pairs at the other 7 layouts (never a fine-tuning prompt)",
}


def _report(s: dict, methods: list[str]) -> str:
    rows = "\n".join(
        f"| {m} | {r['oracle_alignment_before']:.3f} | {r['oracle_alignment_after']:.3f} | "
        f"{r['gain']:+.3f} ± {r['gain_stderr']:.3f} | "
        + (", ".join(f"{g:+.3f}" for g in r["gain_per_seed"]) if r["gain_per_seed"] else "")
        + f" | {r['seconds']} |"
        for m, r in s["methods"].items()
    )
    parts = [("base", s["oracle_parts_before"])] + [
        (m, r["oracle_parts_after"]) for m, r in s["methods"].items() if r["oracle_parts_after"]
    ]
    part_rows = "\n".join(
        f"| {name} | " + " | ".join(f"{p[k]:.3f}" for k in PARTS) + " |" for name, p in parts
    )
    acc, kinds = s.get("reward_accuracy_vs_oracle"), s.get("reward_accuracy_per_mismatch")
    acc_line = (
        "Reward model's held-out pairwise accuracy against the oracle: "
        + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
        + (
            "; alignment pairs that differ in one attribute only: "
            + ", ".join(f"{k} {v:.3f}" for k, v in kinds.items())
            if kinds
            else ""
        )
        + "."
        if acc
        else ""
    )
    agree = s.get("reward_on_policy_agreement") or {}
    if agree.get("agreement") is not None and not s["config"]["reward"].startswith("oracle"):
        acc_line += (
            f" On the base policy's own images (pairs of one prompt whose oracle alignment differs "
            f"by >= 0.1) the training reward orders {agree['agreement']:.3f} of "
            f"{agree['pairs']} pairs as the oracle does."
        )
    cfg = s["config"]
    tau = cfg.get("reward_contrast_tau", 0)
    reward_line = (
        f"Training reward: the oracle ({cfg['reward']})."
        if cfg["reward"].startswith("oracle")
        else f"Training reward: the LLaVA-Reward {cfg['reward_weights']}"
        + (
            f", used contrastively (tau {tau:g}: log-probability that the image shows its "
            "caption rather than the caption with one attribute changed, summed over the four)."
            if tau > 0
            else "."
        )
    )
    rise_lines = "".join(
        f"\n- {m}: training reward, mean of the first {r['reward_rise']['window']} epochs "
        f"{r['reward_rise']['first']:.3f} -> last {r['reward_rise']['window']} "
        f"{r['reward_rise']['last']:.3f} ({r['reward_rise']['z']:.1f} standard errors)"
        for m, r in s["methods"].items()
        if r.get("reward_rise")
    )
    curve = "![training curves](training_curves.png)\n\n" if methods[0] in _CURVE_METHODS else ""
    return f"""# Tiny-world demo

{_PROMPTS_LINE[s["config"]["rl_prompts"]].format(n=s["train_prompts"], m=len(s["held_out_prompts"]))} x seeds
{s["seeds"]}. Oracle alignment in [0, 1] (background x colour x shape x position). Seed-to-seed
noise of the mean (std over {s["config"]["noise_seed_sets"]} disjoint seed sets, base model):
{s["oracle_alignment_noise"]:.3f}. {acc_line} {reward_line}

| method | oracle alignment before | after | gain ± s.e. | gain per seed | seconds |
|---|---|---|---|---|---|
{rows}
{rise_lines}

Oracle parts on the same held-out prompts and seeds:

| model | {" | ".join(PARTS)} |
|---|{"---|" * len(PARTS)}
{part_rows}

{curve}Before (first row) and after each method (next rows), same prompts and seeds:

![before and after](before_after.png)

Tuned pipeline of {methods[0]}: `export/`
(`{"StableDiffusion3Pipeline" if methods[0] in FLOW_METHODS else "StableDiffusionPipeline"}.from_pretrained("{s["config"]["output_dir"]}/export")`).
"""


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser

    (cfg,) = TrlParser(DemoConfig).parse_args_and_config(args=argv)
    summary = run(cfg)
    print(Path(cfg.output_dir, "report.md").read_text())
    return summary


if __name__ == "__main__":
    main()
