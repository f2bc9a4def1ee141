"""Diffusion-DPO training throughput (pairs/s) with LoRA, through the real trainer code path.

    python bench/dpo.py --tiny     # tiny random pipeline on the CPU (smoke test, seconds)
    python bench/dpo.py            # SD 1.5-shaped random pipeline, 512 px, bf16, LoRA rank 8, GPU

One measured step = ``DPOTrainer.compute_loss`` (policy UNet on the 2B noised latents of B pairs
with a graph, the reference = adapter off without one) + backward + optimiser step. Two figures:
from pre-encoded latents (online pairs, or offline pairs cached as latents) and with the VAE
encoding of the 2B images included (offline pairs read as pixels). Target on an H100: >= 30
pairs/s (the original full-UNet code ran about 3 pairs/s per GPU). Figures go to
bench/results/dpo_{cpu,gpu}.json and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_name, timed, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny pipeline on the CPU")
    ap.add_argument("--batch", type=int, default=None, help="pairs per step (GPU 16, tiny 4)")
    ap.add_argument("--gradient_checkpointing", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    gpu = not args.tiny
    if gpu and not torch.cuda.is_available():
        sys.exit("No CUDA device: run with --tiny for the CPU smoke test.")
    from alignment.dpo_trainer import DPOConfig, DPOTrainer
    from alignment.policy import DiffusionPolicy

    batch = args.batch or (16 if gpu else 4)
    reps = args.reps or (10 if gpu else 3)
    if gpu:
        from ddpo import sd15_shaped_pipeline

        torch.backends.cuda.matmul.allow_tf32 = True
        pipe, res_px, precision = sd15_shaped_pipeline(), 512, "bf16"
    else:
        from alignment.tiny import tiny_sd_pipeline

        pipe, res_px, precision = tiny_sd_pipeline(), 32, "no"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DPOConfig(
            pretrained_model="bench",
            data=str(Path(tmp) / "unused.jsonl"),
            max_steps=10**6,
            train_batch_size=batch,
            lora_rank=8,
            learning_rate=1e-5,
            mixed_precision=precision,
            gradient_checkpointing=args.gradient_checkpointing,
            output_dir=tmp,
            log_with="none",
            progress_bar=False,
            save_every=0,
        )
        weight_dtype = torch.bfloat16 if gpu else torch.float32
        policy = DiffusionPolicy(
            pipe,
            lora_rank=8,
            weight_dtype=weight_dtype,
            device="cuda" if gpu else "cpu",
            gradient_checkpointing=args.gradient_checkpointing,
        )
        trainer = DPOTrainer(cfg, policy=policy, dataset=[None])
        acc = trainer.accelerator
        shape = policy.latent_shape(batch)
        g = torch.Generator(device=acc.device).manual_seed(0)
        lat_w = torch.randn(shape, generator=g, device=acc.device)
        lat_l = torch.randn(shape, generator=g, device=acc.device)
        pixels = torch.rand(2 * batch, 3, res_px, res_px, generator=g, device=acc.device) * 2 - 1
        prompts = ["a photo of a cat on a red sofa"] * batch

        def step() -> None:
            trainer.unet.train()
            with acc.accumulate(trainer.unet):
                loss, _ = trainer.compute_loss(prompts, lat_w, lat_l)
                trainer.backward_and_step(loss)

        vae = policy.vae

        def encode() -> None:
            with torch.no_grad():
                vae.encode(pixels.to(next(vae.parameters()).dtype)).latent_dist.mode()

        t_step = timed(step, warmup=2, reps=reps)
        t_enc = timed(encode, warmup=1, reps=reps)
    res = {
        "device": device_name(),
        "pipeline": "SD 1.5-shaped (random), 512 px" if gpu else "tiny (alignment.tiny), 32 px",
        "precision": precision,
        "lora_rank": 8,
        "pairs_per_step": batch,
        "gradient_checkpointing": args.gradient_checkpointing,
        "step_s": round(t_step, 4),
        "pairs_per_s_from_latents": round(batch / t_step, 2),
        "vae_encode_s": round(t_enc, 4),
        "pairs_per_s_with_vae_encode": round(batch / (t_step + t_enc), 2),
    }
    if gpu:
        res["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    name = "dpo_gpu" if gpu else "dpo_cpu"
    cmd = "python bench/dpo.py" + (" --tiny" if args.tiny else "")
    title = "Diffusion-DPO training throughput" + (" (tiny CPU smoke test)" if args.tiny else "")
    rows = "\n".join(f"| {k} | {v} |" for k, v in res.items())
    md = f"### {title}\n\n`{cmd}` on {res['device']}:\n\n| figure | value |\n|---|---|\n{rows}\n"
    if gpu:
        md += "\nTarget: >= 30 pairs/s on an H100 (original full-UNet code: ~3 pairs/s per GPU).\n"
    write_results(name, res, md)
    print(res)


if __name__ == "__main__":
    main()
