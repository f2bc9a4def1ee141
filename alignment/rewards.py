"""The reward registry: every reward the trainers use, looked up by name.

A reward is a plain callable::

    fn(images: Tensor[N, 3, H, W] float in [0, 1], prompts: list[str]) -> Tensor[N] (float32)

Built-in names: ``jpeg_compressibility``, ``jpeg_incompressibility``, ``brightness``,
``llava_reward`` (a trained LLaVA-Reward folder via ``reward.scorer.RewardScorer``), ``pickscore``
and ``clip_score`` (a frozen ``CLIPModel``, :mod:`alignment.clip_rewards`). Any
``"package.module:function"`` string names a user callable; if that callable is a factory it is
called with the keyword arguments, otherwise it is used as the reward itself. Register new ones
with :func:`register_reward`.
"""

from __future__ import annotations

import importlib
import inspect
import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from alignment.clip_rewards import clip_score_reward, pickscore_reward

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]

# name -> factory(**kwargs) -> RewardFn
_REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Decorator registering a reward *factory* (``factory(**kwargs) -> reward_fn``) as ``name``."""

    def deco(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"A reward named {name!r} is already registered.")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_rewards() -> list[str]:
    """Names of the registered rewards."""
    return sorted(_REGISTRY)


def _takes_device(factory: Callable) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return "device" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def check_reward(name: str) -> Callable:
    """The factory (or ``module:function``) that reward ``name`` resolves to, without building
    it: the trainers call this before they load a model, so that a typo fails in seconds.

    Raises:
        KeyError: an unknown name (the message lists the registered ones) or an import failure.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise KeyError(
                f"Cannot import reward {name!r} ({err}); give 'package.module:function' of an "
                "importable module."
            ) from err
    raise KeyError(
        f"Unknown reward {name!r}. Registered: {available_rewards()}; or give "
        "'package.module:function' of your own fn(images, prompts) -> Tensor[N]."
    )


def get_reward_fn(name: str, device: str | torch.device | None = None, **kwargs: Any) -> RewardFn:
    """Return the reward function called ``name`` (a registered name or ``"module:function"``).

    Args:
        name: registered name, or ``"package.module:function"``.
        device: where the reward runs (the trainers pass ``accelerator.device``, or the user's
            ``reward_kwargs["device"]``): given to the reward's factory only when it takes a
            ``device`` argument (``llava_reward`` does), so that each process's reward model
            lives on its own GPU, while rewards without one (``brightness``) are built as before.
        **kwargs: passed to the reward's factory (e.g. ``path=``, ``perspective=`` for
            ``llava_reward``; ``quality=`` for the JPEG rewards).

    Raises:
        KeyError: an unknown name (the message lists the registered ones).
    """
    factory = check_reward(name)
    if name not in _REGISTRY and not (kwargs or getattr(factory, "is_reward_factory", False)):
        return factory  # a module:function reward itself
    if device is not None and _takes_device(factory):
        kwargs["device"] = device
    return factory(**kwargs)


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = getattr(images, "shape", type(images))
        raise ValueError(
            f"Rewards take images as a float tensor [N, 3, H, W] in [0, 1]; got {shape}."
        )
    return images


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, 3, H, W]`` in [0, 1] -> ``[N, H, W, 3]`` uint8."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG file size of each image in kilobytes (PIL, given quality), ``[N]`` float32."""
    from PIL import Image

    sizes = []
    for arr in _to_uint8(_check_images(images)):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


@register_reward("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95) -> RewardFn:
    """Reward = minus the JPEG size in kB (DDPO's compressibility task)."""

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return -jpeg_sizes_kb(images, quality)

    return fn


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95) -> RewardFn:
    """Reward = the JPEG size in kB (DDPO's incompressibility task)."""

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return jpeg_sizes_kb(images, quality)

    return fn


@register_reward("brightness")
def brightness() -> RewardFn:
    """Reward = mean pixel value in [0, 1] (a cheap, smooth reward for tests and demos)."""

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return _check_images(images).detach().float().mean(dim=(1, 2, 3)).cpu()

    return fn


@register_reward("world_oracle")
def world_oracle(perspective: str = "alignment", differentiable: bool = False) -> RewardFn:
    """The tiny world's oracle (``alignment.world.oracle``) for ``perspective`` (alignment,
    fidelity, safety or overall): the ground truth of the demo, usable as a reward;
    ``differentiable`` (alignment and its parts) keeps the gradient to the pixels (DRaFT)."""
    from alignment.world.oracle import oracle_reward

    return oracle_reward(perspective, differentiable)


