"""DDPO speed: seconds per epoch split into sampling / reward / training.

CPU mode (default): our DDPO trainer side by side with trl==0.23.1's ``DDPOTrainer`` (the last
trl release that had one), on the same tiny pipeline (saved once to a folder both load) and the
same settings. trl 0.23.1 is installed by this script into ``.cache/bench/trl-0.23.1`` with
``pip install --target --no-deps`` (our transformers/diffusers/peft stay untouched) and imported
from there in a subprocess. Each side runs in its own subprocess with the same thread count.

    python bench/ddpo.py                      # tiny CPU comparison, writes docs + JSON
    python bench/ddpo.py --epochs 4 --threads 2

GPU mode: an SD 1.5-shaped random pipeline (512 px, 50 DDIM steps, CFG 5, batch 8, LoRA rank 4,
bf16): sampling images/s and one epoch of 256 samples with all 50 timesteps trained.

    python bench/ddpo.py --gpu [--compile] [--channels_last] [--timesteps_per_call 2]

Figures go to ``bench/results/ddpo_{cpu,gpu}.json`` and a DDPO section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_DIR = ROOT / ".cache" / "bench" / "trl-0.23.1"
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
PROMPTS = ["a cat", "a dog", "a horse", "a bird", "a fish", "a cow"]

# the shared tiny settings (both trainers)
TINY = dict(
    num_steps=10,
    guidance_scale=5.0,
    eta=1.0,
    sample_batch_size=8,
    num_batches_per_epoch=2,
    train_batch_size=4,
    gradient_accumulation_steps=2,
    lora_rank=4,
    learning_rate=3e-4,
)


# --------------------------------------------------------------------------- rewards
def cnn_reward(seed: int = 0):
    """A CPU-heavy stand-in for a learned reward model: a random conv net on 224 px inputs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(64, 3, 7, 7, generator=g) * 0.05
    w2 = torch.randn(128, 64, 3, 3, generator=g) * 0.05
    w3 = torch.randn(256, 128, 3, 3, generator=g) * 0.05

    def fn(images, prompts):
        with torch.no_grad():
            x = torch.nn.functional.interpolate(images.float().cpu(), size=224, mode="bilinear")
            x = torch.relu(torch.nn.functional.conv2d(x, w1, stride=2, padding=3))
            x = torch.relu(torch.nn.functional.conv2d(x, w2, stride=2, padding=1))
            x = torch.relu(torch.nn.functional.conv2d(x, w3, stride=2, padding=1))
            return x.mean(dim=(1, 2, 3))

    return fn


def make_reward(name: str):
    from alignment.rewards import get_reward_fn

    return cnn_reward() if name == "cnn" else get_reward_fn(name)


# --------------------------------------------------------------------------- workers
def worker_ours(args: dict) -> dict:
    import torch

    torch.set_num_threads(args["threads"])
    from alignment.ddpo_trainer import DDPOConfig, DDPOTrainer

    opts = dict(TINY)
    opts.update(args.get("overrides", {}))
    cfg = DDPOConfig(
        pretrained_model=args["model"],
        output_dir=tempfile.mkdtemp(prefix="bench-ddpo-"),
        num_epochs=args["epochs"],
        save_every=0,
        log_with="none",
        log_images_every=0,
        progress_bar=False,
        seed=0,
        **opts,
    )
    trainer = DDPOTrainer(cfg, reward_fn=make_reward(args["reward"]), prompts=PROMPTS)
    t0 = time.perf_counter()
    hist = trainer.train()
    total = time.perf_counter() - t0
    return {
        "epochs": [
            {
                "sampling": h["time/sampling"],
                "reward": h["time/reward"],
                "reward_wait": h["time/reward_wait"],
                "training": h["time/training"],
            }
            for h in hist
        ],
        "total_s": total,
    }


