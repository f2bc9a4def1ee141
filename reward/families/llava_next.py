"""LLaVA-NeXT (LLaVA-1.6): transformers' native ``LlavaNextForConditionalGeneration``.

Image path (``LlavaNextImageProcessor`` / ``LlavaNextModel``): the image is resized (aspect kept)
into the best grid of ``image_grid_pinpoints`` and zero-padded to it, cut into ``crop``-px tiles
row-major, and preceded by the whole image resized to a square; CLIP features of the
``vision_feature_layer`` (-2, the second-to-last) without the class token. In the text the tiles'
features are unpadded and each row ends with ``image_newline``, so one image is
``base + rows * (cols + 1)`` ``<image>`` tokens (``LlavaNextProcessor``'s count).

Text, as the LLaVA-Reward release fed it: the chat template rendered with the generation prompt,
cut after the caption, plus EOS (``USER: <image>\\n{caption}</s>`` for Vicuna), tokenised as one
text with the tokenizer's BOS; no system prompt; the reward is read at the final ``</s>``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .base import BackboneFamily, register_family
from .image_ops import (
    _rescale_normalize,
    _size_get,
    center_crop,
    quantize_8bit,
    resample_kind,
    resize_pil,
)

#: the processor options the differentiable path reproduces; any other truthy ``do_*`` option of
#: the image processor is refused by name.
_SUPPORTED_OPTIONS = {
    "do_resize",
    "do_center_crop",
    "do_rescale",
    "do_normalize",
    "do_pad",
    "do_convert_rgb",
}


class LlavaNextFamily(BackboneFamily):
    """LLaVA-NeXT: anyres tiles + a base view, ``image_newline`` after each row of tile features."""

    model_types = ("llava_next",)
    projector = "multi_modal_projector"
    template_image_text = "<image>"
    pixel_keys = ("pixel_values", "image_sizes")

    # ------------------------------------------------------------------ image tokens
    def _processed_size(self) -> tuple[int, int]:
        """``(height, width)`` of one processed tile (``pixel_values.shape[-2:]``)."""
        ip = self.image_processor
        height = _size_get(ip.crop_size, "height") if getattr(ip, "do_center_crop", True) else None
        if height is None:
            short = _size_get(ip.size, "shortest_edge")
            height = short if short is not None else _size_get(ip.size, "height")
        width = _size_get(ip.crop_size, "width") if getattr(ip, "do_center_crop", True) else None
        return int(height), int(width or height)

    def num_image_tokens(self, height: int, width: int) -> int:
        """``<image>`` tokens of an image of ``height x width``: ``LlavaNextProcessor``'s count."""
        from transformers import LlavaNextProcessor

        cfg = self.model_config
        full = getattr(cfg, "vision_feature_select_strategy", "default") == "full"
        counter = SimpleNamespace(
            image_processor=self.image_processor,
            patch_size=cfg.vision_config.patch_size,
            num_additional_image_tokens=1 if full else 0,
            _get_unpadded_features=lambda *a: LlavaNextProcessor._get_unpadded_features(None, *a),
        )
        tile_h, tile_w = self._processed_size()
        return LlavaNextProcessor._get_number_of_features(counter, height, width, tile_h, tile_w)

    def image_token_ids(self, pixel_inputs: dict[str, torch.Tensor], index: int) -> list[int]:
        h, w = (int(v) for v in pixel_inputs["image_sizes"][index])
        return [self.image_token_id] * self.num_image_tokens(h, w)

    # ------------------------------------------------------------------ text
    # The sequence is the base rule (reward.families.base): the Vicuna template's user turn
    # ``USER: <image>\n{caption}`` + EOS, tokenised whole with BOS, ``<image>`` expanded; the
    # official code renders ``[text, image]`` with the generation prompt and cuts " ASSISTANT:",
    # the same text, since the template writes the images first.

    # ------------------------------------------------------------------ pixels in torch
    def _check_options(self) -> None:
        ip = self.image_processor
        for name, value in vars(ip).items():
            if name.startswith("do_") and value and name not in _SUPPORTED_OPTIONS:
                raise ValueError(
                    f"the image processor sets `{name}`, which the differentiable LLaVA-NeXT "
                    f"preprocessing does not reproduce (it does: {sorted(_SUPPORTED_OPTIONS)}). "
                    f"Turn `{name}` off or score with the PIL path."
                )
        if not getattr(ip, "image_grid_pinpoints", None):
            raise ValueError(
                "the image processor has no `image_grid_pinpoints`: the anyres grid is undefined."
            )

    def _tile(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """One view (base or tile) through the per-patch steps: shortest-edge resize, centre crop,
        rescale/normalise."""
        ip = self.image_processor
        if getattr(ip, "do_resize", True):
            short = _size_get(ip.size, "shortest_edge")
            h, w = x.shape[-2:]
            if short is not None:
                if w <= h:
                    new_w, new_h = short, int(short * h / w)
                else:
                    new_h, new_w = short, int(short * w / h)
            else:
                new_h, new_w = _size_get(ip.size, "height"), _size_get(ip.size, "width")
            x = resize_pil(x, new_h, new_w, kind, self.emulate_8bit)
        if getattr(ip, "do_center_crop", True):
            x = center_crop(x, _size_get(ip.crop_size, "height"), _size_get(ip.crop_size, "width"))
        return _rescale_normalize(x, ip)

    def pixel_inputs_torch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``LlavaNextImageProcessor`` in torch: best pinpoint, aspect-kept resize into it
        (``ceil`` on the free side), centred zero padding, row-major tiles of ``crop`` px, the base
        view (the whole image resized to ``size x size``) first; each view resized/cropped/
        normalised as the processor does. ``do_pad`` (padding the tile count across a batch) is a
        no-op here: every image of a tensor batch has the same size and so the same tiles.

        ``images [N, 3, H, W]`` -> ``pixel_values [N, 1 + tiles, 3, S, S]``, ``image_sizes [N, 2]``.
        """
        from transformers.image_processing_utils import select_best_resolution

        self._check_options()
        ip = self.image_processor
        kind = resample_kind(ip, "bicubic")
        n, _, h, w = images.shape
        x = quantize_8bit(images) if self.emulate_8bit else images
        th, tw = select_best_resolution((h, w), ip.image_grid_pinpoints)
        scale_w, scale_h = tw / w, th / h
        if scale_w < scale_h:
            new_w, new_h = tw, min(math.ceil(h * scale_w), th)
        else:
            new_h, new_w = th, min(math.ceil(w * scale_h), tw)
        resized = resize_pil(x, new_h, new_w, kind, self.emulate_8bit)
        top, r_y = divmod(th - new_h, 2)
        left, r_x = divmod(tw - new_w, 2)
        padded = F.pad(resized, (left, left + r_x, top, top + r_y), value=0.0)
        crop = _size_get(ip.crop_size, "height") or _size_get(ip.size, "height")
        if crop is None:
            crop = _size_get(ip.size, "shortest_edge")
        tiles = [
            padded[..., i : i + crop, j : j + crop]
            for i in range(0, th, crop)
            for j in range(0, tw, crop)
        ]
        short = _size_get(ip.size, "shortest_edge")
        base_h, base_w = (
            (short, short) if short is not None else (ip.size["height"], ip.size["width"])
        )
        views = [resize_pil(x, base_h, base_w, kind, self.emulate_8bit), *tiles]
        pixel_values = torch.stack([self._tile(v, kind) for v in views], dim=1)
        sizes = torch.tensor([[h, w]] * n, dtype=torch.long, device=images.device)
        return {"pixel_values": pixel_values, "image_sizes": sizes}


register_family(LlavaNextFamily)
