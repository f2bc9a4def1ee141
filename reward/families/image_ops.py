"""torch image operations shared by the families (all differentiable): PIL's separable
resampling and 8-bit rounding reproduced in torch, crop, rescale and normalise."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

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
    """Center crop as the processors do: ``top = (H - height) // 2``, ``left = (W - width) // 2``."""
    h, w = images.shape[-2:]
    if height > h or width > w:
        pad_h, pad_w = max(height - h, 0), max(width - w, 0)
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        h, w = images.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return images[..., top : top + height, left : left + width]


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


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Round ``[0, 1]`` values to the 8-bit grid (``floor(255 x + 0.5) / 255``, clipped) with a
    straight-through gradient: the forward value is the rounded one, the gradient is identity."""
    rounded = torch.floor(images.detach().clamp(0.0, 1.0) * 255.0 + 0.5) / 255.0
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
    pixels = torch.floor(x.detach().double().clamp(0.0, 1.0) * 255.0 + 0.5)
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
