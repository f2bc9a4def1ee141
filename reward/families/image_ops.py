"""torch image operations shared by the families (all differentiable): PIL's separable
resampling and 8-bit rounding reproduced in torch, crop, rescale and normalise."""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def resize_bicubic(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize with antialiasing, ``[N, C, H, W] -> [N, C, height, width]``.

    Close to PIL's ``BICUBIC`` (PIL filters with support scaled by the downscale factor, as
    ``antialias=True`` does) but without PIL's clipping after its first pass: on high-frequency
    images it differs by up to ~0.06 (in ``[0, 1]``). :func:`resize_pil` matches PIL exactly up to
    PIL's 8-bit rounding; the families use that.
    """
    if images.shape[-2:] == (height, width):
        return images
    return F.interpolate(
        images, size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )


def center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Center crop as transformers' ``center_crop``: ``top = (H - height) // 2``,
    ``left = (W - width) // 2``; a crop larger than the image first pads it with zeros, the image
    placed at ``ceil(pad / 2)`` from the top / left."""
    h, w = images.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    if top < 0 or left < 0:
        new_h, new_w = max(height, h), max(width, w)
        pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
        images = F.pad(images, (pad_left, new_w - w - pad_left, pad_top, new_h - h - pad_top))
        top, left = top + pad_top, left + pad_left
    return images[..., top : top + height, left : left + width]


def pad_to_square(images: torch.Tensor, fill: Sequence[float]) -> torch.Tensor:
    """LLaVA's ``pad_to_square``: ``[N, C, H, W] -> [N, C, S, S]``, ``S = max(H, W)``, the image
    centred (``(S - short) // 2`` before it), the rest filled with ``fill[c]`` per channel."""
    n, c, h, w = images.shape
    if h == w:
        return images
    size = max(h, w)
    before = (size - min(h, w)) // 2
    after = size - min(h, w) - before
    value = torch.as_tensor(list(fill), dtype=images.dtype, device=images.device).view(1, c, 1, 1)
    if w > h:
        parts = [value.expand(n, c, before, w), images, value.expand(n, c, after, w)]
        return torch.cat(parts, dim=2)
    parts = [value.expand(n, c, h, before), images, value.expand(n, c, h, after)]
    return torch.cat(parts, dim=3)


