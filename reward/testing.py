"""Tiny random backbones of each supported family, built in code (tests, demo, benchmarks).

``save_tiny_backbone(family, path)`` writes a complete backbone folder (model safetensors,
tokenizer, image processor) that ``LlavaRewardModel.from_backbone(path)`` loads through the real
``from_pretrained`` path. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

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


def tiny_llava(
    hidden: int = 32, layers: int = 2, image_size: int = 28, patch: int = 7, seed: int = 0
):
    """A tiny LLaVA (CLIP vision + Llama) and its tokenizer / PIL image processor."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = tiny_word_tokenizer(
        LLAVA_SPECIAL,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        image_token="<image>",
    )
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
            projection_dim=hidden,
        ),
        text_config=LlamaConfig(
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
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return model, tokenizer, image_processor


TINY_BUILDERS = {"llava": tiny_llava}


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
