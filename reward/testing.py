"""Tiny random backbones of each supported family, built in code (tests, demo, benchmarks).

``save_tiny_backbone(family, path)`` writes a complete backbone folder (model safetensors,
tokenizer, image processor) that ``LlavaRewardModel.from_backbone(path)`` loads through the real
``from_pretrained`` path. Nothing is downloaded.

Tokenizers (``tokenizer=`` of each builder):

- ``"word"`` (the default): a word-level vocabulary with BOS written by the chat template; the
  tiny world's reward is built on it;
- ``"sentencepiece"``: the kind of LLaVA-1.5/NeXT (Llama, Vicuna, Mistral) and Phi-3: transformers'
  ``LlamaTokenizer`` (BPE over ``▁``-prefixed pieces, ``Metaspace`` pre-tokenizer that prefixes only
  the start of the text, byte fallback ``<0x0A>``..., BOS added by the post-processor);
  ``"sentencepiece_legacy"``: the older ``tokenizer.json`` layout (a ``Prepend("▁")`` normaliser on
  every text segment between special tokens, as llava-1.5-hf ships);
- ``"bytelevel"``: the kind of Qwen2/2.5/3-VL: transformers' ``Qwen2Tokenizer`` (byte-level BPE,
  Qwen's pre-tokenising regex, NFC, no BOS).

each with the real chat template of its family (:data:`LLAVA_15_CHAT_TEMPLATE`,
:data:`QWEN2_VL_REAL_CHAT_TEMPLATE`, :data:`QWEN3_VL_CHAT_TEMPLATE`; written here to render the
same text as the released templates for the turns LLaVA-Reward uses).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPVisionConfig, PreTrainedTokenizerFast

#: A small word vocabulary: enough for the tests' captions and the tiny world's grammar.
WORDS = [
    "USER:",
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "at",
    "and",
    "with",
    "without",
    "is",
    "are",
    "to",
    "photo",
    "picture",
    "image",
    "drawing",
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "white",
    "black",
    "gray",
    "pink",
    "brown",
    "cyan",
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "dot",
    "bar",
    "heart",
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "middle",
    "upper",
    "lower",
    "small",
    "big",
    "large",
    "tiny",
    "one",
    "two",
    "three",
    "four",
    "background",
    "sky",
    "grass",
    "cat",
    "dog",
    "car",
    "tree",
    "house",
    "person",
    "astronaut",
    "riding",
    "horse",
    "city",
    "night",
    "day",
    "sun",
    "moon",
    "beautiful",
    "ugly",
    "blurry",
    "sharp",
]

LLAVA_SPECIAL = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]

#: A minimal chat template of the LLaVA style (user turn only, as LLaVA-Reward uses it).
LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}{{ eos_token }}"
)


#: The llava-1.5 / llava-v1.6-vicuna (llava-hf) chat template: ``ROLE: `` then the images as
#: ``<image>\n``, then the texts each followed by a space; ``ASSISTANT:`` as generation prompt.
#: A user turn renders ``USER: <image>\n{caption} `` (BOS comes from the tokenizer).
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] + ' ' }}"
    "{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

#: One ChatML turn per message, the image written as ``<|vision_start|><|image_pad|><|vision_end|>``;
#: the generation prompt ``<|im_start|>assistant\n``.
_CHATML_TURNS = (
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Qwen2-VL / Qwen2.5-VL's ChatML template, with the default system turn it writes when the first
#: message is not a system message.
QWEN2_VL_REAL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}" + _CHATML_TURNS
)

#: Qwen3-VL's ChatML template (no default system turn; a system turn only when given).
QWEN3_VL_CHAT_TEMPLATE = "{% for message in messages %}" + _CHATML_TURNS

#: FastVLM's template (Qwen2's ChatML with the default system turn; the image written as
#: ``<image>\n`` before the text, as the released checkpoints' template does).
FAST_VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: extra words the chat templates write (role names), so they have pieces of their own.
_TEMPLATE_WORDS = ("USER", "ASSISTANT", "user", "assistant", "system", "You", "helpful")


def _left_to_right_merges(pieces: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The tokens and BPE merges that build each piece from its characters left to right
    (``r e`` -> ``re``, ``re d`` -> ``red``), in order, without repeats."""
    tokens: dict[str, None] = {}
    merges: dict[tuple[str, str], None] = {}
    for piece in pieces:
        for ch in piece:
            tokens.setdefault(ch)
        for i in range(2, len(piece) + 1):
            merges.setdefault((piece[: i - 1], piece[i - 1]))
            tokens.setdefault(piece[:i])
    return list(tokens), list(merges)


