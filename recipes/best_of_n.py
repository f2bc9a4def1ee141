"""Inference-time scaling: best-of-N or Feynman-Kac steering with any registered reward.

    python recipes/best_of_n.py --pretrained_model tiny --method best_of_n --n 4 \
        --num_steps 10 --reward brightness --output_dir outputs/bon
    python recipes/best_of_n.py --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 --method fk \
        --n 4 --lmbda 10 --resample_every 5 --reward llava_reward \
        --reward_kwargs '{"path": "outputs/llava_reward", "perspective": "alignment"}'
Writes the best image per prompt and scores.json (every score, UNet and reward evaluations).
Any field of alignment.scaling.ScalingConfig is an option (or put them in --config file.yaml).
"""

from __future__ import annotations

from alignment.recipe_utils import parse_recipe_args
from alignment.scaling import ScalingConfig, run_scaling


def main(argv: list[str] | None = None) -> dict:
    (config,) = parse_recipe_args(ScalingConfig, argv)
    return run_scaling(config)


if __name__ == "__main__":
    main()
