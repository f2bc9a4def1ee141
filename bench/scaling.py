"""Best-of-N against Feynman-Kac steering at equal UNet evaluations (toy reward: brightness).

    python bench/scaling.py                                         # tiny random pipeline (CPU)
    python bench/scaling.py --model alignment/world/weights/tiny-world-sd --lmbda 20

For N = K in {2, 4, 8}: the mean over prompts of the best image's reward for best-of-N and FK
steering (same seeds, same steps, so the same UNet evaluations; FK also scores the predicted
clean image at each resampling step: ``reward_evals``). Figures go to
bench/results/scaling_<model>.json and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_name, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' or a diffusers folder")
    ap.add_argument("--lmbda", type=float, default=None, help="FK temperature (tiny: 1000)")
    ap.add_argument("--num_steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args()
    from alignment.draft import mean_brightness
    from alignment.policy import DiffusionPolicy
    from alignment.prompts import SHORT_PROMPTS
    from alignment.scaling import best_of_n, fk_steering

    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = DiffusionPolicy.from_pretrained(args.model, use_lora=False, device=device)
    if args.model == "tiny":
        prompts, lmbda = list(SHORT_PROMPTS[: args.prompts]), args.lmbda or 1000.0
    else:
        import random

        from alignment.world.grammar import split_scenes

        prompts = split_scenes(0).train_captions
        random.Random(3).shuffle(prompts)
        prompts, lmbda = prompts[: args.prompts], args.lmbda or 20.0
    kw = dict(num_steps=args.num_steps, eta=1.0, guidance_scale=3.0, seed=0)
    one = best_of_n(policy, prompts, mean_brightness, n=1, **kw)
    rows, res = (
        [],
        {
            "device": device_name(),
            "model": args.model,
            "lmbda": lmbda,
            "prompts": len(prompts),
            "n1_mean_reward": round(float(one.best_scores.mean()), 4),
        },
    )
    for n in (2, 4, 8):
        b = best_of_n(policy, prompts, mean_brightness, n=n, **kw)
        f = fk_steering(
            policy, prompts, mean_brightness, num_particles=n, lmbda=lmbda, resample_every=2, **kw
        )
        r = {
            "n": n,
            "best_of_n": round(float(b.best_scores.mean()), 4),
            "fk_best": round(float(f.best_scores.mean()), 4),
            "fk_all_particles": round(float(f.scores.mean()), 4),
            "unet_evals": b.unet_evals,
            "reward_evals_bon": b.reward_evals,
            "reward_evals_fk": f.reward_evals,
        }
        assert b.unet_evals == f.unet_evals
        res[f"n{n}"] = r
        rows.append(
            f"| {n} | {r['best_of_n']} | {r['fk_best']} | {r['fk_all_particles']} | "
            f"{r['unet_evals']} | {r['reward_evals_bon']} / {r['reward_evals_fk']} |"
        )
    name = "scaling_" + ("tiny" if args.model == "tiny" else Path(args.model).name)
    md = (
        f"### Best-of-N vs FK steering at equal UNet evaluations ({args.model})\n\n"
        f"`python bench/scaling.py --model {args.model}` on {res['device']}: mean brightness of "
        f"the best image over {len(prompts)} prompts, {args.num_steps} DDIM steps (eta 1, CFG 3), "
        f"FK lambda {lmbda}, potential diff, resampling every 2 steps in [20%, 90%) of the steps. "
        f"N = 1: {res['n1_mean_reward']}.\n\n"
        "| N = K | best-of-N | FK (best particle) | FK (all particles) | UNet evals (each) | "
        "reward evals BoN / FK |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    write_results(name, res, md)
    print(res)


if __name__ == "__main__":
    main()
