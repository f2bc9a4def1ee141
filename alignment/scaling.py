"""Inference-time scaling: best-of-N and Feynman-Kac (FK) steering (Singhal et al. 2025).

Both spend extra compute at sampling time instead of training. They take either policy: a
:class:`alignment.policy.DiffusionPolicy` (SD 1.x, DDIM steps with ``eta``) or a
:class:`alignment.flow_policy.FlowPolicy` (SD 3.x, FLUX: Flow-GRPO's SDE steps with
``noise_level``, the particles coming from the same sampler as GRPO's images). Compute is counted
in **UNet evaluations** ``unet_evals``: per-image denoiser (UNet or transformer) passes, a CFG step
counting 2 (the unconditional and the conditional half; FLUX's embedded guidance counts 1), so
best-of-N with ``N`` images and FK steering with ``K = N`` particles and the same step count cost
the same ``unet_evals``; FK additionally runs the VAE decoder and the reward on the predicted
clean image at each resampling step (``reward_evals``).

Seeds: image (or particle) ``n`` of prompt ``p`` starts from the noise of
``torch.Generator().manual_seed(seed + p * 100_003 + n)``, so ``N = 1`` is the first image of any
larger ``N`` and best-of-N with the same seed and ``N = K`` starts from FK's initial particles.

**FK steering** (``K`` particles per prompt, DDIM with ``eta > 0`` or the flow SDE with
``noise_level > 0`` so that resampled copies diverge). At each resampling step ``i``
(``resample_every`` steps in ``[resample_start, resample_end)``, as fractions of the ``T`` steps)
the reward of the decoded ``x0_hat`` (:func:`alignment.draft.predict_x0` of the UNet output of that
step, or :func:`alignment.flow.flow_predict_x0` ``x - s v`` of the velocity; no extra model call)
gives each particle a potential, and the particles of a prompt are resampled
(multinomially) with weights ``softmax(lambda * g)``, where ``lambda`` is the temperature
(``lmbda``, higher = greedier) and ``g``:

- ``"diff"``: ``r_i - r_prev`` (the product over steps telescopes to ``exp(lambda * r_last)``);
- ``"max"``: ``max(r_i, r_prev_max)`` (the running maximum along the particle's history);
- ``"add"``: ``r_i + r_prev_sum`` (the running sum).

``r_prev`` travels with a particle when it is copied. With ``ess_threshold < 1`` a prompt's
particles are resampled only when the effective sample size ``1 / sum(w^2)`` falls below
``ess_threshold * K``. At the end every particle is decoded and scored and the best per prompt is
returned (with all final scores).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from alignment.ddpo import ddim_step_with_logprob
from alignment.draft import predict_x0
from alignment.flow import flow_predict_x0, sde_step_with_logprob
from alignment.flow_policy import is_flow_policy
from alignment.world import BUNDLED_WEIGHTS
from reward.files import atomic_write_text

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]
POTENTIALS = ("diff", "max", "add")


def _seed(seed: int, p: int, n: int) -> int:
    return seed + p * 100_003 + n


def _uses_cfg(policy: Any, guidance_scale: float) -> bool:
    return policy.uses_cfg(guidance_scale) if is_flow_policy(policy) else guidance_scale > 1.0


def _stochasticity(policy: Any, eta: float, noise_level: float) -> float:
    """The sampler's noise argument: the flow SDE's ``noise_level`` or DDIM's ``eta``."""
    return noise_level if is_flow_policy(policy) else eta


