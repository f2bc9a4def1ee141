"""Qwen3-VL (native in transformers: ``Qwen3VLForConditionalGeneration``)."""

from __future__ import annotations

from .base import register_family
from .qwen2_vl import Qwen2VLFamily


class Qwen3VLFamily(Qwen2VLFamily):
    """Qwen3-VL: the Qwen2-VL image path (``Qwen2VLImageProcessor``, 16 px patches merged
    ``2 x 2`` in the released checkpoints, mean/std 0.5) and token layout
    (``<|vision_start|>`` + ``t h w / merge^2`` x ``<|image_pad|>`` + ``<|vision_end|>``, M-RoPE
    from ``mm_token_type_ids``), so everything but the model class is inherited.

    What differs inside the model: DeepStack adds features of some vision layers (their own
    ``visual.deepstack_merger_list``) to the hidden states of the first LM layers, and the vision
    tower has learned position embeddings, interpolated to each grid. The trainable projector is
    ``visual.merger`` (the one that writes the visual tokens into ``inputs_embeds``, which
    SkipCA attends to); the DeepStack mergers stay frozen with the vision tower. The chat template
    has no default system turn.
    """

    model_types = ("qwen3_vl",)
    projector = "visual.merger"


register_family(Qwen3VLFamily)
