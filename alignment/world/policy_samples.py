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


def oracle_shape_targets(images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
    """``q [N, S]``: the oracle's shape part of image ``n`` for its caption with the shape word
    set to each of the world's ``S`` shapes, ``q[n, k] = softmax_k(IoU_k / 0.05)`` over the soft
    IoUs of the caption colour's mask with each shape's template (alignment/world/oracle.py); rows
    sum to 1."""
    from alignment.world.grammar import SHAPES, parse_caption
    from alignment.world.oracle import alignment_components

    columns = []
    for shape in SHAPES:
        asked = [parse_caption(c).replace(shape=shape).caption for c in captions]
        columns.append(alignment_components(images, asked)["shape"])
    return torch.stack(columns, 1)


def _tokens(tower, pixel_values: torch.Tensor) -> torch.Tensor:
    """The tower's last hidden state as tokens ``[N, T, D]`` (a ``[N, D, h, w]`` map flattened
    row by row, as FastVLM does)."""
    hidden = tower(pixel_values=pixel_values).last_hidden_state
    return hidden.flatten(2).transpose(1, 2) if hidden.ndim == 4 else hidden


class ShapeProbe(torch.nn.Module):
    """A vision tower read for the world's shapes: the caption colour's embedding added to every
    token of ``tower``, the mean token, a two-layer head to ``S`` shape log-probabilities.
    Images ``[N, 3, H, W]`` in [0, 1] are normalised with ``mean`` / ``std`` first."""

    def __init__(self, tower, mean: Sequence[float], std: Sequence[float], seed: int = 0) -> None:
        from torch import nn

        from alignment.world.grammar import COLOURS, SHAPES

        super().__init__()
        self.tower = tower
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, 3, 1, 1))
        training = tower.training
        tower.eval()  # batch norm statistics untouched by this one probe image
        with torch.no_grad():
            width = _tokens(tower, torch.zeros(1, 3, 32, 32)).shape[-1]
        tower.train(training)
        torch.manual_seed(seed)
        self.colour = nn.Embedding(len(COLOURS), width)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, len(SHAPES)))

    def forward(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """``log softmax(z) [N, S]``."""
        from alignment.world.grammar import COLOURS, parse_caption

        colours = torch.tensor([list(COLOURS).index(parse_caption(c).colour) for c in captions])
        tokens = _tokens(self.tower, (images - self.mean) / self.std)
        return torch.log_softmax(self.head((tokens + self.colour(colours)[:, None]).mean(1)), 1)

    def loss(
        self, images: torch.Tensor, captions: Sequence[str], targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Cross-entropy with the oracle's shape probabilities, ``-sum_k q_k log p_k``, averaged."""
        if targets is None:
            targets = oracle_shape_targets(images, captions)
        return -(targets * self(images, captions)).sum(1).mean()


def train_tower_on_shapes(
    tower: torch.nn.Module,
    images: torch.Tensor,
    captions: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
) -> tuple[ShapeProbe, list[float]]:
    """Teach a vision ``tower`` the world's shapes as the policy draws them.

    The tower and a :class:`ShapeProbe` on it minimise the cross-entropy with the oracle's shape
    probabilities (:func:`oracle_shape_targets`) over random batches of ``images`` (with their
    ``captions``) for ``steps`` AdamW steps. Returns ``(probe, losses)``; the tower (trained in
    place) is what a backbone keeps. On the tenth round's data (7632 samples, 3000 steps) the
    probe orders 0.87-0.89 of held-out policy pairs by shape as the oracle does, a tower that
    learnt from captions alone 0.68 (alignment/world/weights/README.md).
    """
    targets = oracle_shape_targets(images, captions)
    probe = ShapeProbe(tower, mean, std, seed)
    opt = torch.optim.AdamW(probe.parameters(), lr)
    generator = torch.Generator().manual_seed(seed)
    probe.train()
    losses = []
    for _ in range(steps):
        j = torch.randint(len(images), (batch_size,), generator=generator)
        loss = probe.loss(images[j], [captions[i] for i in j.tolist()], targets[j])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    probe.eval()
    return probe, losses
