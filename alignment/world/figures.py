"""Figures of the tiny-world demo that a person reads at a glance.

- :func:`verdict_grid`: the same prompts and seeds before and after fine-tuning, each caption
  written out whole (wrapped at word boundaries) above its column, and under every image the
  oracle's verdict per part of the caption (green: drawn as captioned, red: not) with its
  alignment score;
- :func:`training_figure`: the reward per epoch beside the held-out oracle alignment per
  evaluation, so that the curve the policy optimises and the quantity it should raise are seen
  together.

Pillow's own font (``ImageFont.load_default(size)``) is used: no system font is needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

#: The oracle's parts shown under each image, with the short label drawn.
VERDICT_PARTS: tuple[tuple[str, str], ...] = (
    ("background", "background"),
    ("colour", "colour"),
    ("shape", "shape"),
    ("position", "position"),
)
_GREEN, _RED, _GREY = (0, 128, 0), (200, 0, 0), (90, 90, 90)


def wrap_words(text: str, max_width: float, measure) -> list[str]:
    """Greedy word wrap: lines of whole words whose measured width stays within ``max_width``.

    ``measure(s) -> float`` gives the width of a string (e.g. ``font.getlength``). A word wider
    than ``max_width`` on its own gets a line of its own (never cut). Joining the lines with
    spaces gives back ``" ".join(text.split())``.
    """
    lines: list[str] = []
    for word in text.split():
        if lines and measure(f"{lines[-1]} {word}") <= max_width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def verdict_grid(
    prompts: Sequence[str],
    rows: Sequence[tuple[str, torch.Tensor]],
    scores: Sequence[Mapping[str, torch.Tensor]],
    cell: int = 128,
    threshold: float = 0.5,
):
    """A PIL image: one column per prompt (caption on top), one row per model.

    Args:
        prompts: ``P`` captions of the world's grammar.
        rows: ``(label, images Tensor[P, 3, H, W] in [0, 1])`` per model, e.g.
            ``[("before", ...), ("after DDPO", ...)]``.
        scores: per row, the oracle's scores of those images (:func:`~.oracle.oracle_scores`:
            ``Tensor[P]`` per key, at least ``alignment`` and the parts of :data:`VERDICT_PARTS`).
        cell: side of each (nearest-neighbour upscaled) image in pixels.
        threshold: a part counts as drawn when its oracle score is at least this.
    """
    from PIL import Image, ImageDraw

    if len(rows) != len(scores):
        raise ValueError(f"verdict_grid: {len(rows)} rows but {len(scores)} score sets.")
    font, small = _font(13), _font(11)
    pad, label_w = 6, 96
    col_w = cell + 2 * pad
    wrapped = [wrap_words(p, col_w - 4, font.getlength) for p in prompts]
    line_h = 15
    header_h = line_h * max(len(w) for w in wrapped) + 2 * pad
    verdict_h = 3 * 13 + pad
    row_h = cell + verdict_h + pad
    legend_h = 18
    width = label_w + col_w * len(prompts)
    height = legend_h + header_h + row_h * len(rows)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text(
        (pad, 3),
        f"under each image, the oracle's verdict: green = drawn as the caption says "
        f"(part score >= {threshold}), red = not; A = alignment (product of the parts)",
        fill=_GREY,
        font=small,
    )
    for j, lines in enumerate(wrapped):
        x = label_w + j * col_w + 2
        for k, line in enumerate(lines):
            draw.text((x, legend_h + pad + k * line_h), line, fill="black", font=font)
    for i, ((label, images), sc) in enumerate(zip(rows, scores, strict=True)):
        if images.shape[0] != len(prompts):
            raise ValueError(
                f"verdict_grid: row {label!r} has {images.shape[0]} images for {len(prompts)} "
                "prompts."
            )
        y0 = legend_h + header_h + i * row_h
        for k, line in enumerate(wrap_words(label, label_w - 2 * pad, font.getlength)):
            draw.text((pad, y0 + cell // 2 - 8 + k * line_h), line, fill="black", font=font)
        arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        arr = arr.permute(0, 2, 3, 1).cpu().numpy()
        for j in range(len(prompts)):
            x = label_w + j * col_w + pad
            canvas.paste(Image.fromarray(arr[j]).resize((cell, cell), Image.NEAREST), (x, y0))
            words = [
                (text, _GREEN if float(sc[part][j]) >= threshold else _RED)
                for part, text in VERDICT_PARTS
            ]
            # two parts per line, then the alignment score
            for k in range(0, len(words), 2):
                cx = x
                for text, colour in words[k : k + 2]:
                    draw.text((cx, y0 + cell + 2 + (k // 2) * 13), text, fill=colour, font=small)
                    cx += small.getlength(text + "  ")
            draw.text(
                (x, y0 + cell + 2 + 2 * 13),
                f"A = {float(sc['alignment'][j]):.2f}",
                fill="black",
                font=small,
            )
    return canvas


def training_figure(
    history: Sequence[Mapping[str, float]],
    evaluations: Sequence[Mapping[str, float]],
    path: str | os.PathLike,
    reward_label: str = "reward",
    samples_per_epoch: int = 1,
    window: int = 5,
    x_label: str = "epoch",
) -> Path:
    """Two panels to a PNG: the mean training reward per epoch (band: its standard error over the
    epoch's ``samples_per_epoch`` samples, with the means of the first and last ``window`` epochs drawn), and the
    held-out oracle alignment per evaluation (``{"epoch", "mean", "stderr"}``; error bars: its
    standard error over prompt-seed pairs). ``x_label`` names the x axis of both (what
    ``"epoch"`` counts: epochs, or optimiser steps for DRaFT)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    from alignment.logging_utils import save_figure

    epochs = np.array([h["epoch"] for h in history], dtype=float)
    mean = np.array([h["reward_mean"] for h in history])
    se = np.array([h.get("reward_std", 0.0) for h in history]) / np.sqrt(max(1, samples_per_epoch))
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    left.plot(epochs, mean, marker="o", ms=3, label="mean per epoch")
    left.fill_between(epochs, mean - se, mean + se, alpha=0.25, label="+- s.e.")
    if len(mean) >= 2 * window:
        for sl, name in ((slice(0, window), "first"), (slice(-window, None), "last")):
            left.hlines(
                mean[sl].mean(),
                epochs[sl][0],
                epochs[sl][-1],
                colors="k",
                linestyles="--",
                label=f"{name} {window} epochs" if name == "first" else None,
            )
    left.set_xlabel(x_label)
    left.set_ylabel(reward_label)
    left.set_title(f"training reward ({reward_label})")
    left.legend(loc="best", fontsize=8)
    if evaluations:
        ex = [e["epoch"] for e in evaluations]
        ey = [e["mean"] for e in evaluations]
        err = [e.get("stderr", 0.0) for e in evaluations]
        right.errorbar(ex, ey, yerr=err, marker="s", ms=4, capsize=3, color="tab:green")
    right.set_xlabel(x_label)
    right.set_ylabel("oracle alignment")
    right.set_title("held-out prompts, oracle alignment")
    right.set_ylim(bottom=0)
    return save_figure(fig, path)


__all__ = ["VERDICT_PARTS", "training_figure", "verdict_grid", "wrap_words"]
