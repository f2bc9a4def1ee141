"""Diffusion-DPO (Wallace et al. 2023) for Stable Diffusion on accelerate: config, pair data and
the training loop.

Pairs come from one of two sources:

- **offline**: a preference file read by :mod:`reward.data` (Pick-a-Pic v2 parquet, the generic
  pair manifests ``{prompt, chosen, rejected}`` / ``{prompt, image_0, image_1, label}``, or any
  other paired format it reads); ties are dropped. Images are resized (shorter side) and
  centre-cropped to the model's resolution and VAE-encoded on the fly. ``build_data=true`` first
  writes such a manifest from the initial policy's own samples ranked by ``reward``
  (:func:`build_pair_manifest`, for tiny runs and tests);
- **online** (``data: online``): every ``refresh_every`` optimiser steps, sample
  ``images_per_prompt`` images for each of ``prompts_per_refresh`` prompts from the *current*
  policy, rank them with ``reward`` (any registered reward, e.g. LLaVA-Reward with a perspective
  or a weighted mix) and keep (best, worst) per prompt, or every pair whose reward gap exceeds
  ``reward_margin`` (``pairing: margin``). The sampled clean latents are used directly (no VAE
  round trip). The pair buffer is not checkpointed: a resumed run samples fresh pairs first.

Offline pairs are read as one deterministic stream over shuffled epochs, indexed by the global
sample position (the processes take consecutive slices; the trainer state counts the samples
drawn), and each pair's noise and timestep come from a stream keyed by that position
(:mod:`alignment.seeding`): a resumed run continues with the pairs the uninterrupted run would
have used, on any number of processes. ``build_data`` samples on every process (its share of the
prompts) and the main process writes the manifest.
Diffusion-DPO assumes the UNet denoises its own images (a pre-trained model); on a randomly
initialised UNet the implicit accuracy rises without the samples following the preference.

One micro-batch of ``B`` pairs: the preferred and the rejected latents are noised with the *same*
noise and timestep and go through the UNet in one ``2B`` call, then again under
``policy.reference()`` (LoRA adapter off, or the frozen copy for full fine-tuning, which is never
given to DeepSpeed) without a graph; :func:`alignment.dpo.diffusion_dpo_loss` (``beta`` with the
1/2 inside: 5000 for SD 1.5) gives the loss and the implicit accuracy. Logged per step: loss,
implicit accuracy, the model and reference error differences, and for online pairs the rewards
and reward margins of the pairs; optionally the mean reward of the policy on fixed evaluation
seeds. Checkpoints, resume and export are the shared ones (:mod:`alignment.trainer_utils`).

**Flow-matching policies** (SD 3.x, FLUX: ``pretrained_model`` a folder or hub id of a
``StableDiffusion3Pipeline`` / ``FluxPipeline``, or ``tiny-sd3`` / ``tiny-flux``) train with the
flow form of the loss, selected by the policy type (a
:class:`~alignment.flow_policy.FlowPolicy`): online pairs come from the policy's own flow SDE
sampler (``noise_level``; 0 is its ODE), ranked by ``reward``; each pair's latents are
interpolated to ``x_s = (1 - s) x0 + s eps`` with shared noise and a sigma drawn as SD3 trains
(``timestep_sampling``: logit-normal by default), the transformer predicts the velocity (FLUX
with ``guidance_scale`` in its guidance embedding, SD3 without CFG) and
:func:`alignment.dpo.flow_dpo_loss`'s errors against ``eps - x0`` go into the same loss, with
``beta`` 100 by default (:data:`alignment.dpo.FLOW_DPO_BETA`). The reference is the adapter
switched off; accelerate/DeepSpeed, checkpoints and resume are shared. Evaluation samples flow
policies with the ODE (the sampler of the exported pipeline). The policy is built and prepared by
:class:`~alignment.trainer_utils.PolicyTrainerBase` (as for DDPO, DRaFT and GRPO), with GRPO's
memory options (:class:`~alignment.trainer_utils.FlowPolicyOptions`: ``max_sequence_length``, the
prompt set encoded once and the text encoders moved off the accelerator); ``export_dir`` writes a
``StableDiffusion3Pipeline`` / ``FluxPipeline`` folder and the LoRA file
(:func:`alignment.export.export_from_accelerator`, GRPO's export).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from alignment.dpo import (
    DIFFUSION_DPO_BETA,
    FLOW_DPO_BETA,
    LOSS_TYPES,
    TIMESTEP_SAMPLING,
    denoising_target,
    diffusion_dpo_loss,
    flow_training_sigmas,
    per_image_error,
)
from alignment.flow import flow_interpolate, flow_velocity_target
from alignment.trainer_utils import (
    FlowPolicyOptions,
    PolicyTrainConfig,
    PolicyTrainerBase,
    parse_json_kwargs,
    reduce_metrics,
)
from reward.guards import NonFiniteError, any_process


@dataclass
class DPOConfig(FlowPolicyOptions, PolicyTrainConfig):
    """Settings of a Diffusion-DPO run (YAML + command line through ``trl.TrlParser``)."""

    # --- data
    data: str = field(
        default="online",
        metadata={
            "help": "'online' (pairs sampled from the policy and ranked by `reward`), or a "
            "preference file (comma-separated for several): Pick-a-Pic v2 parquet, a pair "
            "manifest .json/.jsonl/.parquet, or any paired format reward.data reads."
        },
    )
    data_format: str = field(
        default="auto",
        metadata={"help": "reward.data format: auto, pairs, pickapic, imagereward, mjbench, ..."},
    )
    image_root: str | None = field(
        default=None, metadata={"help": "Folder for relative image paths (default: the file's)."}
    )
    max_pairs: int | None = field(default=None, metadata={"help": "Use at most this many pairs."})
    build_data: bool = field(
        default=False,
        metadata={
            "help": "If `data` does not exist, first write it as a pair manifest of the initial "
            "policy's samples ranked by `reward` (tiny runs and tests); a relative `data` path "
            "is then taken under output_dir."
        },
    )
    build_data_offset: float = field(
        default=0.0,
        metadata={
            "help": "build_data: random brightness offset in [-a, a] added to each image "
            "before ranking (widens a tiny model's spread; see build_pair_manifest)."
        },
    )
    # --- prompts and reward (online pairs, build_data, evaluation)
    prompts: str = field(
        default="short",
        metadata={"help": "Prompt source: 'short', 'parti', or a .txt/.tsv/.json(l) file."},
    )
    prompt_category: str | None = field(
        default=None, metadata={"help": "Category filter (comma-separated), e.g. 'Animals'."}
    )
    reward: str | None = field(
        default=None,
        metadata={
            "help": "Reward name (alignment.rewards) or 'module:function'; online pairs, "
            "build_data and evaluation use it."
        },
    )
    reward_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "Reward keyword arguments as JSON (or a YAML mapping), e.g. "
            '\'{"path": "out/rm", "perspective": {"alignment": 1, "fidelity": 0.5}}\'.'
        },
    )
    images_per_prompt: int = field(
        default=4, metadata={"help": "Online / build_data: images sampled per prompt."}
    )
    prompts_per_refresh: int = field(
        default=16, metadata={"help": "Online: prompts sampled per refresh and process."}
    )
    refresh_every: int = field(
        default=10, metadata={"help": "Online: resample the pairs every K optimiser steps."}
    )
    pairing: str = field(
        default="best_worst",
        metadata={
            "help": "'best_worst' (one pair per prompt) or 'margin' (all pairs whose "
            "reward gap exceeds reward_margin)."
        },
    )
    reward_margin: float = field(
        default=0.0, metadata={"help": "Keep a pair only if r_chosen - r_rejected > this."}
    )
    # --- sampling (online pairs, build_data, evaluation)
    num_steps: int = field(default=50, metadata={"help": "Denoising steps when sampling."})
    eta: float = field(default=1.0, metadata={"help": "DDIM eta when sampling (SD 1.x/2.x)."})
    noise_level: float = field(
        default=0.7,
        metadata={
            "help": "Flow policies (SD 3.x, FLUX): the SDE noise level of the pair sampler "
            "(0: the ODE; evaluation always uses the ODE)."
        },
    )
    guidance_scale: float = field(default=5.0, metadata={"help": "CFG scale when sampling."})
    sample_batch_size: int = field(default=16, metadata={"help": "Images per sampling call."})
    # --- DPO
    beta: float | None = field(
        default=None,
        metadata={
            "help": "DPO beta with the 1/2 inside the loss. Default by the policy: 5000 for "
            "SD 1.x (= 2500 without the 1/2), 100 for flow policies (Flow-GRPO's SD 3.5-M DPO)."
        },
    )
    timestep_sampling: str = field(
        default="logit_normal",
        metadata={
            "help": "Flow policies: how each pair's sigma is drawn from the 1000 training "
            "sigmas: 'logit_normal' (SD3's training density) or 'uniform'."
        },
    )
    logit_mean: float = field(
        default=0.0, metadata={"help": "Flow policies, logit_normal: mean of the logit."}
    )
    logit_std: float = field(
        default=1.0, metadata={"help": "Flow policies, logit_normal: std of the logit."}
    )
    loss_type: str = field(
        default="sigmoid", metadata={"help": "'sigmoid' (Diffusion-DPO), 'hinge' or 'ipo'."}
    )
    # --- evaluation
    eval_every: int = field(
        default=0, metadata={"help": "Mean reward on fixed prompts/seeds every N steps (0: off)."}
    )
    eval_prompts: int = field(default=4, metadata={"help": "Evaluation prompts (first N)."})
    eval_seeds: int = field(default=2, metadata={"help": "Evaluation seeds per prompt."})
    tracker_project: str = field(default="diffusion-dpo", metadata={"help": "Tracker project."})
    output_dir: str = field(default="outputs/dpo", metadata={"help": "Run folder."})

    #: several preference files: comma-separated, or a YAML list
    COMMA_FIELDS: ClassVar[tuple[str, ...]] = ("data",)
    RANGES: ClassVar[dict[str, str]] = {
        "max_pairs": ">= 1",
        "build_data_offset": ">= 0",
        "images_per_prompt": ">= 2",
        "prompts_per_refresh": ">= 1",
        "refresh_every": ">= 1",
        "reward_margin": ">= 0",
        "num_steps": ">= 1",
        "eta": ">= 0",
        "noise_level": ">= 0",
        "guidance_scale": ">= 0",
        "sample_batch_size": ">= 1",
        "beta": "> 0",
        "logit_std": "> 0",
        "eval_every": ">= 0",
        "eval_prompts": ">= 1",
        "eval_seeds": ">= 1",
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reward_kwargs = parse_json_kwargs(self.reward_kwargs, "reward_kwargs")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}.")
        if self.pairing not in ("best_worst", "margin"):
            raise ValueError(f"pairing must be 'best_worst' or 'margin', got {self.pairing!r}.")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(
                f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got "
                f"{self.timestep_sampling!r}."
            )

    @property
    def online(self) -> bool:
        return self.data.strip().lower() == "online"


def vae_latents(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Model latents of images ``[B, 3, H, W]`` in [-1, 1]: ``(z - shift) * scale`` with ``z``
    the VAE posterior's mode (SD 1.x has no shift; SD3 and FLUX do), as the pipelines' inverse
    of their decode."""
    cfg = vae.config
    z = vae.encode(pixels).latent_dist.mode()
    return (z - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor


# ----------------------------------------------------------------------------- pair selection


def select_pairs(
    rewards: torch.Tensor, pairing: str = "best_worst", margin: float = 0.0
) -> list[tuple[int, int, int]]:
    """Pairs ``(prompt, chosen, rejected)`` from rewards ``[P, N]`` of N images per prompt.

    ``best_worst``: ``(argmax, argmin)`` per prompt; ``margin``: every ``(i, j)`` with
    ``r_i - r_j > margin``. Either way a pair is kept only if its gap exceeds ``margin`` (so exact
    ties are never pairs). Non-finite rewards (NaN, inf) never enter a pair.
    """
    out: list[tuple[int, int, int]] = []
    r = rewards.detach().float().cpu()
    finite = torch.isfinite(r)
    for p in range(r.shape[0]):
        if pairing == "best_worst":
            if not finite[p].any():
                continue
            i = int(torch.where(finite[p], r[p], float("-inf")).argmax())
            j = int(torch.where(finite[p], r[p], float("inf")).argmin())
            if r[p, i] - r[p, j] > margin:
                out.append((p, i, j))
        elif pairing == "margin":
            for i in range(r.shape[1]):
                for j in range(r.shape[1]):
                    if finite[p, i] and finite[p, j] and r[p, i] - r[p, j] > margin:
                        out.append((p, i, j))
        else:
            raise ValueError(f"unknown pairing {pairing!r}")
    return out


@torch.no_grad()
def sample_ranked(
    policy: Any,
    prompts: Sequence[str],
    reward_fn: Callable,
    images_per_prompt: int,
    num_steps: int,
    eta: float,
    guidance_scale: float,
    batch_size: int = 16,
    generator_seed: int | None = None,
    autocast: Any = None,
    prompt_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Sample ``N = images_per_prompt`` images for each of ``P`` prompts and score them.

    ``policy`` is a :class:`~alignment.policy.DiffusionPolicy` (``eta``: its DDIM eta) or a
    :class:`~alignment.flow_policy.FlowPolicy` (``eta``: the flow SDE's ``noise_level``; 0 is the
    ODE): the third positional argument of either's ``sample``. Either way the latents are the
    sampler's last, clean ones.

    Returns ``{"latents": [P, N, C, h, w] (clean x_0), "images": [P, N, 3, H, W],
    "rewards": [P, N]}``. With ``generator_seed`` image ``n`` of prompt ``p`` is seeded with
    ``generator_seed + prompt_ids[p] * N + n`` (``prompt_ids`` default ``0 .. P - 1``; a process
    sampling its share of a larger prompt list passes the prompts' global indices, so the images
    do not depend on how the list was shared out).
    """
    n_img = images_per_prompt
    ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
    flat = [p for p in prompts for _ in range(n_img)]
    seeds = [ids[p] * n_img + n for p in range(len(prompts)) for n in range(n_img)]
    lat, imgs, rews = [], [], []
    for s in range(0, len(flat), batch_size):
        chunk = flat[s : s + batch_size]
        gens = None
        if generator_seed is not None:
            gens = [
                torch.Generator().manual_seed(generator_seed + k) for k in seeds[s : s + batch_size]
            ]
        ctx = autocast() if autocast is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            out = policy.sample(chunk, num_steps, eta, guidance_scale, generator=gens)
        images = out.images.float()
        r = torch.as_tensor(reward_fn(images, chunk), dtype=torch.float32).reshape(-1)
        lat.append(out.latents[:, -1].float().cpu())
        imgs.append(images.cpu())
        rews.append(r.detach().cpu())
    shape = (len(prompts), images_per_prompt)
    return {
        "latents": torch.cat(lat).reshape(*shape, *lat[0].shape[1:]),
        "images": torch.cat(imgs).reshape(*shape, *imgs[0].shape[1:]),
        "rewards": torch.cat(rews).reshape(shape),
    }


def build_pair_manifest(
    path: str | Path,
    policy: Any,
    prompts: Sequence[str],
    reward_fn: Callable,
    images_per_prompt: int = 4,
    pairing: str = "best_worst",
    margin: float = 0.0,
    num_steps: int = 10,
    eta: float = 1.0,
    guidance_scale: float = 5.0,
    seed: int = 0,
    batch_size: int = 16,
    brightness_offset: float = 0.0,
    accelerator: Any = None,
) -> Path:
    """Write a pair manifest (JSONL ``{prompt, chosen, rejected, id, reward_chosen,
    reward_rejected}``, PNG images in ``images/`` next to it) of ``policy``'s own samples ranked
    by ``reward_fn``: a small offline preference set, e.g. "the brighter image wins" for tests.
    Readable by :func:`reward.data.read_pairs`. Returns the manifest path. ``policy`` and ``eta``
    as in :func:`sample_ranked` (a FlowPolicy's ``eta`` is its SDE ``noise_level``).

    ``brightness_offset = a > 0`` adds a uniform random offset in ``[-a, a]`` to every sampled
    image (clamped to [0, 1]) before it is scored: a photometric augmentation that widens the
    spread of simple properties (a tiny random pipeline's images all have a mean near 0.5).

    With ``accelerator`` (call it on every process then) each process samples its share of the
    prompts (``prompts[rank::P]``, padded so that every process makes the same number of UNet
    calls, as DeepSpeed ZeRO-3 needs); image ``n`` of prompt ``p`` is seeded by ``(seed, p, n)``
    alone, so the manifest is the one a single process writes. The pairs and their PNG bytes are
    gathered, and the main process writes the files.
    """
    rank, world = (
        (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    )
    path = Path(path)
    n_img = images_per_prompt
    ids = list(range(rank, len(prompts), world))
    real = len(ids)
    ids += [ids[0] if ids else 0] * (-(-len(prompts) // world) - real)  # pad: same UNet calls
    res = sample_ranked(
        policy,
        [prompts[p] for p in ids],
        reward_fn,
        n_img,
        num_steps,
        eta,
        guidance_scale,
        batch_size,
        generator_seed=seed,
        prompt_ids=ids,
    )
    ids = ids[:real]
    res = {k: v[:real] for k, v in res.items()}
    if brightness_offset > 0 and ids:
        g = torch.Generator().manual_seed(seed)
        off = (torch.rand((len(prompts), n_img), generator=g) * 2 - 1) * brightness_offset
        res["images"] = (res["images"] + off[ids][..., None, None, None]).clamp(0, 1)
        flat = res["images"].flatten(0, 1)
        prompts_flat = [prompts[p] for p in ids for _ in range(n_img)]
        rewards = torch.as_tensor(reward_fn(flat, prompts_flat), dtype=torch.float32)
        res["rewards"] = rewards.reshape(real, n_img)
    found = []  # (global prompt, chosen, rejected, PNG bytes of both, rewards)
    for p, i, j in select_pairs(res["rewards"], pairing, margin) if ids else []:
        pngs = [_png_bytes(res["images"][p, n]) for n in (i, j)]
        found.append((ids[p], i, j, pngs, float(res["rewards"][p, i]), float(res["rewards"][p, j])))
    if accelerator is not None and world > 1:
        from accelerate.utils import gather_object

        found = gather_object(found)  # every process gets all of them
    if not found:
        raise ValueError("No pair has a reward gap above the margin: nothing to write.")
    if accelerator is None or accelerator.is_main_process:
        _write_manifest(path, prompts, sorted(found, key=lambda x: x[:3]))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return path


def _png_bytes(image: torch.Tensor) -> bytes:
    import io

    from reward.images import to_pil

    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


def _write_manifest(path: Path, prompts: Sequence[str], found: list) -> None:
    """The manifest and images of :func:`build_pair_manifest` (written atomically)."""
    img_dir = path.parent / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, (p, i, j, pngs, r_chosen, r_rejected) in enumerate(found):
        names = []
        for n, data in zip((i, j), pngs):
            name = f"p{p:04d}_{n:02d}.png"
            if not (img_dir / name).exists():
                (img_dir / name).write_bytes(data)
            names.append(f"images/{name}")
        lines.append(
            {
                "id": str(k),
                "prompt": prompts[p],
                "chosen": names[0],
                "rejected": names[1],
                "reward_chosen": r_chosen,
                "reward_rejected": r_rejected,
            }
        )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    tmp.replace(path)


def load_pair_dataset(
    data: str,
    data_format: str = "auto",
    image_root: str | None = None,
    max_pairs: int | None = None,
) -> Any:
    """A paired ``datasets.Dataset`` (``prompt, chosen, rejected`` as PIL) from preference files
    read by :func:`reward.data.load_reward_data`; ties dropped."""
    from reward.data import load_reward_data

    paths = [p.strip() for p in data.split(",") if p.strip()]
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(
                f"Preference data {p!r} not found. Give a Pick-a-Pic v2 parquet shard or a pair "
                "manifest, data=online for pairs sampled from the policy, or build_data=true."
            )
    kwargs: dict[str, Any] = {}
    if image_root is not None:
        kwargs["image_root"] = image_root
    fmt = data_format
    if fmt in ("auto", "pairs", "imagereward", "pickapic", "mjbench", "genai_bench"):
        kwargs["keep_ties"] = False
    ds, report = load_reward_data(paths if len(paths) > 1 else paths[0], format=fmt, **kwargs)
    if "chosen" not in ds.column_names:
        raise ValueError(
            f"{data} holds single images, not pairs; Diffusion-DPO needs preference pairs "
            "(chosen/rejected)."
        )
    if "tie" in ds.column_names:
        ds = ds.filter(lambda t: not t, input_columns="tie")
    if max_pairs is not None:
        ds = ds.select(range(min(max_pairs, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"{data}: no usable (non-tie) pairs; report: {report.as_dict()}")
    return ds


def pil_to_model_input(images: Sequence[Any], resolution: int) -> torch.Tensor:
    """PIL images -> ``[B, 3, R, R]`` in ``[-1, 1]`` (shorter side resized to ``R`` with bicubic
    resampling, then centre-cropped)."""
    from PIL import Image

    out = []
    for img in images:
        img = img.convert("RGB")
        w, h = img.size
        s = resolution / min(w, h)
        img = img.resize(
            (max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC
        )
        w, h = img.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out)


# ----------------------------------------------------------------------------- trainer


class DPOTrainer(PolicyTrainerBase):
    """Builds policy, pairs (offline or online), reward and accelerator from a
    :class:`DPOConfig` and trains with the Diffusion-DPO loss.

    The policy type selects the form of the loss: a :class:`~alignment.policy.DiffusionPolicy`
    (SD 1.x/2.x: noise or v prediction) or a :class:`~alignment.flow_policy.FlowPolicy` (SD 3.x,
    FLUX: the flow-matching form, :func:`alignment.dpo.flow_dpo_loss`); built from
    ``pretrained_model`` by its pipeline class when not given.

    Args:
        config: the run's settings.
        policy: an existing :class:`~alignment.policy.DiffusionPolicy` or
            :class:`~alignment.flow_policy.FlowPolicy` (default: built).
        reward_fn: a reward callable (default: ``get_reward_fn(config.reward,
            device=accelerator.device, **reward_kwargs)``).
        prompts: prompts for online pairs / build_data / evaluation (default: ``config.prompts``).
        dataset: an offline paired dataset (default: read from ``config.data``).
    """

    def __init__(
        self,
        config: DPOConfig,
        policy: Any = None,
        reward_fn: Callable | None = None,
        prompts: Sequence[str] | None = None,
        dataset: Any = None,
    ) -> None:
        from alignment.rewards import get_reward_fn

        self.load_prompts_and_check_reward(config, prompts, None if reward_fn else config.reward)
        self.setup(config, policy, keep_reference=True)
        cfg, acc = config, self.accelerator
        # self.is_flow (the base's): the flow-matching form (FlowPolicy) or the
        # noise-prediction form (DiffusionPolicy)
        self.beta = cfg.beta
        if self.beta is None:
            self.beta = FLOW_DPO_BETA if self.is_flow else DIFFUSION_DPO_BETA
        #: the sampler's noise for pairs (DDIM eta or the flow SDE's noise_level) and evaluation
        self.sample_noise = cfg.noise_level if self.is_flow else cfg.eta
        self.eval_noise = 0.0 if self.is_flow else cfg.eta
        if self.is_flow:
            from diffusers import FlowMatchEulerDiscreteScheduler

            # the training schedule (N = num_train_timesteps sigmas, shift applied as at training)
            train = FlowMatchEulerDiscreteScheduler.from_config(self.policy.scheduler.config)
            self._flow_sigmas = train.sigmas.float()
            self._flow_timesteps = train.timesteps.float()
        self.reward_fn = reward_fn
        if self.reward_fn is None and cfg.reward:
            with self.frozen_outside_zero3():
                self.reward_fn = get_reward_fn(cfg.reward, **self.reward_kwargs(cfg.reward_kwargs))
        if self.reward_fn is None and (cfg.online or cfg.build_data or cfg.eval_every):
            raise ValueError(
                "Online pairs, build_data and eval_every need a reward: set `reward` (e.g. "
                "llava_reward with reward_kwargs {path, perspective}, or brightness), or pass "
                "reward_fn= to the trainer."
            )
        self.resolution = cfg.resolution or self.policy.latent_shape(1)[-1] * 2 ** (
            len(self.policy.vae.config.block_out_channels) - 1
        )
        # flow policies: the prompt set (online pairs, build_data, evaluation) encoded once, then
        # the text encoders off the accelerator (GRPO's memory options, the same code)
        self.cache_prompts(self.prompts)
        self.dataset = dataset
        self._buffer: dict[str, Any] | None = None
        self._orders: dict[int, torch.Tensor] = {}
        #: the preference file; with build_data a relative path lies under output_dir
        self.data_path = cfg.data
        if cfg.build_data and not cfg.online and not Path(cfg.data).is_absolute():
            self.data_path = str(self.output_dir / cfg.data)
        if not cfg.online and self.dataset is None:
            if cfg.build_data and not Path(self.data_path).exists():
                acc.print(f"Building the pair manifest {self.data_path} from the policy.")
                # every process samples its share (the UNet may be sharded: ZeRO-3)
                build_pair_manifest(
                    self.data_path,
                    self.policy,
                    self.prompts,
                    self.reward_fn,
                    cfg.images_per_prompt,
                    cfg.pairing,
                    cfg.reward_margin,
                    cfg.num_steps,
                    self.sample_noise,
                    cfg.guidance_scale,
                    cfg.seed,
                    cfg.sample_batch_size,
                    cfg.build_data_offset,
                    accelerator=acc,
                )
            self.dataset = load_pair_dataset(
                self.data_path, cfg.data_format, cfg.image_root, cfg.max_pairs
            )

    # ------------------------------------------------------------------------------ data
    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            from alignment.seeding import stream_generator

            g = stream_generator(self.config.seed, "dpo_order", epoch)
            self._orders = {epoch: torch.randperm(len(self.dataset), generator=g)}
        return self._orders[epoch]

    def offline_batch(
        self, sample_ids: Sequence[int]
    ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """The pairs at global stream positions ``sample_ids``: position ``k`` is pair
        ``order_e[k % n]`` of epoch ``e = k // n``, each epoch a fresh shuffle of the ``n``
        pairs (:func:`alignment.seeding.stream_generator` ``(seed, "dpo_order", e)``)."""
        acc, n = self.accelerator, len(self.dataset)
        idx = [int(self._order(k // n)[k % n]) for k in sample_ids]
        rows = self.dataset[idx] if len(set(idx)) == len(idx) else None
        if rows is None:  # tiny data sets: a batch may wrap to the next epoch
            rows = {"prompt": [], "chosen": [], "rejected": []}
            for i in idx:
                r = self.dataset[i]
                for key in rows:
                    rows[key].append(r[key])
        pix = pil_to_model_input(list(rows["chosen"]) + list(rows["rejected"]), self.resolution)
        vae = self.policy.vae
        with torch.no_grad():
            lat = vae_latents(vae, pix.to(acc.device, next(vae.parameters()).dtype))
        lat_w, lat_l = lat.float().chunk(2)
        return list(rows["prompt"]), lat_w, lat_l

    def process_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Online pairs: this process's pair buffer (sampled at the last refresh by the policy
        of then), so a run resumed between refreshes trains on the same pairs."""
        if self._buffer is None:
            return {}, {}
        tensors = {k: self._buffer[k] for k in ("latents_w", "latents_l")}
        return tensors, {"online_prompts": json.dumps(self._buffer["prompts"])}

    def load_process_state(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
        if "online_prompts" in metadata:
            device = self.accelerator.device
            self._buffer = {
                "prompts": json.loads(metadata["online_prompts"]),
                **{k: tensors[k].to(device) for k in ("latents_w", "latents_l")},
            }

    def refresh_pairs(self) -> dict[str, float]:
        """Sample and rank fresh online pairs from the current policy; returns their stats.

        Prompt slot ``j`` of this refresh (``rank * prompts_per_refresh + i`` over all
        processes) and its images are drawn from streams keyed by ``(seed, step, j)``."""
        from alignment.seeding import stream_generator, stream_seed

        cfg, acc = self.config, self.accelerator
        k = cfg.prompts_per_refresh
        slots = range(acc.process_index * k, (acc.process_index + 1) * k)
        step = self.global_step
        gens = [stream_generator(cfg.seed, "dpo_online_prompt", step, j) for j in slots]
        prompts = [
            self.prompts[int(torch.randint(len(self.prompts), (), generator=g))] for g in gens
        ]
        self.unet.eval()
        res = sample_ranked(
            self.policy,
            prompts,
            self.reward_fn,
            cfg.images_per_prompt,
            cfg.num_steps,
            self.sample_noise,
            cfg.guidance_scale,
            cfg.sample_batch_size,
            generator_seed=stream_seed(cfg.seed, "dpo_online_noise", self.global_step),
            autocast=acc.autocast,
            prompt_ids=slots,
        )
        r = res["rewards"]
        pairs = select_pairs(r, cfg.pairing, cfg.reward_margin)
        if not pairs:  # every image scored the same: fall back to best-vs-worst without margin
            pairs = select_pairs(r, "best_worst", float("-inf"))
        # statistics over every process: the rewards gathered, the pairs' means weighted by count
        all_r = acc.gather(r.to(acc.device)).cpu()
        finite = all_r[torch.isfinite(all_r)]
        stats = {
            "online/reward_mean": float(finite.mean()) if finite.numel() else float("nan"),
            "online/reward_std": float(finite.std()) if finite.numel() > 1 else float("nan"),
            "rewards/nonfinite": float(all_r.numel() - finite.numel()),
        }
        local = {"online/reward_chosen": 0.0, "online/reward_rejected": 0.0}
        if pairs:
            p, i, j = (torch.tensor(x) for x in zip(*pairs))
            local = {
                "online/reward_chosen": float(r[p, i].mean()),
                "online/reward_rejected": float(r[p, j].mean()),
            }
            self._buffer = {
                "prompts": [prompts[k] for k in p.tolist()],
                "latents_w": res["latents"][p, i].to(acc.device),
                "latents_l": res["latents"][p, j].to(acc.device),
            }
        # decided together: a process without pairs cannot take its part of the step, and one
        # process raising alone leaves the others waiting in the next collective
        if any_process(acc, self._buffer is None):
            where = "this process" if self._buffer is None else "another process"
            raise NonFiniteError(
                f"No online pair on {where}: every reward of the prompts it sampled at step "
                f"{self.global_step} is non-finite (or all are equal). Check the reward."
            )
        local = reduce_metrics(acc, local, weight=len(pairs))
        local["online/reward_margin"] = (
            local["online/reward_chosen"] - local["online/reward_rejected"]
        )
        count = reduce_metrics(acc, {"online/num_pairs": len(pairs)}, sum_keys=["online/num_pairs"])
        return {**stats, **local, **count}

    def online_batch(
        self, sample_ids: Sequence[int]
    ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Pairs of this process's buffer, drawn with replacement (one stream per position)."""
        from alignment.seeding import stream_generator

        buf = self._buffer
        n = len(buf["prompts"])
        seed = self.config.seed
        idx = [
            int(torch.randint(n, (), generator=stream_generator(seed, "dpo_online_batch", k)))
            for k in sample_ids
        ]
        return [buf["prompts"][k] for k in idx], buf["latents_w"][idx], buf["latents_l"][idx]

    # ------------------------------------------------------------------------------ loss
    def pair_draws(
        self, lat: torch.Tensor, sample_ids: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise ``[B, C, h, w]`` and the timestep draw ``[B]`` of ``B`` pairs.

        The draw is an integer timestep in ``[0, num_train_timesteps)`` (noise-prediction form)
        or a uniform ``r`` in [0, 1) that :func:`alignment.dpo.flow_training_sigmas` maps to the
        pair's sigma (flow form). With ``sample_ids`` (the pairs' global stream positions) pair
        ``k``'s noise and draw come from the stream ``(seed, "dpo_noise", k)``, whatever process
        draws it; without, from the global torch RNG."""
        n_train = self.policy.scheduler.config.num_train_timesteps
        if sample_ids is None:
            noise = torch.randn_like(lat)
            if self.is_flow:
                return noise, torch.rand(lat.shape[0], device=lat.device)
            return noise, torch.randint(0, n_train, (lat.shape[0],), device=lat.device)
        from alignment.seeding import stream_generator

        gens = [stream_generator(self.config.seed, "dpo_noise", k) for k in sample_ids]
        noise = torch.stack([torch.randn(lat.shape[1:], generator=g) for g in gens])
        if self.is_flow:
            draw = torch.stack([torch.rand((), generator=g) for g in gens])
        else:
            draw = torch.stack([torch.randint(0, n_train, (), generator=g) for g in gens])
        return noise.to(lat.device, lat.dtype), draw.to(lat.device)

    def noised_pairs(
        self, lat_w: torch.Tensor, lat_l: torch.Tensor, noise: torch.Tensor, draw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, t, target)`` of the ``2B`` images ``[preferred; rejected]``, each pair with
        its shared noise and timestep.

        Noise-prediction form: ``x_t`` from the scheduler's ``add_noise``, target ``eps`` (or the
        v target). Flow form: ``s`` from :func:`alignment.dpo.flow_training_sigmas`,
        ``x_s = (1 - s) x0 + s eps``, target ``eps - x0``, ``t = 1000 s`` (scheduler units)."""
        x0 = torch.cat([lat_w, lat_l])
        noise2 = torch.cat([noise, noise])
        if self.is_flow:
            cfg = self.config
            sigma, t = flow_training_sigmas(
                draw,
                self._flow_sigmas,
                self._flow_timesteps,
                cfg.timestep_sampling,
                cfg.logit_mean,
                cfg.logit_std,
            )
            sigma2 = torch.cat([sigma, sigma]).to(x0.device)
            x_t = flow_interpolate(x0, noise2, sigma2)
            return x_t, torch.cat([t, t]).to(x0.device), flow_velocity_target(x0, noise2)
        sched = self.policy.scheduler
        t2 = torch.cat([draw, draw])
        return sched.add_noise(x0, noise2, t2), t2, denoising_target(sched, x0, noise2, t2)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, embeds: Any) -> torch.Tensor:
        """The model's prediction at ``x_t`` without CFG: the noise (or v) of a UNet, the
        velocity of a flow transformer (FLUX with ``guidance_scale`` in its guidance embedding,
        as it was distilled)."""
        policy = self.policy
        if self.is_flow:
            g = self.config.guidance_scale if policy.kind == "flux" else 1.0
            return policy.predict_velocity(x_t, t, embeds, g)
        return policy.predict_noise(x_t, t, embeds, 1.0)

    def compute_loss(
        self,
        prompts: list[str],
        lat_w: torch.Tensor,
        lat_l: torch.Tensor,
        sample_ids: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Diffusion-DPO loss of one micro-batch of pairs (shared noise and timestep per pair),
        in the noise-prediction or the flow form (:meth:`pair_draws`, :meth:`noised_pairs`).

        In the flow form the loss equals :func:`alignment.dpo.flow_dpo_loss` of the policy's and
        the reference's velocities at the pairs' ``x_s`` (tests/test_flow_dpo.py); the errors
        are computed once here, for the loss and the log."""
        cfg, acc, policy = self.config, self.accelerator, self.policy
        embeds = policy.encode_prompts(prompts)
        noise, draw = self.pair_draws(lat_w, sample_ids)
        x_t, t2, target = self.noised_pairs(lat_w, lat_l, noise, draw)
        emb2 = type(embeds).cat([embeds, embeds]) if self.is_flow else torch.cat([embeds, embeds])
        with acc.autocast():
            err = per_image_error(target, self.predict(x_t, t2, emb2))
        with torch.no_grad(), acc.autocast(), policy.reference():
            ref = per_image_error(target, self.predict(x_t, t2, emb2))
        mw, ml = err.chunk(2)
        rw, rl = ref.chunk(2)
        loss, accuracy = diffusion_dpo_loss(mw, ml, rw, rl, self.beta, cfg.loss_type)
        info = {
            "loss": loss.item(),
            "implicit_acc": accuracy.item(),
            "model_diff": (mw - ml).mean().item(),
            "ref_diff": (rw - rl).mean().item(),
            "model_err": err.mean().item(),
        }
        return loss, info

    # ------------------------------------------------------------------------------ loop
    def evaluate(self) -> float:
        """Mean reward of the policy on the first ``eval_prompts`` prompts and fixed seeds
        (flow policies sample with the ODE)."""
        from alignment.ddpo_trainer import evaluate_policy

        cfg = self.config
        self.unet.eval()
        with self.accelerator.autocast():
            r = evaluate_policy(
                self.policy,
                self.reward_fn,
                self.prompts[: cfg.eval_prompts],
                list(range(cfg.eval_seeds)),
                cfg.num_steps,
                cfg.guidance_scale,
                self.eval_noise,
            )
        return float(r[torch.isfinite(r)].mean())

    def train(self) -> list[dict[str, float]]:
        """Run (or resume) training; checkpoint, log, export. Returns the per-step history."""
        cfg, acc = self.config, self.accelerator
        self.init_trackers()
        self.maybe_resume()
        if cfg.eval_every and self.global_step == 0:
            self.log({"step": 0, "eval/reward_mean": self.evaluate()})
        ga = cfg.gradient_accumulation_steps
        online_stats: dict[str, float] = {}
        bar = self.pbar(
            range(self.global_step, cfg.max_steps),
            desc="dpo",
            initial=self.global_step,
            total=cfg.max_steps,
        )
        for _ in bar:
            if cfg.online and (self._buffer is None or self.global_step % cfg.refresh_every == 0):
                online_stats = self.refresh_pairs()
            self.unet.train()
            infos = []
            for _a in range(ga):
                ids = self.next_sample_ids()
                batch = self.online_batch(ids) if cfg.online else self.offline_batch(ids)
                with acc.accumulate(self.unet):
                    loss, info = self.compute_loss(*batch, sample_ids=ids)
                    self.backward_and_step(loss)
                infos.append(info)
            self.global_step += 1
            record = self.step_record(infos)
            record.update(online_stats)
            online_stats = {}
            if cfg.eval_every and self.global_step % cfg.eval_every == 0:
                record["eval/reward_mean"] = self.evaluate()
            if self.global_step % cfg.log_every == 0 or "eval/reward_mean" in record:
                self.log(record)
            if cfg.log_images_every and self.global_step % cfg.log_images_every == 0:
                self.log_policy_samples(
                    self.prompts, cfg.num_steps, self.eval_noise, cfg.guidance_scale
                )
            bar.set_postfix(loss=f"{record['loss']:.4g}", acc=f"{record['implicit_acc']:.2f}")
            if self.should_save():
                self.save_checkpoint()
        self.finish()
        return self.history


__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "build_pair_manifest",
    "load_pair_dataset",
    "pil_to_model_input",
    "sample_ranked",
    "select_pairs",
    "vae_latents",
]