@dataclass
class ScalingResult:
    """What :func:`best_of_n` and :func:`fk_steering` return (``P`` prompts, ``N`` images or
    particles per prompt).

    Attributes:
        images: ``[P, 3, H, W]`` the best image per prompt.
        scores: ``[P, N]`` the reward of every final image.
        best_index: ``[P]`` index of the best image of each prompt.
        best_scores: ``[P]``.
        unet_evals: per-image UNet passes (a CFG step counts 2).
        reward_evals: images scored by the reward (intermediate ones included).
        all_images: ``[P, N, 3, H, W]`` when asked for, else None.
        info: method details (e.g. FK's resampling steps and effective sample sizes).
    """

    images: torch.Tensor
    scores: torch.Tensor
    best_index: torch.Tensor
    best_scores: torch.Tensor
    unet_evals: int
    reward_evals: int
    all_images: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _score(reward_fn: RewardFn, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return torch.as_tensor(reward_fn(images, prompts), dtype=torch.float32).reshape(-1).cpu()


def _finish(images, scores, unet_evals, reward_evals, keep_all, info) -> ScalingResult:
    best = scores.argmax(dim=1)
    rows = torch.arange(scores.shape[0])
    return ScalingResult(
        images=images[rows, best],
        scores=scores,
        best_index=best,
        best_scores=scores[rows, best],
        unet_evals=unet_evals,
        reward_evals=reward_evals,
        all_images=images if keep_all else None,
        info=info,
    )


@torch.no_grad()
def best_of_n(
    policy: Any,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    n: int = 4,
    num_steps: int = 50,
    eta: float = 1.0,
    guidance_scale: float = 5.0,
    seed: int = 0,
    batch_size: int = 16,
    keep_all: bool = False,
    noise_level: float = 0.7,
    progress: bool = False,
) -> ScalingResult:
    """Sample ``n`` images per prompt (batched, ``batch_size`` images per call), score them with
    ``reward_fn`` and keep the best one per prompt (``progress``: a bar over the batches). See
    :class:`ScalingResult`.

    ``eta`` is the DDIM noise of a ``DiffusionPolicy``, ``noise_level`` the SDE noise of a
    ``FlowPolicy`` (0: its ODE); the other one is ignored."""
    from tqdm.auto import tqdm

    if n < 1:
        raise ValueError("n must be at least 1.")
    prompts = list(prompts)
    jobs = [(p, k) for p in range(len(prompts)) for k in range(n)]
    images, scores = [], []
    starts = range(0, len(jobs), batch_size)
    for s in tqdm(starts, desc="best-of-N batches", disable=not progress, dynamic_ncols=True):
        chunk = jobs[s : s + batch_size]
        gens = [torch.Generator().manual_seed(_seed(seed, p, k)) for p, k in chunk]
        texts = [prompts[p] for p, _ in chunk]
        noise = _stochasticity(policy, eta, noise_level)
        out = policy.sample(texts, num_steps, noise, guidance_scale, generator=gens)
        imgs = out.images.float()
        scores.append(_score(reward_fn, imgs, texts))
        images.append(imgs.cpu())
    images_t = torch.cat(images).reshape(len(prompts), n, *images[0].shape[1:])
    scores_t = torch.cat(scores).reshape(len(prompts), n)
    cfg_factor = 2 if _uses_cfg(policy, guidance_scale) else 1
    unet_evals = len(jobs) * num_steps * cfg_factor
    return _finish(images_t, scores_t, unet_evals, len(jobs), keep_all, {"method": "best_of_n"})


def resampling_steps(num_steps: int, every: int, start: float = 0.2, end: float = 0.9) -> list[int]:
    """Step indices ``i`` (0-based, of ``T = num_steps``) at which FK resamples: every
    ``every``-th step from ``round(start * T)`` while ``i < round(end * T)``."""
    lo, hi = round(start * num_steps), round(end * num_steps)
    return list(range(lo, hi, max(1, every)))


def fk_weights(
    rewards: torch.Tensor, previous: torch.Tensor, potential: str, lmbda: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FK resampling weights of one prompt's particles and the potential state to carry.

    Args:
        rewards: ``[K]`` rewards of the particles' ``x0_hat`` now; previous: ``[K]`` carried state
            (last reward for ``diff``, running max for ``max``, running sum for ``add``).
        potential: ``"diff"`` | ``"max"`` | ``"add"``; lmbda: the temperature.

    Returns:
        ``(weights [K] summing to 1, new_state [K])``: ``softmax(lmbda * g)`` with
        ``g = r - prev`` (diff), ``max(r, prev)`` (max) or ``r + prev`` (add); the new state is
        ``r``, ``max(r, prev)`` or ``r + prev``.
    """
    if potential == "diff":
        g, state = rewards - previous, rewards
    elif potential == "max":
        state = torch.maximum(rewards, previous)
        g = state
    elif potential == "add":
        state = rewards + previous
        g = state
    else:
        raise ValueError(f"potential must be one of {POTENTIALS}, got {potential!r}.")
    return torch.softmax(lmbda * g.float(), dim=-1), state


@torch.no_grad()
def fk_steering(
    policy: Any,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    num_particles: int = 4,
    num_steps: int = 50,
    eta: float = 1.0,
    guidance_scale: float = 5.0,
    lmbda: float = 10.0,
    potential: str = "diff",
    resample_every: int = 5,
    resample_start: float = 0.2,
    resample_end: float = 0.9,
    ess_threshold: float = 1.0,
    seed: int = 0,
    keep_all: bool = False,
    batch_size: int | None = None,
    noise_level: float = 0.7,
    progress: bool = False,
) -> ScalingResult:
    """Feynman-Kac steering with ``K = num_particles`` particles per prompt (module docstring);
    ``progress``: a bar over each chunk's denoising steps.

    The particles of up to ``max(1, batch_size // K)`` prompts run as one batch (all prompts at
    once when ``batch_size`` is None); the initial noise, step noise and resampling draws of a
    prompt are seeded by its index, so chunking gives the same draws. Returns the best final particle per prompt, all
    final scores, and in ``info`` the resampling steps, the effective sample size before each
    resampling (``ess``, mean over prompts) and how many prompts were resampled there.
    ``eta`` is the DDIM noise of a ``DiffusionPolicy``, ``noise_level`` the SDE noise of a
    ``FlowPolicy``.
    """
    flow = is_flow_policy(policy)
    if _stochasticity(policy, eta, noise_level) <= 0:
        raise ValueError(
            f"FK steering needs stochastic steps ({'noise_level' if flow else 'eta'} > 0): "
            "resampled copies of a particle would otherwise stay identical."
        )
    if potential not in POTENTIALS:
        raise ValueError(f"potential must be one of {POTENTIALS}, got {potential!r}.")
    prompts = list(prompts)
    per_chunk = len(prompts) if batch_size is None else max(1, batch_size // num_particles)
    if len(prompts) > per_chunk:
        kw = dict(
            num_particles=num_particles,
            num_steps=num_steps,
            eta=eta,
            guidance_scale=guidance_scale,
            lmbda=lmbda,
            potential=potential,
            resample_every=resample_every,
            resample_start=resample_start,
            resample_end=resample_end,
            ess_threshold=ess_threshold,
            keep_all=keep_all,
            noise_level=noise_level,
            progress=progress,
        )
        parts = []
        for c in range(0, len(prompts), per_chunk):
            # prompt p of this chunk is prompt c + p overall: shift the seed by c * 100_003
            parts.append(
                fk_steering(
                    policy, prompts[c : c + per_chunk], reward_fn, seed=seed + c * 100_003, **kw
                )
            )
        info = dict(parts[0].info)
        info["ess"] = [float(sum(e) / len(e)) for e in zip(*(q.info["ess"] for q in parts))]
        info["resampled_prompts"] = [
            int(sum(r)) for r in zip(*(q.info["resampled_prompts"] for q in parts))
        ]
        return ScalingResult(
            images=torch.cat([q.images for q in parts]),
            scores=torch.cat([q.scores for q in parts]),
            best_index=torch.cat([q.best_index for q in parts]),
            best_scores=torch.cat([q.best_scores for q in parts]),
            unet_evals=sum(q.unet_evals for q in parts),
            reward_evals=sum(q.reward_evals for q in parts),
            all_images=torch.cat([q.all_images for q in parts]) if keep_all else None,
            info=info,
        )
    P, K = len(prompts), num_particles
    texts = [p for p in prompts for _ in range(K)]
    gens = [torch.Generator().manual_seed(_seed(seed, p, k)) for p in range(P) for k in range(K)]
    embeds = policy.encode_prompts(texts)
    negative = policy.negative_embeds(P * K) if _uses_cfg(policy, guidance_scale) else None
    timesteps = policy.set_timesteps(num_steps)
    x = policy.initial_latents(P * K, generator=gens)
    if not flow:
        x = x * policy.scheduler.init_noise_sigma
    steps = set(resampling_steps(num_steps, resample_every, resample_start, resample_end))
    state = torch.zeros(P, K)
    # one resampling RNG per prompt (seeded by the prompt's index, like its particles' noise)
    rngs = [torch.Generator().manual_seed(_seed(seed, p, 99_991)) for p in range(P)]
    info: dict[str, Any] = {
        "method": "fk",
        "resample_steps": sorted(steps),
        "ess": [],
        "resampled_prompts": [],
        "potential": potential,
        "lmbda": lmbda,
    }
    reward_evals = 0
    from tqdm.auto import tqdm

    bar = tqdm(
        list(enumerate(timesteps)),
        desc=f"FK steering ({P} prompts)",
        disable=not progress,
        dynamic_ncols=True,
    )
    for i, t in bar:
        if flow:
            eps = policy.predict_velocity(x, t, embeds, guidance_scale, negative)
        else:
            eps = policy.predict_noise(x, t, embeds, guidance_scale, negative)
        if i in steps:
            x0 = (flow_predict_x0 if flow else predict_x0)(policy.scheduler, eps, t, x)
            r = _score(reward_fn, policy.decode(x0).float(), texts).reshape(P, K)
            reward_evals += P * K
            w, new_state = fk_weights(r, state, potential, lmbda)
            ess = 1.0 / (w**2).sum(dim=1)
            idx = torch.arange(K).expand(P, K).clone()
            redo = ess < ess_threshold * K if ess_threshold < 1 else torch.ones(P, dtype=torch.bool)
            for p in torch.nonzero(redo).flatten().tolist():
                idx[p] = torch.multinomial(w[p], K, replacement=True, generator=rngs[p])
            flat = (idx + torch.arange(P)[:, None] * K).flatten().to(x.device)
            x, eps = x[flat], eps[flat]
            state = torch.gather(new_state, 1, idx)
            info["ess"].append(float(ess.mean()))
            info["resampled_prompts"].append(int(redo.sum()))
        if flow:
            x = sde_step_with_logprob(policy.scheduler, eps, t, x, noise_level, generator=gens)[0]
        else:
            x, _ = ddim_step_with_logprob(policy.scheduler, eps, t, x, eta=eta, generator=gens)
    images = policy.decode(x).float()
    scores = _score(reward_fn, images, texts).reshape(P, K)
    reward_evals += P * K
    unet_evals = P * K * num_steps * (2 if _uses_cfg(policy, guidance_scale) else 1)
    images = images.cpu().reshape(P, K, *images.shape[1:])
    return _finish(images, scores, unet_evals, reward_evals, keep_all, info)


@dataclass
class ScalingConfig:
    """Settings of the sampling recipe (``recipes/best_of_n.py``), parsed by ``trl.TrlParser``."""

    pretrained_model: str = field(
        default=str(BUNDLED_WEIGHTS / "tiny-world-sd"),
        metadata={
            "help": "Hub id or diffusers folder (SD 1.x: DiffusionPolicy; SD 3.x / FLUX: "
            "FlowPolicy), 'tiny', 'tiny-sd3' or 'tiny-flux'. Default: the bundled tiny-world "
            "SD 1.5-architecture model (offline)."
        },
    )
    method: str = field(default="best_of_n", metadata={"help": "'best_of_n' or 'fk'."})
    n: int = field(default=4, metadata={"help": "Images (best-of-N) or particles (FK) per prompt."})
    prompts: str = field(default="short", metadata={"help": "Prompt source (alignment.prompts)."})
    prompt_category: str | None = field(default=None, metadata={"help": "Category filter."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use the first N prompts."})
    reward: str = field(
        default="brightness",
        metadata={"help": "Reward name (alignment.rewards, e.g. llava_reward) or module:function."},
    )
    reward_kwargs: str | None = field(
        default=None, metadata={"help": "Reward keyword arguments as JSON or a YAML mapping."}
    )
    num_steps: int = field(default=50, metadata={"help": "DDIM steps."})
    eta: float = field(default=1.0, metadata={"help": "DDIM eta (FK needs > 0)."})
    noise_level: float = field(
        default=0.7,
        metadata={"help": "Flow models: the SDE noise level (0: the ODE; FK needs > 0)."},
    )
    guidance_scale: float = field(default=5.0, metadata={"help": "CFG scale."})
    seed: int = field(default=0, metadata={"help": "Base seed (see alignment.scaling)."})
    batch_size: int = field(
        default=16, metadata={"help": "Images (best-of-N) or particles (FK) per UNet batch."}
    )
    lmbda: float = field(default=10.0, metadata={"help": "FK temperature lambda."})
    potential: str = field(default="diff", metadata={"help": "FK potential: diff, max or add."})
    resample_every: int = field(default=5, metadata={"help": "FK: resample every N steps."})
    resample_start: float = field(default=0.2, metadata={"help": "FK: first resampling (frac)."})
    resample_end: float = field(default=0.9, metadata={"help": "FK: resampling stops (frac)."})
    ess_threshold: float = field(
        default=1.0, metadata={"help": "FK: resample only when ESS < this * K (1: always)."}
    )
    save_all: bool = field(default=False, metadata={"help": "Also write every candidate image."})
    output_dir: str = field(default="outputs/scaling", metadata={"help": "Images + scores.json."})
    device: str | None = field(
        default=None, metadata={"help": "cuda, cuda:1, cpu (None: this process's GPU, else cpu)."}
    )
    progress_bar: bool = field(default=True, metadata={"help": "Show a tqdm progress bar."})

    RANGES: ClassVar[dict[str, str]] = {
        "n": ">= 1",
        "max_prompts": ">= 1",
        "num_steps": ">= 1",
        "eta": ">= 0",
        "noise_level": ">= 0",
        "guidance_scale": ">= 0",
        "batch_size": ">= 1",
        "lmbda": ">= 0",
        "resample_every": ">= 1",
        "resample_start": "[0, 1]",
        "resample_end": "[0, 1]",
        "ess_threshold": "(0, 1]",
    }

    def __post_init__(self) -> None:
        from reward.guards import validate_config

        validate_config(self)
        if self.method not in ("best_of_n", "fk"):
            raise ValueError(f"method must be 'best_of_n' or 'fk', got {self.method!r}.")
        if self.resample_start >= self.resample_end:
            raise ValueError(
                f"resample_start ({self.resample_start}) must be below resample_end "
                f"({self.resample_end})."
            )


def run_scaling(cfg: ScalingConfig) -> dict[str, Any]:
    """Load the policy and reward, run best-of-N or FK steering, write ``output_dir``
    (``pNNNN.png`` best images, ``pNNNN_kK.png`` with ``save_all``, ``scores.json``)."""
    import json

    from alignment.flow_policy import load_frozen_policy
    from alignment.prompts import load_prompts
    from alignment.rewards import get_reward_fn
    from alignment.trainer_utils import parse_json_kwargs
    from reward.guards import process_device
    from reward.images import to_pil

    device = torch.device(cfg.device) if cfg.device else process_device()
    # the reward and the prompts first: a typo fails before the pipeline is loaded
    kwargs = parse_json_kwargs(cfg.reward_kwargs, "reward_kwargs")
    reward_fn = get_reward_fn(cfg.reward, device=device, **kwargs)
    prompts = load_prompts(cfg.prompts, cfg.prompt_category)[: cfg.max_prompts]
    policy = load_frozen_policy(cfg.pretrained_model, device)
    net = policy.transformer if is_flow_policy(policy) else policy.unet
    net.requires_grad_(False).eval()
    print(
        f"{cfg.method}: {len(prompts)} prompts x {cfg.n} {'images' if cfg.method == 'best_of_n' else 'particles'}, "
        f"{cfg.num_steps} steps, reward {cfg.reward!r}, on {device}."
    )
    common = dict(
        num_steps=cfg.num_steps,
        eta=cfg.eta,
        guidance_scale=cfg.guidance_scale,
        seed=cfg.seed,
        keep_all=cfg.save_all,
        noise_level=cfg.noise_level,
        progress=cfg.progress_bar,
    )
    if cfg.method == "best_of_n":
        res = best_of_n(policy, prompts, reward_fn, n=cfg.n, batch_size=cfg.batch_size, **common)
    elif cfg.method == "fk":
        res = fk_steering(
            policy,
            prompts,
            reward_fn,
            num_particles=cfg.n,
            lmbda=cfg.lmbda,
            potential=cfg.potential,
            resample_every=cfg.resample_every,
            resample_start=cfg.resample_start,
            resample_end=cfg.resample_end,
            ess_threshold=cfg.ess_threshold,
            **common,
        )
    else:
        raise ValueError(f"method must be 'best_of_n' or 'fk', got {cfg.method!r}.")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for p, prompt in enumerate(prompts):
        name = f"p{p:04d}.png"
        to_pil(res.images[p]).save(out / name)
        if res.all_images is not None:
            for k in range(res.all_images.shape[1]):
                to_pil(res.all_images[p, k]).save(out / f"p{p:04d}_k{k}.png")
        records.append(
            {
                "prompt": prompt,
                "image": name,
                "best_index": int(res.best_index[p]),
                "best_score": float(res.best_scores[p]),
                "scores": [float(x) for x in res.scores[p]],
            }
        )
    report = {
        "method": cfg.method,
        "n": cfg.n,
        "num_steps": cfg.num_steps,
        "unet_evals": res.unet_evals,
        "reward_evals": res.reward_evals,
        "mean_best_score": float(res.best_scores.mean()),
        "mean_score": float(res.scores.mean()),
        "info": res.info,
        "prompts": records,
    }
    atomic_write_text(out / "scores.json", json.dumps(report, indent=1))
    print(
        f"Wrote the best image of each of {len(prompts)} prompts (p0000.png ...) and "
        f"scores.json to {out.resolve()} (mean best score {report['mean_best_score']:.4g}, "
        f"mean score {report['mean_score']:.4g})."
    )
    return report


__all__ = [
    "POTENTIALS",
    "ScalingConfig",
    "run_scaling",
    "ScalingResult",
    "best_of_n",
    "fk_steering",
    "fk_weights",
    "resampling_steps",
]