def worker_trl(args: dict) -> dict:
    import torch

    torch.set_num_threads(args["threads"])
    import trl
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    assert trl.__version__ == "0.23.1", trl.__version__
    reward = make_reward(args["reward"])
    timings: dict[str, list[float]] = {"sampling": [], "reward": [], "training": []}

    def reward_fn(images, prompts, metadata):
        t = time.perf_counter()
        r = reward(images, list(prompts))
        timings["reward"].append(time.perf_counter() - t)
        return r, {}

    rng = iter(range(10**9))

    def prompt_fn():
        return PROMPTS[next(rng) % len(PROMPTS)], {}

    s = TINY
    config = DDPOConfig(
        num_epochs=args["epochs"],
        sample_num_steps=s["num_steps"],
        sample_eta=s["eta"],
        sample_guidance_scale=s["guidance_scale"],
        sample_batch_size=s["sample_batch_size"],
        sample_num_batches_per_epoch=s["num_batches_per_epoch"],
        train_batch_size=s["train_batch_size"],
        train_gradient_accumulation_steps=s["gradient_accumulation_steps"],
        train_learning_rate=s["learning_rate"],
        mixed_precision="no",
        log_with=None,
        save_freq=10**6,
        async_reward_computation=args.get("async", False),
        per_prompt_stat_tracking=True,
        logdir=tempfile.mkdtemp(prefix="bench-trl-"),
        project_kwargs={"project_dir": tempfile.mkdtemp(prefix="bench-trl-")},
    )
    from accelerate import PartialState

    PartialState()  # trl 0.23.1 logs through accelerate before its Accelerator exists
    pipeline = DefaultDDPOStableDiffusionPipeline(args["model"], use_lora=True)
    trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipeline)

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            timings[name].append(time.perf_counter() - t)
            return out

        return wrapper

    trainer._generate_samples = timed("sampling", trainer._generate_samples)
    trainer._train_batched_samples = timed("training", trainer._train_batched_samples)
    t0 = time.perf_counter()
    epoch_times = []
    global_step = 0
    for epoch in range(args["epochs"]):
        t = time.perf_counter()
        global_step = trainer.step(epoch, global_step)
        epoch_times.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    per_epoch_reward = len(timings["reward"]) // args["epochs"]
    epochs = []
    for e in range(args["epochs"]):
        r = sum(timings["reward"][e * per_epoch_reward : (e + 1) * per_epoch_reward])
        # trl samples every batch in one _generate_samples call per epoch
        epochs.append(
            {
                "sampling": timings["sampling"][e],
                "reward": r,
                "training": timings["training"][e] if len(timings["training"]) > e else 0.0,
                "epoch": epoch_times[e],
            }
        )
    return {"epochs": epochs, "total_s": total}


def run_worker(kind: str, args: dict, extra_path: Path | None = None) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(args["threads"]),
        WANDB_DISABLED="true",
    )
    paths = [str(ROOT)] + ([str(extra_path)] if extra_path else [])
    env["PYTHONPATH"] = os.pathsep.join(paths[::-1] + [env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__, "--_worker", kind, json.dumps(args)],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr or proc.stdout)[-3000:]}


def ensure_trl() -> str | None:
    """Install trl 0.23.1 (without dependencies) into the throwaway folder; None when ready."""
    if (TRL_DIR / "trl" / "__init__.py").is_file():
        return None
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(TRL_DIR),
         "trl==0.23.1"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    return None if proc.returncode == 0 else proc.stderr[-2000:]


def summarise(runs: list[dict]) -> dict:
    """Median over runs and over epochs after each run's first (warm-up) epoch."""
    import statistics

    eps = [e for res in runs for e in (res["epochs"][1:] or res["epochs"])]
    keys = [k for k in ("sampling", "reward", "reward_wait", "training") if k in eps[0]]
    out = {k: statistics.median(e[k] for e in eps) for k in keys}
    total = [e["sampling"] + e.get("reward_wait", e["reward"]) + e["training"] for e in eps]
    out["epoch"] = statistics.median(total)
    out["epoch_min"] = min(total)
    out["n_epochs"] = len(eps)
    return out


