"""Backbone families: how each image-text-to-text model family turns images into model inputs.

A family knows three things about its backbone:

1. the image inputs of a batch of PIL images, through the backbone's own (PIL) image processor
   (:meth:`BackboneFamily.pixel_inputs`);
2. the same inputs computed in torch from ``Tensor[N, 3, H, W]`` in ``[0, 1]`` so that gradients
   reach the pixels (:meth:`BackboneFamily.pixel_inputs_torch`); it must agree with (1) on the same
   image within the tolerance its tests state. Resizing reproduces PIL's separable resampling
   (:func:`resize_pil`); with :attr:`BackboneFamily.emulate_8bit` (the default) PIL's 8-bit
   rounding is reproduced too, with straight-through gradients, so the values are the official
   processor's bit for bit (tests/test_families.py); without it they are about one grey level
   away (max 0.016 in normalised units on noise images);
3. the token ids that stand for image ``i`` in the text (:meth:`BackboneFamily.image_token_ids`),
   i.e. the image placeholder expanded the way that family's processor expands it.

Families are looked up by the backbone's ``config.model_type`` in :data:`FAMILIES`: ``llava``,
``qwen2_vl`` / ``qwen2_5_vl`` and ``idefics3`` / ``smolvlm`` (with and without image splitting).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image


class BackboneFamily:
    """Base class; subclasses set the class attributes and implement the three methods."""

    #: ``config.model_type`` values served by this family.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: dotted path of the vision projector inside the base model (trainable per perspective).
    projector: ClassVar[str] = ""
    #: the text the chat template emits for ``{"type": "image"}`` (replaced by the expanded ids).
    template_image_text: ClassVar[str] = "<image>"
    #: keys of the image inputs the base model's ``forward`` takes.
    pixel_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: whether :meth:`pixel_inputs_torch` reproduces the PIL processors' 8-bit rounding (of the
    #: input and after every resampling pass) with straight-through gradients, so that its values
    #: equal the official processor's; ``False``: plain float arithmetic (about one grey level
    #: away from the official values). Set it on an instance to change it.
    emulate_8bit: bool = True

    def __init__(self, image_processor: Any, tokenizer: Any, model_config: Any):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.model_config = model_config

    @property
    def image_token_id(self) -> int:
        cfg = self.model_config
        token_id = getattr(cfg, "image_token_id", None)
        if token_id is None:
            token_id = getattr(cfg, "image_token_index", None)
        if token_id is None:
            raise ValueError(
                f"the backbone ({cfg.model_type}) has no image token id in its config "
                "(`image_token_id`); LLaVA-Reward needs an image-text-to-text model whose "
                "text carries image placeholder tokens."
            )
        return int(token_id)

    def pixel_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Image inputs for the base model from RGB PIL images (the official processor)."""
        out = self.image_processor(images=list(images), return_tensors="pt")
        return {k: out[k] for k in self.pixel_keys if k in out}

    def pixel_inputs_torch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Differentiable image inputs from ``images: Tensor[N, 3, H, W]`` in ``[0, 1]``."""
        raise NotImplementedError(
            f"{type(self).__name__} has no differentiable preprocessing; supported families: "
            f"{', '.join(sorted(n for f in FAMILIES.values() for n in f.model_types if f.has_torch_preprocessing()))}."
        )

    @classmethod
    def has_torch_preprocessing(cls) -> bool:
        return cls.pixel_inputs_torch is not BackboneFamily.pixel_inputs_torch

    def image_token_ids(self, pixel_inputs: dict[str, torch.Tensor], index: int) -> list[int]:
        """The token ids that stand for image ``index`` of ``pixel_inputs`` in the text."""
        raise NotImplementedError

    def model_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_inputs: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The inputs the base model's ``forward`` takes besides ``input_ids``/``attention_mask``.

        By default the pixel inputs under :attr:`pixel_keys` (other keys, such as the row/column
        layout a family keeps for :meth:`image_token_ids`, are dropped). A family whose model needs
        more text-side inputs (Qwen2-VL's ``mm_token_type_ids``) adds them here.
        """
        return {k: v for k, v in pixel_inputs.items() if k in self.pixel_keys}