def sentencepiece_tokenizer(
    special: list[str],
    words: tuple[str, ...] = WORDS,
    legacy: bool = False,
    model_max_length: int = 4096,
    **special_map: str,
) -> PreTrainedTokenizerFast:
    """A Llama-style SentencePiece BPE tokenizer (transformers' ``LlamaTokenizer``) over ``words``.

    Vocabulary: ``<unk> <s> </s>``, the 256 byte-fallback tokens ``<0x00>..<0xFF>``, then every
    piece of ``▁word`` and ``word`` built left to right, then ``special`` (added special tokens).
    ``legacy=False``: a ``Metaspace`` pre-tokenizer that prefixes ``▁`` only at the start of the
    text (transformers' ``LlamaTokenizer``, Mistral, Phi-3); ``legacy=True``: a ``Prepend("▁")`` +
    ``Replace(" ", "▁")`` normaliser and no pre-tokenizer (older ``tokenizer.json`` files such as
    llava-1.5-hf's), which prefixes every text segment between special tokens. BOS is added by the
    post-processor (``add_bos_token``); ``special_map`` names pad/image tokens etc.
    """
    from tokenizers import normalizers
    from transformers import LlamaTokenizer

    pieces = []
    for w in [*words, *_TEMPLATE_WORDS, ":", "."]:
        pieces += ["\u2581" + w, w]
    chars, merges = _left_to_right_merges(pieces)
    base = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "\u2581"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*base, *chars]))}
    std = {k: v for k, v in special_map.items() if k in ("bos_token", "eos_token", "unk_token")}
    extra = {k: v for k, v in special_map.items() if k not in std and k != "pad_token"}
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        legacy=False,
        add_bos_token=True,
        model_max_length=model_max_length,
        extra_special_tokens=extra or None,
        **std,
    )
    if legacy:
        backend = tokenizer.backend_tokenizer
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
        backend.pre_tokenizer = None
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [s for s in special if s not in vocab]}
    )
    if "pad_token" in special_map:
        tokenizer.pad_token = special_map["pad_token"]
    return tokenizer


def bytelevel_tokenizer(
    special: list[str],
    words: tuple[str, ...] = WORDS,
    model_max_length: int = 32768,
    **special_map: str,
) -> PreTrainedTokenizerFast:
    """A Qwen2-style byte-level BPE tokenizer (transformers' ``Qwen2Tokenizer``) over ``words``.

    Vocabulary: the 256 byte symbols of GPT-2's byte-to-unicode map, every piece of ``Ġword`` and
    ``word`` built left to right, then ``special`` (added special tokens). No BOS; ``special_map``
    names eos/pad/image tokens.
    """
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    space = bytes_to_unicode()[ord(" ")]
    pieces = []
    for w in [*words, *_TEMPLATE_WORDS]:
        pieces += [space + w, w]
    chars, merges = _left_to_right_merges(pieces)
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*alphabet, *chars]))}
    std = {
        k: v
        for k, v in special_map.items()
        if k in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    extra = {k: v for k, v in special_map.items() if k not in std}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        extra_special_tokens=extra or None,
        **std,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [s for s in special if s not in tokenizer.get_vocab()]}
    )
    return tokenizer


