"""Idefics3 and SmolVLM (with and without image splitting)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image

from .base import BackboneFamily, register_family
from .image_ops import (
    COMMON_TORCH_OPTIONS,
    _rescale_normalize,
    _size_get,
    check_torch_options,
    quantize_8bit,
    resample_kind,
    resize_pil,
)


class Idefics3Family(BackboneFamily):
    """Idefics3 and SmolVLM: SigLIP tiles of ``max_image_size`` + pixel-shuffle connector.

    With ``do_image_splitting`` an image becomes ``rows x cols`` tiles plus a global view, else one
    global view; each tile is ``image_seq_len = (image_size / patch)^2 / scale_factor^2``
    ``<image>`` tokens framed as ``Idefics3Processor`` / ``SmolVLMProcessor`` frame them
    (``<fake_token_around_image>``, ``<row_r_col_c>``, ``<global-img>``, newlines). Pixel inputs:
    ``pixel_values [N, tiles, C, S, S]`` and ``pixel_attention_mask [N, tiles, S, S]``.
    """

    model_types = ("idefics3", "smolvlm")
    projector = "connector"
    template_image_text = "<image>"
    pixel_keys = ("pixel_values", "pixel_attention_mask")

    @property
    def image_seq_len(self) -> int:
        cfg = self.model_config
        vision = cfg.vision_config
        return int((vision.image_size // vision.patch_size) ** 2 / (cfg.scale_factor**2))

    def pixel_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        out = self.image_processor(
            images=[[im] for im in images], return_tensors="pt", return_row_col_info=True
        )
        inputs = {k: out[k] for k in self.pixel_keys if k in out}
        inputs["rows"] = torch.tensor([r[0] for r in out["rows"]], dtype=torch.long)
        inputs["cols"] = torch.tensor([c[0] for c in out["cols"]], dtype=torch.long)
        return inputs

    def image_token_ids(self, pixel_inputs: dict[str, torch.Tensor], index: int) -> list[int]:
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

        tok = self.tokenizer
        text = get_image_prompt_string(
            int(pixel_inputs["rows"][index]),
            int(pixel_inputs["cols"][index]),
            self.image_seq_len,
            fake_token_around_image=getattr(tok, "fake_image_token", None)
            or "<fake_token_around_image>",
            image_token=tok.convert_ids_to_tokens(self.image_token_id),
            global_image_token=getattr(tok, "global_image_token", None) or "<global-img>",
        )
        # the string starts and ends with special tokens, so it tokenizes alone as in context
        return tok(text, add_special_tokens=False)["input_ids"]

    #: image-processor options the torch path reproduces; ``do_pad`` pads the images of a batch to
    #: one tile count and size, which a tensor batch (one size) has already;
    #: ``return_row_col_info`` only adds the layout, which this path returns anyway.
    torch_options = COMMON_TORCH_OPTIONS | {
        "do_pad",
        "do_image_splitting",
        "max_image_size",
        "return_row_col_info",
    }

    def pixel_inputs_torch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Idefics3ImageProcessor`` in torch (Lanczos resizes, with or without splitting).

        Resize the longest side to ``size["longest_edge"]`` (the other side ``int``-truncated, then
        made even); with splitting, resize both sides up to multiples of the tile size ``S``, cut
        ``rows x cols`` tiles of ``S x S`` row-major and append the whole image resized to
        ``S x S``; without splitting, resize to ``S x S``. Then rescale/normalise. All images of a
        tensor batch share a size, so no tile padding is needed: ``pixel_attention_mask`` is ones.
        """
        from transformers.models.idefics3.image_processing_pil_idefics3 import (
            MAX_IMAGE_SIZE,
            _resize_output_size_rescale_to_max_len,
            _resize_output_size_scale_below_upper_bound,
        )

        ip = self.image_processor
        check_torch_options(ip, self.torch_options, type(self).__name__)
        kind = resample_kind(ip, "lanczos")
        tile = int(_size_get(ip.max_image_size, "longest_edge"))
        n, c, h, w = images.shape
        x = quantize_8bit(images) if self.emulate_8bit else images
        if getattr(ip, "do_resize", True):
            longest = _size_get(ip.size, "longest_edge")
            if longest is not None:
                h, w = _resize_output_size_rescale_to_max_len(h, w, max_len=longest)
                h, w = _resize_output_size_scale_below_upper_bound(h, w, max_len=MAX_IMAGE_SIZE)
            else:
                h, w = _size_get(ip.size, "height"), _size_get(ip.size, "width")
            x = resize_pil(x, h, w, kind, self.emulate_8bit)
        rows = cols = 0
        if getattr(ip, "do_image_splitting", True):
            # resize_for_vision_encoder
            aspect = w / h
            if w >= h:
                w = math.ceil(w / tile) * tile
                h = math.ceil(int(w / aspect) / tile) * tile
            else:
                h = math.ceil(h / tile) * tile
                w = math.ceil(int(h * aspect) / tile) * tile
            x = resize_pil(x, h, w, kind, self.emulate_8bit)
            if h > tile or w > tile:
                rows, cols = (h - tile) // tile + 1, (w - tile) // tile + 1
                tiles = [
                    x[..., r * tile : (r + 1) * tile, q * tile : (q + 1) * tile]
                    for r in range(rows)
                    for q in range(cols)
                ]
                tiles.append(resize_pil(x, tile, tile, kind, self.emulate_8bit))
            else:
                tiles = [x]
        else:
            tiles = [resize_pil(x, tile, tile, kind, self.emulate_8bit)]
        pixel_values = _rescale_normalize(torch.stack(tiles, dim=1), ip)  # [N, tiles, C, S, S]
        mask = torch.ones(
            (n, len(tiles), *pixel_values.shape[-2:]), dtype=torch.long, device=images.device
        )
        return {
            "pixel_values": pixel_values,
            "pixel_attention_mask": mask,
            "rows": torch.full((n,), rows, dtype=torch.long),
            "cols": torch.full((n,), cols, dtype=torch.long),
        }


register_family(Idefics3Family)
