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
   i.e. the image placeholder expanded the way that family's processor expands it;
4. the ids of one (image, caption) turn, equal to the official processor's (the sequence hook:
   :meth:`BackboneFamily.render_turn` and :meth:`BackboneFamily.encode_turn`, described in
   :mod:`reward.families.base`).

Families are looked up by the backbone's ``config.model_type`` in :data:`FAMILIES`: ``llava``,
``qwen2_vl`` / ``qwen2_5_vl``, ``qwen3_vl``, ``idefics3`` / ``smolvlm`` (with and without image
splitting), ``llava_next`` (LLaVA-1.6, anyres), ``fast_vlm`` (FastVLM: a convolutional tower) and ``phi3_v``
(Phi-3.5-vision, native port). One
module per family (``llava``, ``llava_next``, ``fast_vlm``, ``qwen2_vl``, ``qwen3_vl``, ``idefics3``,
``phi3_v``); each registers its class on import.
A new family is a :class:`BackboneFamily` subclass in a module of its own, imported here.
"""

from .base import (
    FAMILIES,
    BackboneFamily,
    EncodedTurn,
    TurnText,
    family_for,
    register_family,
)
from .fast_vlm import FastVlmFamily
from .idefics3 import Idefics3Family
from .image_ops import (
    center_crop,
    normalize,
    pil_resample_matrix,
    quantize_8bit,
    resample_kind,
    resize_bicubic,
    resize_pil,
)
from .llava import LlavaFamily
from .llava_next import LlavaNextFamily
from .phi3_v import Phi3VFamily
from .qwen2_vl import Qwen2VLFamily, qwen2_vl_smart_resize
from .qwen3_vl import Qwen3VLFamily

__all__ = [
    "FAMILIES",
    "BackboneFamily",
    "EncodedTurn",
    "FastVlmFamily",
    "Idefics3Family",
    "LlavaFamily",
    "LlavaNextFamily",
    "Phi3VFamily",
    "Qwen2VLFamily",
    "Qwen3VLFamily",
    "TurnText",
    "center_crop",
    "family_for",
    "normalize",
    "pil_resample_matrix",
    "qwen2_vl_smart_resize",
    "quantize_8bit",
    "register_family",
    "resample_kind",
    "resize_bicubic",
    "resize_pil",
]
