"""Backbone families: how each image-text-to-text model family turns images into model inputs.

A family knows three things about its backbone:

1. the image inputs of a batch of PIL images, through the backbone's own (PIL) image processor
   (:meth:`BackboneFamily.pixel_inputs`);
2. the same inputs computed in torch from ``Tensor[N, 3, H, W]`` in ``[0, 1]`` so that gradients
   reach the pixels (:meth:`BackboneFamily.pixel_inputs_torch`); it must agree with (1) on the same
   image within the tolerance its tests state;
3. the token ids that stand for image ``i`` in the text (:meth:`BackboneFamily.image_token_ids`),
   i.e. the image placeholder expanded the way that family's processor expands it.

Families are looked up by the backbone's ``config.model_type`` in :data:`FAMILIES`.
"""

from __future__ import annotations

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


# --------------------------------------------------------------------------------------------
# torch image operations shared by the families (all differentiable)


def resize_bicubic(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize with antialiasing, ``[N, C, H, W] -> [N, C, height, width]``.

    Matches PIL's ``BICUBIC`` up to PIL's 8-bit rounding (PIL filters with support scaled by the
    downscale factor, as ``antialias=True`` does).
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
        x = images
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
            x = resize_bicubic(x, new_h, new_w)
        if getattr(ip, "do_center_crop", False):
            x = center_crop(x, _size_get(ip.crop_size, "height"), _size_get(ip.crop_size, "width"))
        if getattr(ip, "do_normalize", True):
            x = normalize(x, ip.image_mean, ip.image_std)
        return {"pixel_values": x}


FAMILIES: dict[str, type[BackboneFamily]] = {}


def register_family(family: type[BackboneFamily]) -> type[BackboneFamily]:
    """Register a family for each of its ``model_types`` (usable as a decorator)."""
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


register_family(LlavaFamily)


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
