"""Draw a world caption into a small RGB image, with optional defects and forbidden symbol.

Shapes are analytic masks (anti-aliased by supersampling), written in torch so that the oracle
can reuse them as templates. A shape is placed by its *centroid* and sized by its *area*:

- circle of radius ``r``: area ``pi r^2``;
- square of half-side ``h``: area ``4 h^2``;
- upward equilateral triangle of circumradius ``R``: area ``(3 sqrt(3) / 4) R^2``.

At the nominal size (``OBJECT_SCALE`` of the image side as "radius" ``s``) the renderer uses
``r = s``, ``h = 0.9 s`` and ``R = 1.25 s`` (the triangle stays inside the frame at the corners).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from alignment.world.grammar import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SYMBOL_COLOUR,
    Scene,
    parse_caption,
)

#: Nominal object "radius" as a fraction of the image side.
OBJECT_SCALE = 0.19
#: Defect kinds understood by :func:`render_scene`.
DEFECTS: tuple[str, ...] = ("noise", "blotches")
_TRI_AREA = 3.0 * math.sqrt(3.0) / 4.0  # area of an equilateral triangle of circumradius 1
_SQUARE_HALF = 0.9
_TRI_R = 1.25


def rgb(colour: tuple[int, int, int]) -> torch.Tensor:
    """``(r, g, b)`` in 0..255 -> ``Tensor[3]`` in [0, 1]."""
    return torch.tensor(colour, dtype=torch.float32) / 255.0


def nominal_area(shape: str, size: int) -> float:
    """Area in pixels of ``shape`` drawn at the nominal size in a ``size`` x ``size`` image."""
    s = OBJECT_SCALE * size
    return {
        "circle": math.pi * s * s,
        "square": 4.0 * (_SQUARE_HALF * s) ** 2,
        "triangle": _TRI_AREA * (_TRI_R * s) ** 2,
    }[shape]


def shape_coverage(
    shape: str,
    cx: torch.Tensor,
    cy: torch.Tensor,
    area: torch.Tensor,
    size: int,
    supersample: int = 4,
) -> torch.Tensor:
    """Anti-aliased coverage of a batch of shapes.

    Args:
        shape: one of :data:`~alignment.world.grammar.SHAPES`.
        cx, cy: ``Tensor[N]`` centroids in pixel coordinates (pixel ``i`` spans ``[i, i + 1)``).
        area: ``Tensor[N]`` shape areas in pixels.
        size: image side in pixels.
        supersample: sub-samples per pixel side.

    Returns:
        ``Tensor[N, size, size]`` in [0, 1]: the fraction of each pixel inside the shape.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r}: the world knows {SHAPES}.")
    ss = supersample
    coords = (torch.arange(size * ss, dtype=torch.float32) + 0.5) / ss
    x = coords.view(1, 1, -1) - cx.float().view(-1, 1, 1)
    y = coords.view(1, -1, 1) - cy.float().view(-1, 1, 1)
    a = area.float().clamp_min(1e-6).view(-1, 1, 1)
    if shape == "circle":
        inside = x * x + y * y <= a / math.pi
    elif shape == "square":
        half = a.sqrt() / 2.0
        inside = (x.abs() <= half) & (y.abs() <= half)
    else:  # upward equilateral triangle centred on its centroid; inradius = R / 2
        inr = (a / _TRI_AREA).sqrt() / 2.0
        c30 = math.sqrt(3.0) / 2.0
        inside = (y <= inr) & (c30 * x - 0.5 * y <= inr) & (-c30 * x - 0.5 * y <= inr)
    cov = inside.float().unsqueeze(1)
    return torch.nn.functional.avg_pool2d(cov, ss).squeeze(1)


def _x_symbol(cx: float, cy: float, half: float, width: float, size: int) -> torch.Tensor:
    """Coverage ``[size, size]`` of an "X" of half-extent ``half`` and stroke ``width``."""
    ss = 4
    coords = (torch.arange(size * ss, dtype=torch.float32) + 0.5) / ss
    x = coords.view(1, -1) - cx
    y = coords.view(-1, 1) - cy
    in_box = (x.abs() <= half) & (y.abs() <= half)
    near_diag = ((x - y).abs() <= width / math.sqrt(2)) | ((x + y).abs() <= width / math.sqrt(2))
    cov = (in_box & near_diag).float()[None, None]
    return torch.nn.functional.avg_pool2d(cov, ss)[0, 0]


