"""Token ids of a rendered (image, caption) turn with the caption tokenised in context.

The families whose official processor tokenises the whole rendered text at once (LLaVA-NeXT,
Phi-3.5-vision's chunks) encode ``before + caption + after`` in one call and locate the caption's
tokens by their character offsets, so that truncation can cut the caption from its end without
re-tokenising the template around it.
"""

from __future__ import annotations

from typing import Any


def encode_with_caption(
    tokenizer: Any, before: str, caption: str, after: str, add_special_tokens: bool
) -> tuple[list[int], list[int]]:
    """``(ids, caption_positions)`` of ``before + caption + after`` tokenised in one call.

    ``caption_positions`` are the indices in ``ids`` of the tokens whose characters overlap the
    caption (``[len(before), len(before) + len(caption))``). Needs a fast tokenizer (offsets).
    """
    text = before + caption + after
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    start, end = len(before), len(before) + len(caption)
    positions = [
        i for i, (lo, hi) in enumerate(enc["offset_mapping"]) if hi > lo and lo < end and hi > start
    ]
    return list(enc["input_ids"]), positions


def cut_caption(ids: list[int], caption_positions: list[int], excess: int) -> list[int]:
    """``ids`` without the last ``excess`` caption tokens (the caption is cut from its end)."""
    if excess <= 0:
        return ids
    if excess > len(caption_positions):
        raise ValueError(f"cannot cut {excess} tokens from a caption of {len(caption_positions)}.")
    drop = set(caption_positions[-excess:])
    return [t for i, t in enumerate(ids) if i not in drop]