def tiny_word_tokenizer(
    special: list[str], words: tuple[str, ...] = WORDS, **special_map: str
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``special + words`` (``special_map`` names bos/eos/pad/unk...)."""
    vocab = {tok: i for i, tok in enumerate(list(dict.fromkeys([*special, *words])))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = {
        k: v
        for k, v in special_map.items()
        if k not in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    std = {
        k: v
        for k, v in special_map.items()
        if k in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, extra_special_tokens=extra or None, **std
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [s for s in special if s not in std.values()]}
    )
    return tokenizer


#: tokenizer builders by kind (see the module docstring)
_TOKENIZER_KINDS = ("word", "sentencepiece", "sentencepiece_legacy", "bytelevel")


def _tokenizer(kind: str, special: list[str], words: tuple[str, ...] = WORDS, **special_map: str):
    """A tokenizer of ``kind`` over ``special + words``; ``special_map`` names bos/eos/pad/..."""
    if kind == "word":
        return tiny_word_tokenizer(special, words, **special_map)
    if kind in ("sentencepiece", "sentencepiece_legacy"):
        return sentencepiece_tokenizer(
            special, words, legacy=kind == "sentencepiece_legacy", **special_map
        )
    if kind == "bytelevel":
        special_map.pop("unk_token", None)  # byte-level BPE has no unknown pieces
        return bytelevel_tokenizer(special, words, **special_map)
    raise ValueError(f"tokenizer must be one of {', '.join(_TOKENIZER_KINDS)}, got {kind!r}.")


def _tiny_clip_vision_config(
    hidden: int, layers: int, image_size: int, patch: int, **extra: Any
) -> CLIPVisionConfig:
    """A tiny CLIP vision tower: width ``hidden`` (MLP ``2 * hidden``), ``layers`` layers, 2 heads,
    ``image_size``-px images in ``patch``-px patches; ``extra`` config fields on top."""
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        projection_dim=hidden,
        **extra,
    )


def _tiny_llama_config(tokenizer, hidden: int, layers: int):
    """A tiny Llama text config sized to ``tokenizer`` (the LM of the LLaVA and Idefics3 builders)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_llava(
    hidden: int = 32,
    layers: int = 2,
    image_size: int = 28,
    patch: int = 7,
    seed: int = 0,
    tokenizer: str = "word",
    vision_hidden: int | None = None,
):
    """A tiny LLaVA (CLIP vision + Llama) and its tokenizer / PIL image processor.

    ``tokenizer="word"``: the word-level tokenizer with BOS in a minimal template (the tiny world's
    reward); ``"sentencepiece"`` / ``"sentencepiece_legacy"``: a Llama SentencePiece tokenizer
    with llava-1.5's chat template (:data:`LLAVA_15_CHAT_TEMPLATE`). ``vision_hidden``: the CLIP width (default ``hidden``)."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _tokenizer(
        tokenizer,
        LLAVA_SPECIAL,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        image_token="<image>",
    )
    tok.chat_template = LLAVA_CHAT_TEMPLATE if tokenizer == "word" else LLAVA_15_CHAT_TEMPLATE
    tokenizer = tok
    vision_hidden = vision_hidden or hidden
    config = LlavaConfig(
        vision_config=_tiny_clip_vision_config(vision_hidden, 2, image_size, patch),
        text_config=_tiny_llama_config(tokenizer, hidden, layers),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return model, tokenizer, image_processor


QWEN2_VL_SPECIAL = [
    "<unk>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

#: The word-level Qwen2-VL builder's template: ChatML without the default system turn.
QWEN2_VL_CHAT_TEMPLATE = QWEN3_VL_CHAT_TEMPLATE


def tiny_qwen2_vl(
    hidden: int = 32,
    layers: int = 2,
    patch: int = 7,
    merge: int = 2,
    min_pixels: int = 14 * 14 * 4,
    max_pixels: int = 56 * 56,
    model_type: str = "qwen2_vl",
    seed: int = 0,
    tokenizer: str = "word",
):
    """A tiny Qwen2-VL (``model_type="qwen2_5_vl"``: Qwen2.5-VL, ``"qwen3_vl"``: Qwen3-VL, see
    :func:`tiny_qwen3_vl`) with its tokenizer and PIL image processor. Patches of ``patch`` px
    merged ``merge x merge``: a side is a multiple of ``patch * merge`` (14 px) and an image covers
    ``min_pixels..max_pixels`` pixels. ``tokenizer="word"``: word-level with a minimal ChatML
    template; ``"bytelevel"``: a Qwen2 byte-level BPE with the family's real template (Qwen2-VL's
    writes a default system turn, Qwen3-VL's does not)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    kind = tokenizer
    tokenizer = _tokenizer(
        kind,
        QWEN2_VL_SPECIAL,
        words=(*WORDS, "user", "assistant", "system"),
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
        vision_bos_token="<|vision_start|>",
        vision_eos_token="<|vision_end|>",
    )
    if kind == "word":
        tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    elif model_type == "qwen3_vl":
        tokenizer.chat_template = QWEN3_VL_CHAT_TEMPLATE
    else:
        tokenizer.chat_template = QWEN2_VL_REAL_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    heads = 2
    half_head = hidden // heads // 2  # rotary frequencies per head, split over (t, h, w)
    mrope = [half_head - 2 * (half_head // 3), half_head // 3, half_head // 3]
    text = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "mrope_section": mrope},
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "depth": 2,
        "embed_dim": hidden,
        "hidden_size": hidden,
        "num_heads": heads,
        "mlp_ratio": 2,
        "patch_size": patch,
        "spatial_merge_size": merge,
        "temporal_patch_size": 2,
    }
    token_ids = {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }
    if model_type == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision.pop("embed_dim")
        vision.pop("mlp_ratio")
        vision.update(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            out_hidden_size=hidden,
            window_size=2 * patch * merge,
            fullatt_block_indexes=[1],
        )
    elif model_type == "qwen3_vl":
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model

        text.update(
            head_dim=hidden // heads,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": mrope,
                "mrope_interleaved": True,
            },
        )
        text.pop("bos_token_id")
        vision = {
            "depth": 2,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_heads": heads,
            "patch_size": patch,
            "spatial_merge_size": merge,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden,
            "num_position_embeddings": 16,  # a 4 x 4 grid of learned positions, interpolated
            "deepstack_visual_indexes": [0],  # vision layer 0 feeds LM layer 0 (DeepStack)
        }
    elif model_type == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model
    else:
        raise ValueError(
            f"model_type must be 'qwen2_vl', 'qwen2_5_vl' or 'qwen3_vl', got {model_type!r}."
        )
    config = Config(text_config=text, vision_config=vision, **token_ids)
    torch.manual_seed(seed)
    model = Model(config).eval()
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=2,
    )
    return model, tokenizer, image_processor