def render_scene(
    scene: Scene | str,
    size: int = 32,
    *,
    rng: random.Random | int | None = None,
    jitter: bool = True,
    defects: Sequence[str] = (),
    symbol: bool = False,
) -> torch.Tensor:
    """Render one scene (or caption) as ``Tensor[3, size, size]`` in [0, 1].

    Args:
        scene: a :class:`Scene` or a caption of the grammar.
        size: image side in pixels (32 is what the tiny diffusion model is trained on).
        rng: a ``random.Random`` or an int seed for jitter, defects and symbol placement
            (``None``: seed 0). The global RNGs are untouched.
        jitter: move the object by up to +-1/32 of the side and scale its area by +-10 %.
        defects: any of :data:`DEFECTS`: ``"noise"`` adds Gaussian noise (std 0.1-0.2);
            ``"blotches"`` adds 3-5 small blobs of foreign colour away from the object.
        symbol: draw the forbidden symbol (a magenta "X") away from the object.
    """
    if isinstance(scene, str):
        scene = parse_caption(scene)
    unknown = set(defects) - set(DEFECTS)
    if unknown:
        raise ValueError(f"unknown defects {sorted(unknown)}; use any of {DEFECTS}.")
    if not isinstance(rng, random.Random):
        rng = random.Random(0 if rng is None else rng)
    fx, fy = POSITIONS[scene.position]
    cx, cy = fx * size, fy * size
    area = nominal_area(scene.shape, size)
    if jitter:
        cx += rng.uniform(-1, 1) * size / 32
        cy += rng.uniform(-1, 1) * size / 32
        area *= rng.uniform(0.9, 1.1)
    img = rgb(BACKGROUNDS[scene.background]).view(3, 1, 1).expand(3, size, size).clone()
    cov = shape_coverage(
        scene.shape, torch.tensor([cx]), torch.tensor([cy]), torch.tensor([area]), size
    )[0]
    img = img * (1 - cov) + rgb(COLOURS[scene.colour]).view(3, 1, 1) * cov
    obj_radius = math.sqrt(area / math.pi) * 1.4

    def far_point(margin: float, min_dist: float) -> tuple[float, float]:
        for _ in range(100):
            px = rng.uniform(margin, size - margin)
            py = rng.uniform(margin, size - margin)
            if math.hypot(px - cx, py - cy) >= min_dist:
                return px, py
        return (size - cx, size - cy)  # mirror of the object: always far enough

    if symbol:
        half = 0.11 * size
        sx, sy = far_point(half + 1, obj_radius + half * 1.2)
        sym = _x_symbol(sx, sy, half, 0.06 * size, size)
        img = img * (1 - sym) + rgb(SYMBOL_COLOUR).view(3, 1, 1) * sym
    if "blotches" in defects:
        foreign = [c for c in (*COLOURS.values(), *BACKGROUNDS.values())]
        foreign = [c for c in foreign if c != BACKGROUNDS[scene.background]]
        for _ in range(rng.randint(3, 5)):
            bx, by = far_point(2, obj_radius + 2)
            blob_area = rng.uniform(3.0, 9.0) * (size / 32) ** 2
            blob = shape_coverage(
                "circle", torch.tensor([bx]), torch.tensor([by]), torch.tensor([blob_area]), size
            )[0]
            colour = rgb(rng.choice(foreign)).view(3, 1, 1)
            img = img * (1 - blob) + colour * blob
    if "noise" in defects:
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        std = rng.uniform(0.1, 0.2)
        img = img + std * torch.randn(img.shape, generator=gen)
    return img.clamp(0, 1)


def render_captions(
    captions: Sequence[str | Scene],
    size: int = 32,
    *,
    seed: int = 0,
    jitter: bool = True,
    defects: Sequence[str] = (),
    symbol: bool = False,
) -> torch.Tensor:
    """Render a batch of captions as ``Tensor[N, 3, size, size]`` in [0, 1] (seeded)."""
    rng = random.Random(seed)
    if not captions:
        return torch.zeros(0, 3, size, size)
    return torch.stack(
        [
            render_scene(c, size, rng=rng, jitter=jitter, defects=defects, symbol=symbol)
            for c in captions
        ]
    )
