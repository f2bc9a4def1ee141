"""DRaFT-K / AlignProp / ReFL: fine-tune Stable Diffusion on a differentiable reward.

Tiny CPU run (differentiable toy reward: brightness):
    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/draft_sd15.py \
        --config recipes/configs/draft_tiny.yaml --output_dir OUT --export_dir OUT/export
ReFL instead of DRaFT: add ``--method refl``; AlignProp: ``--grad_steps`` equal to ``num_steps``.
Real run with a LLaVA-Reward model (differentiable, torch preprocessing) on GPUs:
    accelerate launch --config_file recipes/accelerate/zero2.yaml --mixed_precision bf16 \
        recipes/draft_sd15.py --config recipes/configs/draft_sd15_llava_reward.yaml
Resume: add ``--resume_from latest``. Any field of alignment.draft_trainer.DraftConfig overridable.
"""

from __future__ import annotations

from alignment.draft_trainer import DraftConfig, DraftTrainer
from alignment.recipe_utils import parse_recipe_args


def main(argv: list[str] | None = None) -> list[dict]:
    (config,) = parse_recipe_args(DraftConfig, argv)
    return DraftTrainer(config).train()


if __name__ == "__main__":
    main()
