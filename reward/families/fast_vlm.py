"""FastVLM (``FastVlmForConditionalGeneration``; apple/ml-fastvlm): a convolutional vision tower
whose last feature map, flattened row by row, is the visual tokens, a projector and an LM.

Its processor is ``LlavaProcessor`` with ``patch_size`` = the tower's total stride (64 for
FastViTHD) and ``vision_feature_select_strategy="full"`` (no class token to drop): one image of
``h x w`` processed pixels is ``(h // stride) * (w // stride)`` image tokens. The image processor is
CLIP's (resize, centre crop, rescale, normalise), so the pixel path is :class:`LlavaFamily`'s.
"""

from __future__ import annotations

import torch

from .base import register_family
from .llava import LlavaFamily

#: total stride of ``timm_wrapper`` towers by timm architecture (FastViTHD: 1024 px -> 16 x 16).
TIMM_STRIDES = {"fastvit_mci3": 64}


def vision_stride(vision_config) -> int:
    """Pixels per visual token along a side: the tower's total stride.

    ``resnet`` (transformers' ``ResNetModel``): the stem's stride 4 (convolution and max-pool),
    times 2 for every stage after the first, and for the first with ``downsample_in_first_stage``:
    ``4 * 2^(len(depths) - 1) * (2 if downsample_in_first_stage else 1)``. ``timm_wrapper``: by
    architecture (:data:`TIMM_STRIDES`).
    """
    kind = getattr(vision_config, "model_type", None)
    if kind == "resnet":
        first = 2 if vision_config.downsample_in_first_stage else 1
        return 4 * 2 ** (len(vision_config.depths) - 1) * first
    if kind == "timm_wrapper":
        arch = getattr(vision_config, "architecture", None)
        if arch in TIMM_STRIDES:
            return TIMM_STRIDES[arch]
        raise ValueError(
            f"FastVLM with the timm tower {arch!r}: its stride is unknown; add it to "
            "reward.families.fast_vlm.TIMM_STRIDES (the processor config's `patch_size`)."
        )
    raise ValueError(
        f"FastVLM with a {kind!r} vision tower: its stride is unknown; supported towers are "
        "'resnet' and 'timm_wrapper' (extend reward.families.fast_vlm.vision_stride)."
    )


class FastVlmFamily(LlavaFamily):
    """FastVLM: :class:`LlavaFamily`'s pixels and turn; the image-token count comes from the
    processed image's size and the tower's stride (:func:`vision_stride`)."""

    model_types = ("fast_vlm",)

    def image_token_ids(self, pixel_inputs: dict[str, torch.Tensor], index: int) -> list[int]:
        height, width = pixel_inputs["pixel_values"][index].shape[-2:]
        stride = vision_stride(self.model_config.vision_config)
        return [self.image_token_id] * ((int(height) // stride) * (int(width) // stride))


register_family(FastVlmFamily)