@register_reward("llava_reward")
def llava_reward(
    path: str,
    perspective: str | dict[str, float] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool | None = None,
) -> RewardFn:
    """A frozen LLaVA-Reward model (``reward.scorer.RewardScorer``) as a reward.

    Args:
        path: a trained LLaVA-Reward folder.
        perspective: a perspective name (``"alignment"``, ``"fidelity"``, ``"safety"``,
            ``"overall"``) or ``{perspective: weight}``; None: the folder's only perspective,
            else ``overall``, else an error listing them (``reward.scorer.default_perspective``).
        device: where the reward model runs (None: this process's device,
            :func:`reward.guards.process_device`; the trainers pass ``accelerator.device``).
        dtype: its dtype (e.g. ``"bfloat16"``); None keeps the scorer's default.
        trust_remote_code: True to load a folder whose backbone runs its own code (only the
            user turns it on: ``reward_kwargs: {trust_remote_code: true}``).
    """
    from reward.scorer import RewardScorer

    scorer = RewardScorer.from_pretrained(
        path, device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )
    return scorer.as_reward_fn(perspective, differentiable=False)


def _check_tau(tau: float) -> None:
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau = {tau!r}: the contrast's temperature must be a finite number > 0.")


def caption_contrast(scores: torch.Tensor, own: torch.Tensor, tau: float) -> torch.Tensor:
    """How much more an image fits its own caption than the alternatives to it.

    ``c(x) = log softmax_k(s_k / tau)[own] = s_own / tau - log sum_k exp(s_k / tau)`` (<= 0).

    Args:
        scores: ``Tensor[N, K]``: a reward's scores of each image against ``K`` captions (entries
            of ``-inf`` are absent alternatives, for groups of fewer than ``K``).
        own: ``LongTensor[N]``: the column of each image's own caption.
        tau: temperature (> 0) in the reward's units.

    Returns ``Tensor[N]``; differentiable in ``scores``.
    """
    _check_tau(tau)
    logp = torch.log_softmax(scores / tau, dim=-1)
    return logp.gather(-1, own.view(-1, 1).to(logp.device)).squeeze(-1)


def contrastive_reward(
    reward_fn: RewardFn,
    alternatives: Callable[[str], list[tuple[list[str], int]]],
    tau: float = 10.0,
) -> RewardFn:
    """A reward that pays for what distinguishes an image's own caption from its alternatives.

    ``r_c(x, p) = sum_g caption_contrast(r(x, A_g(p)), own_g, tau)``: for each group
    ``(A_g(p), own_g)`` that ``alternatives(p)`` returns (captions, e.g. ``p`` with its colour
    word replaced by every colour, and the index of the one that means ``p``), the
    log-probability that ``x`` shows that caption rather than another of the group, under
    ``softmax(r / tau)``. Whatever ``r`` pays
    for regardless of the caption (sharpness, contrast, the style of its training images)
    cancels out, so a policy tuned on the reward's gradient (DRaFT) cannot raise ``r_c`` that
    way; only the attributes the caption names count. ``tau`` is in ``r``'s units (its scores'
    spread between captions). Costs one reward call on ``sum_g |A_g(p)|`` images per image.

    ``reward_fn``: any registered reward (differentiable or not; ``r_c`` is differentiable when
    it is); ``alternatives``: prompt -> groups of captions, e.g.
    :func:`alignment.world.grammar.attribute_alternatives`.
    """
    _check_tau(tau)

    def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        rows, captions, segments = [], [], []  # segments: (image, start, size, own)
        for i, prompt in enumerate(prompts):
            groups = alternatives(prompt)
            if not groups:
                raise ValueError(f"no alternative captions for {prompt!r}.")
            for group, own in groups:
                if not (isinstance(own, int) and 0 <= own < len(group)):
                    raise ValueError(
                        f"an alternatives group of {prompt!r} names caption {own!r} as its own, "
                        f"but holds {len(group)}: {group!r}; give (captions, index of the one "
                        "that means the prompt)."
                    )
                segments.append((i, len(captions), len(group), own))
                rows += [i] * len(group)
                captions += list(group)
        scores = reward_fn(images[torch.tensor(rows, device=images.device)], captions)
        width = max(size for _, _, size, _ in segments)
        index = torch.tensor(
            [
                [start + k for k in range(size)] + [0] * (width - size)
                for _, start, size, _ in segments
            ],
            device=scores.device,
        )
        present = torch.tensor(
            [[True] * size + [False] * (width - size) for _, _, size, _ in segments],
            device=scores.device,
        )
        table = scores[index].masked_fill(~present, float("-inf"))
        own = torch.tensor([o for *_, o in segments])
        per_group = caption_contrast(table, own, tau)
        image_of = torch.tensor([i for i, *_ in segments], device=per_group.device)
        return per_group.new_zeros(len(prompts)).index_add(0, image_of, per_group)

    return fn


# The CLIP rewards (signatures and docs in alignment.clip_rewards; transformers loads lazily).
register_reward("pickscore")(pickscore_reward)
register_reward("clip_score")(clip_score_reward)
