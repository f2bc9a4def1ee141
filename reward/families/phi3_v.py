"""Phi-3.5-vision natively: transformers' Phi3 language model and CLIP vision model with our own
port of Phi-3-vision's HD image path, no remote code.

The image path (facts from the official ``modeling_phi3_v.py`` / ``processing_phi3_v.py``; the code
here is written anew):

- **HD transform** (PIL, :class:`Phi3VImageProcessor`): the image is transposed to landscape, scaled
  to ``scale`` crops wide (the largest ``scale`` with ``scale * ceil(scale / ratio) <= num_crops``,
  ``new_w = scale * S``, ``new_h = int(new_w / ratio)``, bilinear), padded top and bottom with white
  to a multiple of ``S`` (``S`` = the CLIP crop size, 336), transposed back, normalised with CLIP's
  mean/std. The global view is that HD tensor resized to ``S x S`` (bicubic, ``F.interpolate``);
  the sub-crops are its ``h_c x w_c`` tiles in row-major order. ``pixel_values [N, num_crops + 1,
  3, S, S]`` (global first, zero-padded crops at the end), ``image_sizes [N, 2]`` = the HD size.
- **Features** (:class:`Phi3VModel`): CLIP hidden states of layer ``vision_feature_layer`` (-2,
  the second-to-last) without the class token, ``(S / P)^2`` patches of width ``D``; merged 2x2 into
  ``g x g`` (``g = S / 2P``, 12) of width ``4 D``; the sub-crops tiled into a ``h_c g x w_c g`` grid.
  Each row of the grid ends with the learnt separator ``sub_GN``; the global view likewise
  (``g x (g + 1)``). Sequence: ``[sub-crop rows, glb_GN, global rows]``, then ``img_projection``
  (``Linear(4D, d) -> GELU -> Linear(d, d)``). Tokens per image:
  ``h_c g (w_c g + 1) + 1 + g (g + 1)`` (``(h_c w_c + 1) 144 + 1 + (h_c + 1) 12`` at 336 px).
- **Text** (:class:`Phi3VFamily`): the official helper renders the chat template with the content
  ``"<|image_1|>\\n{caption}"`` and the generation prompt, cuts ``<|end|>\\n<|assistant|>\\n`` and
  appends the tokenizer's EOS; the text is split at ``<|image_1|>`` and each chunk is tokenised
  with its own BOS; the image run sits between the chunks (here ``image_token_id`` repeated, where
  the official code used negative ids). No system turn; the reward is read at the final token.

Weights: the official checkpoint's names (``model.vision_embed_tokens.img_processor.*``,
``model.vision_embed_tokens.{glb_GN,sub_GN,img_projection.*}``, ``model.{embed_tokens,layers,
norm}.*``) are mapped to this module's on load (:data:`OFFICIAL_KEY_MAP`, registered with
transformers' checkpoint conversion) and back on save. The official flat ``config.json``
(``model_type: phi3_v``, ``img_processor``, ``embd_layer``) is read by :class:`Phi3VConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    CLIPVisionModel,
    Phi3Model,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.modeling_outputs import CausalLMOutputWithPast

from .base import BackboneFamily, EncodedTurn, TurnText, register_family
from .image_ops import normalize, quantize_8bit, resize_pil
from .sequence import encode_text, span_tokens

#: CLIP ViT-L/14 at 336 px, the vision tower of Phi-3-vision / Phi-3.5-vision (the official code
#: builds it from constants; its config.json only names ``openai/clip-vit-large-patch14-336``).
CLIP_VIT_L_14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_TAG = "<|image_1|>"

#: official checkpoint name (regex) -> this module's name, applied in order on load.
OFFICIAL_KEY_MAP = {
    r"^model\.vision_embed_tokens\.img_processor\.": "model.vision_tower.",
    r"^model\.vision_embed_tokens\.": "model.multi_modal_projector.",
    r"^model\.embed_tokens\.": "model.language_model.embed_tokens.",
    r"^model\.layers\.": "model.language_model.layers.",
    r"^model\.norm\.": "model.language_model.norm.",
}
_OFFICIAL_ARCHITECTURES = {"Phi3VForCausalLM"}


class Phi3VConfig(PreTrainedConfig):
    """Phi-3.5-vision: ``text_config`` (Phi3), ``vision_config`` (CLIP vision), ``image_token_id``
    (the placeholder id repeated for each image token; default ``vocab_size - 1``, a padded
    embedding row no tokenizer text produces), ``vision_feature_layer`` (-2).

    Also reads the official flat ``config.json``: the Phi3 fields at the top level become
    ``text_config``; without a ``vision_config`` the CLIP ViT-L/14-336 of the release is used;
    ``img_processor.layer_idx`` sets ``vision_feature_layer``.
    """

    model_type = "phi3_v"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="phi3"),
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=CLIP_VIT_L_14_336
        ),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    image_token_id: int | None = None
    vision_feature_layer: int = -2
    img_processor: dict | None = None
    embd_layer: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.text_config is None and "hidden_size" in kwargs:  # the official flat config.json
            own = set(PreTrainedConfig.__dataclass_fields__)
            text = {k: v for k, v in kwargs.items() if k not in own and k != "auto_map"}
            text.pop("model_type", None)
            self.text_config = text
            for key in text:
                kwargs.pop(key, None)
            kwargs.pop("auto_map", None)
            if self.img_processor and "layer_idx" in self.img_processor:
                self.vision_feature_layer = int(self.img_processor["layer_idx"])
        if self.architectures and set(self.architectures) & _OFFICIAL_ARCHITECTURES:
            self.architectures = ["Phi3VForConditionalGeneration"]
        super().__post_init__(**kwargs)
        if self.image_token_id is None:
            self.image_token_id = int(self.text_config.vocab_size) - 1


class Phi3VImageProjector(nn.Module):
    """The separators ``glb_GN [1, 1, 4D]``, ``sub_GN [1, 1, 1, 4D]`` and ``img_projection``
    (``Linear(4D, d)``, GELU, ``Linear(d, d)``), and the HD feature layout around them."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        width = 4 * config.vision_config.hidden_size
        hidden = config.text_config.hidden_size
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, width))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, width))
        self.img_projection = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )

    @staticmethod
    def merge_2x2(features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """``[rows * cols, P * P, D]`` crop features -> ``[rows * g, cols * g, 4 D]``, ``g = P / 2``.

        Within a crop, each ``2 x 2`` patch block becomes one vector (its four patches' features
        concatenated row-major); the crops are tiled row-major."""
        n, length, dim = features.shape
        p = math.isqrt(length)
        g = p // 2
        x = features.reshape(n, g, 2, g, 2, dim).permute(0, 1, 3, 2, 4, 5)  # n, g, g, 2, 2, D
        x = x.reshape(rows, cols, g, g, 4 * dim).permute(0, 2, 1, 3, 4)  # rows, g, cols, g, 4D
        return x.reshape(rows * g, cols * g, 4 * dim)

    def with_row_separators(self, grid: torch.Tensor) -> torch.Tensor:
        """``[H, W, 4D]`` -> ``[H * (W + 1), 4D]``: ``sub_GN`` appended to every row."""
        sep = self.sub_GN.reshape(1, 1, -1).expand(grid.shape[0], 1, -1).to(grid.dtype)
        return torch.cat([grid, sep], dim=1).reshape(-1, grid.shape[-1])

    def forward(self, crops: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """``crops [1 + rows * cols, P * P, D]`` (global view first) of one image ->
        ``[rows g (cols g + 1) + 1 + g (g + 1), d]``."""
        glb = self.with_row_separators(self.merge_2x2(crops[:1], 1, 1))
        sub = self.with_row_separators(self.merge_2x2(crops[1:], rows, cols))
        sep = self.glb_GN.reshape(1, -1).to(sub.dtype)
        dtype = next(self.img_projection.parameters()).dtype
        return self.img_projection(torch.cat([sub, sep, glb], dim=0).to(dtype))


class Phi3VPreTrainedModel(PreTrainedModel):
    config_class = Phi3VConfig
    config: Phi3VConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Phi3VImageProjector):
            nn.init.zeros_(module.glb_GN)
            nn.init.zeros_(module.sub_GN)


class Phi3VModel(Phi3VPreTrainedModel):
    """Phi-3.5-vision without the LM head: ``vision_tower`` (CLIP), ``multi_modal_projector``
    (:class:`Phi3VImageProjector`) and ``language_model`` (Phi3)."""

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.vision_tower = CLIPVisionModel(config.vision_config)
        self.multi_modal_projector = Phi3VImageProjector(config)
        self.language_model = Phi3Model(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model

    @property
    def crop_size(self) -> int:
        return int(self.config.vision_config.image_size)

    def get_image_features(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor
    ) -> list[torch.Tensor]:
        """``pixel_values [N, C + 1, 3, S, S]``, ``image_sizes [N, 2]`` (HD height, width) -> one
        ``[tokens_i, d]`` tensor per image. Only the crops an image uses go through CLIP."""
        s = self.crop_size
        grids = [(int(h) // s, int(w) // s) for h, w in image_sizes.tolist()]
        used = [pixel_values[i, : 1 + r * c] for i, (r, c) in enumerate(grids)]
        crops = torch.cat(used, dim=0).to(self.vision_tower.dtype)
        hidden = self.vision_tower(crops, output_hidden_states=True).hidden_states
        patches = hidden[self.config.vision_feature_layer][:, 1:]  # drop the class token
        out, start = [], 0
        for r, c in grids:
            out.append(self.multi_modal_projector(patches[start : start + 1 + r * c], r, c))
            start += 1 + r * c
        return out

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            if image_sizes is None or input_ids is None:
                raise ValueError("Phi-3.5-vision images need `image_sizes` and `input_ids`.")
            features = torch.cat(self.get_image_features(pixel_values, image_sizes), dim=0)
            mask = input_ids == self.config.image_token_id
            if int(mask.sum()) != features.shape[0]:
                raise ValueError(
                    f"the text holds {int(mask.sum())} image tokens but the images give "
                    f"{features.shape[0]} features: expand each image with Phi3VFamily."
                )
            inputs_embeds = inputs_embeds.masked_scatter(
                mask.unsqueeze(-1).to(inputs_embeds.device),
                features.to(inputs_embeds.device, inputs_embeds.dtype),
            )
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            # as the official model: positions count the real tokens (left padding starts at 0)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **kwargs,
        )


class Phi3VForConditionalGeneration(Phi3VPreTrainedModel):
    """:class:`Phi3VModel` with the LM head (``lm_head``); what ``from_pretrained`` builds from a
    Phi-3.5-vision folder (official or saved by this class)."""

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.model = Phi3VModel(config)
        text = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_decoder(self) -> nn.Module:
        return self.model.language_model

    def forward(self, **kwargs: Any) -> CausalLMOutputWithPast:
        out = self.model(**kwargs)
        return CausalLMOutputWithPast(
            logits=self.lm_head(out.last_hidden_state),
            past_key_values=getattr(out, "past_key_values", None),
            hidden_states=getattr(out, "hidden_states", None),
        )


# ------------------------------------------------------------------------------ image processor


def hd_scale(width: int, height: int, num_crops: int) -> int:
    """Crops across a landscape image (``width >= height``): the largest integer ``scale`` with
    ``scale * ceil(scale / ratio) <= num_crops``, ``ratio = width / height``."""
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    return scale - 1


def hd_size(width: int, height: int, num_crops: int, crop: int) -> tuple[int, int, int, int]:
    """The HD transform's sizes for an image of ``width x height``:
    ``(resized_w, resized_h, padded_w, padded_h)`` in pixels (the orientation of the input).

    Landscape (``w >= h``; a portrait image is transposed first and the result back):
    ``ratio = w / h``; ``scale`` = the largest integer with ``scale * ceil(scale / ratio) <=
    num_crops``; ``new_w = scale * crop``, ``new_h = int(new_w / ratio)``; the height is padded to
    ``ceil(new_h / crop) * crop``."""
    transposed = width < height
    if transposed:
        width, height = height, width
    scale = hd_scale(width, height, num_crops)
    new_w = scale * crop
    new_h = int(new_w / (width / height))
    padded_h = int(np.ceil(new_h / crop) * crop)
    if transposed:
        return new_h, new_w, padded_h, new_w
    return new_w, new_h, new_w, padded_h


class Phi3VImageProcessor(BaseImageProcessor):
    """Phi-3-vision's image processor (HD crops + global view) in PIL and numpy, no torchvision.

    ``num_crops``: the most sub-crops (16 in the LLaVA-Reward release, which its tokenizer helper
    forces; Phi-3.5-vision's own folder says 4); ``crop_size``: the CLIP input size (336).
    Returns ``pixel_values [N, num_crops + 1, 3, S, S]`` (float32) and ``image_sizes [N, 2]``.
    """

    model_input_names = ["pixel_values", "image_sizes"]

    def __init__(
        self,
        num_crops: int = 16,
        crop_size: int = 336,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        num_img_tokens: int | None = None,
        do_convert_rgb: bool = True,
        **kwargs: Any,
    ):
        kwargs.pop("processor_class", None)
        kwargs.pop("auto_map", None)
        super().__init__(**kwargs)
        self.num_crops = int(num_crops)
        self.crop_size = int(crop_size)
        self.image_mean = list(image_mean if image_mean is not None else OPENAI_CLIP_MEAN)
        self.image_std = list(image_std if image_std is not None else OPENAI_CLIP_STD)
        # the official folder's tokens per crop (144); informational: counts come from the model
        self.num_img_tokens = num_img_tokens
        self.do_convert_rgb = do_convert_rgb

    def hd_image(self, image: Image.Image) -> Image.Image:
        """The HD transform on a PIL image: transpose to landscape, bilinear resize, white padding
        of the height to a multiple of ``crop_size`` (centred), transpose back."""
        img = image.convert("RGB")
        transposed = img.width < img.height
        if transposed:
            img = img.transpose(Image.Transpose.TRANSPOSE)
        new_w, new_h, _, padded_h = hd_size(img.width, img.height, self.num_crops, self.crop_size)
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        top = (padded_h - new_h) // 2
        canvas = Image.new("RGB", (new_w, padded_h), (255, 255, 255))
        canvas.paste(img, (0, top))
        if transposed:
            canvas = canvas.transpose(Image.Transpose.TRANSPOSE)
        return canvas

    def __call__(self, images: Any = None, return_tensors: str | None = "pt", **_: Any):
        if isinstance(images, Image.Image):
            images = [images]
        hd = []
        for image in images:
            arr = np.asarray(self.hd_image(image), dtype=np.float32) / 255.0
            hd.append(torch.from_numpy(arr).permute(2, 0, 1))
        pixel_values, sizes = crops_from_hd(
            hd, self.crop_size, self.num_crops, self.image_mean, self.image_std
        )
        return BatchFeature({"pixel_values": pixel_values, "image_sizes": sizes})

    preprocess = __call__


def crops_from_hd(
    hd_images: Sequence[torch.Tensor],
    crop: int,
    num_crops: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """HD images ``[3, h_c S, w_c S]`` in ``[0, 1]`` -> ``pixel_values [N, num_crops + 1, 3, S, S]``
    and ``image_sizes [N, 2]``: normalise, the global view (bicubic ``F.interpolate`` of the
    normalised HD tensor to ``S x S``, no antialiasing, as the official processor) first, then the
    ``h_c x w_c`` crops row-major, zero-padded to ``num_crops + 1``. Differentiable."""
    out, sizes = [], []
    for x in hd_images:
        x = normalize(x.unsqueeze(0), mean, std)[0]
        _, h, w = x.shape
        rows, cols = h // crop, w // crop
        glb = F.interpolate(x.unsqueeze(0), size=(crop, crop), mode="bicubic", align_corners=False)
        tiles = x.reshape(3, rows, crop, cols, crop).permute(1, 3, 0, 2, 4)
        tiles = tiles.reshape(rows * cols, 3, crop, crop)
        pad = x.new_zeros(num_crops - rows * cols, 3, crop, crop)
        out.append(torch.cat([glb, tiles, pad], dim=0))
        sizes.append([h, w])
    return torch.stack(out), torch.tensor(sizes, dtype=torch.long)


# ------------------------------------------------------------------------------ family


class Phi3VFamily(BackboneFamily):
    """Phi-3.5-vision (:class:`Phi3VModel`): HD crops, ``<|image_1|>`` expanded to
    ``h_c g (w_c g + 1) + 1 + g (g + 1)`` image tokens, each text chunk with its own BOS."""

    model_types = ("phi3_v",)
    projector = "multi_modal_projector.img_projection"
    template_image_text = IMAGE_TAG
    pixel_keys = ("pixel_values", "image_sizes")

    @property
    def crop_size(self) -> int:
        return int(self.model_config.vision_config.image_size)

    def tokens_per_crop_side(self) -> int:
        vision = self.model_config.vision_config
        return int(vision.image_size // vision.patch_size) // 2

    def image_token_ids(self, pixel_inputs: dict[str, torch.Tensor], index: int) -> list[int]:
        h, w = (int(v) for v in pixel_inputs["image_sizes"][index])
        rows, cols = h // self.crop_size, w // self.crop_size
        g = self.tokens_per_crop_side()
        n = rows * g * (cols * g + 1) + 1 + g * (g + 1)
        return [self.image_token_id] * n

    def prompt_text(self, chat_template: str | None = None) -> str:
        """The official prompt with ``{caption}`` left open: ``<|user|>\\n<|image_1|>\\n{caption}``
        + EOS (the template rendered with the generation prompt, cut after the caption)."""
        tok = self.tokenizer
        marker = "\ue000CAPTION\ue000"
        message = {"role": "user", "content": f"{IMAGE_TAG}\n{marker}"}
        template = chat_template or getattr(tok, "chat_template", None)
        before = f"<|user|>\n{IMAGE_TAG}\n"
        if template:
            rendered = tok.apply_chat_template(
                [message], chat_template=template, tokenize=False, add_generation_prompt=True
            )
            if marker in rendered and IMAGE_TAG in rendered:
                before = rendered.split(marker, 1)[0]
        return before + "{caption}" + tok.eos_token

    def render_turn(self, chat_template: str | None) -> TurnText:
        """The official prompt cut around ``<|image_1|>`` and the caption (:meth:`prompt_text`):
        ``before`` = ``<|user|>\n``, ``between`` = ``\n``, ``after`` = EOS."""
        before_caption, after = self.prompt_text(chat_template).split("{caption}")
        before, between = before_caption.split(IMAGE_TAG, 1)
        return TurnText(before, between, after)

    def encode_turn(self, turn: TurnText, caption: str, image_ids: list[int]) -> EncodedTurn:
        """The official ids: each text chunk around ``<|image_1|>`` tokenised on its own with its
        special tokens (so a second BOS follows the image run), the image run between them."""
        head, _ = encode_text(self.tokenizer, turn.before, add_special_tokens=True)
        tail, offsets = encode_text(
            self.tokenizer, turn.between + caption + turn.after, add_special_tokens=True
        )
        c0, c1 = span_tokens(offsets, len(turn.between), len(turn.between) + len(caption))
        shift = len(head) + len(image_ids)
        return EncodedTurn(head + list(image_ids) + tail, c0 + shift, c1 + shift)

    def pixel_inputs(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        out = self.image_processor(images=list(images), return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}

    def pixel_inputs_torch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The HD transform in torch, differentiable: 8-bit rounding (straight-through), transpose
        a portrait batch, PIL-exact bilinear resize, white padding, transpose back, then
        :func:`crops_from_hd` (the same function the PIL path ends in)."""
        ip = self.image_processor
        crop, num_crops = int(ip.crop_size), int(ip.num_crops)
        x = quantize_8bit(images) if self.emulate_8bit else images
        transposed = x.shape[-1] < x.shape[-2]
        if transposed:
            x = x.transpose(-1, -2)
        h, w = x.shape[-2:]
        new_w, new_h, _, padded_h = hd_size(w, h, num_crops, crop)
        x = resize_pil(x, new_h, new_w, "bilinear", self.emulate_8bit)
        top = (padded_h - new_h) // 2
        x = F.pad(x, (0, 0, top, padded_h - new_h - top), value=1.0)
        if transposed:
            x = x.transpose(-1, -2)
        pixel_values, sizes = crops_from_hd(list(x), crop, num_crops, ip.image_mean, ip.image_std)
        return {"pixel_values": pixel_values, "image_sizes": sizes.to(images.device)}


def _register() -> None:
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    AutoConfig.register("phi3_v", Phi3VConfig, exist_ok=True)
    AutoModel.register(Phi3VConfig, Phi3VModel, exist_ok=True)
    AutoModelForImageTextToText.register(Phi3VConfig, Phi3VForConditionalGeneration, exist_ok=True)
    AutoImageProcessor.register(
        Phi3VConfig, image_processor_classes={"pil": Phi3VImageProcessor}, exist_ok=True
    )
    register_checkpoint_conversion_mapping(
        "Phi3VForConditionalGeneration",
        [WeightRenaming(source_patterns=k, target_patterns=v) for k, v in OFFICIAL_KEY_MAP.items()],
        overwrite=True,
    )


_register()
register_family(Phi3VFamily)
