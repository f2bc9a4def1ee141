"""`RewardProcessor`: (prompt, image) -> model inputs in LLaVA-Reward's format.

The format (SPEC section 1): the image, then the caption, as one user turn with no instruction text
and no assistant prefix, ending in the end-of-sequence token. The ids are what the backbone's own
processor gives for that turn plus EOS: the family renders the turn with the chat template and
tokenises it whole, the caption in context (the sequence hook, :mod:`reward.families.base`).

**Truncation rule**: a sequence longer than the budget loses tokens from the end of its caption
only; the template tokens, every image token and the final EOS are always kept. The budget is
``max_length`` when set, else the backbone's context: the smaller of the language model's
``max_position_embeddings`` and the tokenizer's ``model_max_length``. A call that cuts captions
warns once (:class:`CaptionTruncatedWarning`, naming how many). If even an empty caption does not
fit, a ``ValueError`` says how many tokens the image alone needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

from .families import BackboneFamily, EncodedTurn, family_for
from .images import check_image_batch

PROCESSOR_FILE = "reward_processor.json"
#: tokenizers without a ``model_max_length`` report ``VERY_LARGE_INTEGER`` (1e30): not a limit.
_NO_LIMIT = 10**12


class CaptionTruncatedWarning(UserWarning):
    """Captions were cut to fit the token budget (``max_length``)."""


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
        min_pixels: int | None = None,
        max_pixels: int | None = None,
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
        self.family.set_pixel_budget(min_pixels, max_pixels)
        self._turn = self.family.render_turn(chat_template)
        #: truncation counts of the calls inside :meth:`collect_truncations` (None: warn per call)
        self._truncations: list[int] | None = None

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
        """``text`` tokenised alone, without special tokens (for length estimates only: the
        model's ids come from :meth:`encode`, which tokenises the caption in context)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    @property
    def context_length(self) -> int | None:
        """The backbone's context: min of the language model's ``max_position_embeddings`` and the
        tokenizer's ``model_max_length`` (None when neither is set)."""
        limits = []
        text_config = self.model_config
        if hasattr(text_config, "get_text_config"):
            text_config = text_config.get_text_config()
        positions = getattr(text_config, "max_position_embeddings", None)
        if positions:
            limits.append(int(positions))
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if tok_max and tok_max < _NO_LIMIT:
            limits.append(int(tok_max))
        return min(limits) if limits else None

    @property
    def token_budget(self) -> int | None:
        """The length a sequence is cut to: ``max_length`` if set, else :attr:`context_length`."""
        return self.max_length if self.max_length is not None else self.context_length

    def encode(self, caption: str, image_ids: list[int]) -> EncodedTurn:
        """One (image, caption) turn, not truncated (the family's sequence hook)."""
        return self.family.encode_turn(self._turn, caption, image_ids)

    def sequence_ids(self, caption: str, image_ids: list[int]) -> list[int]:
        """Token ids of one (image, caption) turn, truncated by the module's rule."""
        return self._truncate([self.encode(caption, image_ids)])[0]

    def _truncate(self, turns: list[EncodedTurn]) -> list[list[int]]:
        """Each turn cut to :attr:`token_budget`; counts the captions cut (warns, see
        :meth:`collect_truncations`)."""
        budget = self.token_budget
        if budget is None:
            return [t.ids for t in turns]
        cut = [t.truncated(budget) for t in turns]
        n_cut = sum(len(c.ids) < len(t.ids) for c, t in zip(cut, turns))
        if self._truncations is not None:
            self._truncations[0] += n_cut
            self._truncations[1] += len(turns)
        elif n_cut:
            self._warn_truncated(n_cut, len(turns))
        return [c.ids for c in cut]

    def _warn_truncated(self, n_cut: int, total: int) -> None:
        source = (
            f"max_length={self.max_length}"
            if self.max_length is not None
            else f"the backbone's context of {self.context_length} tokens"
        )
        warnings.warn(
            f"{n_cut} of {total} captions were cut (from their end) to fit {source}; the image "
            "tokens, the template and EOS are kept. Set max_length (--max_length) to change it.",
            CaptionTruncatedWarning,
            stacklevel=4,
        )

    @contextlib.contextmanager
    def collect_truncations(self) -> Iterator[None]:
        """Count cut captions over several calls and warn once at the end (a scorer call that
        runs many batches warns once, naming the total)."""
        if self._truncations is not None:  # nested: the outer block warns
            yield
            return
        self._truncations = [0, 0]
        try:
            yield
        finally:
            (n_cut, total), self._truncations = self._truncations, None
            if n_cut:
                self._warn_truncated(n_cut, total)

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
        sequences = self._truncate(
            [self.encode(p, self.family.image_token_ids(pixel, i)) for i, p in enumerate(prompts)]
        )
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
        check_image_batch(images)
        if len(prompts) != images.shape[0]:
            raise ValueError(
                f"got {len(prompts)} prompts for {images.shape[0]} images; pass one each."
            )
        return self._assemble(prompts, self.family.pixel_inputs_torch(images))

    def sequence_length(self, prompt: str, num_image_tokens: int) -> int:
        """Length of a prompt's sequence (used to sort batches by length)."""
        return len(self.sequence_ids(prompt, [0] * num_image_tokens))