def tiny_qwen3_vl(**kwargs):
    """A tiny Qwen3-VL (native in transformers: ``Qwen3VLForConditionalGeneration``, DeepStack
    visual features added to the first LM layers, interleaved M-RoPE) with a Qwen2-VL PIL image
    processor, as the released checkpoints use; arguments as :func:`tiny_qwen2_vl`."""
    return tiny_qwen2_vl(model_type="qwen3_vl", **kwargs)


IDEFICS3_SPECIAL = [
    "<unk>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<global-img>",
    "<image>",
    *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)],
]

#: The Idefics3 / SmolVLM chat template (``User:<image>caption<end_of_utterance>\n``).
IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def tiny_idefics3(
    hidden: int = 32,
    layers: int = 2,
    tile: int = 28,
    patch: int = 7,
    longest_edge: int = 56,
    do_image_splitting: bool = True,
    model_type: str = "idefics3",
    seed: int = 0,
    tokenizer: str = "word",
):
    """A tiny Idefics3 (``model_type="smolvlm"``: SmolVLM) with its tokenizer and PIL image
    processor (``tokenizer="bytelevel"``: a byte-level BPE, the kind of SmolLM/Llama-3): tiles of
    ``tile`` px (SigLIP ``patch`` px patches, pixel shuffle 2, so ``(tile / patch)^2 / 4`` tokens
    per tile), images resized to ``longest_edge`` first."""
    from tokenizers import AddedToken
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    kind = tokenizer
    tokenizer = _tokenizer(
        kind,
        IDEFICS3_SPECIAL,
        words=(*WORDS, "User:", "Assistant:"),
        unk_token="<unk>",
        pad_token="<|end_of_text|>",
        bos_token="<|begin_of_text|>",
        eos_token="<end_of_utterance>",
        image_token="<image>",
        fake_image_token="<fake_token_around_image>",
        global_image_token="<global-img>",
        end_of_utterance_token="<end_of_utterance>",
    )
    if kind == "word":  # keep newlines as tokens (the split-image prompt uses them), as BPEs do
        tokenizer.add_tokens([AddedToken("\n", normalized=False, special=False)])
    tokenizer.chat_template = IDEFICS3_CHAT_TEMPLATE
    text = _tiny_llama_config(tokenizer, hidden, layers)
    vision = {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": tile,
        "patch_size": patch,
    }
    if model_type == "idefics3":
        from transformers import Idefics3Config as Config
        from transformers import Idefics3ForConditionalGeneration as Model
    elif model_type == "smolvlm":
        from transformers import SmolVLMConfig as Config
        from transformers import SmolVLMForConditionalGeneration as Model
    else:
        raise ValueError(f"model_type must be 'idefics3' or 'smolvlm', got {model_type!r}.")
    config = Config(
        vision_config=vision,
        text_config=text.to_dict(),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Model(config).eval()
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": longest_edge},
        max_image_size={"longest_edge": tile},
        do_image_splitting=do_image_splitting,
    )
    return model, tokenizer, image_processor


