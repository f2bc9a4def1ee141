"""Image loading and conversion shared by the scorer, the data readers and the CLI.

Every image that enters the project passes through :func:`load_image` (PIL in, PIL RGB out) or
:func:`to_tensor` / :func:`to_pil` (``Tensor[3, H, W]`` in ``[0, 1]``). Modes RGBA, LA, P, L, I;16,
I and F are converted to RGB rather than refused; transparent pixels are composited on white.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

ImageLike = Image.Image | str | os.PathLike | bytes | torch.Tensor | np.ndarray


class ImageInputError(ValueError):
    """An image could not be used; the message names the item and the fix."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB (alpha composited on white, 16/32-bit rescaled to 8 bit)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(scaled.clip(0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(image: ImageLike, *, name: str | None = None) -> Image.Image:
    """Return ``image`` as an RGB PIL image.

    Accepts a PIL image, a path, encoded bytes, a ``Tensor[3, H, W]`` / ``[H, W, 3]`` array in
    ``[0, 1]`` (float) or ``[0, 255]`` (uint8). ``name`` labels the item in error messages.
    """
    label = name or (str(image) if isinstance(image, (str, os.PathLike)) else type(image).__name__)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise ImageInputError(f"image {label!s}: file not found: {path}. Check the path.")
        try:
            with Image.open(path) as opened:
                opened.load()
                img = opened.copy()
        except (UnidentifiedImageError, OSError) as err:
            raise ImageInputError(
                f"image {label!s}: cannot read {path} as an image ({err}). "
                "Re-encode it as PNG, JPEG or WebP."
            ) from err
    elif isinstance(image, bytes):
        try:
            with Image.open(io.BytesIO(image)) as opened:
                opened.load()
                img = opened.copy()
        except (UnidentifiedImageError, OSError) as err:
            raise ImageInputError(
                f"image {label}: the bytes are not a readable image ({err})."
            ) from err
    elif isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (torch.Tensor, np.ndarray)):
        return to_pil(torch.as_tensor(image), name=label)
    else:
        raise ImageInputError(
            f"image {label}: unsupported type {type(image).__name__}; pass a PIL image, a path, "
            "bytes or a [3, H, W] tensor in [0, 1]."
        )
    if img.width == 0 or img.height == 0:
        raise ImageInputError(f"image {label}: zero-size image ({img.width}x{img.height}).")
    return _to_rgb(img)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> ``Tensor[3, H, W]`` float32 in ``[0, 1]``."""
    arr = np.asarray(_to_rgb(image), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_pil(tensor: torch.Tensor, *, name: str | None = None) -> Image.Image:
    """``Tensor[3, H, W]`` (or ``[H, W, 3]``) in ``[0, 1]`` (float) or ``[0, 255]`` (uint8) -> PIL RGB."""
    t = tensor.detach().cpu()
    if t.ndim != 3:
        raise ImageInputError(
            f"image {name or 'tensor'}: expected a 3-d tensor [3, H, W], got shape {tuple(t.shape)}."
        )
    if t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
        t = t.permute(1, 2, 0)
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ImageInputError(f"image {name or 'tensor'}: zero-size image {tuple(tensor.shape)}.")
    if t.dtype == torch.uint8:
        arr = t.numpy()
    else:
        arr = (t.float().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return _to_rgb(Image.fromarray(arr))


def load_images(images: Sequence[ImageLike] | torch.Tensor) -> list[Image.Image]:
    """Load a list (or a ``Tensor[N, 3, H, W]``) of images, each as RGB PIL."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ImageInputError(
                f"images: expected a Tensor[N, 3, H, W], got shape {tuple(images.shape)}."
            )
        return [to_pil(img, name=f"#{i}") for i, img in enumerate(images)]
    return [
        load_image(img, name=f"#{i} ({img})" if isinstance(img, (str, os.PathLike)) else f"#{i}")
        for i, img in enumerate(images)
    ]
