"""Logging helpers shared by the trainers: captioned image grids and reward curves."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def image_grid(
    images: torch.Tensor,
    captions: Sequence[str] | None = None,
    cols: int = 4,
    cell: int = 128,
):
    """Tile ``images`` (``[N, 3, H, W]`` in [0, 1]) into a PIL image, each cell upscaled to
    ``cell`` pixels with its caption (wrapped) underneath."""
    from PIL import Image, ImageDraw

    n = images.shape[0]
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    text_h = 36 if captions is not None else 0
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        img = Image.fromarray(arr[i]).resize((cell, cell), Image.NEAREST)
        x, y = c * cell, r * (cell + text_h)
        grid.paste(img, (x, y))
        if captions is not None:
            text = str(captions[i])
            chars = max(8, cell // 6)
            lines = [text[j : j + chars] for j in range(0, min(len(text), 3 * chars), chars)]
            draw.multiline_text((x + 2, y + cell + 1), "\n".join(lines), fill="black", spacing=0)
    return grid


def log_image_grid(
    accelerator: Any,
    tag: str,
    images: torch.Tensor,
    prompts: Sequence[str],
    rewards: Sequence[float] | None,
    step: int,
    save_dir: str | os.PathLike | None = None,
) -> None:
    """Send a captioned grid (prompt + reward under each image; no reward when ``rewards`` is
    None) to every accelerate tracker (tensorboard image + text, wandb images) and optionally save
    it as a PNG."""
    if rewards is None:
        captions = [str(p) for p in prompts]
    else:
        captions = [f"{p} | r={float(r):.3g}" for p, r in zip(prompts, rewards)]
    grid = image_grid(images, captions)
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        grid.save(Path(save_dir) / f"{tag.replace('/', '_')}_{step:05d}.png")
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")
            tracker.writer.add_text(tag + "/captions", "  \n".join(captions), step)
        elif tracker.name == "wandb":
            import wandb

            arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
            arr = arr.permute(0, 2, 3, 1).cpu().numpy()
            tracker.log(
                {tag: [wandb.Image(a, caption=c) for a, c in zip(arr, captions)]}, step=step
            )


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Lay out, write (parents created) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_reward_curve(
    history: Sequence[dict[str, float]],
    path: str | os.PathLike,
    title: str = "reward per epoch",
) -> Path:
    """Plot ``reward_mean`` +- ``reward_std`` against ``epoch`` from ``history`` to a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    mean = np.array([h["reward_mean"] for h in history])
    std = np.array([h.get("reward_std", 0.0) for h in history])
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(epochs, mean, marker="o", ms=3, label="mean reward")
    ax.fill_between(epochs, mean - std, mean + std, alpha=0.25, label="+- std")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.legend(loc="best")
    return save_figure(fig, path)


#: metrics :func:`plot_history` draws when a history has them, one panel each
CURVE_KEYS = (
    "reward_mean",
    "eval/reward_mean",
    "online/reward_mean",
    "loss",
    "implicit_acc",
)


def plot_history(
    history: Sequence[dict[str, float]],
    path: str | os.PathLike,
    x: str = "step",
    keys: Sequence[str] = CURVE_KEYS,
) -> Path | None:
    """Plot each of ``keys`` that ``history`` has (one panel per metric, its records in order)
    against ``x`` to a PNG; None when no record has any of them."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    present = [k for k in keys if any(k in h for h in history)]
    if not present:
        return None
    fig, axes = plt.subplots(
        len(present), 1, figsize=(5, 2.2 * len(present)), dpi=100, sharex=True, squeeze=False
    )
    for ax, key in zip(axes[:, 0], present):
        rows = [h for h in history if key in h]
        ax.plot([h[x] for h in rows], [h[key] for h in rows], marker="o", ms=3)
        ax.set_ylabel(key)
    axes[-1, 0].set_xlabel(x)
    return save_figure(fig, path)
