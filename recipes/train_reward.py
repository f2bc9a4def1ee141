"""Train one LLaVA-Reward perspective (YAML config + CLI overrides) and evaluate it.

Tiny CPU run (offline, tiny random LLaVA backbone, synthetic colour-alignment data):
    accelerate launch --config_file recipes/accelerate/zero2.yaml recipes/train_reward.py \
        --config recipes/configs/reward_tiny.yaml --output_dir outputs/reward_tiny
Add a second perspective to the same folder (it keeps the first one):
    accelerate launch --config_file recipes/accelerate/zero2.yaml recipes/train_reward.py \
        --config recipes/configs/reward_tiny.yaml --output_dir outputs/reward_tiny \
        --perspective safety
Real runs (paper settings): recipes/configs/reward_qwen2_5_vl_7b.yaml, reward_phi3_5_vision.yaml,
e.g. with --num_processes 8 --mixed_precision bf16 and --train_file YOUR_DATA.

Every field of reward.training.RewardScriptArguments (backbone, data, LoRA, SkipCA, head) and of
RewardTrainingArguments (transformers.TrainingArguments + perspective, loss_type, tau) can be set
in the YAML file or on the command line. The output folder ends up holding the reward model (one
LoRA adapter + SkipCA + head per perspective), ``eval_report_<perspective>.json`` / ``.md``,
``fixed_scores_<perspective>.json`` and ``checkpoints/<perspective>/checkpoint-N``; load it with
``reward.scorer.RewardScorer.from_pretrained(OUTPUT_DIR)``. Resume with
``--resume_from_checkpoint latest`` (or a checkpoint folder).
"""

from __future__ import annotations

import json
import logging

from alignment.recipe_utils import parse_recipe_args
from reward.training import (
    RewardScriptArguments,
    RewardTrainer,
    RewardTrainingArguments,
    build_reward_model,
    finish_reward_training,
    load_reward_datasets,
)


def main(argv: list[str] | None = None) -> dict | None:
    script, args = parse_recipe_args((RewardScriptArguments, RewardTrainingArguments), argv)
    logging.basicConfig(level=logging.INFO if args.should_log else logging.WARNING)

    model = build_reward_model(script, args)
    train, evald, reports = load_reward_datasets(script, args)
    logging.getLogger("recipes.train_reward").info("data: %s", json.dumps(reports))
    trainer = RewardTrainer(model, args, train_dataset=train, eval_dataset=evald)

    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)  # "latest": the newest

    metrics = finish_reward_training(trainer, evald, script.n_fixed_scores)
    if metrics is not None and trainer.args.should_log:
        print(f"eval accuracy ({args.perspective}): {metrics['accuracy']:.4f}")
    return metrics


if __name__ == "__main__":
    main()
