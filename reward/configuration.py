"""`LlavaRewardConfig`: what a saved LLaVA-Reward folder needs to be rebuilt.

The frozen backbone is referenced (hub id or local path), not copied, unless it is saved with
``save_pretrained(..., save_backbone=True)``; each perspective records its own head and SkipCA
settings and its LoRA configuration (the adapter weights live in ``adapters/<name>/``).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

#: The four perspectives of the paper. Users may add their own names.
DEFAULT_PERSPECTIVES = ("alignment", "fidelity", "safety", "overall")


class LlavaRewardConfig(PreTrainedConfig):
    """Configuration of :class:`reward.LlavaRewardModel`.

    Fields:
        backbone: hub id or local folder of the image-text-to-text backbone (the reference that
            ``from_pretrained`` reloads; ``"backbone"`` when the folder holds its own copy).
        backbone_model_type: ``model_type`` of the backbone (``llava``, ``qwen2_vl``, ...).
        hidden_size: the language model's hidden size ``d`` (SkipCA and head width).
        image_token_id: id of the image placeholder token in ``input_ids``.
        perspectives: ``{name: {"skipca": bool, "head_dim": 1|2, "lora": dict|None,
            "train_projector": bool}}``.
        tau: temperature of the pairwise probability ``sigmoid((r_a - r_b) / tau)``.
        max_length: token budget of one (image, caption) sequence; captions are cut from their
            end to fit. None: the backbone's context (min of the language model's
            ``max_position_embeddings`` and the tokenizer's ``model_max_length``).
        padding_side: ``"left"`` (reward at position -1) or ``"right"``.
        trust_remote_code: whether the backbone was loaded with remote code (the user's choice).
        min_pixels, max_pixels: the image area range of a dynamic-resolution backbone (Qwen2-VL,
            Qwen2.5-VL, Qwen3-VL): images are resized into it, one visual token per
            ``(patch * merge)^2`` pixels. None: the backbone processor's own (what the released
            weights saw; SPEC section 6). The saved ``processor/`` holds the values in effect.
    """

    model_type = "llava_reward"

    backbone: str | None = None
    backbone_model_type: str | None = None
    hidden_size: int | None = None
    image_token_id: int | None = None
    perspectives: dict[str, dict[str, Any]] | None = None
    tau: float = 0.1
    max_length: int | None = None
    padding_side: str = "left"
    trust_remote_code: bool = False
    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self, **kwargs):
        if self.perspectives is None:
            self.perspectives = {}
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}.")
        super().__post_init__(**kwargs)
