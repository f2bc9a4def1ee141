"""The reference for sequence parity: what the official LLaVA-Reward code feeds a backbone.

For one (image, caption) it builds the text the way the official code (sjz5202/LLaVA-Reward,
``llava_reward/datasets/reward_dataset.py``; SPEC section 6) builds it, then runs the backbone's
own transformers processor on it:

- LLaVA (llava-1.5 / NeXT vicuna templates): the chat template with the generation prompt, the
  final ``" ASSISTANT:"`` cut away, EOS appended; the processor's tokenizer adds BOS;
- Qwen2-VL / Qwen2.5-VL: the chat template with the generation prompt, the default system turn
  and the final ``"\\n<|im_start|>assistant\\n"`` cut away, stripped (it ends in ``<|im_end|>``);
- Qwen3-VL (not in the official code; the same rule on its template, which has no system turn);
- FastVLM (not in the official code; Qwen2's rule with its default system turn kept);
- Idefics3 / SmolVLM (not in the official code): the user turn without generation prompt,
  stripped; it ends in ``<end_of_utterance>``, the tokenizer's EOS.

Processors: ``LlavaProcessor`` and ``Idefics3Processor`` build here as they are.
``Qwen2VLProcessor`` / ``Qwen3VLProcessor`` refuse to build without torchvision (their video
processor's class cannot be imported): :func:`official_processor` skips only that class check
(the video processor is ``None``, never used for images); everything their ``__call__`` does
(image processor, ``replace_image_token``, text expansion, tokenizer call, ``mm_token_type_ids``)
is the library's own code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from PIL import Image

QWEN2_SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
QWEN_GENERATION_PROMPT = "\n<|im_start|>assistant\n"


def _render(tokenizer: Any, chat_template: str, caption: str, generation: bool) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": caption}]}]
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=generation
    )


def official_text(model_type: str, tokenizer: Any, chat_template: str, caption: str) -> str:
    """The text the official LLaVA-Reward code gives the processor for one turn."""
    if model_type == "llava":
        text = _render(tokenizer, chat_template, caption, generation=True)
        assert text.endswith(" ASSISTANT:"), text
        return text[: -len(" ASSISTANT:")] + tokenizer.eos_token
    if model_type == "fast_vlm":  # not in the official code: its rule for ChatML, system turn kept
        text = _render(tokenizer, chat_template, caption, generation=True)
        assert text.endswith(QWEN_GENERATION_PROMPT), text
        return text[: -len(QWEN_GENERATION_PROMPT)].strip()
    if model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        text = _render(tokenizer, chat_template, caption, generation=True)
        if model_type != "qwen3_vl":
            assert text.startswith(QWEN2_SYSTEM_TURN), text
            text = text[len(QWEN2_SYSTEM_TURN) :]
        assert text.endswith(QWEN_GENERATION_PROMPT), text
        return text[: -len(QWEN_GENERATION_PROMPT)].strip()
    if model_type in ("idefics3", "smolvlm"):
        return _render(tokenizer, chat_template, caption, generation=False).strip()
    raise ValueError(f"no reference text for {model_type!r}")


@contextlib.contextmanager
def _without_video_processor_check() -> Iterator[None]:
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin.check_argument_for_proper_class

    def check(self, name, argument):
        if name == "video_processor" and argument is None:
            return None
        return original(self, name, argument)

    ProcessorMixin.check_argument_for_proper_class = check
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


def official_processor(tokenizer: Any, image_processor: Any, model_config: Any) -> Any:
    """The backbone's transformers processor, built from its parts."""
    model_type = model_config.model_type
    if model_type == "llava":
        from transformers import LlavaProcessor

        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=model_config.vision_config.patch_size,
            vision_feature_select_strategy=model_config.vision_feature_select_strategy,
            num_additional_image_tokens=1,  # CLIP's class token
        )
    if model_type == "fast_vlm":  # patch_size: the tower's stride; no class token
        from transformers import LlavaProcessor

        from reward.families.fast_vlm import vision_stride

        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=vision_stride(model_config.vision_config),
            vision_feature_select_strategy=model_config.vision_feature_select_strategy,
            num_additional_image_tokens=0,
        )
    if model_type in ("idefics3", "smolvlm"):
        from transformers import Idefics3Processor

        vision = model_config.vision_config
        seq_len = int((vision.image_size // vision.patch_size) ** 2 / model_config.scale_factor**2)
        return Idefics3Processor(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len
        )
    if model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        from transformers import Qwen2VLProcessor, Qwen3VLProcessor

        cls = Qwen3VLProcessor if model_type == "qwen3_vl" else Qwen2VLProcessor
        with _without_video_processor_check():
            return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)
    raise ValueError(f"no official processor for {model_type!r}")


def official_inputs(
    tokenizer: Any,
    image_processor: Any,
    model_config: Any,
    chat_template: str,
    caption: str,
    image: Image.Image,
) -> dict:
    """The official processor's output (``input_ids [1, L]``, ...) for one (image, caption)."""
    model_type = model_config.model_type
    processor = official_processor(tokenizer, image_processor, model_config)
    text = official_text(model_type, tokenizer, chat_template, caption)
    images = [[image]] if model_type in ("idefics3", "smolvlm") else [image]
    return processor(text=[text], images=images, return_tensors="pt")
