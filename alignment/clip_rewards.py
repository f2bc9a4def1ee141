"""CLIP-based rewards: PickScore (Kirstain et al. 2023) and CLIP score, frozen and differentiable.

The rewards Flow-GRPO is compared on (SPEC section 7: "PickScore 21.7 -> 23.3"), as plain reward
callables of the registry (:mod:`alignment.rewards`: ``pickscore``, ``clip_score``), through
transformers' ``CLIPModel`` and ``CLIPProcessor`` (a hub id or a local folder):

- PickScore: ``logit_scale.exp() * cos(image_embed, text_embed)`` of the PickScore checkpoint
  (``yuvalkirstain/PickScore_v1`` with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``),
  the value the paper and the Flow-GRPO tables report (about 21-24 for good SD images);
- CLIP score: ``cos(image_embed, text_embed)`` (default ``openai/clip-vit-large-patch14``), the
  reference's ``logits_per_image / 100`` for CLIP models whose logit scale is 100 (torchmetrics'
  CLIPScore is ``100 * max(cos, 0)``).

The images are preprocessed in torch so that gradients reach the pixels (DRaFT/ReFL can train on
these rewards): the ``CLIPImageProcessor`` pipeline (shortest side resize with PIL's bicubic filter,
center crop, rescale, normalise) as the LLaVA family of :mod:`reward.families` implements it for
LLaVA's CLIP tower, with PIL's 8-bit rounding emulated (straight-through gradients), so the pixel
values equal the processor's on the 8-bit image bit for bit (tests/test_clip_rewards.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_MODEL = "openai/clip-vit-large-patch14"


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    out = getattr(torch, str(dtype), None)
    if not isinstance(out, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'.")
    return out


class ClipScorer:
    """A frozen ``CLIPModel`` scoring (image, prompt) pairs.

    Args:
        model: a ``transformers.CLIPModel`` (frozen and put in eval mode here).
        processor: its ``CLIPProcessor`` (tokenizer + image processor).
        device: where the model runs.

    Prompt embeddings are cached per prompt (GRPO scores many images of one prompt).
    """

    def __init__(self, model: Any, processor: Any, device: str | torch.device = "cpu") -> None:
        from reward.families.llava import LlavaFamily

        self.model = model.to(device).eval().requires_grad_(False)
        self.processor = processor
        self.device = torch.device(device)
        # LLaVA's CLIP tower takes CLIPImageProcessor inputs: its family's torch preprocessing
        # (PIL-exact resize, crop, normalise) needs only the image processor.
        self._pixels = LlavaFamily(processor.image_processor, processor.tokenizer, None)
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        processor: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> ClipScorer:
        """Load a ``CLIPModel`` (hub id or folder) and the ``CLIPProcessor`` of ``processor``
        (default: the model's own). ``device``: default this process's GPU (else the CPU);
        ``dtype``: e.g. ``"bfloat16"`` (default: as saved)."""
        from transformers import CLIPModel, CLIPProcessor

        from reward.guards import process_device

        device = device or process_device()
        try:
            clip = CLIPModel.from_pretrained(model, torch_dtype=_dtype(dtype))
            proc = CLIPProcessor.from_pretrained(processor or model)
        except OSError as err:
            raise OSError(
                f"Could not load a CLIP model from {model!r} (processor {processor or model!r}): "
                f"{err}. Give a local folder saved with CLIPModel/CLIPProcessor.save_pretrained or a "
                "cached hub id (PickScore: model 'yuvalkirstain/PickScore_v1' with processor "
                "'laion/CLIP-ViT-H-14-laion2B-s32B-b79K')."
            ) from err
        return cls(clip, proc, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """``images [N, 3, H, W]`` in [0, 1] -> ``pixel_values [N, 3, S, S]`` as the image
        processor computes them from the 8-bit images (differentiable, straight-through)."""
        return self._pixels.pixel_inputs_torch(images.float())["pixel_values"]

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm projected text embeddings ``[N, P]`` (float32), cached per prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            max_len = self.model.config.text_config.max_position_embeddings
            tok = self.processor.tokenizer(
                missing, padding=True, truncation=True, max_length=max_len, return_tensors="pt"
            ).to(self.device)
            out = self.model.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
            emb = self.model.text_projection(out.pooler_output).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            for p, e in zip(missing, emb):
                self._text_cache[p] = e
        return torch.stack([self._text_cache[p] for p in prompts])

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm projected image embeddings ``[N, P]`` (float32) of ``images [N, 3, H, W]``
        in [0, 1]; differentiable in the pixels when grad mode is on."""
        pv = self.pixel_values(images.to(self.device)).to(self.dtype)
        emb = self.model.visual_projection(self.model.vision_model(pixel_values=pv).pooler_output)
        emb = emb.float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def cosine(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """``cos(image_embed_i, text_embed_i)`` per pair, ``[N]`` float32."""
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts.")
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(dim=-1)

    def logit_scale(self) -> float:
        """``exp(logit_scale)`` of the model (100 for OpenAI CLIP and PickScore)."""
        return float(self.model.logit_scale.detach().float().exp())

    def reward_fn(self, scale: float = 1.0, batch_size: int = 32) -> RewardFn:
        """``fn(images [N, 3, H, W] in [0, 1], prompts) -> Tensor[N]`` = ``scale * cos``.

        With grad mode on and ``images.requires_grad`` the whole batch runs with a graph to the
        pixels (for DRaFT/ReFL); otherwise without one, ``batch_size`` images at a time. The result
        is float32 on ``images``' device.
        """

        def fn(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            from alignment.rewards import _check_images

            _check_images(images)
            prompts = list(prompts)
            if torch.is_grad_enabled() and images.requires_grad:
                return (scale * self.cosine(images, prompts)).to(images.device)
            out = []
            with torch.no_grad():
                for s in range(0, images.shape[0], batch_size):
                    chunk = images[s : s + batch_size]
                    out.append(self.cosine(chunk, prompts[s : s + batch_size]))
            return (scale * torch.cat(out)).to(images.device)

        fn.scorer = self  # type: ignore[attr-defined]
        return fn


def pickscore_reward(
    model: str = PICKSCORE_MODEL,
    processor: str | None = PICKSCORE_PROCESSOR,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 32,
) -> RewardFn:
    """PickScore: ``exp(logit_scale) * cos(image, prompt)`` (see the module docstring).

    Args:
        model: the PickScore ``CLIPModel`` (hub id or folder).
        processor: the ``CLIPProcessor`` to use (PickScore's hub checkpoint ships none; None: the
            model's own, e.g. a folder that holds both).
        device, dtype: where and in which dtype the model runs.
        batch_size: images per forward pass without gradients.
    """
    scorer = ClipScorer.from_pretrained(model, processor, device, dtype)
    return scorer.reward_fn(scorer.logit_scale(), batch_size)


def clip_score_reward(
    model: str = CLIP_MODEL,
    processor: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 32,
    scale: float = 1.0,
) -> RewardFn:
    """CLIP score: ``scale * cos(image, prompt)`` (``scale = 100`` gives torchmetrics' units
    without its clamp at 0). Arguments as :func:`pickscore_reward`."""
    return ClipScorer.from_pretrained(model, processor, device, dtype).reward_fn(scale, batch_size)


__all__ = ["ClipScorer", "clip_score_reward", "pickscore_reward"]
