"""`RewardProcessor`: (prompt, image) -> model inputs in LLaVA-Reward's format.

The format (SPEC section 1): the image, then the caption, as one user turn with no instruction text
and no assistant prefix, ending in the end-of-sequence token. When the tokenizer (or processor)
has a chat template, the turn is rendered with it; otherwise the sequence is
``[bos] <image tokens> caption eos``.

Each sequence is assembled from token pieces: ``prefix + image tokens + middle + caption + suffix``,
where ``suffix`` always ends in EOS. **Truncation rule**: when the sequence exceeds
``max_length``, tokens are cut from the end of the caption only; the template tokens, every image
token and the final EOS are always kept. If even an empty caption does not fit, a
``ValueError`` says how many tokens the image alone needs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

from .families import BackboneFamily, family_for

_CAPTION = "\ue000CAPTION\ue000"
PROCESSOR_FILE = "reward_processor.json"


class RewardProcessor:
    """Tokenizer + image processor + the family's image-token expansion, with left/right padding."""

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any,
        model_config: Any,
        chat_template: str | None = None,
        max_length: int | None = None,
        padding_side: str = "left",
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_config = model_config
        self.chat_template = chat_template
        self.max_length = max_length
        self.padding_side = padding_side
        self.family: BackboneFamily = family_for(model_config.model_type)(
            image_processor, tokenizer, model_config
        )
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "the backbone's tokenizer has no EOS token; LLaVA-Reward reads the reward there."
            )
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self._prefix, self._middle, self._suffix = self._template_pieces()

    # ---------------------------------------------------------------- construction / saving
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        model_config: Any,
        trust_remote_code: bool = False,
        **overrides: Any,
    ) -> RewardProcessor:
        """Load from a reward folder (tokenizer + image processor + ``reward_processor.json``) or
        from a backbone's hub id / folder (its processor, or its tokenizer and image processor)."""
        path = str(path)
        extra: dict[str, Any] = {}
        meta = Path(path) / PROCESSOR_FILE
        if meta.is_file():
            extra = json.loads(meta.read_text())
        chat_template = extra.get("chat_template")
        tokenizer = image_processor = None
        if not meta.is_file():  # a backbone's folder / hub id: try its official processor first
            try:
                proc = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
                tokenizer = getattr(proc, "tokenizer", None)
                image_processor = getattr(proc, "image_processor", None)
                chat_template = getattr(proc, "chat_template", None)
            except Exception:  # e.g. Qwen2VLProcessor needs torchvision for its video processor
                pass
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if image_processor is None:
            image_processor = AutoImageProcessor.from_pretrained(
                path, trust_remote_code=trust_remote_code
            )
        if chat_template is None and not meta.is_file():
            chat_template = getattr(tokenizer, "chat_template", None)
        kwargs = {
            "max_length": extra.get("max_length"),
            "padding_side": extra.get("padding_side", "left"),
        }
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(tokenizer, image_processor, model_config, chat_template=chat_template, **kwargs)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        meta = {
            "chat_template": self.chat_template,
            "max_length": self.max_length,
            "padding_side": self.padding_side,
            "family": type(self.family).__name__,
        }
        (path / PROCESSOR_FILE).write_text(json.dumps(meta, indent=2))

    # ---------------------------------------------------------------- the sequence format
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _template_pieces(self) -> tuple[list[int], list[int], list[int]]:
        tok = self.tokenizer
        img = self.family.template_image_text
        rendered = None
        if self.chat_template:
            messages = [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": _CAPTION}],
                }
            ]
            try:
                rendered = tok.apply_chat_template(
                    messages,
                    chat_template=self.chat_template,
                    tokenize=False,
                    add_generation_prompt=False,
                )
            except Exception:
                rendered = None
        if rendered is not None and img in rendered and _CAPTION in rendered:
            before_img, rest = rendered.split(img, 1)
            middle, suffix = rest.split(_CAPTION, 1)
            suffix = suffix.rstrip()
        else:  # no usable chat template: [bos] <image> caption eos
            before_img = tok.bos_token or ""
            middle, suffix = "", ""
        prefix_ids = self._encode(before_img)
        suffix_ids = self._encode(suffix)
        if not suffix_ids or suffix_ids[-1] != tok.eos_token_id:
            suffix_ids = suffix_ids + [tok.eos_token_id]
        return prefix_ids, self._encode(middle), suffix_ids

    def sequence_ids(self, caption: str, image_ids: list[int]) -> list[int]:
        """Token ids of one (image, caption) turn, truncated by the module's rule."""
        family_rule = getattr(self.family, "sequence_ids", None)
        if family_rule is not None:  # a family whose official text rule is its own (phi3_v, ...)
            return family_rule(caption, image_ids, self.max_length, self.chat_template)
        caption_ids = self._encode(caption)
        fixed = len(self._prefix) + len(image_ids) + len(self._middle) + len(self._suffix)
        if self.max_length is not None:
            budget = self.max_length - fixed
            if budget < 0:
                raise ValueError(
                    f"max_length={self.max_length} is too small: the image and the template alone "
                    f"need {fixed} tokens. Raise max_length (or lower the image resolution)."
                )
            caption_ids = caption_ids[:budget]
        return self._prefix + image_ids + self._middle + caption_ids + self._suffix

    # ---------------------------------------------------------------- batching
    def _pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for i, s in enumerate(sequences):
            if self.padding_side == "left":
                ids[i, longest - len(s) :] = torch.tensor(s)
                mask[i, longest - len(s) :] = 1
            else:
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
        return ids, mask

    def _assemble(self, prompts: Sequence[str], pixel: dict[str, torch.Tensor]) -> dict:
        sequences = [
            self.sequence_ids(p, self.family.image_token_ids(pixel, i))
            for i, p in enumerate(prompts)
        ]
        input_ids, attention_mask = self._pad(sequences)
        extra = self.family.model_inputs(input_ids, attention_mask, pixel)
        return {"input_ids": input_ids, "attention_mask": attention_mask, **extra}

    def __call__(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> dict:
        """Model inputs for RGB PIL ``images`` (one prompt each), through the official processor."""
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts for {len(images)} images; pass one each.")
        return self._assemble(prompts, self.family.pixel_inputs(images))

    def from_tensors(self, prompts: Sequence[str], images: torch.Tensor) -> dict:
        """Model inputs for ``images: Tensor[N, 3, H, W]`` in ``[0, 1]``, differentiable in the pixels."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be Tensor[N, 3, H, W], got shape {tuple(images.shape)}.")
        if len(prompts) != images.shape[0]:
            raise ValueError(
                f"got {len(prompts)} prompts for {images.shape[0]} images; pass one each."
            )
        return self._assemble(prompts, self.family.pixel_inputs_torch(images))

    def sequence_length(self, prompt: str, num_image_tokens: int) -> int:
        """Length of a prompt's sequence (used to sort batches by length)."""
        return len(self.sequence_ids(prompt, [0] * num_image_tokens))
