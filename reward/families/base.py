"""The family interface (:class:`BackboneFamily`) and the registry that finds a family by the
backbone's ``config.model_type``.

**The sequence hook.** What ids the model sees for one (image, caption) turn is a family-level
decision, in two steps that a family may override:

1. :meth:`BackboneFamily.render_turn` -> :class:`TurnText`: the user turn as text, cut around the
   image and the caption, ``before + <image> + between + caption + after``, with ``after`` ending in
   the EOS text. Default: the chat template (one user message: image, then caption; no
   generation prompt), trailing whitespace of the template cut, EOS appended when the template
   does not end in it (the official LLaVA-Reward code renders with the generation prompt and cuts
   it away, then appends EOS: the same text). Without a chat template, ``[bos] <image> caption
   eos``. Qwen2-VL drops the template's default system turn (the official code cuts it).
2. :meth:`BackboneFamily.encode_turn` -> :class:`EncodedTurn`: token ids plus where the caption's
   tokens are (truncation cuts only those, from their end). Default: what the backbone's official
   processor does: the whole text tokenised at once (the caption in context, BOS by the tokenizer's
   own post-processor unless the text already starts with it), the image placeholder replaced by
   the family's expansion (:meth:`BackboneFamily.image_token_ids`). A family whose image is not a
   run of vocabulary tokens, or whose processor tokenises text chunks apart (Phi-3.5-vision: a
   BOS per chunk, ``<|image_1|>`` as negative ids), overrides :meth:`encode_turn`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from PIL import Image

from .sequence import encode_text, span_tokens

#: stands for the caption while the chat template is rendered (private-use characters, which no
#: template transforms), so the template is rendered once, not once per caption.
CAPTION_MARKER = "\ue000CAPTION\ue000"


@dataclasses.dataclass(frozen=True)
class TurnText:
    """One user turn as text: ``before + <image text> + between + caption + after``.

    ``<image text>`` is :attr:`BackboneFamily.template_image_text` (what the chat template writes
    for the image); ``after`` ends in the tokenizer's EOS text."""

    before: str
    between: str
    after: str


@dataclasses.dataclass(frozen=True)
class EncodedTurn:
    """Token ids of one turn; ``ids[caption_start:caption_end]`` are the caption's tokens."""

    ids: list[int]
    caption_start: int
    caption_end: int

    def truncated(self, max_length: int) -> EncodedTurn:
        """The turn cut to ``max_length`` ids by dropping caption tokens from the caption's end;
        ``ValueError`` when the rest alone (image, template, EOS) is longer."""
        excess = len(self.ids) - max_length
        if excess <= 0:
            return self
        n_caption = self.caption_end - self.caption_start
        if excess > n_caption:
            raise ValueError(
                f"max_length={max_length} is too small: the image and the template alone need "
                f"{len(self.ids) - n_caption} tokens. Raise max_length (or lower the image "
                "resolution)."
            )
        end = self.caption_end - excess
        return EncodedTurn(self.ids[:end] + self.ids[self.caption_end :], self.caption_start, end)


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

    def pixel_budget(self) -> tuple[int, int] | None:
        """``(min_pixels, max_pixels)`` of a dynamic-resolution image processor, None for a family
        with a fixed input resolution."""
        return None

    def set_pixel_budget(self, min_pixels: int | None, max_pixels: int | None) -> None:
        """Set the image area range (pixels) an image is resized into; None keeps that bound."""
        if min_pixels is None and max_pixels is None:
            return
        raise ValueError(
            f"min_pixels/max_pixels apply to dynamic-resolution backbones (Qwen2-VL, Qwen2.5-VL, "
            f"Qwen3-VL); {type(self).__name__} resizes every image to a fixed size. Leave them unset."
        )

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

    #: the image-processor options :meth:`pixel_inputs_torch` reproduces; it refuses a processor
    #: that sets any other (``image_ops.check_torch_options``).
    torch_options: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def has_torch_preprocessing(cls) -> bool:
        return cls.pixel_inputs_torch is not BackboneFamily.pixel_inputs_torch

    def supports_torch_preprocessing(self) -> bool:
        """Whether :meth:`pixel_inputs_torch` can reproduce this image processor (the family has a
        torch path and the processor sets no option outside :attr:`torch_options`)."""
        from .image_ops import check_torch_options

        if not self.has_torch_preprocessing():
            return False
        try:
            check_torch_options(self.image_processor, self.torch_options, type(self).__name__)
        except ValueError:
            return False
        return True

    def image_token_ids(self, pixel_inputs: dict[str, torch.Tensor], index: int) -> list[int]:
        """The token ids that stand for image ``index`` of ``pixel_inputs`` in the text."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the sequence hook
    def render_turn(self, chat_template: str | None) -> TurnText:
        """The user turn as text (see the module docstring); override to change the template."""
        tok = self.tokenizer
        eos = tok.eos_token
        img = self.template_image_text
        rendered = None
        if chat_template:
            messages = [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": CAPTION_MARKER}],
                }
            ]
            try:
                rendered = tok.apply_chat_template(
                    messages,
                    chat_template=chat_template,
                    tokenize=False,
                    add_generation_prompt=False,
                )
            except Exception:  # a template that cannot render this turn: the plain format
                rendered = None
        if rendered is not None and img in rendered and CAPTION_MARKER in rendered:
            before, rest = rendered.split(img, 1)
            between, after = rest.split(CAPTION_MARKER, 1)
            after = after.rstrip()
            if not after.endswith(eos):
                after += eos
            return TurnText(before, between, after)
        return TurnText(tok.bos_token or "", "", eos)

    def encode_turn(self, turn: TurnText, caption: str, image_ids: list[int]) -> EncodedTurn:
        """Token ids of ``turn`` with ``caption``, the image placeholder expanded to ``image_ids``.

        The whole text is tokenised in one call, as the official processor does (so the caption is
        tokenised in context); BOS comes from the tokenizer's post-processor unless the text starts
        with it already (as ``ProcessorMixin.apply_chat_template`` decides). The placeholder's
        tokens are then replaced by ``image_ids``: the same ids as expanding the placeholder in the
        text first, since the placeholder and the expansion begin and end with special tokens, at
        which tokenizers split the text before anything else (tests/test_sequences.py checks this
        against the official processors).
        """
        tok = self.tokenizer
        img = self.template_image_text
        text = turn.before + img + turn.between + caption + turn.after
        img_start = len(turn.before)
        cap_start = img_start + len(img) + len(turn.between)
        add_special = not (tok.bos_token and text.startswith(tok.bos_token))
        ids, offsets = encode_text(tok, text, add_special_tokens=add_special)
        i0, i1 = span_tokens(offsets, img_start, img_start + len(img))
        if i0 == i1:
            raise ValueError(
                f"the image placeholder {img!r} did not tokenise to tokens of its own in {text!r}; "
                "it must be a special token of the tokenizer."
            )
        c0, c1 = span_tokens(offsets, cap_start, cap_start + len(caption))
        shift = len(image_ids) - (i1 - i0)
        return EncodedTurn(ids[:i0] + list(image_ids) + ids[i1:], c0 + shift, c1 + shift)

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
