"""Flow-GRPO speed and memory.

CPU mode (default): the GRPO trainer on the tiny SD3 (``alignment.tiny_flow``, 32 px), seconds
per epoch split into sampling / reward / training, full Flow-GRPO (every step an SDE step, all
trained) against Flow-GRPO-Fast (an SDE window of 2 steps, the only ones stored and trained);
median over the epochs after the first (warm-up). Also the memory estimate of SD3.5-M GRPO with
LoRA: parameter counts of the real architectures (built on the meta device) and the activations
a transformer block keeps for backward, counted with ``torch.autograd.graph.saved_tensors_hooks``
on one block of SD3.5-M's width (1536) and scaled linearly in rows x tokens (flash attention keeps
no tokens^2 matrix).

    python bench/grpo.py                    # writes bench/results/grpo_cpu.json and the docs
    python bench/grpo.py --epochs 4 --threads 1

GPU mode: an SD3.5-M-shaped random pipeline (transformer 24 layers x 1536 with dual attention in
layers 0-12, SD3's VAE, CLIP-L, CLIP-G and T5-XXL at their real sizes, tiny tokenizers) at
512 px, bf16, 10 SDE steps with CFG 4.5, LoRA rank 32 on the joint attention, groups of 8: images/s
of sampling, one epoch (sampling + the first 9 of 10 steps trained, KL and EMA on) and the peak
GPU memory, once with the text encoders on the GPU, no checkpointing and AdamW ("plain"), once
with the memory options (prompts cached and text encoders offloaded, gradient checkpointing,
8-bit AdamW when bitsandbytes is installed). Each variant runs in its own process.

    python bench/grpo.py --gpu [--samples 16] [--train_batch 4]
    python bench/grpo.py --gpu --toy        # the same code at a toy size on the CPU (a check)

Figures go to ``bench/results/grpo_{cpu,gpu}.json`` and the GRPO sections of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import RESULTS, write_results  # noqa: E402

PROMPTS = ["a cat", "a dog", "a horse", "a bird", "a fish", "a cow", "a red circle", "a tree"]
TARGETS = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"

#: the tiny CPU settings shared by both runs (Fast adds its window)
TINY = dict(
    num_steps=10,
    guidance_scale=4.5,
    noise_level=0.7,
    sample_batch_size=8,
    num_batches_per_epoch=2,
    images_per_prompt=4,
    train_batch_size=8,
    gradient_accumulation_steps=1,
    timesteps_per_call=1,
    timestep_fraction=1.0,
    lora_rank=8,
    learning_rate=1e-3,
    kl_coef=0.04,
    ema=True,
    ema_update_every=1,
)
FAST = dict(sde_window_size=2, sde_window_hi=5)

#: SD3.5-M's transformer (stabilityai/stable-diffusion-3.5-medium, transformer/config.json)
SD35M = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
TOY = dict(
    SD35M,
    sample_size=16,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=64,
    caption_projection_dim=32,
    pooled_projection_dim=64,
    pos_embed_max_size=16,
    dual_attention_layers=(0,),
)
#: text encoders: (hidden, layers, heads, ffn) of CLIP-L, CLIP-G; T5-XXL (d_model, layers, heads, ffn)
TEXT_REAL = {
    "clip_l": (768, 12, 12, 3072),
    "clip_g": (1280, 32, 20, 5120),
    "t5": (4096, 24, 64, 10240),
}
TEXT_TOY = {"clip_l": (16, 1, 2, 32), "clip_g": (48, 1, 2, 96), "t5": (64, 1, 2, 128)}


# --------------------------------------------------------------------------- CPU mode
def run_tiny(extra: dict, epochs: int) -> dict:
    from alignment.grpo_trainer import GRPOConfig, GRPOTrainer

    cfg = GRPOConfig(
        pretrained_model="tiny-sd3",
        output_dir=tempfile.mkdtemp(prefix="bench-grpo-"),
        reward="brightness",
        num_epochs=epochs,
        save_every=0,
        eval_every=0,
        log_with="none",
        log_images_every=0,
        progress_bar=False,
        seed=0,
        **TINY,
        **extra,
    )
    trainer = GRPOTrainer(cfg, prompts=PROMPTS)
    t0 = time.perf_counter()
    hist = trainer.train()
    total = time.perf_counter() - t0
    keys = {"sampling": "time/sampling", "reward": "time/reward", "training": "time/training"}
    rows = [{k: h[v] for k, v in keys.items()} for h in hist]
    for r in rows:
        r["epoch"] = r["sampling"] + r["reward"] + r["training"]
    rest = rows[1:] or rows
    median = {k: statistics.median(r[k] for r in rest) for k in rows[0]}
    return {"epochs": rows, "median": median, "total_s": total}


def saved_bytes_per_token(dual: bool, dtype_bytes: int = 2) -> float:
    """Bytes an SD3.5-M joint block (width 1536) keeps for backward per row and token, counted
    with ``saved_tensors_hooks`` (each storage once) on 1 row x (64 image + 32 text) tokens, bf16
    sizes; tokens^2-sized tensors (the CPU attention's probabilities) are left out, since flash
    attention on a GPU keeps none."""
    import torch
    from diffusers.models.attention import JointTransformerBlock

    block = JointTransformerBlock(
        dim=1536,
        num_attention_heads=24,
        attention_head_dim=64,
        context_pre_only=False,
        qk_norm="rms_norm",
        use_dual_attention=dual,
    )
    n_img, n_txt = 64, 32
    x = torch.randn(1, n_img, 1536, requires_grad=True)
    c = torch.randn(1, n_txt, 1536, requires_grad=True)
    temb = torch.randn(1, 1536)
    seen: dict[int, int] = {}
    quad = n_img + n_txt
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights and t.shape[-2:] != (quad, quad):
            key = t.untyped_storage().data_ptr()
            seen[key] = t.untyped_storage().nbytes() // t.element_size() * dtype_bytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(hidden_states=x, encoder_hidden_states=c, temb=temb)
    return sum(seen.values()) / (n_img + n_txt)


def memory_estimate(train_batch: int = 9, sample_batch: int = 9, res: int = 512) -> dict:
    """GiB of SD3.5-M Flow-GRPO with LoRA rank 32 on one GPU, per part (see the module)."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    gib = 2**30
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**SD35M)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        text = []
        for key in ("clip_l", "clip_g"):
            h, n, heads, ffn = TEXT_REAL[key]
            cfg = CLIPTextConfig(
                vocab_size=49408,
                hidden_size=h,
                num_hidden_layers=n,
                num_attention_heads=heads,
                intermediate_size=ffn,
                projection_dim=h,
            )
            text.append(CLIPTextModelWithProjection(cfg))
        d, n, heads, ffn = TEXT_REAL["t5"]
        t5cfg = T5Config(
            vocab_size=32128,
            d_model=d,
            num_layers=n,
            num_heads=heads,
            d_ff=ffn,
            feed_forward_proj="gated-gelu",
        )
        text.append(T5EncoderModel(t5cfg))
    # weights and buffers (the 384 x 384 position table is a 226M-entry buffer)
    n_transformer = sum(p.numel() for p in transformer.parameters()) + sum(
        b.numel() for b in transformer.buffers()
    )
    transformer.add_adapter(LoraConfig(r=32, lora_alpha=64, target_modules=TARGETS.split(",")))
    n_lora = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    n_vae = sum(p.numel() for p in vae.parameters())
    n_text = [sum(p.numel() for p in m.parameters()) for m in text]
    tokens = (res // 8 // 2) ** 2 + 77 + 128  # image patches + CLIP 77 + T5 128 text tokens
    rows = 2 * train_batch  # CFG: unconditional and conditional halves
    plain, dual = saved_bytes_per_token(False), saved_bytes_per_token(True)
    per_token_all = 13 * dual + 11 * plain  # the 24 blocks of one forward
    block_input = 1536 * 2  # checkpointing keeps each block's inputs: one bf16 vector per token
    act_full = rows * tokens * per_token_all / gib
    act_ckpt = (rows * tokens * (24 * block_input + dual)) / gib
    return {
        "params": {
            "transformer_B": n_transformer / 1e9,
            "lora_M": n_lora / 1e6,
            "vae_M": n_vae / 1e6,
            "clip_l_M": n_text[0] / 1e6,
            "clip_g_M": n_text[1] / 1e6,
            "t5_xxl_B": n_text[2] / 1e9,
        },
        "settings": {
            "train_batch": train_batch,
            "rows_with_cfg": rows,
            "tokens": tokens,
            "px": res,
        },
        "gib": {
            "transformer_bf16": 2 * n_transformer / gib,
            "vae_bf16": 2 * n_vae / gib,
            "text_encoders_bf16": 2 * sum(n_text) / gib,
            "lora_weights_grads_adamw_fp32": 16 * n_lora / gib,
            "lora_weights_grads_adamw8bit": 10 * n_lora / gib,
            "lora_ema_fp32": 4 * n_lora / gib,
            "activations_no_checkpointing": act_full,
            "activations_checkpointing": act_ckpt,
        },
        "saved_bytes_per_row_token": {"plain_block": plain, "dual_block": dual},
    }


def cpu_mode(opts: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(opts.threads)
    results = {
        "full": run_tiny({}, opts.epochs),
        "fast": run_tiny(FAST, opts.epochs),
    }
    for name, r in results.items():
        m = r["median"]
        print(
            f"{name}: epoch {m['epoch']:.2f} s (sampling {m['sampling']:.2f}, reward "
            f"{m['reward']:.3f}, training {m['training']:.2f})"
        )
    speedup = results["full"]["median"]["training"] / results["fast"]["median"]["training"]
    print(f"Fast / full training time: 1 / {speedup:.1f}")
    return {
        "meta": {
            "settings": {**TINY, "fast": FAST},
            "epochs": opts.epochs,
            "threads": opts.threads,
            "cpu": platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "note": "median over the epochs after the first (warm-up); seconds",
        },
        "results": results,
        "fast_training_speedup": speedup,
        "sd35m_memory_estimate": memory_estimate(),
    }


# --------------------------------------------------------------------------- GPU mode
def sd35m_shaped_pipeline(toy: bool, device: str, dtype):
    """SD3.5-M's architecture with random weights (see the module); ``toy``: tiny sizes."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from alignment.tiny import tiny_clip_tokenizer
    from alignment.tiny_flow import tiny_t5_tokenizer

    sizes = TEXT_TOY if toy else TEXT_REAL
    tok = tiny_clip_tokenizer(max_length=77)
    tok_3 = tiny_t5_tokenizer(max_length=128)
    torch.manual_seed(0)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**(TOY if toy else SD35M)).to(dtype)
        vae_channels = (16, 32) if toy else (128, 256, 512, 512)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
            block_out_channels=vae_channels,
            layers_per_block=1 if toy else 2,
            norm_num_groups=8 if toy else 32,
            latent_channels=16,
            shift_factor=0.0609,
            scaling_factor=1.5305,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).to(dtype)
        clips = []
        for key in ("clip_l", "clip_g"):
            h, n, heads, ffn = sizes[key]
            cfg = CLIPTextConfig(
                vocab_size=len(tok),
                hidden_size=h,
                num_hidden_layers=n,
                num_attention_heads=heads,
                intermediate_size=ffn,
                projection_dim=h,
                max_position_embeddings=77,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            clips.append(CLIPTextModelWithProjection._from_config(cfg, torch_dtype=dtype))
        d, n, heads, ffn = sizes["t5"]
        t5cfg = T5Config(
            vocab_size=len(tok_3),
            d_model=d,
            d_kv=d // heads,
            num_layers=n,
            num_heads=heads,
            d_ff=ffn,
            feed_forward_proj="gated-gelu",
            pad_token_id=tok_3.pad_token_id,
            eos_token_id=tok_3.eos_token_id,
            decoder_start_token_id=tok_3.pad_token_id,
        )
        t5 = T5EncoderModel._from_config(t5cfg, torch_dtype=dtype)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae.eval(),
        text_encoder=clips[0].eval(),
        tokenizer=tok,
        text_encoder_2=clips[1].eval(),
        tokenizer_2=tiny_clip_tokenizer(max_length=77),
        text_encoder_3=t5.eval(),
        tokenizer_3=tok_3,
    )


def gpu_variant(args: dict) -> dict:
    """One GPU-mode variant (``plain`` or ``memory``) in this process."""
    import importlib.util

    import torch

    from alignment.flow_policy import FlowPolicy
    from alignment.grpo_trainer import GRPOConfig, GRPOTrainer
    from alignment.rewards import get_reward_fn

    toy, memory = args["toy"], args["variant"] == "memory"
    device = "cpu" if toy else "cuda"
    dtype = torch.float32 if toy else torch.bfloat16
    cuda = device == "cuda"
    res = 32 if toy else 512
    eight_bit = memory and cuda and importlib.util.find_spec("bitsandbytes") is not None
    policy = FlowPolicy(
        sd35m_shaped_pipeline(toy, device, dtype),
        lora_rank=32,
        weight_dtype=dtype,
        gradient_checkpointing=memory,
        max_sequence_length=128,
        resolution=res,
        device=device,
    )
    samples, tb = args["samples"], args["train_batch"]
    cfg = GRPOConfig(
        pretrained_model="(in memory: SD3.5-M-shaped)",
        output_dir=tempfile.mkdtemp(prefix="bench-grpo-gpu-"),
        reward="brightness",
        num_steps=10,
        guidance_scale=4.5,
        sample_batch_size=8,
        num_batches_per_epoch=samples // 8,
        images_per_prompt=8,
        train_batch_size=tb,
        gradient_accumulation_steps=max(1, samples // tb // 2),
        timestep_fraction=0.99,
        kl_coef=0.04,
        ema=True,
        eval_every=0,
        num_epochs=1,
        cache_prompts=True,
        offload_text_encoders=memory,
        use_8bit_adam=eight_bit,
        mixed_precision="no" if toy else "bf16",
        resolution=res,
        save_every=0,
        log_with="none",
        log_images_every=0,
        progress_bar=False,
    )
    reward = get_reward_fn("brightness")
    trainer = GRPOTrainer(cfg, policy=policy, reward_fn=reward, prompts=PROMPTS)
    acc = trainer.accelerator
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    resident = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    batch = PROMPTS[:1] * 8

    def sample() -> None:
        with torch.no_grad(), acc.autocast():
            policy.sample(batch, 10, 0.7, 4.5, height=res)

    t = time.perf_counter()
    sample()
    sync()
    warmup = time.perf_counter() - t
    n = args["sample_batches"]
    t = time.perf_counter()
    for _ in range(n):
        sample()
    sync()
    images_per_s = 8 * n / (time.perf_counter() - t)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    h = trainer.train()[0]
    epoch_s = time.perf_counter() - t
    return {
        "variant": args["variant"],
        "device": torch.cuda.get_device_name() if cuda else f"CPU (toy, {platform.machine()})",
        "sampling_images_per_s": images_per_s,
        "warmup_s": warmup,
        "epoch_s": epoch_s,
        "epoch_split": {k: h[f"time/{k}"] for k in ("sampling", "reward", "training")},
        "resident_after_setup_gib": resident,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "options": {
            "offload_text_encoders": memory,
            "gradient_checkpointing": memory,
            "use_8bit_adam": eight_bit,
        },
        "settings": {"samples": samples, "train_batch": tb, "px": res, "steps": 10, "trained": 9},
    }


def gpu_mode(opts: argparse.Namespace) -> dict:
    import torch

    if not opts.toy and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device (or --toy for a CPU check at a toy size).")
    out = {}
    for variant in ("plain", "memory"):
        args = {
            "variant": variant,
            "toy": opts.toy,
            "samples": opts.samples,
            "train_batch": opts.train_batch,
            "sample_batches": opts.sample_batches,
        }
        cmd = [sys.executable, __file__, "--_worker", json.dumps(args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            out[variant] = {"error": (proc.stdout + proc.stderr)[-3000:]}
            print(f"{variant}: failed\n{out[variant]['error']}")
            continue
        out[variant] = json.loads(lines[-1][len("RESULT ") :])
        print(json.dumps(out[variant], indent=1))
    return out


# --------------------------------------------------------------------------- report
def cpu_markdown(cpu: dict) -> str:
    s = cpu["meta"]["settings"]
    lines = [
        "### Flow-GRPO epoch: full vs Fast (tiny SD3, CPU)",
        "",
        f"`python bench/grpo.py` ({cpu['meta']['threads']} torch thread on a "
        f"{cpu['meta']['cores']}-core shared machine; median seconds per epoch after a warm-up "
        f"epoch). Tiny SD3 (`alignment.tiny_flow`, 32 px), {s['sample_batch_size']} x "
        f"{s['num_batches_per_epoch']} images per epoch in groups of {s['images_per_prompt']}, "
        f"{s['num_steps']} steps with CFG {s['guidance_scale']}, one transformer call per trained "
        f"step, KL {s['kl_coef']} (a reference call per trained step), EMA. Full: every step an "
        "SDE step and trained; Fast: a 2-step SDE window within the first 5 steps, only it stored "
        "and trained.",
        "",
        "| run | sampling | reward | training | epoch |",
        "|---|---|---|---|---|",
    ]
    for name, r in cpu["results"].items():
        m = r["median"]
        lines.append(
            f"| {name} | {m['sampling']:.2f} | {m['reward']:.3f} | {m['training']:.2f} | "
            f"{m['epoch']:.2f} |"
        )
    lines += ["", f"Fast trains {cpu['fast_training_speedup']:.1f}x faster per epoch."]
    return "\n".join(lines)


def gpu_markdown(gpu: dict) -> str:
    lines = [
        "### Flow-GRPO on an SD3.5-M-shaped pipeline (GPU)",
        "",
        "`python bench/grpo.py --gpu`: random SD3.5-M-shaped pipeline (real text-encoder sizes), "
        "512 px, bf16, 10 SDE steps, CFG 4.5, LoRA rank 32, groups of 8, the first 9 steps "
        "trained with KL and EMA.",
        "",
        "| variant | images/s sampling | epoch (s) | sampling / training (s) | peak GiB |",
        "|---|---|---|---|---|",
    ]
    for name, g in gpu.items():
        if "error" in g:
            lines.append(f"| {name} | failed | | | |")
            continue
        sp = g["epoch_split"]
        lines.append(
            f"| {name} ({g['device']}, {g['settings']['samples']} images, train batch "
            f"{g['settings']['train_batch']}) | {g['sampling_images_per_s']:.2f} | "
            f"{g['epoch_s']:.1f} | {sp['sampling']:.1f} / {sp['training']:.1f} | "
            f"{g['peak_memory_gib']:.1f} |"
        )
    lines += [
        "",
        "`plain`: text encoders on the GPU, no gradient checkpointing, AdamW; `memory`: prompts "
        "cached and text encoders on the CPU, gradient checkpointing, 8-bit AdamW (if "
        "bitsandbytes is installed).",
    ]
    return "\n".join(lines)


def estimate_markdown(est: dict) -> str:
    g, p, s = est["gib"], est["params"], est["settings"]
    base = g["transformer_bf16"] + g["vae_bf16"]
    lora8 = g["lora_weights_grads_adamw8bit"] + g["lora_ema_fp32"]
    lora32 = g["lora_weights_grads_adamw_fp32"] + g["lora_ema_fp32"]
    return "\n".join(
        [
            "### SD3.5-M Flow-GRPO with LoRA: memory estimate (one GPU)",
            "",
            f"Parameter counts of the real architectures (meta device): transformer "
            f"{p['transformer_B']:.2f}B, LoRA rank 32 on the joint attention {p['lora_M']:.1f}M, "
            f"VAE {p['vae_M']:.0f}M, CLIP-L {p['clip_l_M']:.0f}M, CLIP-G {p['clip_g_M']:.0f}M, "
            f"T5-XXL {p['t5_xxl_B']:.2f}B. Activations: bytes a joint block keeps for backward, "
            f"counted on one block of width 1536, for a train batch of {s['train_batch']} with CFG "
            f"({s['rows_with_cfg']} rows) x {s['tokens']} tokens at {s['px']} px.",
            "",
            "| part | GiB |",
            "|---|---|",
            f"| transformer + VAE weights (bf16) | {base:.1f} |",
            f"| text encoders (bf16), unless offloaded | {g['text_encoders_bf16']:.1f} |",
            f"| LoRA weights + grads + AdamW + EMA (fp32) | {lora32:.2f} |",
            f"| the same with 8-bit AdamW | {lora8:.2f} |",
            f"| activations, no checkpointing | {g['activations_no_checkpointing']:.1f} |",
            f"| activations, gradient checkpointing | {g['activations_checkpointing']:.1f} |",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="SD3.5-M-shaped GPU benchmark")
    p.add_argument("--toy", action="store_true", help="GPU mode's code at a toy size on the CPU")
    p.add_argument("--epochs", type=int, default=4, help="CPU: epochs per run (first = warm-up)")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads")
    p.add_argument("--samples", type=int, default=16, help="GPU: images per epoch (x8)")
    p.add_argument("--train_batch", type=int, default=4, help="GPU: train batch (x2 rows, CFG)")
    p.add_argument("--sample_batches", type=int, default=2, help="GPU: batches of 8 timed")
    p.add_argument("--no_doc", action="store_true", help="do not update docs/benchmarks.md")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts._worker:
        print("RESULT " + json.dumps(gpu_variant(json.loads(opts._worker))), flush=True)
        return
    if opts.gpu:
        gpu = gpu_mode(opts)
        if opts.toy:  # a check of the code path, not a figure
            return
        if opts.no_doc:
            (RESULTS / "grpo_gpu.json").write_text(json.dumps(gpu, indent=1) + "\n")
        else:
            write_results("grpo_gpu", gpu, gpu_markdown(gpu))
        return
    cpu = cpu_mode(opts)
    if opts.no_doc:
        (RESULTS / "grpo_cpu.json").write_text(json.dumps(cpu, indent=1) + "\n")
        return
    write_results("grpo_cpu", cpu, cpu_markdown(cpu))
    estimate = cpu["sd35m_memory_estimate"]
    write_results("grpo_sd35m_memory", estimate, estimate_markdown(estimate))


if __name__ == "__main__":
    main()
