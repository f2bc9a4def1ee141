"""DDPO fine-tuning of Stable Diffusion with any registered reward (YAML config + CLI overrides).

Tiny CPU run (offline, about a minute):
    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/ddpo_sd15.py \
        --config recipes/configs/ddpo_tiny.yaml --output_dir outputs/ddpo_tiny
DeepSpeed ZeRO-2 (ZeRO-3: zero3.yaml), any field of alignment.ddpo_trainer.DDPOConfig overridable:
    accelerate launch --config_file recipes/accelerate/zero2.yaml recipes/ddpo_sd15.py \
        --config recipes/configs/ddpo_tiny.yaml --output_dir OUT --export_dir OUT/export
Real run with a trained LLaVA-Reward model on 8 GPUs:
    accelerate launch --config_file recipes/accelerate/zero2.yaml --num_processes 8 \
        --mixed_precision bf16 recipes/ddpo_sd15.py --config recipes/configs/ddpo_sd15_llava_reward.yaml
Resume an interrupted run: add ``--resume_from latest``.
"""

from __future__ import annotations

from alignment.ddpo_trainer import DDPOConfig, DDPOTrainer
from alignment.recipe_utils import parse_recipe_args


def main(argv: list[str] | None = None) -> list[dict]:
    (config,) = parse_recipe_args(DDPOConfig, argv)
    return DDPOTrainer(config).train()


if __name__ == "__main__":
    main()