# --------------------------------------------------------------------------------------------
# torch image operations shared by the families (all differentiable)


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


# --------------------------------------------------------------------------------------------


class LlavaFamily(BackboneFamily):
    """LLaVA (CLIP-style vision tower + projector + Llama-style LM), e.g. llava-1.5, and
    Phi-3.5-vision-shaped LLaVA configs. One image = ``n`` copies of the image token, with
    ``n = (image_size / patch_size)^2`` (+1 with ``vision_feature_select_strategy="full"``)."""

    model_types = ("llava",)
    projector = "multi_modal_projector"
    template_image_text = "<image>"

    def num_image_tokens(self) -> int:
        vision = self.model_config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        if getattr(self.model_config, "vision_feature_select_strategy", "default") == "full":
            n += 1
        return n

    def image_token_ids(self, pixel_inputs: dict[str, torch.Tensor], index: int) -> list[int]:
        return [self.image_token_id] * self.num_image_tokens()

    def pixel_inputs_torch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        ip = self.image_processor
        x = quantize_8bit(images) if self.emulate_8bit else images
        h, w = x.shape[-2:]
        if getattr(ip, "do_resize", True):
            short = _size_get(ip.size, "shortest_edge")
            if short is not None:
                # transformers' get_resize_output_image_size: the short side to `short`, the long
                # side to int(short * long / short_side) (truncated).
                if w <= h:
                    new_w, new_h = short, int(short * h / w)
                else:
                    new_h, new_w = short, int(short * w / h)
            else:
                new_h, new_w = _size_get(ip.size, "height"), _size_get(ip.size, "width")
            x = resize_pil(x, new_h, new_w, resample_kind(ip, "bicubic"), self.emulate_8bit)
        if getattr(ip, "do_center_crop", False):
            x = center_crop(x, _size_get(ip.crop_size, "height"), _size_get(ip.crop_size, "width"))
        if getattr(ip, "do_normalize", True):
            x = normalize(x, ip.image_mean, ip.image_std)
        return {"pixel_values": x}


# --------------------------------------------------------------------------------------------


def qwen2_vl_smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of ``factor`` (= patch x merge), the area
    within ``[min_pixels, max_pixels]``, the aspect ratio kept as closely as possible."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


