"""Image loading and conversion shared by the scorer, the data readers and the CLI.

Every image that enters the project passes through :func:`load_image` (PIL in, PIL RGB out) or
:func:`to_tensor` / :func:`to_pil` (``Tensor[3, H, W]`` in ``[0, 1]``). Modes RGBA, LA, P, L, I;16,
I and F are converted to RGB rather than refused; transparent pixels are composited on white.

Tensors are checked before use (:func:`check_image_tensor`, :func:`check_image_batch`): the shape
(``[3, H, W]``, or ``[H, W, 3]``; 1 or 4 channels too), the dtype (floating point in ``[0, 1]``,
``uint8``, or integers in ``[0, 255]``), the range and NaN/inf; a bad one raises
:class:`ImageInputError` naming the image. Float images become 8-bit by one rule everywhere,
``floor(255 x + 0.5)`` (:func:`reward.families.image_ops.to_8bit_levels`), in the PIL path and in
the differentiable path alike.
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


#: float images may exceed [0, 1] by this much (arithmetic noise) before they are refused
RANGE_TOLERANCE = 1e-6
_CHANNELS = (1, 3, 4)


def _check_values(t: torch.Tensor, label: str) -> None:
    """dtype, NaN/inf and range of an image tensor (any shape)."""
    if t.dtype == torch.bool or t.is_complex():
        raise ImageInputError(
            f"image {label}: dtype {t.dtype} is not an image; pass floats in [0, 1] or uint8."
        )
    if t.is_floating_point():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            raise ImageInputError(
                f"image {label}: {int(bad.sum())} NaN/inf values; the image is broken (check the "
                "decoder or the division that made it)."
            )
        lo, hi = float(t.min()), float(t.max())
        if lo < -RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
            raise ImageInputError(
                f"image {label}: float values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]. "
                "Map [-1, 1] images with (x + 1) / 2, pass 0-255 values as uint8, or clamp."
            )
    elif t.dtype != torch.uint8:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi > 255:
            raise ImageInputError(
                f"image {label}: integer values must lie in [0, 255], got [{lo}, {hi}]."
            )


def check_image_tensor(t: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Validate one image tensor and return it channels-last ``[H, W, C]``.

    ``[C, H, W]`` when the first dimension is 1, 3 or 4 (the documented layout), else ``[H, W, C]``
    when the last one is; values as :func:`_check_values`. Raises :class:`ImageInputError`.
    """
    label = name or "tensor"
    if t.ndim != 3:
        raise ImageInputError(
            f"image {label}: expected a 3-d tensor [3, H, W], got shape {tuple(t.shape)}."
        )
    if t.shape[0] in _CHANNELS:
        t = t.permute(1, 2, 0)
    elif t.shape[-1] not in _CHANNELS:
        raise ImageInputError(
            f"image {label}: expected [3, H, W] (channels first) or [H, W, 3], got shape "
            f"{tuple(t.shape)}: neither the first nor the last dimension is 1, 3 or 4 channels."
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ImageInputError(f"image {label}: zero-size image {tuple(t.shape)}.")
    _check_values(t, label)
    return t


def check_image_batch(images: torch.Tensor, name: str = "images") -> None:
    """Validate a batch for the differentiable path: ``Tensor[N, 3, H, W]``, floating point, in
    ``[0, 1]``, finite; the error names the first bad image (``images #i``)."""
    if not torch.is_tensor(images):
        raise ImageInputError(
            f"{name}: expected a Tensor[N, 3, H, W], got {type(images).__name__}."
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ImageInputError(
            f"{name}: expected a Tensor[N, 3, H, W] (RGB, channels first), got shape "
            f"{tuple(images.shape)}."
        )
    if not images.is_floating_point():
        raise ImageInputError(
            f"{name}: the differentiable path takes floats in [0, 1], got dtype {images.dtype} "
            "(divide uint8 images by 255)."
        )
    if 0 in images.shape[2:]:
        raise ImageInputError(f"{name}: zero-size images {tuple(images.shape)}.")
    x = images.detach()
    bad = (~torch.isfinite(x)) | (x < -RANGE_TOLERANCE) | (x > 1.0 + RANGE_TOLERANCE)
    if bool(bad.any()):
        first = int(bad.flatten(1).any(1).nonzero()[0])
        _check_values(x[first], f"#{first} of {name}")


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
        return to_pil(torch.as_tensor(image), name=name or "tensor")
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
    """``Tensor[3, H, W]`` (or ``[H, W, 3]``) in ``[0, 1]`` (float) or ``[0, 255]`` (integers) ->
    PIL RGB; floats are rounded by :func:`reward.families.image_ops.to_8bit_levels`. Raises
    :class:`ImageInputError` (naming ``name``) for a bad shape, dtype, range or NaN."""
    from .families.image_ops import to_8bit_levels

    t = check_image_tensor(tensor.detach().cpu(), name)
    if t.is_floating_point():
        arr = to_8bit_levels(t.float()).to(torch.uint8).contiguous().numpy()
    else:
        arr = t.to(torch.uint8).contiguous().numpy()
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
