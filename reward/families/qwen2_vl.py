"""Qwen2-VL and Qwen2.5-VL."""

from __future__ import annotations

import torch

from .base import BackboneFamily, TurnText, register_family
from .image_ops import (
    COMMON_TORCH_OPTIONS,
    _rescale_normalize,
    _size_get,
    check_torch_options,
    quantize_8bit,
    resample_kind,
    resize_pil,
)


def qwen2_vl_smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of ``factor`` (= patch x merge), the area
    within ``[min_pixels, max_pixels]``, the aspect ratio kept as closely as possible."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


class Qwen2VLFamily(BackboneFamily):
    """Qwen2-VL and Qwen2.5-VL: dynamic resolution, ``14 x 14`` patches merged ``2 x 2``.

    One image of grid ``(t, h, w)`` (in patches) is ``<|vision_start|>`` + ``t h w / merge^2`` x
    ``<|image_pad|>`` + ``<|vision_end|>``, as ``Qwen2VLProcessor`` expands the chat template's
    ``<|vision_start|><|image_pad|><|vision_end|>``. Pixel inputs: ``pixel_values
    [sum_i t_i h_i w_i, C * T * P * P]`` and ``image_grid_thw [N, 3]``. The model also needs
    ``mm_token_type_ids`` (1 at image tokens) for its multimodal RoPE.
    """

    model_types = ("qwen2_vl", "qwen2_5_vl")
    projector = "visual.merger"
    template_image_text = "<|vision_start|><|image_pad|><|vision_end|>"
    pixel_keys = ("pixel_values", "image_grid_thw")

    def render_turn(self, chat_template: str | None) -> TurnText:
        """The template's user turn without the default system turn that Qwen2-VL's template
        writes before it: the official LLaVA-Reward input is
        ``<|im_start|>user\n<|vision_start|><|image_pad|>...<|vision_end|>{caption}<|im_end|>``
        (no system turn, no BOS; SPEC section 6)."""
        turn = super().render_turn(chat_template)
        user = turn.before.find("<|im_start|>user")
        if user > 0:
            turn = TurnText(turn.before[user:], turn.between, turn.after)
        return turn

    def _token_id(self, attr: str, token: str) -> int:
        token_id = getattr(self.model_config, attr, None)
        if token_id is None:
            token_id = self.tokenizer.convert_tokens_to_ids(token)
        return int(token_id)

    def pixel_budget(self) -> tuple[int, int]:
        """``(min_pixels, max_pixels)``: the image processor's ``size`` (``shortest_edge``,
        ``longest_edge``; older processors: ``min_pixels``, ``max_pixels``)."""
        size = self.image_processor.size
        low = _size_get(size, "shortest_edge") or _size_get(size, "min_pixels")
        high = _size_get(size, "longest_edge") or _size_get(size, "max_pixels")
        return int(low), int(high)

    def set_pixel_budget(self, min_pixels: int | None, max_pixels: int | None) -> None:
        """Resize images into ``[min_pixels, max_pixels]`` pixels (``smart_resize``), in the PIL
        and the torch path alike; one visual token per ``(patch * merge)^2`` pixels. None keeps the
        processor's own bound (the backbone folder's, which the released weights saw)."""
        low, high = self.pixel_budget()
        low = low if min_pixels is None else int(min_pixels)
        high = high if max_pixels is None else int(max_pixels)
        factor = int(self.image_processor.patch_size) * self.merge_size
        if not 0 < low <= high:
            raise ValueError(
                f"need 0 < min_pixels <= max_pixels, got min_pixels={low}, max_pixels={high}."
            )
        if high < factor * factor:
            raise ValueError(
                f"max_pixels={high} is below one visual token ({factor}x{factor} = "
                f"{factor * factor} pixels for patch {factor // self.merge_size} x merge "
                f"{self.merge_size}); raise it."
            )
        ip = self.image_processor
        ip.size = {"shortest_edge": low, "longest_edge": high}
        for name, value in (("min_pixels", low), ("max_pixels", high)):
            if hasattr(ip, name):
                setattr(ip, name, value)

    @property
    def merge_size(self) -> int:
        return int(getattr(self.image_processor, "merge_size", None) or 2)

    def image_token_ids(self, pixel_inputs: dict[str, torch.Tensor], index: int) -> list[int]:
        n = int(pixel_inputs["image_grid_thw"][index].prod()) // self.merge_size**2
        start = self._token_id("vision_start_token_id", "<|vision_start|>")
        end = self._token_id("vision_end_token_id", "<|vision_end|>")
        return [start, *([self.image_token_id] * n), end]

    def model_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_inputs: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        out = super().model_inputs(input_ids, attention_mask, pixel_inputs)
        # text 0, image 1 (video 2): the processor's `mm_token_type_ids`, needed by M-RoPE
        out["mm_token_type_ids"] = (input_ids == self.image_token_id).to(torch.int32)
        return out

    #: image-processor options the torch path reproduces; ``do_center_crop``, ``crop_size``,
    #: ``do_pad`` and ``pad_size`` have no effect in ``Qwen2VLImageProcessor`` (its patches are
    #: concatenated, never padded or cropped), so they are honoured by doing nothing.
    torch_options = COMMON_TORCH_OPTIONS | {
        "min_pixels",
        "max_pixels",
        "patch_size",
        "temporal_patch_size",
        "merge_size",
        "do_center_crop",
        "crop_size",
        "do_pad",
        "pad_size",
    }

    def pixel_inputs_torch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Qwen2VLImageProcessor`` in torch: smart resize (bicubic), rescale/normalise, repeat
        in time to ``temporal_patch_size``, patchify in the processor's patch order.

        ``images [N, 3, H, W]`` -> ``pixel_values [N * gh * gw, 3 * T * P * P]`` (rows of image 0
        first, within an image merge-window-major: ``(gh/m, gw/m, m, m)``), ``image_grid_thw
        [N, 3] = (1, gh, gw)``.
        """
        ip = self.image_processor
        check_torch_options(ip, self.torch_options, type(self).__name__)
        p, m = int(ip.patch_size), self.merge_size
        t = int(getattr(ip, "temporal_patch_size", 2))
        n, c, h, w = images.shape
        x = quantize_8bit(images) if self.emulate_8bit else images
        if getattr(ip, "do_resize", True):
            min_px, max_px = self.pixel_budget()
            h, w = qwen2_vl_smart_resize(h, w, p * m, min_px, max_px)
            x = resize_pil(x, h, w, resample_kind(ip, "bicubic"), self.emulate_8bit)
        x = _rescale_normalize(x, ip)
        gh, gw = h // p, w // p
        x = x.reshape(n, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # n, gh/m, gw/m, mh, mw, C, ph, pw
        x = x.unsqueeze(6).expand(*x.shape[:6], t, p, p)  # ..., C, T, ph, pw
        pixel_values = x.reshape(n * gh * gw, c * t * p * p)
        grid = torch.tensor([[1, gh, gw]] * n, dtype=torch.long, device=images.device)
        return {"pixel_values": pixel_values, "image_grid_thw": grid}


register_family(Qwen2VLFamily)
