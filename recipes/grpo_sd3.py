"""Flow-GRPO fine-tuning of SD 3.x / FLUX (or GRPO on SD 1.x) with any registered reward.

Tiny CPU run (a tiny SD3 built in code, offline, under 2 minutes):
    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/grpo_sd3.py \
        --config recipes/configs/grpo_tiny.yaml --output_dir outputs/grpo_tiny
DeepSpeed ZeRO-2 (ZeRO-3: zero3.yaml) with the export (a diffusers folder, LoRA merged, plus the
LoRA file); any field of alignment.grpo_trainer.GRPOConfig can be overridden:
    accelerate launch --config_file recipes/accelerate/zero2.yaml recipes/grpo_sd3.py \
        --config recipes/configs/grpo_tiny.yaml --output_dir OUT --export_dir OUT/export
Flow-GRPO-Fast (2 SDE steps, the rest ODE): add --sde_window_size 2 --sde_window_hi 5.
SD3.5-M with a trained LLaVA-Reward model on 8 GPUs (PickScore: grpo_sd35m_pickscore_style.yaml;
FLUX.1-dev: grpo_flux_llava_reward.yaml):
    accelerate launch --config_file recipes/accelerate/zero2.yaml --num_processes 8 \
        --mixed_precision bf16 recipes/grpo_sd3.py --config recipes/configs/grpo_sd35m_llava_reward.yaml
One 24 GB GPU: add --num_processes 1 --gradient_checkpointing --use_8bit_adam (README, Flow-GRPO).
Resume an interrupted run: add ``--resume_from latest``.
"""

from __future__ import annotations

from alignment.grpo_trainer import GRPOConfig, GRPOTrainer
from alignment.recipe_utils import parse_recipe_args


def main(argv: list[str] | None = None) -> list[dict]:
    (config,) = parse_recipe_args(GRPOConfig, argv)
    return GRPOTrainer(config).train()


if __name__ == "__main__":
    main()
