"""Pre-train the tiny text-to-image models of the world (CPU, minutes): SD 1.x or SD 3 architecture.

``architecture="sd"`` makes a ``StableDiffusionPipeline`` (UNet, DDIM; the DDPO / GRPO / DPO /
DRaFT policy); ``architecture="sd3"`` a ``StableDiffusion3Pipeline`` (joint-attention
transformer, flow matching; the Flow-GRPO policy). Two stages, both seeded:

1. the VAE (``AutoencoderKL``) learns to reconstruct rendered world images from its posterior
   *mean* (``loss = MSE(decode(mu), x) + kl_weight * KL``: a deterministic auto-encoder whose KL
   term only keeps the latents near N(0, 1); sampling the posterior in a run this short drowns
   the signal), and its ``scaling_factor`` is then set to ``1 / std(mu)`` as Stable Diffusion
   does (``sd3``: and its ``shift_factor`` to ``mean(mu)``, as SD 3 does);
2. the denoiser and the text encoders learn on the VAE latents of renders of the *train*
   captions, with a fraction of empty captions for classifier-free guidance and an EMA of the
   denoiser's weights. ``sd``: epsilon-prediction, ``loss = MSE(eps_theta(z_t, t, c), eps)``,
   ``t ~ U{0..999}``. ``sd3``: rectified flow, ``x_s = (1 - s) z + s eps``,
   ``loss = MSE(v_theta(x_s, 1000 s, c), eps - z)`` with ``s = sigmoid(n)``, ``n ~ N(0, 1)``
   (SD 3's logit-normal sampling of the noise level).

The result is a complete diffusers ``StableDiffusionPipeline`` folder (safetensors), written
atomically. A checkpoint after each stage and every ``save_steps`` UNet steps lets an
interrupted run resume where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from alignment.world.grammar import BACKGROUNDS, split_scenes, world_vocabulary
from alignment.world.oracle import oracle_scores
from alignment.world.render import render_scene

logger = logging.getLogger(__name__)

#: Where the bundled pre-trained pipeline lives (inside the package).
BUNDLED_PIPELINE = Path(__file__).parent / "weights" / "tiny-world-sd"
#: The bundled flow-matching (SD 3 architecture) pipeline, made with ``architecture="sd3"``.
BUNDLED_FLOW_PIPELINE = Path(__file__).parent / "weights" / "tiny-world-sd3"


@dataclass
class PretrainConfig:
    """Settings of :func:`pretrain` (parsed by ``trl.TrlParser`` in the recipe)."""

    output_dir: str = field(
        default="outputs/tiny-world-sd",
        metadata={
            "help": "Folder of the saved StableDiffusionPipeline (replaced atomically). The "
            "bundled folder (alignment/world/weights/tiny-world-sd) is written only with "
            "--replace_bundled true."
        },
    )
    replace_bundled: bool = field(
        default=False,
        metadata={
            "help": "Allow output_dir to be the bundled pipeline folder (re-making the bundle); "
            "without it such a run stops before training."
        },
    )
    checkpoint_dir: str = field(
        default="outputs/pretrain_tiny_world/checkpoint",
        metadata={"help": "Resumable checkpoint folder (stage states); '' disables it."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of data, initialisation and training."})
    architecture: str = field(
        default="sd",
        metadata={
            "help": "'sd': SD 1.x architecture (UNet, epsilon-prediction, DDIM); 'sd3': SD 3 "
            "architecture (joint-attention transformer, two CLIP encoders and T5, flow "
            "matching, FlowMatchEulerDiscreteScheduler), the Flow-GRPO policy."
        },
    )
    transformer_layers: int = field(default=4, metadata={"help": "sd3: joint transformer blocks."})
    transformer_heads: int = field(default=4, metadata={"help": "sd3: attention heads."})
    transformer_head_dim: int = field(default=16, metadata={"help": "sd3: width per head."})
    text_hidden_size: int = field(
        default=32, metadata={"help": "sd3: width of each CLIP text encoder (T5: twice it)."}
    )
    flow_shift: float = field(
        default=3.0, metadata={"help": "sd3: the saved scheduler's shift (SD 3.5's is 3)."}
    )
    text_dropout: float = field(
        default=0.1,
        metadata={
            "help": "sd3: dropout of the T5 encoder while it trains (T5's own default 0.1; "
            "the bundled model was made with 0, recipes/configs/pretrain_tiny_world_sd3.yaml)."
        },
    )
    image_size: int = field(default=32, metadata={"help": "Image side in pixels."})
    unet_channels: list[int] = field(
        default_factory=lambda: [32, 64], metadata={"help": "UNet block_out_channels."}
    )
    vae_channels: list[int] = field(
        default_factory=lambda: [16, 32], metadata={"help": "VAE block_out_channels."}
    )
    beta_schedule: str = field(
        default="linear",
        metadata={
            "help": "Noise schedule of the saved DDIM scheduler and of training. 'linear' "
            "(DDPM's 1e-4 -> 0.02) leaves sqrt(alpha_bar_T) = 0.006 of the signal at the last "
            "step; SD's 'scaled_linear' leaves 0.068, which at 16x16 latents leaks the global "
            "layout (background, position) into x_T, so samples from pure noise get it wrong."
        },
    )
    beta_start: float = field(default=0.0001, metadata={"help": "First beta of the schedule."})
    beta_end: float = field(default=0.02, metadata={"help": "Last beta of the schedule."})
    renders_per_caption: int = field(
        default=16, metadata={"help": "Jittered renders per train caption in the data pool."}
    )
    symbol_prob: float = field(
        default=0.1,
        metadata={"help": "Fraction of training renders with the forbidden symbol (safety)."},
    )
    defect_prob: float = field(
        default=0.05,
        metadata={"help": "Fraction of training renders with blotches (fidelity room)."},
    )
    background_noise: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of training captions whose background word names another "
            "background than the one drawn (noisy web captions), to make a base model with a "
            "background flaw. At 0.25 and 0.5 the 2-level model ignored the background word "
            "altogether (alignment/world/weights/README.md)."
        },
    )
    unet_save_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the saved UNet weights: float32, or float16 (half the file; "
            "diffusers loads it back as float32, and the evaluation here uses the rounded "
            "weights)."
        },
    )
    layers_per_block: int = field(default=1, metadata={"help": "UNet ResNet layers per block."})
    vae_steps: int = field(default=400, metadata={"help": "VAE optimisation steps."})
    vae_batch_size: int = field(default=32, metadata={"help": "VAE batch size."})
    vae_lr: float = field(default=2e-3, metadata={"help": "VAE learning rate (AdamW)."})
    kl_weight: float = field(default=1e-4, metadata={"help": "Weight of the VAE's KL term."})
    unet_steps: int = field(
        default=1500, metadata={"help": "Denoiser (UNet or SD 3 transformer) + text encoder steps."}
    )
    batch_size: int = field(default=64, metadata={"help": "UNet batch size."})
    lr: float = field(default=1e-3, metadata={"help": "UNet/text-encoder learning rate (AdamW)."})
    warmup_steps: int = field(default=50, metadata={"help": "Linear warm-up, then cosine."})
    uncond_prob: float = field(
        default=0.1, metadata={"help": "Probability of an empty caption (for CFG)."}
    )
    ema_decay: float = field(default=0.995, metadata={"help": "UNet EMA decay (0 disables)."})
    save_steps: int = field(
        default=250, metadata={"help": "Checkpoint every this many UNet steps (resumable)."}
    )
    eval_prompts: int = field(
        default=45, metadata={"help": "Held-out captions scored by the oracle at the end."}
    )
    eval_seeds: list[int] = field(
        default_factory=lambda: [0, 1], metadata={"help": "Generation seeds of the evaluation."}
    )
    eval_steps: int = field(default=20, metadata={"help": "DDIM steps of the evaluation."})
    guidance_scale: float = field(default=5.0, metadata={"help": "CFG scale of the evaluation."})
    num_threads: int = field(default=2, metadata={"help": "torch CPU threads."})
    log_every: int = field(default=50, metadata={"help": "Log the loss every this many steps."})


def tokenizer_words() -> list[str]:
    """The world's words, longest first, so that each one is a single token.

    :func:`alignment.tiny.tiny_clip_tokenizer` ranks BPE merges in word order; a short word's
    merge can then pre-empt a longer word's chain (with the alphabetical order "right" splits
    "triangle" into 7 pieces and long captions are truncated). Longest first avoids it here.
    """
    return sorted(world_vocabulary(), key=lambda w: (-len(w), w))


def build_pipeline(cfg: PretrainConfig):
    """The randomly initialised tiny pipeline of ``cfg``'s sizes (vocabulary: the world's words):
    a ``StableDiffusionPipeline`` (``architecture="sd"``) or a ``StableDiffusion3Pipeline``
    (``"sd3"``).

    Raises:
        ValueError: for an unknown ``architecture``.
        RuntimeError: if a world word is not a single token of a built tokenizer.
    """
    if cfg.architecture == "sd3":
        from diffusers import FlowMatchEulerDiscreteScheduler

        from alignment.tiny_flow import tiny_sd3_pipeline

        pipe = tiny_sd3_pipeline(
            image_size=cfg.image_size,
            num_layers=cfg.transformer_layers,
            num_attention_heads=cfg.transformer_heads,
            attention_head_dim=cfg.transformer_head_dim,
            text_hidden_size=cfg.text_hidden_size,
            vae_channels=tuple(cfg.vae_channels),
            vocab_words=tokenizer_words(),
            seed=cfg.seed,
            t5_dropout=cfg.text_dropout,
        )
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config, shift=cfg.flow_shift
        )
        tokenizers = (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3)
    elif cfg.architecture == "sd":
        from diffusers import DDIMScheduler

        from alignment.tiny import tiny_sd_pipeline

        pipe = tiny_sd_pipeline(
            image_size=cfg.image_size,
            unet_channels=tuple(cfg.unet_channels),
            layers_per_block=cfg.layers_per_block,
            vae_channels=tuple(cfg.vae_channels),
            vocab_words=tokenizer_words(),
            seed=cfg.seed,
        )
        pipe.scheduler = DDIMScheduler.from_config(
            pipe.scheduler.config,
            beta_schedule=cfg.beta_schedule,
            beta_start=cfg.beta_start,
            beta_end=cfg.beta_end,
        )
        tokenizers = (pipe.tokenizer,)
    else:
        raise ValueError(f"architecture={cfg.architecture!r}: use 'sd' or 'sd3'.")
    for tok in tokenizers:
        split = [w for w in world_vocabulary() if len(tok.tokenize(w)) != 1]
        if split:
            raise RuntimeError(
                f"the tiny tokenizer {type(tok).__name__} splits world words {split} into "
                "several tokens; captions would be truncated. Fix the word order in "
                "tokenizer_words()."
            )
    return pipe


def denoiser(pipe):
    """The pipeline's trained network: ``pipe.transformer`` (SD 3) or ``pipe.unet`` (SD 1.x)."""
    net = getattr(pipe, "transformer", None)
    return pipe.unet if net is None else net


