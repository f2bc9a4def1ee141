"""`make demo`: the whole chain on the bundled tiny world, on the CPU, in minutes.

1. load the tiny text-to-image model pre-trained on the world (``alignment/world/weights/
   tiny-world-sd``) and the tiny LLaVA-Reward trained on the world's pairs for the four
   perspectives (``alignment/world/weights/tiny-world-reward``; ``--reward train`` retrains it);
2. measure the oracle's alignment score on held-out prompts (colour-shape pairs never seen in
   training) and fixed seeds, plus its seed-to-seed noise (the same measure on disjoint seeds);
3. fine-tune the policy with DDPO on the LLaVA-Reward (``--method`` also runs online
   Diffusion-DPO, DRaFT-1 and best-of-N for a comparison table);
4. measure again on the same prompts and seeds, export the tuned pipeline, and write
   ``report.md`` (reward curve, before/after grid, numbers) and ``summary.json``.

    python -m alignment.demo                       # DDPO (the default), ~3 minutes on 2 cores
    python -m alignment.demo --method all          # + online DPO, DRaFT-1, best-of-N
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "world" / "weights"
METHODS = ("ddpo", "dpo_online", "draft", "best_of_n")
#: The oracle's scores reported per model: the factors of its alignment, and fidelity.
PARTS = ("background", "colour", "shape", "position", "fidelity")


@dataclass
class DemoConfig:
    """Settings of the tiny-world demo (YAML via ``--config`` or command-line flags)."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Where everything goes."})
    policy: str = field(
        default=str(WEIGHTS / "tiny-world-sd"), metadata={"help": "Diffusers folder to tune."}
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
    method: str = field(
        default="ddpo", metadata={"help": f"One of {', '.join(METHODS)}, a comma list, or 'all'."}
    )
    epochs: int = field(default=30, metadata={"help": "DDPO epochs."})
    ddpo_kwargs: str = field(
        default="{}",
        metadata={
            "help": "JSON of further DDPOConfig fields for the DDPO run, e.g. "
            '\'{"images_per_prompt": 4, "per_prompt_stat_tracking": true}\'.'
        },
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "DDPO learning rate (LoRA)."})
    num_steps: int = field(default=10, metadata={"help": "DDIM steps (sampling and training)."})
    guidance_scale: float = field(default=3.0, metadata={"help": "Classifier-free guidance."})
    eval_prompts: int = field(default=24, metadata={"help": "Held-out prompts evaluated."})
    eval_seeds: int = field(default=4, metadata={"help": "Seeds per held-out prompt."})
    noise_seed_sets: int = field(
        default=4,
        metadata={"help": "Disjoint seed sets of the base policy for the seed-to-seed noise."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of everything."})


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


def _reward_fn(scorer, cfg: DemoConfig, differentiable: bool = False):
    """The run's reward callable: the scorer's weighted perspectives, or the oracle's alignment
    (``'oracle'``) or one of its parts (``'oracle:<part>'``)."""
    if scorer is None:
        from alignment.world.oracle import oracle_reward

        return oracle_reward(cfg.reward.partition(":")[2] or "alignment")
    return scorer.as_reward_fn(json.loads(cfg.reward_weights), differentiable=differentiable)


def _evaluate(policy, prompts, seeds, cfg) -> dict:
    """Oracle scores of ``policy`` on fixed prompts and seeds: ``{"alignment": Tensor[S, P],
    "parts": {part: mean}}`` (parts: background, colour, shape, position, fidelity)."""
    import torch

    from alignment.ddpo_trainer import evaluate_policy
    from alignment.world.oracle import oracle_scores

    scored: list[dict] = []

    def alignment(images, prompts):  # keeps every part of the oracle's scores
        scored.append(oracle_scores(images, prompts))
        return scored[-1]["alignment"]

    rows = evaluate_policy(policy, alignment, prompts, seeds, cfg.num_steps, cfg.guidance_scale)
    return {
        "alignment": rows,
        "parts": {k: round(float(torch.cat([p[k] for p in scored]).mean()), 4) for k in PARTS},
    }


def _ddpo_overrides(cfg: DemoConfig) -> dict:
    """``cfg.ddpo_kwargs`` parsed and checked against DDPOConfig's fields (the demo's own DDPO
    settings below are the defaults these replace)."""
    from dataclasses import fields

    from alignment.ddpo_trainer import DDPOConfig

    extra = json.loads(cfg.ddpo_kwargs)
    known = {f.name for f in fields(DDPOConfig)}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(
            f"ddpo_kwargs: {unknown} are not DDPOConfig fields; see alignment/ddpo_trainer.py "
            "(e.g. images_per_prompt, per_prompt_stat_tracking, kl_coef, temporal_discount)."
        )
    return extra


def _train(method: str, cfg: DemoConfig, out: Path, train_prompts: list[str], scorer):
    """Fine-tune a fresh LoRA policy with ``method`` on ``scorer``'s reward (None: the oracle);
    return the tuned policy and its history."""
    common = dict(
        pretrained_model=cfg.policy,
        output_dir=str(out / method),
        seed=cfg.seed,
        log_with="tensorboard",
        progress_bar=False,
        mixed_precision="no",
    )
    if method == "ddpo":
        from alignment.ddpo_trainer import DDPOConfig, DDPOTrainer

        settings = dict(
            common,
            num_steps=cfg.num_steps,
            guidance_scale=cfg.guidance_scale,
            num_epochs=cfg.epochs,
            sample_batch_size=16,
            num_batches_per_epoch=2,
            # 4 images of each prompt, advantages against that prompt's own images
            images_per_prompt=4,
            per_prompt_stat_tracking=True,
            stat_min_count=4,
            # weight 0.5^k on denoising step k: the first steps decide colour and layout; the
            # last ones only add gradient noise (at 1.0 the oracle's alignment did not move)
            temporal_discount=0.5,
            train_batch_size=16,
            gradient_accumulation_steps=2,
            timesteps_per_call=cfg.num_steps,
            lora_rank=8,
            lora_target_modules="to_q,to_k,to_v,to_out.0,conv_out",
            learning_rate=cfg.learning_rate,
            clip_range=1e-3,
            save_every=0,
            log_images_every=2,
            export_dir=str(out / "export"),
        )
        settings.update(_ddpo_overrides(cfg))
        trainer = DDPOTrainer(
            DDPOConfig(**settings),
            reward_fn=_reward_fn(scorer, cfg),
            prompts=train_prompts,
        )
    elif method == "dpo_online":
        from alignment.dpo_trainer import DPOConfig, DPOTrainer

        trainer = DPOTrainer(
            DPOConfig(
                **common,
                data="online",
                num_steps=cfg.num_steps,
                guidance_scale=cfg.guidance_scale,
                max_steps=30,
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
    elif method == "draft":
        from alignment.draft_trainer import DraftConfig, DraftTrainer

        trainer = DraftTrainer(
            DraftConfig(
                **common,
                num_steps=cfg.num_steps,
                guidance_scale=cfg.guidance_scale,
                max_steps=30,
                train_batch_size=8,
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
    return trainer.policy, history


def run(cfg: DemoConfig) -> dict:
    import torch

    from alignment.logging_utils import image_grid
    from alignment.policy import DiffusionPolicy
    from alignment.world.grammar import split_scenes

    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = split_scenes()
    train_prompts = split.train_captions
    captions = split.held_out_captions  # evenly spread over the held-out (colour, shape) pairs
    n_eval = min(cfg.eval_prompts, len(captions))
    held = [captions[i * len(captions) // n_eval] for i in range(n_eval)]
    seeds = list(range(cfg.eval_seeds))
    methods = list(METHODS) if cfg.method == "all" else [m.strip() for m in cfg.method.split(",")]

    t0 = time.perf_counter()
    scorer, reward_path = _load_reward(cfg, out)  # once: 'train' would retrain it per method
    base = DiffusionPolicy.from_pretrained(cfg.policy, use_lora=False)
    evaluated = _evaluate(base, held, seeds, cfg)
    before = evaluated["alignment"]
    # seed-to-seed noise: std of the same mean over disjoint seed sets (the base policy)
    means = [before.mean()] + [
        _evaluate(base, held, [100 * k + s for s in seeds], cfg)["alignment"].mean()
        for k in range(1, cfg.noise_seed_sets)
    ]
    noise = torch.stack(means).std().item() if len(means) > 1 else 0.0
    summary: dict = {
        "config": asdict(cfg),
        "held_out_prompts": held,
        "train_prompts": len(train_prompts),
        "seeds": seeds,
        "oracle_alignment_before": before.mean().item(),
        "oracle_alignment_noise": noise,
        "oracle_parts_before": evaluated["parts"],
        "methods": {},
    }
    grid_prompts = held[:: max(1, len(held) // 8)][:8]  # one row of varied held-out prompts
    grid_rows = [("before", _first_images(base, grid_prompts, cfg))]
    for method in methods:
        start = time.perf_counter()
        if method == "best_of_n":
            from alignment.scaling import best_of_n
            from alignment.world.oracle import oracle_alignment

            res = best_of_n(
                base,
                held,
                _reward_fn(scorer, cfg),
                n=4,
                num_steps=cfg.num_steps,
                guidance_scale=cfg.guidance_scale,
                seed=cfg.seed,
            )
            after = oracle_alignment(res.images, held).unsqueeze(0)
            parts, history = None, []
        else:
            policy, history = _train(method, cfg, out, train_prompts, scorer)
            evaluated = _evaluate(policy, held, seeds, cfg)
            after, parts = evaluated["alignment"], evaluated["parts"]
            grid_rows.append((method, _first_images(policy, grid_prompts, cfg)))
        diff = (after - before.mean(0, keepdim=True)) if after.shape[0] == 1 else after - before
        summary["methods"][method] = {
            "oracle_alignment_after": after.mean().item(),
            "gain": after.mean().item() - before.mean().item(),
            "gain_stderr": (diff.std() / diff.numel() ** 0.5).item(),
            "gain_per_seed": (after.mean(1) - before.mean(1)).tolist()
            if after.shape[0] == before.shape[0]
            else None,
            "oracle_parts_after": parts,
            "seconds": round(time.perf_counter() - start, 1),
            "reward_first_epoch": history[0].get("reward_mean") if history else None,
            "reward_last_epoch": history[-1].get("reward_mean") if history else None,
        }
    summary["reward_accuracy_vs_oracle"] = _reward_accuracy(reward_path)
    main = summary["methods"][methods[0]]
    summary["oracle_alignment_after"] = main["oracle_alignment_after"]
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    if (out / "ddpo" / "reward_curve.png").exists():
        shutil.copy(out / "ddpo" / "reward_curve.png", out / "reward_curve.png")
    images = torch.cat([imgs for _, imgs in grid_rows])
    captions = [f"{name}: {p}" for name, _ in grid_rows for p in grid_prompts]
    image_grid(images, captions, cols=8, cell=96).save(out / "before_after.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(_report(summary, methods))
    return summary


def _reward_accuracy(folder: str | None) -> dict | None:
    """Held-out pairwise accuracy against the oracle per perspective (the reward folder's
    ``world_report.json``), or None for the oracle (no folder) / a folder without that report."""
    path = Path(folder) / "world_report.json" if folder else None
    if path is None or not path.is_file():
        return None
    return {k: v["accuracy"] for k, v in json.loads(path.read_text()).items()}


def _first_images(policy, prompts, cfg):
    import torch

    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    with torch.no_grad():
        return policy.sample(prompts, cfg.num_steps, 1.0, cfg.guidance_scale, generator=gens).images


def _report(s: dict, methods: list[str]) -> str:
    rows = "\n".join(
        f"| {m} | {s['oracle_alignment_before']:.3f} | {r['oracle_alignment_after']:.3f} | "
        f"{r['gain']:+.3f} ± {r['gain_stderr']:.3f} | {r['seconds']} |"
        for m, r in s["methods"].items()
    )
    parts = [("base", s["oracle_parts_before"])] + [
        (m, r["oracle_parts_after"]) for m, r in s["methods"].items() if r["oracle_parts_after"]
    ]
    part_rows = "\n".join(
        f"| {name} | " + " | ".join(f"{p[k]:.3f}" for k in PARTS) + " |" for name, p in parts
    )
    acc = s.get("reward_accuracy_vs_oracle")
    acc_line = (
        "Reward model's held-out pairwise accuracy against the oracle: "
        + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
        + "."
        if acc
        else ""
    )
    return f"""# Tiny-world demo

Fine-tuned on the {s["train_prompts"]} train captions; measured on {len(s["held_out_prompts"])}
held-out captions (colour-shape pairs never seen in pre-training or fine-tuning) x seeds
{s["seeds"]}. Oracle alignment in [0, 1] (background x colour x shape x position). Seed-to-seed
noise of the mean (std over {s["config"]["noise_seed_sets"]} disjoint seed sets, base model):
{s["oracle_alignment_noise"]:.3f}. {acc_line}

| method | oracle alignment before | after | gain ± s.e. | seconds |
|---|---|---|---|---|
{rows}

Oracle parts on the same held-out prompts and seeds:

| model | {" | ".join(PARTS)} |
|---|{"---|" * len(PARTS)}
{part_rows}

![reward curve](reward_curve.png)

Before (first row) and after each method (next rows), same prompts and seeds:

![before and after](before_after.png)

Tuned pipeline: `export/` (`StableDiffusionPipeline.from_pretrained("{s["config"]["output_dir"]}/export")`).
"""


def main(argv: list[str] | None = None) -> dict:
    from trl import TrlParser

    (cfg,) = TrlParser(DemoConfig).parse_args_and_config(args=argv)
    summary = run(cfg)
    print(Path(cfg.output_dir, "report.md").read_text())
    return summary


if __name__ == "__main__":
    main()