def pad_bottom_right(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The processors' batch ``pad`` to ``pad_size``: zeros after the image (bottom, right)."""
    h, w = images.shape[-2:]
    if height < h or width < w:
        raise ValueError(
            f"pad_size ({height}x{width}) is smaller than the image ({h}x{w}); raise pad_size."
        )
    return F.pad(images, (0, width - w, 0, height - h))


def resize_output_size(height: int, width: int, size: Any) -> tuple[int, int]:
    """The ``(height, width)`` that transformers' PIL backend ``resize`` gives for ``size``:
    ``shortest_edge`` (+ ``longest_edge``: the long side capped, aspect kept), ``max_height`` +
    ``max_width``, or ``height`` + ``width``; computed by transformers' own helpers."""
    from transformers.image_transforms import (
        get_resize_output_image_size,
        get_size_with_aspect_ratio,
    )
    from transformers.image_utils import ChannelDimension, get_image_size_for_max_height_width

    short, long = _size_get(size, "shortest_edge"), _size_get(size, "longest_edge")
    max_h, max_w = _size_get(size, "max_height"), _size_get(size, "max_width")
    fixed_h, fixed_w = _size_get(size, "height"), _size_get(size, "width")
    if short and long:
        return tuple(get_size_with_aspect_ratio((height, width), short, long))
    if short:
        probe = np.empty((1, height, width), dtype=np.uint8)
        return tuple(
            get_resize_output_image_size(
                probe, size=short, default_to_square=False, input_data_format=ChannelDimension.FIRST
            )
        )
    if max_h and max_w:
        return tuple(get_image_size_for_max_height_width((height, width), max_h, max_w))
    if fixed_h and fixed_w:
        return int(fixed_h), int(fixed_w)
    raise ValueError(
        f"the image processor's size {size!r} has none of shortest_edge, max_height/max_width or "
        "height/width; the differentiable preprocessing cannot resize to it."
    )


#: options every family's torch path reproduces (``do_convert_rgb``: the input is RGB already)
COMMON_TORCH_OPTIONS = frozenset(
    {
        "do_convert_rgb",
        "do_resize",
        "size",
        "resample",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
    }
)

#: keys of an image processor's ``to_dict()`` that are bookkeeping, not preprocessing options
_NOT_OPTIONS = frozenset(
    {"image_processor_type", "processor_class", "auto_map", "_processor_class", "backend"}
)


def check_torch_options(image_processor: Any, handled: Collection[str], family: str) -> None:
    """Refuse an image processor that sets an option the differentiable path does not implement.

    Every entry of ``image_processor.to_dict()`` that is set (not None / False) must be in
    ``handled`` (the options the family's torch preprocessing reproduces, or that the processor
    itself ignores); otherwise a ``ValueError`` names the options, so that the differentiable
    reward never silently diverges from the frozen one.
    """
    try:
        options = image_processor.to_dict()
    except Exception:  # not a transformers image processor: its public attributes
        options = {k: v for k, v in vars(image_processor).items() if not k.startswith("_")}
    unknown = [
        f"{key}={value!r}"
        for key, value in options.items()
        if key not in handled
        and key not in _NOT_OPTIONS
        and value is not None
        and value is not False
    ]
    if unknown:
        raise ValueError(
            f"the differentiable preprocessing of {family} does not implement the image processor "
            f"option(s) {', '.join(sorted(unknown))}; its torch path would differ from "
            f"{type(image_processor).__name__}. Unset them, or score without gradients "
            "(as_reward_fn(differentiable=False) on PIL images)."
        )


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel, ``x`` in ``[0, 1]``."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def _size_get(size: Any, key: str) -> int | None:
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


# --------------------------------------------------------------------------------------------
# PIL-exact separable resampling (bicubic and Lanczos), differentiable


def _pil_bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (``a = -0.5``, support 2)."""
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _pil_lanczos(x: torch.Tensor) -> torch.Tensor:
    """PIL's Lanczos kernel: ``sinc(x) sinc(x / 3)`` on ``[-3, 3)``."""
    inside = (x >= -3.0) & (x < 3.0)
    return torch.where(inside, torch.sinc(x) * torch.sinc(x / 3.0), torch.zeros_like(x))


def _pil_bilinear(x: torch.Tensor) -> torch.Tensor:
    """PIL's bilinear (triangle) kernel, support 1."""
    return (1.0 - x.abs()).clamp(min=0.0)


_PIL_FILTERS = {
    "bilinear": (_pil_bilinear, 1.0),
    "bicubic": (_pil_bicubic, 2.0),
    "lanczos": (_pil_lanczos, 3.0),
}
#: PIL resampling codes (``PILImageResampling``) -> the filters above.
_PIL_RESAMPLE = {1: "lanczos", 2: "bilinear", 3: "bicubic"}


def resample_kind(image_processor: Any, default: str) -> str:
    """The filter name of an image processor's ``resample`` (PIL code), ``default`` if unset.

    Raises for a filter :func:`resize_pil` does not implement (nearest, box, hamming)."""
    code = getattr(image_processor, "resample", None)
    if code is None:
        return default
    code = int(getattr(code, "value", code))
    if code not in _PIL_RESAMPLE:
        raise ValueError(
            f"the image processor resamples with PIL filter {code}; the differentiable "
            f"preprocessing implements {sorted(_PIL_FILTERS)} only. Set its `resample` to one."
        )
    return _PIL_RESAMPLE[code]


@functools.lru_cache(maxsize=128)
def pil_resample_matrix(in_size: int, out_size: int, kind: str = "bicubic") -> torch.Tensor:
    """The ``[out_size, in_size]`` matrix (float64) of PIL's 1-d resampling (``ImagingResample``);
    cached, do not modify it in place.

    For output pixel ``i``: ``center = (i + 0.5) * scale`` with ``scale = in / out``; the filter is
    stretched by ``fs = max(scale, 1)`` (antialiasing when shrinking), taps
    ``j in [int(center - support * fs + 0.5), int(center + support * fs + 0.5))`` clipped to the
    image, weights ``k((j - center + 0.5) / fs)`` normalised to sum 1.
    """
    kernel, support = _PIL_FILTERS[kind]
    scale = in_size / out_size
    fs = max(scale, 1.0)
    reach = support * fs
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - reach + 0.5), 0)
        hi = min(int(center + reach + 0.5), in_size)
        taps = torch.arange(lo, hi, dtype=torch.float64)
        w = kernel((taps - center + 0.5) / fs)
        total = w.sum()
        matrix[i, lo:hi] = w / total if total != 0 else w
    return matrix