FAST_VLM_SPECIAL = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]


def tiny_resnet_tower_config(hidden: int, stem: int = 16, depth: int = 1):
    """A one-stage ``ResNetConfig`` (stride 4: ``s x s`` px -> ``(s/4)^2`` visual tokens) whose
    feature map has ``hidden`` channels (``hidden_size``, what FastVLM's projector reads)."""
    from transformers import ResNetConfig

    return ResNetConfig(
        num_channels=3,
        embedding_size=stem,
        hidden_sizes=[hidden],
        depths=[depth],
        layer_type="basic",
        hidden_act="relu",
        downsample_in_first_stage=False,
        hidden_size=hidden,
    )


def tiny_fast_vlm(
    hidden: int = 32,
    layers: int = 2,
    image_size: int = 28,
    seed: int = 0,
    tokenizer: str = "bytelevel",
):
    """A tiny FastVLM (``FastVlmForConditionalGeneration``): a one-stage ResNet tower (stride 4:
    ``image_size``-px images -> ``(image_size / 4)^2`` visual tokens), Qwen2 LM, CLIP's PIL image
    processor. ``tokenizer="bytelevel"``: a Qwen2 byte-level BPE with FastVLM's ChatML template
    (:data:`FAST_VLM_CHAT_TEMPLATE`); ``"word"``: word-level with the same template."""
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration, Qwen2Config
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _tokenizer(
        tokenizer,
        FAST_VLM_SPECIAL,
        words=(*WORDS, *_TEMPLATE_WORDS),
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        image_token="<image>",
    )
    tok.chat_template = FAST_VLM_CHAT_TEMPLATE
    text = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = FastVlmConfig(
        vision_config=tiny_resnet_tower_config(hidden).to_dict(),
        text_config=text.to_dict(),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // 4) ** 2,
    )
    torch.manual_seed(seed)
    model = FastVlmForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return model, tok, image_processor


TINY_BUILDERS = {
    "llava": tiny_llava,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen3_vl": tiny_qwen3_vl,
    "idefics3": tiny_idefics3,
    "fast_vlm": tiny_fast_vlm,
}


def save_tiny_backbone(family: str, path: str | os.PathLike, **kwargs) -> Path:
    """Build the tiny ``family`` backbone and save model + tokenizer + image processor to ``path``."""
    if family not in TINY_BUILDERS:
        raise ValueError(f"no tiny builder for {family!r}; known: {', '.join(TINY_BUILDERS)}.")
    model, tokenizer, image_processor = TINY_BUILDERS[family](**kwargs)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


