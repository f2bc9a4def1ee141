"""LLaVA (CLIP-style vision tower + projector + Llama-style LM)."""

from __future__ import annotations

import torch

from .base import BackboneFamily, register_family
from .image_ops import (
    _size_get,
    center_crop,
    normalize,
    quantize_8bit,
    resample_kind,
    resize_pil,
)


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


register_family(LlavaFamily)