def _pil_vertical_first(h: int, w: int, height: int, width: int) -> bool:
    """Whether PIL runs the vertical pass first: Pillow >= 13 does when the height shrinks by more
    than twice as many pixels as the width (``Resample.c``); older Pillow never does."""
    import PIL

    if int(PIL.__version__.split(".")[0]) < 13:
        return False
    return (h - height) > 0 and (h - height) > 2 * (w - width)


#: PIL's fixed-point precision for 8-bit resampling (``32 - 8 - 2`` bits).
_PIL_PRECISION_BITS = 22


def to_8bit_levels(images: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` floats -> 8-bit levels ``floor(255 x + 0.5)`` (halves round up), clipped to
    ``[0, 255]``, in the input's float dtype (no gradient). The one rounding rule of the project for
    float images: the PIL path (:func:`reward.images.to_pil`) and the differentiable path
    (:func:`quantize_8bit`) both use it, so they see the same 8-bit image."""
    return torch.floor(images.detach().clamp(0.0, 1.0) * 255.0 + 0.5)


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Round ``[0, 1]`` values to the 8-bit grid (:func:`to_8bit_levels` / 255) with a
    straight-through gradient: the forward value is the rounded one, the gradient is identity."""
    rounded = to_8bit_levels(images) / 255.0
    return images + (rounded - images).detach()


def _resample_pass(x: torch.Tensor, matrix: torch.Tensor, axis: str, exact: bool) -> torch.Tensor:
    """One 1-d PIL pass along ``axis`` (``"w"`` or ``"h"``) with ``matrix [out, in]``.

    The differentiable value is ``clip(matrix @ x, 0, 1)``. With ``exact``, the forward value is
    replaced (straight-through) by PIL's 8-bit arithmetic on the 8-bit input: coefficients rounded
    to ``22``-bit fixed point (half away from zero), ``out = clip(floor((sum + 2^21) / 2^22))``.
    """
    spec = "nchw,ow->ncho" if axis == "w" else "nchw,oh->ncow"
    y = torch.einsum(spec, x, matrix.to(x.device, x.dtype)).clamp(0.0, 1.0)
    if not exact:
        return y
    one = float(1 << _PIL_PRECISION_BITS)
    fixed = torch.where(
        matrix < 0, torch.trunc(matrix * one - 0.5), torch.trunc(matrix * one + 0.5)
    )
    pixels = to_8bit_levels(x.double())
    total = torch.einsum(spec, pixels, fixed.to(x.device)) + one / 2
    out = (torch.floor(total / one).clamp(0.0, 255.0) / 255.0).to(y.dtype)
    return y + (out - y).detach()


def resize_pil(
    images: torch.Tensor, height: int, width: int, kind: str = "bicubic", exact: bool = False
) -> torch.Tensor:
    """Resize ``[N, C, H, W]`` in ``[0, 1]`` to ``[N, C, height, width]`` as PIL does on RGB images.

    Separable, in PIL's pass order (:func:`_pil_vertical_first`), each pass clipped to ``[0, 1]``
    as PIL clips its 8-bit passes. ``kind``: ``"bilinear"``, ``"bicubic"`` or ``"lanczos"``.
    ``exact=False``: float arithmetic (differs from PIL by its 8-bit rounding, about one grey
    level). ``exact=True``: the forward values are PIL's 8-bit results bit for bit (for an 8-bit
    input), the gradient is the float one (straight-through). Differentiable either way (a
    clipped pixel passes no gradient).
    """
    h, w = images.shape[-2:]

    def horizontal(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == width:
            return x
        return _resample_pass(x, pil_resample_matrix(x.shape[-1], width, kind), "w", exact)

    def vertical(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] == height:
            return x
        return _resample_pass(x, pil_resample_matrix(x.shape[-2], height, kind), "h", exact)

    if _pil_vertical_first(h, w, height, width):
        return horizontal(vertical(images))
    return vertical(horizontal(images))


def _rescale_normalize(images: torch.Tensor, ip: Any) -> torch.Tensor:
    """The processors' ``rescale`` and ``normalize`` on images in ``[0, 1]`` (``x / 255`` of the
    8-bit values): values ``255 x * rescale_factor`` (``255 x`` without rescaling)."""
    x = images
    factor = (
        float(getattr(ip, "rescale_factor", 1 / 255)) if getattr(ip, "do_rescale", True) else 1.0
    )
    if abs(factor * 255.0 - 1.0) > 1e-12:
        x = x * (255.0 * factor)
    if getattr(ip, "do_normalize", True):
        x = normalize(x, ip.image_mean, ip.image_std)
    return x
