"""Token ids of a rendered text with their character offsets, and the tokens of a span of it.

The sequence hook (:mod:`reward.families.base`) tokenises a whole rendered turn in one call, as
the official processors do, and then needs to know which tokens are the caption's (truncation cuts
them from their end) and which are the image placeholder's (replaced by the expansion): both are
found by the tokens' character offsets. Phi-3.5-vision tokenises each text chunk around its image
in a call of its own; it uses the same two functions per chunk.
"""

from __future__ import annotations

from typing import Any


def encode_text(
    tokenizer: Any, text: str, add_special_tokens: bool
) -> tuple[list[int], list[tuple[int, int]]]:
    """``(ids, offsets)`` of ``text`` tokenised in one call; ``offsets[i]`` is token ``i``'s
    ``(start, end)`` in ``text`` (``(0, 0)`` for tokens the post-processor adds, such as BOS).
    Needs a fast (tokenizers) tokenizer."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer: LLaVA-Reward needs a fast "
            "(tokenizers) tokenizer, whose offsets locate the caption's tokens. Load the "
            "backbone's fast tokenizer."
        )
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(enc["input_ids"]), [(int(lo), int(hi)) for lo, hi in enc["offset_mapping"]]


def span_tokens(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """``(first, last + 1)``: the tokens whose characters overlap ``text[start:end]``.

    For an empty span, ``(i, i)`` with ``i`` the first token that starts at or after ``end`` (where
    the span's tokens would be). Tokens without characters (BOS) never count."""
    inside = [i for i, (lo, hi) in enumerate(offsets) if hi > lo and lo < end and hi > start]
    if inside:
        return inside[0], inside[-1] + 1
    after = next((i for i, (lo, hi) in enumerate(offsets) if hi > lo and lo >= end), len(offsets))
    return after, after
