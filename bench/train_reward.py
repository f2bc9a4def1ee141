"""Speed and memory of one LLaVA-Reward LoRA training step through the real RewardTrainer.

    python bench/train_reward.py            # GPU: Phi-3.5-vision-shaped random model (4.1B),
                                            # LoRA rank 128 on every LM linear, projector copy,
                                            # SkipCA, gradient checkpointing, bf16, ZeRO-2, 1 GPU
    python bench/train_reward.py --tiny     # CPU smoke test of the same code path (seconds)

The backbone is a random LLaVA-wired CLIP ViT-L/14-336 + Phi-3-mini (the shapes of
Phi-3.5-vision-instruct; 576 image tokens per image) built from a config in code: nothing is
downloaded. A batch of ``--batch-size`` pairs is ``2 x batch-size`` sequences (chosen, rejected).
After ``--warmup`` steps, ``--steps`` optimiser steps are timed (median); samples/s counts pairs.
DeepSpeed ZeRO-2 (ds_configs/zero2.json) runs in this one process (no launcher needed).
Figures go to bench/results/train_reward_{gpu,cpu}.json and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, device_name, write_results  # noqa: E402

from reward.modeling import LlavaRewardModel  # noqa: E402
from reward.testing import LLAVA_CHAT_TEMPLATE, phi35_vision_shaped_llava  # noqa: E402
from reward.training import RewardTrainer, RewardTrainingArguments  # noqa: E402


def build_backbone(tiny: bool):
    """A random LLaVA-wired backbone: Phi-3.5-vision-shaped (bf16, CUDA), or small for --tiny."""
    from transformers import LlavaProcessor

    if tiny:
        model, tok, ip = phi35_vision_shaped_llava(tiny=True, tiny_image_size=56)
    else:
        model, tok, ip = phi35_vision_shaped_llava(device="cuda", dtype=torch.bfloat16)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, chat_template=LLAVA_CHAT_TEMPLATE)
    return model.train(), proc


class Pairs(torch.utils.data.Dataset):
    """``n`` synthetic pairs: a ~64-word caption and two 512x512 images of different colours."""

    WORDS = [
        "a",
        "photo",
        "of",
        "a",
        "red",
        "circle",
        "on",
        "the",
        "left",
        "of",
        "a",
        "big",
        "blue",
        "square",
        "at",
        "night",
    ]

    def __init__(self, n: int, words: int):
        self.n, self.words = n, words

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        caption = " ".join(self.WORDS[(i + k) % len(self.WORDS)] for k in range(self.words))
        return {
            "prompt": caption,
            "chosen": Image.new("RGB", (512, 512), (200, 40 + i % 50, 40)),
            "rejected": Image.new("RGB", (512, 512), (40, 40 + i % 50, 200)),
            "id": str(i),
        }


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self._t = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small model on the CPU (smoke test)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (GPU: 4)")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (GPU: 128, tiny: 8)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-deepspeed", action="store_true", help="plain Trainer, no ZeRO-2")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("the GPU benchmark needs a CUDA device; use --tiny for the CPU smoke test")
    batch = args.batch_size or (2 if args.tiny else 4)
    rank = args.rank or (8 if args.tiny else 128)
    deepspeed = None if args.no_deepspeed else str(ROOT / "ds_configs" / "zero2.json")
    if deepspeed:  # one process, no launcher: the env a launcher would set
        for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0"}.items():
            os.environ.setdefault(k, v)
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")

    backbone, proc = build_backbone(args.tiny)
    lora = {"r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.05}
    model = LlavaRewardModel.from_backbone(
        backbone, processor=proc, perspectives=("overall",), lora_config=lora
    )
    n_trainable = sum(p.numel() for p in model.set_trainable("overall"))
    n_total = sum(p.numel() for p in model.parameters())
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        targs = RewardTrainingArguments(
            output_dir=tmp,
            perspective="overall",
            per_device_train_batch_size=batch,
            max_steps=args.warmup + args.steps,
            warmup_steps=0,
            bf16=not args.tiny,
            activation_checkpointing=True,
            use_cpu=args.tiny,
            deepspeed=deepspeed,
            save_strategy="no",
            report_to="none",
            logging_steps=1,
            disable_tqdm=True,
            dataloader_num_workers=0 if args.tiny else 4,
            seed=0,
        )
        data = Pairs(batch * (args.warmup + args.steps), words=8 if args.tiny else 64)
        trainer = RewardTrainer(model, targs, train_dataset=data, callbacks=[timer])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    step_s = statistics.median(timer.times[args.warmup :])
    seq = trainer.data_collator([data[0]])["input_ids"].shape[1]
    res = {
        "device": device_name(),
        "model": "random LLaVA-wired CLIP + Phi3"
        + (" (tiny)" if args.tiny else " (Phi-3.5-vision shapes)"),
        "params_total_M": round(n_total / 1e6, 1),
        "params_trainable_M": round(n_trainable / 1e6, 1),
        "lora_rank": rank,
        "pairs_per_step": batch,
        "sequences_per_step": 2 * batch,
        "tokens_per_sequence": int(seq),
        "deepspeed": f"ZeRO-{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
        if trainer.is_deepspeed_enabled
        else "none",
        "bf16": trainer.args.bf16,
        "gradient_checkpointing": bool(model._base.is_activation_checkpointing),
        "step_s_median": round(step_s, 4),
        "samples_per_s": round(batch / step_s, 2),
        "images_per_s": round(2 * batch / step_s, 2),
        "steps_timed": len(timer.times[args.warmup :]),
    }
    if torch.cuda.is_available():
        res["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    name = "train_reward_cpu" if args.tiny else "train_reward_gpu"
    rows = "\n".join(f"| {k} | {v} |" for k, v in res.items())
    cmd = "python bench/train_reward.py" + (" --tiny" if args.tiny else "")
    title = "tiny CPU smoke test" if args.tiny else "GPU, Phi-3.5-vision-shaped"
    md = (
        f"### Reward training step ({title})\n\n`{cmd}` on {res['device']}:\n\n"
        f"| figure | value |\n|---|---|\n{rows}"
    )
    write_results(name, res, md)
    print(md)


if __name__ == "__main__":
    main()