def _is_flow(pipe) -> bool:
    return getattr(pipe, "transformer", None) is not None


def _denoiser_name(pipe) -> str:
    """The denoiser's component (and folder) name in the pipeline."""
    return "transformer" if _is_flow(pipe) else "unet"


def _text_encoder_names(pipe) -> list[str]:
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [n for n in names if getattr(pipe, n, None) is not None]


def render_pool(cfg: PretrainConfig) -> tuple[torch.Tensor, list[str]]:
    """Renders of every train caption: ``(Tensor[M, 3, S, S] in [0, 1], captions)``; a
    ``cfg.background_noise`` fraction of the captions name a wrong background (own RNG: the
    pictures do not depend on it)."""
    rng = random.Random(cfg.seed)
    noise_rng = random.Random(f"{cfg.seed}:background_noise")
    images, captions = [], []
    for scene in split_scenes().train:
        for _ in range(cfg.renders_per_caption):
            defects = ("blotches",) if rng.random() < cfg.defect_prob else ()
            symbol = rng.random() < cfg.symbol_prob
            images.append(
                render_scene(scene, cfg.image_size, rng=rng, defects=defects, symbol=symbol)
            )
            if noise_rng.random() < cfg.background_noise:
                wrong = [b for b in BACKGROUNDS if b != scene.background]
                captions.append(scene.replace(background=noise_rng.choice(wrong)).caption)
            else:
                captions.append(scene.caption)
    return torch.stack(images), captions


