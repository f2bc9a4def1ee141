"""DRaFT-1 step time and peak memory with a 4B MLLM-shaped differentiable reward.

    python bench/draft.py --tiny   # tiny pipeline + tiny LLaVA-Reward on the CPU (smoke test)
    python bench/draft.py          # SD 1.5-shaped random pipeline (512 px, bf16, LoRA rank 8)
                                   # + Phi-3.5-vision-shaped random LLaVA-Reward (~4.1B), GPU

One measured step = ``DraftTrainer.compute_loss`` (DDIM sampling, the last K = 1 step with a
graph through a checkpointed UNet call, checkpointed VAE decode, the reward model's torch
preprocessing and forward with a graph to the pixels) + backward + optimiser step. Figures go to
bench/results/draft_{cpu,gpu}.json and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_name, timed, write_results  # noqa: E402


def build_reward(gpu: bool):
    """A random LLaVA-Reward (bench/score.py's backbone: Phi-3.5-vision-shaped on GPU, small on
    CPU) as a differentiable reward function."""
    from score import build_backbone
    from transformers import LlavaProcessor

    from reward import LlavaRewardModel, RewardScorer
    from reward.testing import LLAVA_CHAT_TEMPLATE

    full, tok, ip = build_backbone(gpu)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, chat_template=LLAVA_CHAT_TEMPLATE)
    model = LlavaRewardModel.from_backbone(
        full, processor=proc, perspectives=("overall",), lora_config={"r": 16, "lora_alpha": 32}
    )
    model.requires_grad_(False)
    scorer = RewardScorer(model, dtype=torch.bfloat16 if gpu else torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    return scorer.as_reward_fn("overall", differentiable=True), n_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU")
    ap.add_argument("--batch", type=int, default=None, help="prompts per step (GPU 2, tiny 2)")
    ap.add_argument("--num_steps", type=int, default=None, help="DDIM steps (GPU 50, tiny 4)")
    ap.add_argument("--grad_steps", type=int, default=1, help="K")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    gpu = not args.tiny
    if gpu and not torch.cuda.is_available():
        sys.exit("No CUDA device: run with --tiny for the CPU smoke test.")
    from alignment.draft_trainer import DraftConfig, DraftTrainer
    from alignment.policy import DiffusionPolicy

    batch = args.batch or 2
    steps = args.num_steps or (50 if gpu else 4)
    reps = args.reps or (3 if gpu else 2)
    if gpu:
        from ddpo import sd15_shaped_pipeline

        torch.backends.cuda.matmul.allow_tf32 = True
        pipe, precision = sd15_shaped_pipeline(), "bf16"
    else:
        from alignment.tiny import tiny_sd_pipeline

        pipe, precision = tiny_sd_pipeline(), "no"
    reward_fn, reward_params = build_reward(gpu)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DraftConfig(
            pretrained_model="bench",
            grad_steps=args.grad_steps,
            num_steps=steps,
            eta=0.0,
            guidance_scale=7.5,
            train_batch_size=batch,
            lora_rank=8,
            learning_rate=1e-4,
            mixed_precision=precision,
            output_dir=tmp,
            log_with="none",
            progress_bar=False,
            save_every=0,
            max_steps=10**6,
        )
        policy = DiffusionPolicy(
            pipe,
            lora_rank=8,
            weight_dtype=torch.bfloat16 if gpu else torch.float32,
            device="cuda" if gpu else "cpu",
        )
        trainer = DraftTrainer(cfg, policy=policy, reward_fn=reward_fn, prompts=["a cat"])
        acc = trainer.accelerator
        prompts = ["a photo of a cat on a red sofa"] * batch
        info: dict = {}

        def step() -> None:
            trainer.unet.train()
            with acc.accumulate(trainer.unet):
                loss, i = trainer.compute_loss(prompts)
                trainer.backward_and_step(loss)
            info.update(i)

        if gpu:
            torch.cuda.reset_peak_memory_stats()
        t = timed(step, warmup=1, reps=reps)
    res = {
        "device": device_name(),
        "pipeline": "SD 1.5-shaped (random), 512 px" if gpu else "tiny (alignment.tiny), 32 px",
        "reward": ("LLaVA-Reward, Phi-3.5-vision-shaped (random)" if gpu else "tiny LLaVA-Reward")
        + f", {reward_params / 1e9:.2f}B params, differentiable",
        "precision": precision,
        "prompts_per_step": batch,
        "ddim_steps": steps,
        "grad_steps_K": args.grad_steps,
        "step_s": round(t, 3),
        "images_per_s": round(batch / t, 3),
        "reward_finite": bool(torch.isfinite(torch.tensor(info.get("reward_mean", float("nan"))))),
    }
    if gpu:
        res["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    name = "draft_gpu" if gpu else "draft_cpu"
    cmd = "python bench/draft.py" + (" --tiny" if args.tiny else "")
    title = "DRaFT-1 step with a differentiable MLLM reward" + (
        " (tiny CPU smoke test)" if args.tiny else ""
    )
    rows = "\n".join(f"| {k} | {v} |" for k, v in res.items())
    md = f"### {title}\n\n`{cmd}` on {res['device']}:\n\n| figure | value |\n|---|---|\n{rows}\n"
    write_results(name, res, md)
    print(res)


if __name__ == "__main__":
    main()
