"""Sequence parity and truncation, with tokenizers of the real kinds built in code.

The ids LLaVA-Reward feeds a backbone equal what the official code feeds through the backbone's own
transformers processor (tests/_official.py: the official LLaVA-Reward text, then ``LlavaProcessor``
/ ``Qwen2VLProcessor`` / ``Qwen3VLProcessor`` / ``Idefics3Processor``): BOS, chat template, the
caption tokenised in context, image-token expansion, EOS. Cases:

- ``llava`` + SentencePiece (transformers' ``LlamaTokenizer``: Metaspace, byte fallback, BOS by
  the post-processor) with llava-1.5's template: the kind of LLaVA-1.5/NeXT, Mistral and Phi-3;
- ``llava`` + the legacy SentencePiece ``tokenizer.json`` (``Prepend("▁")`` on each segment, as
  llava-1.5-hf ships);
- ``qwen2_vl`` / ``qwen3_vl`` + byte-level BPE (transformers' ``Qwen2Tokenizer``) with their
  templates (Qwen2-VL's writes a default system turn, which the official input does not have);
- ``idefics3`` + byte-level BPE (image splitting: row/column tokens and newlines in the expansion).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _official import official_inputs
from PIL import Image

from reward.processing import CaptionTruncatedWarning, RewardProcessor
from reward.testing import TINY_BUILDERS

CASES = {
    "llava-sentencepiece": ("llava", "sentencepiece"),
    "llava-sentencepiece_legacy": ("llava", "sentencepiece_legacy"),
    "qwen2_vl-bytelevel": ("qwen2_vl", "bytelevel"),
    "qwen3_vl-bytelevel": ("qwen3_vl", "bytelevel"),
    "idefics3-bytelevel": ("idefics3", "bytelevel"),
}
CAPTIONS = [
    "a red circle on the left of the big tree",
    " zébra 3!\nsky  ",  # leading space, byte fallback / multi-byte, a newline, trailing spaces
    "USER: a cat",  # template words inside the caption
    "",
]
SIZES = [(45, 37), (28, 28), (20, 56)]


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    family, kind = CASES[request.param]
    model, tok, ip = TINY_BUILDERS[family](tokenizer=kind)
    proc = RewardProcessor(tok, ip, model.config, chat_template=tok.chat_template)
    return request.param, proc


def _official_ids(proc: RewardProcessor, caption: str, image: Image.Image) -> list[int]:
    out = official_inputs(
        proc.tokenizer, proc.image_processor, proc.model_config, proc.chat_template, caption, image
    )
    return out["input_ids"][0].tolist()


def test_ids_equal_the_official_processor(case):
    _, proc = case
    for size in SIZES:
        image = _image(*size)
        for caption in CAPTIONS:
            ours = proc([caption], [image])["input_ids"][0].tolist()
            assert ours == _official_ids(proc, caption, image), (size, caption)


def _tokens(proc: RewardProcessor, caption: str) -> list[str]:
    ids = proc([caption], [_image(28, 28)])["input_ids"][0].tolist()
    return proc.tokenizer.convert_ids_to_tokens(ids)


# The full sequences for "a red circle" on a 28x28 image, by value. LLaVA: BOS from the tokenizer,
# no system prompt, no " ASSISTANT:", the caption in context after the image's "\n": 'a', not the
# '▁a' of a caption tokenised alone (legacy tokenizer.json: '▁' '<0x0A>' 'a', as llava-1.5-hf's
# own processor gives). Qwen: no system turn, no BOS, ends at <|im_end|>.
_CIRCLE = ["a", "\u2581red", "\u2581circle"]
_QWEN_CIRCLE = ["a", "\u0120red", "\u0120circle"]


def _tile(row: int, col: int) -> list[str]:
    return ["<fake_token_around_image>", f"<row_{row}_col_{col}>", *["<image>"] * 4]


PINNED = {
    "llava-sentencepiece": ["<s>", "\u2581USER:", "\u2581", *["<image>"] * 16, "<0x0A>", *_CIRCLE]
    + ["</s>"],
    "llava-sentencepiece_legacy": ["<s>", "\u2581USER:", "\u2581", *["<image>"] * 16]
    + ["\u2581", "<0x0A>", *_CIRCLE, "</s>"],
    "qwen2_vl-bytelevel": ["<|im_start|>", "user", "\u010a", "<|vision_start|>"]
    + ["<|image_pad|>"] * 4
    + ["<|vision_end|>", *_QWEN_CIRCLE, "<|im_end|>"],
    # 28x28 -> 56x56 -> 2x2 tiles of 4 tokens, a newline after each row, then the global view
    "idefics3-bytelevel": ["<|begin_of_text|>", "User", ":"]
    + _tile(1, 1)
    + _tile(1, 2)
    + ["\u010a"]
    + _tile(2, 1)
    + _tile(2, 2)
    + ["\u010a", "\u010a", "<fake_token_around_image>", "<global-img>", *["<image>"] * 4]
    + ["<fake_token_around_image>", *_QWEN_CIRCLE, "<end_of_utterance>"],
}
PINNED["qwen3_vl-bytelevel"] = PINNED["qwen2_vl-bytelevel"]


def test_sequences_pinned_by_value(case):
    name, proc = case
    assert _tokens(proc, "a red circle") == PINNED[name]


def test_qwen_mm_token_type_ids_equal_the_official_processor(case):
    name, proc = case
    if not name.startswith("qwen"):
        pytest.skip("M-RoPE token types are a Qwen input")
    image = _image(45, 37)
    official = official_inputs(
        proc.tokenizer, proc.image_processor, proc.model_config, proc.chat_template, "a cat", image
    )
    ours = proc(["a cat"], [image])
    assert torch.equal(ours["mm_token_type_ids"].long(), official["mm_token_type_ids"].long())
    assert int(ours["mm_token_type_ids"].sum()) == 9  # 42x42 -> 3x3 merged patches


# ----------------------------------------------------------------------------- truncation


def _with(proc: RewardProcessor, **kwargs) -> RewardProcessor:
    return RewardProcessor(
        proc.tokenizer,
        proc.image_processor,
        proc.model_config,
        chat_template=proc.chat_template,
        **kwargs,
    )


def test_default_budget_is_the_backbone_context(case):
    _, proc = case
    # tiny configs: 512 positions; tokenizers: model_max_length 4096 (Llama) / 32768 (Qwen)
    assert proc.max_length is None
    assert proc.context_length == proc.token_budget == 512
    tok = proc.tokenizer
    saved = tok.model_max_length
    try:
        tok.model_max_length = 100
        assert proc.context_length == 100  # the tokenizer's limit when smaller
    finally:
        tok.model_max_length = saved
    assert _with(proc, max_length=64).token_budget == 64


def test_truncation_cuts_the_caption_end_only_and_warns_once_per_call(case):
    _, proc = case
    image = _image(28, 28)
    long_caption = " ".join(["a red circle on the left of the big tree"] * 80)  # > 512 tokens
    short = "a red circle"
    image_ids = proc.family.image_token_ids(proc.family.pixel_inputs([image]), 0)
    full = proc.encode(long_caption, image_ids)
    assert len(full.ids) > 512
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = proc([long_caption, short, long_caption], [image] * 3)["input_ids"]
    cut = [w for w in caught if issubclass(w.category, CaptionTruncatedWarning)]
    assert len(cut) == 1 and "2 of 3 captions were cut" in str(cut[0].message)
    assert "context of 512 tokens" in str(cut[0].message)
    row = ids[0].tolist()
    excess = len(full.ids) - 512
    # the caption's last `excess` tokens are gone; everything before and after it is intact
    assert row == full.ids[: full.caption_end - excess] + full.ids[full.caption_end :]
    assert len(row) == 512 and row[-1] == proc.tokenizer.eos_token_id
    assert row.count(proc.family.image_token_id) == full.ids.count(proc.family.image_token_id)
    # the short caption is not cut (left padding up to 512)
    assert ids[1].tolist()[-len(proc.encode(short, image_ids).ids) :] == (
        proc.encode(short, image_ids).ids
    )
    # an explicit max_length
    small = _with(proc, max_length=len(full.ids) - full.caption_end + full.caption_start + 3)
    with pytest.warns(CaptionTruncatedWarning, match=r"1 of 1 captions.*max_length="):
        row = small([long_caption], [image])["input_ids"][0].tolist()
    assert row == full.ids[: full.caption_start + 3] + full.ids[full.caption_end :]
    with pytest.raises(ValueError, match="too small: the image and the template alone need"):
        _with(proc, max_length=len(image_ids))([short], [image])


def test_collect_truncations_warns_once_with_the_total(case):
    _, proc = case
    image = _image(28, 28)
    long_caption = " ".join(["a red circle on the left of the big tree"] * 80)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with proc.collect_truncations():
            for _ in range(3):
                proc([long_caption, "dog"], [image, image])
    cut = [w for w in caught if issubclass(w.category, CaptionTruncatedWarning)]
    assert [str(w.message).split(" captions")[0] for w in cut] == ["3 of 6"]