# --------------------------------------------------------------------------- CPU mode
def cpu_mode(opts: argparse.Namespace) -> dict:
    import torch

    from alignment.tiny import tiny_sd_pipeline

    model_dir = Path(tempfile.mkdtemp(prefix="bench-tiny-sd-"))
    tiny_sd_pipeline(seed=0).save_pretrained(model_dir)
    base = {"model": str(model_dir), "epochs": opts.epochs, "threads": opts.threads}
    k = TINY["num_steps"]
    runs = {
        "ours": ("ours", {"reward": "jpeg_compressibility", "overrides": {"async_reward": True}}),
        "ours_batched_timesteps": (
            "ours",
            {"reward": "jpeg_compressibility", "overrides": {"timesteps_per_call": k}},
        ),
        "ours_cnn_sync": ("ours", {"reward": "cnn", "overrides": {"async_reward": False}}),
        "ours_cnn_async": ("ours", {"reward": "cnn", "overrides": {"async_reward": True}}),
        "trl": ("trl", {"reward": "jpeg_compressibility"}),
    }
    trl_error = ensure_trl()
    results: dict = {name: {"runs": []} for name in runs}
    for rep in range(opts.repeats):  # interleaved, so that load changes hit every run alike
        for name, (kind, extra) in runs.items():
            if kind == "trl" and trl_error:
                results[name] = {"error": "pip install trl==0.23.1 failed: " + trl_error}
                continue
            if "error" in results[name]:
                continue
            print(f"[{rep + 1}/{opts.repeats}] running {name} ...", flush=True)
            res = run_worker(kind, {**base, **extra}, TRL_DIR if kind == "trl" else None)
            if "error" in res:
                results[name] = res
                print(name, "failed:", res["error"][-500:])
                continue
            results[name]["runs"].append(res)
    for name, r in results.items():
        if r.get("runs"):
            r["summary"] = summarise(r["runs"])
            print(name, json.dumps(r["summary"]))
    meta = {
        "settings": TINY,
        "epochs": opts.epochs,
        "threads": opts.threads,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "repeats": opts.repeats,
        "note": "median over repeats and over epochs after each run's first (warm-up); seconds",
    }
    out = {"meta": meta, "results": results}
    if "summary" in results.get("trl", {}) and "summary" in results["ours"]:
        out["trl_over_ours_epoch"] = (
            results["trl"]["summary"]["epoch"] / results["ours"]["summary"]["epoch"]
        )
        print(f"trl 0.23.1 / ours, seconds per epoch: {out['trl_over_ours_epoch']:.2f}x")
    return out