def phi35_vision_shaped_llava(
    tiny: bool = False,
    tiny_image_size: int = 112,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
):
    """A random LLaVA-wired model shaped like Phi-3.5-vision (benchmarks; no download).

    Full size: CLIP ViT-L/14-336 vision (576 image tokens) + a Phi-3-mini text model (hidden 3072,
    32 layers, intermediate 8192, 4.1B parameters in all); ``tiny=True``: the same wiring at toy
    size. Returns ``(model, tokenizer, image_processor)``.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Phi3Config
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = tiny_word_tokenizer(
        LLAVA_SPECIAL,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        image_token="<image>",
    )
    tok.chat_template = LLAVA_CHAT_TEMPLATE
    if tiny:
        vision = dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=tiny_image_size,
            projection_dim=64,
        )
        text = dict(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=256,
            vocab_size=len(tok),
        )
    else:
        vision = dict(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            image_size=336,
            projection_dim=768,
        )
        text = dict(
            hidden_size=3072,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            intermediate_size=8192,
            vocab_size=32064,
        )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(patch_size=14, **vision),
        text_config=Phi3Config(
            max_position_embeddings=4096,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
            **text,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = LlavaForConditionalGeneration(config)
    model = model.to(dtype or torch.float32).eval()
    size = vision["image_size"]
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return model, tok, ip


# ------------------------------------------------------------------------------ Phi-3.5-vision


PHI3_V_SPECIAL = [
    "<unk>",
    "<s>",
    "</s>",
    "<|endoftext|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
]

#: Phi-3.5-vision's chat template (``<|role|>\n{content}<|end|>\n`` per message).
PHI3_V_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\\n' + message['content'] + "
    "'<|end|>\\n' }}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != "
    "'assistant' %}{{- '<|assistant|>\\n' -}}{% endif %}"
)


def tiny_phi3_v(
    hidden: int = 32,
    layers: int = 2,
    vision_hidden: int = 16,
    crop: int = 28,
    patch: int = 7,
    num_crops: int = 4,
    seed: int = 0,
):
    """A tiny Phi-3.5-vision (:class:`reward.families.phi3_v.Phi3VForConditionalGeneration`): a
    ``crop``-px CLIP of ``patch``-px patches (``(crop / 2 patch)^2`` tokens per crop), up to
    ``num_crops`` sub-crops, a Phi3 language model, a SentencePiece-kind tokenizer with the Phi-3
    template (EOS ``<|end|>``) and :class:`Phi3VImageProcessor`."""
    from transformers import Phi3Config

    from .families.phi3_v import Phi3VConfig, Phi3VForConditionalGeneration, Phi3VImageProcessor

    tokenizer = sentencepiece_tokenizer(
        PHI3_V_SPECIAL,
        legacy=True,  # Phi-3's tokenizer.json: a Prepend("▁") normaliser per text segment
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = PHI3_V_CHAT_TEMPLATE
    text = Phi3Config(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tokenizer) + 1,  # + the image placeholder row
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = _tiny_clip_vision_config(vision_hidden, 3, crop, patch, hidden_act="quick_gelu")
    config = Phi3VConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
    torch.manual_seed(seed)
    model = Phi3VForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-zero separators (they start at zero)
        model.model.multi_modal_projector.glb_GN.normal_()
        model.model.multi_modal_projector.sub_GN.normal_()
    image_processor = Phi3VImageProcessor(num_crops=num_crops, crop_size=crop)
    return model, tokenizer, image_processor


TINY_BUILDERS["phi3_v"] = tiny_phi3_v


#: The LLaVA-1.6 Vicuna chat template: llava-1.5's (images first, then text; ``ASSISTANT:`` as the
#: generation prompt).
LLAVA_NEXT_VICUNA_CHAT_TEMPLATE = LLAVA_15_CHAT_TEMPLATE


def tiny_llava_next(
    hidden: int = 32,
    layers: int = 2,
    tile: int = 28,
    patch: int = 7,
    pinpoints: tuple[tuple[int, int], ...] = ((28, 56), (56, 28), (56, 56)),
    seed: int = 0,
):
    """A tiny LLaVA-NeXT (CLIP of ``tile`` px with ``patch`` px patches + Llama), its
    SentencePiece-kind tokenizer with the Vicuna template and ``LlavaNextImageProcessorPil``
    (anyres over ``pinpoints``)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    tokenizer = sentencepiece_tokenizer(
        LLAVA_SPECIAL,
        legacy=True,  # llava-hf's tokenizer.json: a Prepend("▁") normaliser per text segment
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        image_token="<image>",
    )
    tokenizer.chat_template = LLAVA_NEXT_VICUNA_CHAT_TEMPLATE
    grid = [list(p) for p in pinpoints]
    config = LlavaNextConfig(
        vision_config=_tiny_clip_vision_config(hidden, 3, tile, patch),
        text_config=_tiny_llama_config(tokenizer, hidden, layers),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=grid,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():  # the row separator starts random in transformers; keep it seeded
        model.model.image_newline.normal_()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=grid,
    )
    return model, tokenizer, image_processor


TINY_BUILDERS["llava_next"] = tiny_llava_next
