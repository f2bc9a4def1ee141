"""A world policy's own samples, captioned by the oracle, as captioner data for the reward's backbone.

A reward fine-tunes a policy through what the policy draws: soft, blurred blobs whose shape is
roughly a square or a circle, not the clean renders. A backbone pre-trained on renders only ranks
the base policy's shapes barely above chance (0.59 on held-out pairs of its samples,
alignment/world/weights/README.md, tenth round); one that also captions the policy's samples
learns them. Each sample is captioned as annotators who disagree would caption it: a caption
``c`` drawn with probability proportional to the oracle's alignment of the image with ``c``, over
every caption of the world.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: generator seed of sample ``k`` of the caption at index ``i``: ``seed * SEED_STRIDE + k * 1009 + i``
SEED_STRIDE = 1_000_003


def draw_policy_samples(
    policy,
    captions: Sequence[str],
    per_caption: int,
    seed: int = 0,
    num_steps: int = 10,
    guidance_scale: float = 3.0,
    chunk: int = 64,
) -> tuple[torch.Tensor, list[str]]:
    """``per_caption`` samples of ``policy`` (a ``FlowPolicy`` / ``DiffusionPolicy``) per caption.

    Returns ``(images [N, 3, H, W] in [0, 1], rounded to 8 bits as a saved image is; the N =
    per_caption * len(captions) captions asked)``; image ``(k, i)`` comes from its own generator
    (seed ``seed * SEED_STRIDE + k * 1009 + i``), so the set does not depend on ``chunk``.
    """
    images, asked = [], []
    for k in range(per_caption):
        for start in range(0, len(captions), chunk):
            part = list(captions[start : start + chunk])
            generators = [
                torch.Generator().manual_seed(seed * SEED_STRIDE + k * 1009 + start + i)
                for i in range(len(part))
            ]
            with torch.no_grad():
                out = policy.sample(part, num_steps, 0.0, guidance_scale, generator=generators)
            images.append((out.images.clamp(0, 1) * 255).round() / 255)
            asked += part
    return torch.cat(images), asked


def oracle_caption_distribution(images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
    """``p [N, C]``: for each image, the oracle's alignment with each of ``captions``, normalised
    over the captions: ``p[n, c] = a(x_n, c) / sum_c' a(x_n, c')``. A row whose alignment is 0 for
    every caption (nothing the world can name) is all zeros."""
    from alignment.world.oracle import alignment_components, colour_responsibilities

    rows = []
    for n in range(images.shape[0]):
        resp = colour_responsibilities(images[n : n + 1])
        a = alignment_components(
            images[n : n + 1].expand(len(captions), -1, -1, -1),
            list(captions),
            resp=resp.expand(len(captions), *resp.shape[1:]),
        )["alignment"].clamp_min(0)
        total = a.sum()
        rows.append(a / total if total > 0 else torch.zeros_like(a))
    return torch.stack(rows)