# --------------------------------------------------------------------------- GPU mode
def sd15_shaped_pipeline():
    """SD 1.5's architecture with random weights (UNet 860M, VAE, CLIP ViT-L text encoder)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from alignment.tiny import tiny_clip_tokenizer

    torch.manual_seed(0)
    tok = tiny_clip_tokenizer(max_length=77)
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def gpu_mode(opts: argparse.Namespace) -> dict:
    import torch

    from alignment.ddpo_trainer import DDPOConfig, DDPOTrainer
    from alignment.policy import DiffusionPolicy

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device.")
    torch.backends.cuda.matmul.allow_tf32 = True
    policy = DiffusionPolicy(
        sd15_shaped_pipeline(), lora_rank=4, weight_dtype=torch.bfloat16, device="cuda"
    )
    cfg = DDPOConfig(
        pretrained_model="(in memory)",
        output_dir=tempfile.mkdtemp(prefix="bench-ddpo-gpu-"),
        num_steps=50,
        guidance_scale=5.0,
        sample_batch_size=8,
        num_batches_per_epoch=opts.samples // 8,
        train_batch_size=8,
        gradient_accumulation_steps=1,
        timesteps_per_call=opts.timesteps_per_call,
        num_epochs=1,
        mixed_precision="bf16",
        compile_unet=opts.compile,
        channels_last=opts.channels_last,
        save_every=0,
        log_with="none",
        log_images_every=0,
        reward="jpeg_compressibility",
    )
    trainer = DDPOTrainer(cfg, policy=policy, prompts=PROMPTS)
    acc = trainer.accelerator
    # sampling throughput (after a warm-up batch that also triggers compilation)
    t = time.perf_counter()
    with torch.no_grad(), acc.autocast():
        policy.sample(PROMPTS[:1] * 8, 50, 1.0, 5.0)
    torch.cuda.synchronize()
    warmup = time.perf_counter() - t
    t = time.perf_counter()
    n = opts.sample_batches
    for _ in range(n):
        with torch.no_grad(), acc.autocast():
            policy.sample(PROMPTS[:1] * 8, 50, 1.0, 5.0)
    torch.cuda.synchronize()
    images_per_s = 8 * n / (time.perf_counter() - t)
    print(f"sampling: {images_per_s:.2f} images/s (warm-up/compile {warmup:.1f} s)")
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    hist = trainer.train()
    epoch_s = time.perf_counter() - t
    h = hist[0]
    res = {
        "device": torch.cuda.get_device_name(),
        "sampling_images_per_s": images_per_s,
        "warmup_s": warmup,
        "epoch_s": epoch_s,
        "epoch_split": {
            "sampling": h["time/sampling"],
            "reward": h["time/reward"],
            "reward_wait": h["time/reward_wait"],
            "training": h["time/training"],
        },
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "settings": {
            "samples": opts.samples,
            "timesteps_trained": 50,
            "timesteps_per_call": opts.timesteps_per_call,
            "compile": opts.compile,
            "channels_last": opts.channels_last,
            "bf16": True,
            "lora_rank": 4,
        },
    }
    print(json.dumps(res, indent=1))
    return res


# --------------------------------------------------------------------------- report
def _replace_block(text: str, tag: str, body: str) -> str:
    """Replace (or append) the ``<!-- bench:TAG -->`` ... ``<!-- /bench:TAG -->`` block."""
    start_marker, end_marker = f"<!-- bench:{tag} -->", f"<!-- /bench:{tag} -->"
    block = f"{start_marker}\n{body.strip()}\n{end_marker}"
    i, j = text.find(start_marker), text.find(end_marker)
    if i >= 0 and j > i:
        return text[:i] + block + text[j + len(end_marker) :]
    return text.rstrip() + "\n\n" + block + "\n"


def write_doc(cpu: dict | None, gpu: dict | None) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    # drop a DDPO section of the older, marker-less format
    old = text.find("\n## DDPO\n")
    if old >= 0 and "<!-- bench:ddpo" not in text[old:]:
        end = text.find("\n## ", old + 1)
        text = text[:old] + (text[end:] if end >= 0 else "\n")
    if cpu:
        text = _replace_block(text, "ddpo_cpu", _cpu_section(cpu))
    if gpu:
        text = _replace_block(text, "ddpo_gpu", _gpu_section(gpu))
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def _cpu_section(cpu: dict) -> str:
    m, s = cpu["meta"], cpu["meta"]["settings"]
    lines = [
        "### DDPO epoch: ours vs trl 0.23.1 (tiny CPU config)",
        "",
        "`python bench/ddpo.py` (CPU, tiny random SD-architecture pipeline from `alignment.tiny`, "
        "saved once and loaded by both trainers). Settings: "
        f"{s['sample_batch_size']} x {s['num_batches_per_epoch']} samples per epoch, "
        f"{s['num_steps']} DDIM steps, CFG {s['guidance_scale']}, eta {s['eta']}, train batch "
        f"{s['train_batch_size']}, accumulation {s['gradient_accumulation_steps']}, LoRA rank "
        f"{s['lora_rank']}, all timesteps trained; {m['threads']} torch thread(s) per run on a "
        f"{m['cores']}-core machine; median seconds per epoch over epochs 2-{m['epochs']} of "
        f"{m.get('repeats', 1)} interleaved run(s) each (the machine is shared: expect noise).",
        "",
        "| run | sampling | reward (in fn) | reward (blocking) | training | epoch (median) | "
        "epoch (min) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in cpu["results"].items():
        if "summary" not in r:
            err = r.get("error", "").strip().splitlines()[-1:] or [""]
            lines.append(f"| {name} | failed: `{err[0][:150]}` | | | | | |")
            continue
        x = r["summary"]
        lines.append(
            f"| {name} | {x['sampling']:.2f} | {x['reward']:.3f} | "
            f"{x.get('reward_wait', x['reward']):.3f} | {x['training']:.2f} | {x['epoch']:.2f} | "
            f"{x.get('epoch_min', x['epoch']):.2f} |"
        )
    if "trl_over_ours_epoch" in cpu:
        lines += [
            "",
            f"trl 0.23.1 / ours, seconds per epoch (medians): **{cpu['trl_over_ours_epoch']:.2f}x**.",
        ]
    lines += [
        "",
        "`ours` runs one UNet call per trained timestep (as trl and the reference do); "
        "`ours_batched_timesteps` batches all trained timesteps of a train batch into one call "
        "(`timesteps_per_call`, same gradient). `ours_cnn_*` use a CPU-heavy stand-in reward (a "
        "random conv net at 224 px) to measure the reward/sampling overlap (`async_reward`): "
        "`reward (blocking)` is the time the loop waited for rewards after sampling.",
    ]
    return "\n".join(lines)


def _gpu_section(g: dict) -> str:
    st = g["settings"]
    return "\n".join(
        [
            "### DDPO on an SD 1.5-shaped pipeline (GPU)",
            "",
            f"`python bench/ddpo.py --gpu` on {g['device']}: random SD 1.5-shaped pipeline, 512 px, "
            f"50 DDIM steps, CFG 5, batch 8, LoRA rank 4, bf16, compile={st['compile']}, "
            f"channels_last={st['channels_last']}, timesteps_per_call={st['timesteps_per_call']}.",
            "",
            "| figure | value |",
            "|---|---|",
            f"| sampling images/s | {g['sampling_images_per_s']:.2f} |",
            f"| epoch of {st['samples']} samples, all 50 timesteps trained (s) | "
            f"{g['epoch_s']:.0f} |",
            f"| of which sampling / training (s) | {g['epoch_split']['sampling']:.0f} / "
            f"{g['epoch_split']['training']:.0f} |",
            f"| peak GPU memory (GiB) | {g['peak_memory_gib']:.1f} |",
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="SD 1.5-shaped GPU benchmark")
    p.add_argument("--epochs", type=int, default=3, help="CPU: epochs per run (first = warm-up)")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads per run")
    p.add_argument("--repeats", type=int, default=2, help="CPU: interleaved repeats per run")
    p.add_argument("--samples", type=int, default=256, help="GPU: samples in the trained epoch")
    p.add_argument("--sample_batches", type=int, default=4, help="GPU: batches timed for images/s")
    p.add_argument("--timesteps_per_call", type=int, default=1, help="GPU: timesteps per UNet call")
    p.add_argument("--compile", action="store_true", help="GPU: torch.compile the UNet")
    p.add_argument("--channels_last", action="store_true", help="GPU: channels-last UNet")
    p.add_argument("--no_doc", action="store_true", help="do not update docs/benchmarks.md")
    p.add_argument("--doc_only", action="store_true", help="rewrite the docs from bench/results")
    p.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts._worker:
        kind, args = opts._worker[0], json.loads(opts._worker[1])
        res = worker_ours(args) if kind == "ours" else worker_trl(args)
        print("RESULT " + json.dumps(res), flush=True)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    if opts.doc_only:
        cpu_f, gpu_f = RESULTS / "ddpo_cpu.json", RESULTS / "ddpo_gpu.json"
        write_doc(
            json.loads(cpu_f.read_text()) if cpu_f.exists() else None,
            json.loads(gpu_f.read_text()) if gpu_f.exists() else None,
        )
        return
    if opts.gpu:
        gpu = gpu_mode(opts)
        (RESULTS / "ddpo_gpu.json").write_text(json.dumps(gpu, indent=1))
        if not opts.no_doc:
            cpu_prev = RESULTS / "ddpo_cpu.json"
            write_doc(json.loads(cpu_prev.read_text()) if cpu_prev.exists() else None, gpu)
        return
    cpu = cpu_mode(opts)
    (RESULTS / "ddpo_cpu.json").write_text(json.dumps(cpu, indent=1))
    if not opts.no_doc:
        gpu_prev = RESULTS / "ddpo_gpu.json"
        write_doc(cpu, json.loads(gpu_prev.read_text()) if gpu_prev.exists() else None)


if __name__ == "__main__":
    main()