class Qwen2VLFamily(BackboneFamily):
    """Qwen2-VL and Qwen2.5-VL: dynamic resolution, ``14 x 14`` patches merged ``2 x 2``.

    One image of grid ``(t, h, w)`` (in patches) is ``<|vision_start|>`` + ``t h w / merge^2`` x
    ``<|image_pad|>`` + ``<|vision_end|>``, as ``Qwen2VLProcessor`` expands the chat template's
    ``<|vision_start|><|image_pad|><|vision_end|>``. Pixel inputs: ``pixel_values
    [sum_i t_i h_i w_i, C * T * P * P]`` and ``image_grid_thw [N, 3]``. The model also needs
    ``mm_token_type_ids`` (1 at image tokens) for its multimodal RoPE.
    """

    model_types = ("qwen2_vl", "qwen2_5_vl")
    projector = "visual.merger"
    template_image_text = "<|vision_start|><|image_pad|><|vision_end|>"
    pixel_keys = ("pixel_values", "image_grid_thw")

    def _token_id(self, attr: str, token: str) -> int:
        token_id = getattr(self.model_config, attr, None)
        if token_id is None:
            token_id = self.tokenizer.convert_tokens_to_ids(token)
        return int(token_id)

    @property
    def merge_size(self) -> int:
        return int(getattr(self.image_processor, "merge_size", None) or 2)

    def image_token_ids(self, pixel_inputs: dict[str, torch.Tensor], index: int) -> list[int]:
        n = int(pixel_inputs["image_grid_thw"][index].prod()) // self.merge_size**2
        start = self._token_id("vision_start_token_id", "<|vision_start|>")
        end = self._token_id("vision_end_token_id", "<|vision_end|>")
        return [start, *([self.image_token_id] * n), end]

    def model_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_inputs: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        out = super().model_inputs(input_ids, attention_mask, pixel_inputs)
        # text 0, image 1 (video 2): the processor's `mm_token_type_ids`, needed by M-RoPE
        out["mm_token_type_ids"] = (input_ids == self.image_token_id).to(torch.int32)
        return out

    def pixel_inputs_torch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Qwen2VLImageProcessor`` in torch: smart resize (bicubic), rescale/normalise, repeat
        in time to ``temporal_patch_size``, patchify in the processor's patch order.

        ``images [N, 3, H, W]`` -> ``pixel_values [N * gh * gw, 3 * T * P * P]`` (rows of image 0
        first, within an image merge-window-major: ``(gh/m, gw/m, m, m)``), ``image_grid_thw
        [N, 3] = (1, gh, gw)``.
        """
        ip = self.image_processor
        p, m = int(ip.patch_size), self.merge_size
        t = int(getattr(ip, "temporal_patch_size", 2))
        n, c, h, w = images.shape
        x = quantize_8bit(images) if self.emulate_8bit else images
        if getattr(ip, "do_resize", True):
            size = ip.size
            min_px = _size_get(size, "shortest_edge") or _size_get(size, "min_pixels")
            max_px = _size_get(size, "longest_edge") or _size_get(size, "max_pixels")
            h, w = qwen2_vl_smart_resize(h, w, p * m, min_px, max_px)
            x = resize_pil(x, h, w, resample_kind(ip, "bicubic"), self.emulate_8bit)
        x = _rescale_normalize(x, ip)
        gh, gw = h // p, w // p
        x = x.reshape(n, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # n, gh/m, gw/m, mh, mw, C, ph, pw
        x = x.unsqueeze(6).expand(*x.shape[:6], t, p, p)  # ..., C, T, ph, pw
        pixel_values = x.reshape(n * gh * gw, c * t * p * p)
        grid = torch.tensor([[1, gh, gw]] * n, dtype=torch.long, device=images.device)
        return {"pixel_values": pixel_values, "image_grid_thw": grid}


class Idefics3Family(BackboneFamily):
    """Idefics3 and SmolVLM: SigLIP tiles of ``max_image_size`` + pixel-shuffle connector.

    With ``do_image_splitting`` an image becomes ``rows x cols`` tiles plus a global view, else one
    global view; each tile is ``image_seq_len = (image_size / patch)^2 / scale_factor^2``
    ``<image>`` tokens framed as ``Idefics3Processor`` / ``SmolVLMProcessor`` frame them
    (``<fake_token_around_image>``, ``<row_r_col_c>``, ``<global-img>``, newlines). Pixel inputs:
    ``pixel_values [N, tiles, C, S, S]`` and ``pixel_attention_mask [N, tiles, S, S]``.
    """

    model_types = ("idefics3", "smolvlm")
    projector = "connector"
    template_image_text = "<image>"
    pixel_keys = ("pixel_values", "pixel_attention_mask")

    @property
    def image_seq_len(self) -> int:
        cfg = self.model_config
        vision = cfg.vision_config
        return int((vision.image_size // vision.patch_size) ** 2 / (cfg.scale_factor**2))

    def pixel_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        out = self.image_processor(
            images=[[im] for im in images], return_tensors="pt", return_row_col_info=True
        )
        inputs = {k: out[k] for k in self.pixel_keys if k in out}
        inputs["rows"] = torch.tensor([r[0] for r in out["rows"]], dtype=torch.long)
        inputs["cols"] = torch.tensor([c[0] for c in out["cols"]], dtype=torch.long)
        return inputs

    def image_token_ids(self, pixel_inputs: dict[str, torch.Tensor], index: int) -> list[int]:
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

        tok = self.tokenizer
        text = get_image_prompt_string(
            int(pixel_inputs["rows"][index]),
            int(pixel_inputs["cols"][index]),
            self.image_seq_len,
            fake_token_around_image=getattr(tok, "fake_image_token", None)
            or "<fake_token_around_image>",
            image_token=tok.convert_ids_to_tokens(self.image_token_id),
            global_image_token=getattr(tok, "global_image_token", None) or "<global-img>",
        )
        # the string starts and ends with special tokens, so it tokenizes alone as in context
        return tok(text, add_special_tokens=False)["input_ids"]

    def pixel_inputs_torch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Idefics3ImageProcessor`` in torch (Lanczos resizes, with or without splitting).

        Resize the longest side to ``size["longest_edge"]`` (the other side ``int``-truncated, then
        made even); with splitting, resize both sides up to multiples of the tile size ``S``, cut
        ``rows x cols`` tiles of ``S x S`` row-major and append the whole image resized to
        ``S x S``; without splitting, resize to ``S x S``. Then rescale/normalise. All images of a
        tensor batch share a size, so no tile padding is needed: ``pixel_attention_mask`` is ones.
        """
        from transformers.models.idefics3.image_processing_pil_idefics3 import (
            MAX_IMAGE_SIZE,
            _resize_output_size_rescale_to_max_len,
            _resize_output_size_scale_below_upper_bound,
        )

        ip = self.image_processor
        kind = resample_kind(ip, "lanczos")
        tile = int(_size_get(ip.max_image_size, "longest_edge"))
        n, c, h, w = images.shape
        x = quantize_8bit(images) if self.emulate_8bit else images
        if getattr(ip, "do_resize", True):
            longest = _size_get(ip.size, "longest_edge")
            if longest is not None:
                h, w = _resize_output_size_rescale_to_max_len(h, w, max_len=longest)
                h, w = _resize_output_size_scale_below_upper_bound(h, w, max_len=MAX_IMAGE_SIZE)
            else:
                h, w = _size_get(ip.size, "height"), _size_get(ip.size, "width")
            x = resize_pil(x, h, w, kind, self.emulate_8bit)
        rows = cols = 0
        if getattr(ip, "do_image_splitting", True):
            # resize_for_vision_encoder
            aspect = w / h
            if w >= h:
                w = math.ceil(w / tile) * tile
                h = math.ceil(int(w / aspect) / tile) * tile
            else:
                h = math.ceil(h / tile) * tile
                w = math.ceil(int(h * aspect) / tile) * tile
            x = resize_pil(x, h, w, kind, self.emulate_8bit)
            if h > tile or w > tile:
                rows, cols = (h - tile) // tile + 1, (w - tile) // tile + 1
                tiles = [
                    x[..., r * tile : (r + 1) * tile, q * tile : (q + 1) * tile]
                    for r in range(rows)
                    for q in range(cols)
                ]
                tiles.append(resize_pil(x, tile, tile, kind, self.emulate_8bit))
            else:
                tiles = [x]
        else:
            tiles = [resize_pil(x, tile, tile, kind, self.emulate_8bit)]
        pixel_values = _rescale_normalize(torch.stack(tiles, dim=1), ip)  # [N, tiles, C, S, S]
        mask = torch.ones(
            (n, len(tiles), *pixel_values.shape[-2:]), dtype=torch.long, device=images.device
        )
        return {
            "pixel_values": pixel_values,
            "pixel_attention_mask": mask,
            "rows": torch.full((n,), rows, dtype=torch.long),
            "cols": torch.full((n,), cols, dtype=torch.long),
        }


FAMILIES: dict[str, type[BackboneFamily]] = {}


def register_family(family: type[BackboneFamily]) -> type[BackboneFamily]:
    """Register a family for each of its ``model_types`` (usable as a decorator)."""
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


register_family(LlavaFamily)
register_family(Qwen2VLFamily)
register_family(Idefics3Family)


def family_for(model_type: str) -> type[BackboneFamily]:
    """The family class for a backbone ``model_type``; a clear error names the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"backbone model_type {model_type!r} is not supported yet; supported: "
            f"{', '.join(sorted(FAMILIES))}. Add a `BackboneFamily` in reward/families.py."
        ) from None


def ceil_to(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)
