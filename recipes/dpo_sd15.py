"""Diffusion-DPO fine-tuning of Stable Diffusion (offline pairs or online AI feedback).

SD 3.x / FLUX too: a ``pretrained_model`` that is a StableDiffusion3Pipeline / FluxPipeline folder
(or hub id), ``tiny-sd3`` or ``tiny-flux`` trains a FlowPolicy with the flow form of the loss
(pairs from its own flow SDE sampler; alignment.dpo_trainer), e.g. (CPU, ~15 s):
    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/dpo_sd15.py \
        --config recipes/configs/dpo_sd3_tiny.yaml --output_dir OUT

Tiny CPU run (offline pairs built from the tiny pipeline's own samples, brighter wins; < 2 min):
    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/dpo_sd15.py \
        --config recipes/configs/dpo_tiny.yaml --output_dir OUT --export_dir OUT/export
DeepSpeed ZeRO-2 (ZeRO-3: zero3.yaml); any field of alignment.dpo_trainer.DPOConfig overridable:
    accelerate launch --config_file recipes/accelerate/zero2.yaml recipes/dpo_sd15.py \
        --config recipes/configs/dpo_tiny.yaml --output_dir OUT
Real runs (GPUs): recipes/configs/dpo_sd15_pickapic.yaml (offline, Pick-a-Pic v2),
recipes/configs/dpo_sd15_online_llava_reward.yaml (online pairs ranked by LLaVA-Reward) and
recipes/configs/dpo_sd35m_online_pickscore.yaml (SD 3.5 Medium, flow form, PickScore).
Resume an interrupted run: add ``--resume_from latest``.
"""

from __future__ import annotations

from alignment.dpo_trainer import DPOConfig, DPOTrainer
from alignment.recipe_utils import parse_recipe_args


def main(argv: list[str] | None = None) -> list[dict]:
    (config,) = parse_recipe_args(DPOConfig, argv)
    return DPOTrainer(config).train()


if __name__ == "__main__":
    main()