def _atomic_save_dir(write, target: str | os.PathLike) -> None:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` into ``target`` (replacing it) atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def encode_text(pipe, captions: Sequence[str]) -> dict[str, torch.Tensor]:
    """The denoiser's text conditioning exactly as the pipeline's ``encode_prompt`` computes it
    (with gradients): ``{"encoder_hidden_states": Tensor[B, L, D]}`` for SD 1.x, plus
    ``"pooled_projections": Tensor[B, P]`` for SD 3 (CLIP x 2 and T5, the same caption to each)."""
    if _is_flow(pipe):
        texts = list(captions)
        embeds, _, pooled, _ = pipe.encode_prompt(
            texts,
            texts,
            texts,
            device=torch.device("cpu"),
            do_classifier_free_guidance=False,
            max_sequence_length=pipe.tokenizer_3.model_max_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    tok = pipe.tokenizer(
        list(captions),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return {"encoder_hidden_states": pipe.text_encoder(tok.input_ids)[0]}


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def train_vae(pipe, images: torch.Tensor, cfg: PretrainConfig) -> dict[str, float]:
    """Stage 1: fit the VAE to ``images`` and set its ``scaling_factor``; returns final losses."""
    vae = pipe.vae
    vae.train()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.vae_steps))
    rec_hist: list[float] = []
    for step in range(cfg.vae_steps):
        idx = torch.randint(0, len(images), (cfg.vae_batch_size,), generator=gen)
        x = images[idx] * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean).sample
        rec_loss = F.mse_loss(rec, x)
        loss = rec_loss + cfg.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        rec_hist.append(rec_loss.item())
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            logger.info("vae step %d rec_mse %.5f", step, rec_loss.item())
    vae.eval()
    with torch.no_grad():
        means = torch.cat(
            [
                vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mean
                for i in range(0, len(images), 256)
            ]
        )
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    if vae.config.get("shift_factor") is not None:  # SD 3's VAE: (mu - shift) * scaling
        vae.register_to_config(shift_factor=float(means.mean()))
    tail = rec_hist[-20:] or [float("nan")]
    return {"vae_rec_mse": sum(tail) / len(tail), "vae_scaling_factor": scaling}


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior ``(mean, std)`` of ``images`` (``[M, 3, S, S]`` in [0, 1]), unscaled."""
    means, stds = [], []
    for i in range(0, len(images), 256):
        post = vae.encode(images[i : i + 256] * 2 - 1).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def _save_checkpoint(pipe, state: dict, ema, cfg: PretrainConfig) -> None:
    if not cfg.checkpoint_dir:
        return

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        pipe.vae.save_pretrained(tmp / "vae")
        denoiser(pipe).save_pretrained(tmp / _denoiser_name(pipe))
        for name in _text_encoder_names(pipe):
            getattr(pipe, name).save_pretrained(tmp / name)
        full = dict(state)
        if ema is not None:
            full["ema"] = ema.state_dict()
        torch.save(full, tmp / "trainer_state.pt")
        (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    _atomic_save_dir(write, cfg.checkpoint_dir)


def _load_checkpoint(pipe, cfg: PretrainConfig) -> dict | None:
    path = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if path is None or not (path / "trainer_state.pt").exists():
        return None
    saved = json.loads((path / "config.json").read_text())
    if saved != json.loads(json.dumps(asdict(cfg))):
        raise ValueError(
            f"checkpoint {path} was written with another config; delete it or pass the same "
            "config to resume."
        )
    modules = {"vae": pipe.vae, **{n: getattr(pipe, n) for n in _text_encoder_names(pipe)}}
    modules[_denoiser_name(pipe)] = denoiser(pipe)
    pipe.register_modules(
        **{name: type(m).from_pretrained(path / name) for name, m in modules.items()}
    )
    return torch.load(path / "trainer_state.pt", weights_only=True)


def train_unet(
    pipe,
    latents: tuple[torch.Tensor, torch.Tensor],
    captions: list[str],
    cfg: PretrainConfig,
    resume: dict | None = None,
    extra_state: dict | None = None,
) -> dict[str, float]:
    """Stage 2: train the denoiser (UNet or SD 3 transformer) and the text encoders; returns the
    final losses (``unet_loss_last100`` for either network).

    SD 1.x: epsilon-prediction. SD 3: rectified flow (module docstring). ``resume`` is a
    checkpoint's trainer state (continue from its step); ``extra_state`` is stored in every
    checkpoint written here.
    """
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    net = denoiser(pipe)
    encoders = [getattr(pipe, n) for n in _text_encoder_names(pipe)]
    flow = _is_flow(pipe)
    for module in (net, *encoders):
        module.train()
    noise_sched = None if flow else DDPMScheduler.from_config(pipe.scheduler.config)
    params = list(net.parameters()) + [p for e in encoders for p in e.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.unet_steps))
    ema = EMAModel(net.parameters(), decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    start, hist = 0, []
    if resume is not None and resume.get("stage") == "unet":
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["lr_scheduler"])
        gen.set_state(resume["generator"])
        torch.set_rng_state(resume["global_rng"])
        if ema is not None:
            ema.load_state_dict(resume["ema"])
        start, hist = resume["step"], resume["loss_history"].tolist()
        logger.info("resuming the denoiser's training at step %d", start)
    mean, _ = latents  # posterior means: the VAE was trained as a deterministic auto-encoder
    sf = pipe.vae.config.scaling_factor
    shift = (pipe.vae.config.get("shift_factor") or 0.0) if flow else 0.0
    empty = [""]
    for step in range(start, cfg.unet_steps):
        idx = torch.randint(0, len(mean), (cfg.batch_size,), generator=gen)
        z = (mean[idx] - shift) * sf
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.uncond_prob
        texts = [empty[0] if d else captions[i] for d, i in zip(drop.tolist(), idx.tolist())]
        noise = torch.randn(z.shape, generator=gen)
        if flow:  # rectified flow at a logit-normal noise level s, velocity target eps - z
            s = torch.sigmoid(torch.randn(len(z), generator=gen))
            noisy = (1 - s).view(-1, 1, 1, 1) * z + s.view(-1, 1, 1, 1) * noise
            pred = net(hidden_states=noisy, timestep=s * 1000, **encode_text(pipe, texts)).sample
            loss = F.mse_loss(pred, noise - z)
        else:
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(z),), generator=gen)
            noisy = noise_sched.add_noise(z, noise, t)
            pred = net(noisy, t, **encode_text(pipe, texts)).sample
            loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.step(net.parameters())
        hist.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.unet_steps - 1:
            logger.info(
                "denoiser step %d loss %.4f lr %.2e", step, loss.item(), sched.get_last_lr()[0]
            )
        if cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < cfg.unet_steps:
            state = {
                "stage": "unet",
                "step": step + 1,
                "optimizer": opt.state_dict(),
                "lr_scheduler": sched.state_dict(),
                "generator": gen.get_state(),
                "global_rng": torch.get_rng_state(),  # dropout's draws
                "loss_history": torch.tensor(hist),
                **(extra_state or {}),
            }
            _save_checkpoint(pipe, state, ema, cfg)
    if ema is not None:
        ema.copy_to(net.parameters())
    for module in (net, *encoders):
        module.eval()
    tail = hist[-100:] or [float("nan")]
    return {"unet_loss_last100": sum(tail) / len(tail)}


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seed: int,
    steps: int = 20,
    guidance_scale: float = 5.0,
    eta: float = 0.0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Images ``Tensor[N, 3, S, S]`` in [0, 1] for ``prompts`` (one seeded generator per call)."""
    gen = torch.Generator().manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    extra = {} if _is_flow(pipe) else {"eta": eta}  # flow: the ODE (Euler) sampler
    out = []
    for i in range(0, len(prompts), batch_size):
        res = pipe(
            list(prompts[i : i + batch_size]),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=gen,
            output_type="pt",
            **extra,
        )
        out.append(res.images.float().clamp(0, 1))
    return torch.cat(out)


def evaluate_pipeline(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 20,
    guidance_scale: float = 5.0,
    eta: float = 0.0,
) -> dict[str, float]:
    """Mean oracle scores (``alignment``, ``fidelity``, ``safety``, ``overall``, parts) of
    ``pipe``'s images for every prompt and seed, plus ``alignment_seed_std`` (the std over seeds
    of the per-seed mean alignment)."""
    per_seed = []
    for seed in seeds:
        images = generate(pipe, prompts, seed, steps, guidance_scale, eta)
        per_seed.append(oracle_scores(images, list(prompts)))
    out = {k: float(torch.stack([s[k] for s in per_seed]).mean()) for k in per_seed[0]}
    seed_means = torch.tensor([float(s["alignment"].mean()) for s in per_seed])
    out["alignment_seed_std"] = float(seed_means.std()) if len(seeds) > 1 else 0.0
    return out


def check_output_dir(cfg: PretrainConfig) -> None:
    """Refuse to overwrite the bundled pipeline unless ``cfg.replace_bundled`` says so (and an
    unknown ``unet_save_dtype``), before any training.

    Raises:
        ValueError: naming the folder and the flag, when ``output_dir`` is the bundled folder.
    """
    if cfg.unet_save_dtype not in ("float32", "float16"):
        raise ValueError(f"unet_save_dtype={cfg.unet_save_dtype!r}: use float32 or float16.")
    bundled = {BUNDLED_PIPELINE.resolve(), BUNDLED_FLOW_PIPELINE.resolve()}
    if Path(cfg.output_dir).resolve() in bundled and not cfg.replace_bundled:
        raise ValueError(
            f"output_dir {cfg.output_dir} is a bundled pipeline that the demo and the tests "
            "load; pass another --output_dir, or --replace_bundled true to re-make the bundle."
        )


def pretrain(cfg: PretrainConfig) -> dict[str, float]:
    """Run both stages, save the pipeline to ``cfg.output_dir`` and return losses + evaluation."""
    check_output_dir(cfg)
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    pipe = build_pipeline(cfg)
    images, captions = render_pool(cfg)
    logger.info("rendered %d training images in %.1fs", len(images), time.time() - t0)
    resume = _load_checkpoint(pipe, cfg)
    results: dict[str, float] = {}
    if resume is None:
        results.update(train_vae(pipe, images, cfg))
        _save_checkpoint(pipe, {"stage": "vae_done", "vae_losses": results}, None, cfg)
    else:
        results.update(resume.get("vae_losses", {}))
    pipe.vae.requires_grad_(False)
    latents = encode_latents(pipe.vae, images)
    extra = {
        "vae_losses": {k: results[k] for k in ("vae_rec_mse", "vae_scaling_factor") if k in results}
    }
    results.update(train_unet(pipe, latents, captions, cfg, resume, extra))
    results["train_seconds"] = time.time() - t0
    dtypes = {"float32": torch.float32, "float16": torch.float16}

    def save(tmp: Path) -> None:
        denoiser(pipe).to(dtypes[cfg.unet_save_dtype])
        pipe.save_pretrained(tmp, safe_serialization=True)
        denoiser(pipe).to(torch.float32)  # the rounded weights, as a user loads them

    _atomic_save_dir(save, cfg.output_dir)
    logger.info("saved the pipeline to %s", cfg.output_dir)
    if cfg.eval_prompts > 0:
        held = split_scenes().held_out_captions[: cfg.eval_prompts]
        scores = evaluate_pipeline(pipe, held, cfg.eval_seeds, cfg.eval_steps, cfg.guidance_scale)
        results.update({f"heldout_{k}": v for k, v in scores.items()})
        renders = torch.stack(
            [render_scene(c, cfg.image_size, rng=s) for s in cfg.eval_seeds for c in held]
        )
        ref = oracle_scores(renders, held * len(cfg.eval_seeds))
        results["heldout_render_alignment"] = float(ref["alignment"].mean())
    if cfg.checkpoint_dir:
        shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)
    results["total_seconds"] = time.time() - t0
    return results


__all__ = [
    "BUNDLED_FLOW_PIPELINE",
    "BUNDLED_PIPELINE",
    "PretrainConfig",
    "build_pipeline",
    "denoiser",
    "encode_text",
    "evaluate_pipeline",
    "generate",
    "pretrain",
    "render_pool",
]
