"""LLaVA (CLIP-style vision tower + projector + Llama-style LM)."""

from __future__ import annotations

import torch

from .base import BackboneFamily, register_family
from .image_ops import (
    COMMON_TORCH_OPTIONS,
    _rescale_normalize,
    _size_get,
    center_crop,
    check_torch_options,
    pad_bottom_right,
    pad_to_square,
    quantize_8bit,
    resample_kind,
    resize_output_size,
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

    #: image-processor options the torch path reproduces (CLIPImageProcessor,
    #: LlavaImageProcessor); any other option that is set is refused (``check_torch_options``).
    torch_options = COMMON_TORCH_OPTIONS | {
        "default_to_square",
        "do_center_crop",
        "crop_size",
        "do_pad",
        "pad_size",
    }

    def pixel_inputs_torch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``CLIPImageProcessor`` / ``LlavaImageProcessor`` in torch, in the processors' order.

        ``do_pad`` of ``LlavaImageProcessor`` (it has ``pad_to_square``): pad to a square with the
        colour ``int(255 * image_mean)`` first; ``do_pad`` of other processors: zeros after the
        image up to ``pad_size`` at the end (without ``pad_size`` the batch shares one size, so
        nothing to pad). Then resize (``size``: shortest edge (+ longest edge), max height/width,
        or height/width; bilinear/bicubic/Lanczos as PIL), center crop (zero padding when the crop
        is larger), rescale, normalise. ``images [N, 3, H, W]`` -> ``pixel_values [N, 3, h, w]``.
        """
        ip = self.image_processor
        check_torch_options(ip, self.torch_options, type(self).__name__)
        x = quantize_8bit(images) if self.emulate_8bit else images
        do_pad = bool(getattr(ip, "do_pad", False))
        square = do_pad and hasattr(ip, "pad_to_square")
        if square:
            mean = getattr(ip, "image_mean", None)
            fill = [int(m * 255) / 255.0 for m in mean] if mean else [0.0] * x.shape[1]
            x = pad_to_square(x, fill)
        if getattr(ip, "do_resize", True):
            new_h, new_w = resize_output_size(*x.shape[-2:], ip.size)
            x = resize_pil(x, new_h, new_w, resample_kind(ip, "bicubic"), self.emulate_8bit)
        if getattr(ip, "do_center_crop", False):
            x = center_crop(x, _size_get(ip.crop_size, "height"), _size_get(ip.crop_size, "width"))
        x = _rescale_normalize(x, ip)
        pad_size = getattr(ip, "pad_size", None)
        if do_pad and not square and pad_size is not None:
            x = pad_bottom_right(x, _size_get(pad_size, "height"), _size_get(pad_size, "width"))
        return {"pixel_values": x}


# --------------------------------------------------------------------------------------------


register_family(LlavaFamily)
