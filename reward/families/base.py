"""The family interface (:class:`BackboneFamily`) and the registry that finds a family by the
backbone's ``config.model_type``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
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


FAMILIES: dict[str, type[BackboneFamily]] = {}


def register_family(family: type[BackboneFamily]) -> type[BackboneFamily]:
    """Register a family for each of its ``model_types`` (usable as a decorator)."""
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


def family_for(model_type: str) -> type[BackboneFamily]:
    """The family class for a backbone ``model_type``; a clear error names the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"backbone model_type {model_type!r} is not supported yet; supported: "
            f"{', '.join(sorted(FAMILIES))}. Add a `BackboneFamily` in a module of reward/families/ (see its __init__)."
        ) from None
