"""Import of the released LLaVA-Reward weights (official repository sjz5202/LLaVA-Reward, weights on
the hub as ``smz8599/LLaVA-Reward``) into a project reward folder.

An official release folder (one per perspective and backbone, e.g.
``alignment/llavareward_phi_alignment/``) holds:

- ``reward_config.yaml``: ``is_general_preference``, ``add_cross_attention``, ``value_head_dim``,
  ``general_preference_tau``;
- ``lora/``: a peft adapter over the language model, saved with transformers 4.50 and peft 0.13.2
  (``adapter_config.json`` + ``adapter_model.bin``, a torch pickle, or ``adapter_model.safetensors``);
  its keys have no ``base_model.model.`` prefix and no adapter name
  (``model.layers.0.self_attn.q_proj.lora_A.weight``) and are 4.50 module paths;
- ``pytorch_model.bin`` (a torch pickle): ``value_head.weight``, SkipCA's ``W_q/W_k/W_v.weight`` and
  ``ca_layernorm.weight``, and the fine-tuned projector (``...img_projection.{0,2}.*`` for
  Phi-3.5-vision, ``...merger.{ln_q, mlp.0, mlp.2}.*`` or ``merger.{0,2}.*`` for Qwen2.5-VL,
  ``multi_modal_projector.linear_{1,2}.*`` for LLaVA-NeXT).

Pickles are read with ``torch.load(..., weights_only=True)`` (no code runs). Adapter keys are mapped
from the 4.50 module paths to today's (``OLD_DECODER_PREFIX``: the language model's layers moved
from ``model.layers`` / ``language_model.model.layers`` to the base model's ``language_model``);
any key that maps to no linear layer of the language model raises, naming the key, as does any
unknown key of ``pytorch_model.bin``.

What the imported model feeds is what the release was trained on (SPEC section 6): Qwen, the
chat turn without the system turn (:data:`QWEN_RELEASE_TEMPLATE`) with ``mm_token_type_ids``;
Phi-3.5-vision, ``num_crops = 16`` and the official chunk rule (the ``phi3_v`` family); LLaVA-NeXT,
``USER: <image>\\n{caption}</s>`` with BOS (the ``llava_next`` family). SkipCA is on only where the
official code used it: Phi-3.5-vision with ``add_cross_attention``; the official LLaVA-NeXT forward
has no SkipCA branch (saved SkipCA weights are ignored, as there); the official Qwen SkipCA attends
to the positions of token 151643 (the padding), not the image, so such a release is refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

logger = logging.getLogger(__name__)

#: where each family's language-model layers sat in the 4.50 model the adapters were saved on.
OLD_DECODER_PREFIX = {
    "phi3_v": "model.",
    "qwen2_5_vl": "model.",
    "qwen2_vl": "model.",
    "llava_next": "language_model.model.",
}

#: the Qwen turn the release was trained on: the chat template with its default system turn and
#: the assistant prompt cut away (``<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>
#: {caption}<|im_end|>``).
QWEN_RELEASE_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}"
)

#: Phi-3.5-vision crops of the release (the official tokenizer helper forces 16).
PHI_RELEASE_NUM_CROPS = 16

#: SkipCA RMSNorm epsilon of the official heads.
SKIPCA_EPS = {"phi3_v": 1e-5, "llava_next": 1e-5, "qwen2_5_vl": 1e-6, "qwen2_vl": 1e-6}


class ReleaseFormatError(ValueError):
    """An official release folder that cannot be imported; the message names the file or key."""


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unsafe pickle or a broken file
        raise ReleaseFormatError(
            f"{path}: cannot be read as weights with torch.load(weights_only=True) ({err})."
        ) from err


def read_release(src: str | os.PathLike) -> dict[str, Any]:
    """The pieces of an official release folder: ``config`` (reward_config.yaml), ``lora_config``
    (adapter_config.json), ``lora`` (adapter weights) and ``heads`` (pytorch_model.bin)."""
    src = Path(src)
    config_file = src / "reward_config.yaml"
    if not config_file.is_file():
        raise ReleaseFormatError(
            f"{src} is not an official LLaVA-Reward release folder: {config_file.name} is missing "
            "(expected reward_config.yaml, lora/ and pytorch_model.bin)."
        )
    config = yaml.safe_load(config_file.read_text()) or {}
    lora_dir = src / "lora"
    if not (lora_dir / "adapter_config.json").is_file():
        raise ReleaseFormatError(f"{lora_dir / 'adapter_config.json'} is missing.")
    lora_config = json.loads((lora_dir / "adapter_config.json").read_text())
    if (lora_dir / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        lora = load_file(str(lora_dir / "adapter_model.safetensors"))
    elif (lora_dir / "adapter_model.bin").is_file():
        lora = _load_pickle(lora_dir / "adapter_model.bin")
    else:
        raise ReleaseFormatError(
            f"{lora_dir} holds no adapter_model.safetensors or adapter_model.bin."
        )
    heads_file = src / "pytorch_model.bin"
    if not heads_file.is_file():
        raise ReleaseFormatError(f"{heads_file} is missing (value head, SkipCA, projector).")
    return {
        "config": config,
        "lora_config": lora_config,
        "lora": lora,
        "heads": _load_pickle(heads_file),
    }


def map_adapter_keys(
    weights: dict[str, torch.Tensor], base: nn.Module, model_type: str
) -> dict[str, torch.Tensor]:
    """Official adapter keys -> peft keys of today's base model (``base_model.model.<path>.lora_X.weight``).

    ``model.layers.3.mlp.down_proj.lora_B.weight`` (4.50, Qwen / Phi) or
    ``language_model.model.layers.3...`` (LLaVA-NeXT) -> ``<decoder>.layers.3.mlp.down_proj``; an
    optional ``base_model.model.`` prefix and adapter name are dropped first. Raises naming every
    key whose module is not a linear layer of the language model.
    """
    decoder = base.get_decoder()
    prefix = next(name for name, module in base.named_modules() if module is decoder)
    modules = dict(base.named_modules())
    old = OLD_DECODER_PREFIX.get(model_type)
    mapped, nowhere = {}, []
    for key, value in weights.items():
        match = re.fullmatch(r"(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", key)
        path = match.group(1) if match else None
        if path is not None:
            path = path.removeprefix("base_model.model.")
            if old and path.startswith(old):
                path = f"{prefix}.{path[len(old) :]}"
        in_decoder = path is not None and path.startswith(prefix + ".")
        if not in_decoder or not isinstance(modules.get(path), nn.Linear):
            nowhere.append(key)
            continue
        mapped[f"base_model.model.{path}.{match.group(2)}.weight"] = value
    if nowhere:
        raise ReleaseFormatError(
            f"{len(nowhere)} adapter key(s) map to no linear layer of the {model_type} language "
            f"model ({prefix}): {', '.join(nowhere[:5])}{' ...' if len(nowhere) > 5 else ''}."
        )
    return mapped


def _projector_state(heads: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """The fine-tuned projector of ``pytorch_model.bin`` in today's module names (empty if none)."""
    if model_type == "phi3_v":
        found = {".".join(k.split(".")[-2:]): v for k, v in heads.items() if "img_projection" in k}
        return found
    if model_type in ("qwen2_5_vl", "qwen2_vl"):
        found = {".".join(k.split(".")[-2:]): v for k, v in heads.items() if "merger" in k}
        rename = {"0.weight": "mlp.0.weight", "0.bias": "mlp.0.bias"}
        rename.update({"2.weight": "mlp.2.weight", "2.bias": "mlp.2.bias"})
        return {rename.get(k, k): v for k, v in found.items()}
    if model_type == "llava_next":
        return {
            ".".join(k.split(".")[-2:]): v for k, v in heads.items() if "multi_modal_projector" in k
        }
    return {}


_HEAD_KEYS = {
    "value_head.weight": "score.weight",
    "W_q.weight": "q_proj.weight",
    "W_k.weight": "k_proj.weight",
    "W_v.weight": "v_proj.weight",
    "ca_layernorm.weight": "norm.weight",
}
_PROJECTOR_MARKERS = ("img_projection", "merger", "multi_modal_projector")


def _head_state(heads: dict[str, torch.Tensor], skipca: bool) -> dict[str, torch.Tensor]:
    """``pytorch_model.bin`` keys (read by their last components, as the official loader) ->
    :class:`reward.modeling.RewardHead` keys; raises naming keys that belong nowhere."""
    state, unknown = {}, []
    for key, value in heads.items():
        short = ".".join(key.split(".")[-2:])
        if short in _HEAD_KEYS:
            if short == "value_head.weight" or skipca:
                state[_HEAD_KEYS[short]] = value
        elif not any(marker in key for marker in _PROJECTOR_MARKERS):
            unknown.append(key)
    if unknown:
        raise ReleaseFormatError(
            f"pytorch_model.bin holds keys the importer does not know: {', '.join(unknown[:5])}."
        )
    if "score.weight" not in state:
        raise ReleaseFormatError("pytorch_model.bin holds no value_head.weight.")
    return state


def import_official(
    src: str | os.PathLike,
    backbone: str | os.PathLike,
    perspective: str,
    output: str | os.PathLike,
    torch_dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Turn an official release folder ``src`` into perspective ``perspective`` of the project
    reward folder ``output`` (created, or extended when it exists on the same backbone).

    ``backbone``: the hub id or folder of the release's backbone (Phi-3.5-vision-instruct,
    Qwen2.5-VL-7B-Instruct, llava-v1.6-vicuna-13b-hf, loaded natively: no remote code).
    Returns ``output``. Raises :class:`ReleaseFormatError` naming what does not fit.
    """
    from peft.utils import set_peft_model_state_dict

    from .configuration import LlavaRewardConfig
    from .modeling import LlavaRewardModel, load_backbone
    from .processing import RewardProcessor

    output = Path(output)
    release = read_release(src)
    cfg = release["config"]
    base = load_backbone(str(backbone), torch_dtype)
    model_type = base.config.model_type
    if model_type not in OLD_DECODER_PREFIX:
        raise ReleaseFormatError(
            f"the backbone {backbone} is a {model_type!r}; the release covers "
            f"{', '.join(sorted(OLD_DECODER_PREFIX))}."
        )
    if (output / "config.json").is_file():
        existing = LlavaRewardConfig.from_pretrained(output)
        if existing.backbone_model_type != model_type or existing.backbone != str(backbone):
            raise ReleaseFormatError(
                f"{output} holds perspectives on {existing.backbone} ({existing.backbone_model_type}); "
                f"importing onto {backbone} ({model_type}) would mix backbones. Use another --output."
            )
        if perspective in (existing.perspectives or {}) and not overwrite:
            raise ReleaseFormatError(
                f"{output} has a perspective {perspective!r} already; pick another name."
            )

    gpm = bool(cfg.get("is_general_preference", False))
    head_dim = int(cfg.get("value_head_dim", 2)) if gpm else 1
    skipca = bool(cfg.get("add_cross_attention", False))
    if skipca and model_type in ("qwen2_5_vl", "qwen2_vl"):
        raise ReleaseFormatError(
            "reward_config.yaml turns SkipCA on for a Qwen release: the official Qwen SkipCA "
            "attends to the positions of token 151643 (the padding), not to the image tokens, "
            "so its scores cannot be reproduced by a SkipCA over the image; not supported."
        )
    if skipca and model_type == "llava_next":
        logger.warning(
            "reward_config.yaml turns SkipCA on, but the official LLaVA-NeXT forward never uses it "
            "(its W_q/W_k/W_v are saved but unused): imported without SkipCA, as the release scores."
        )
        skipca = False

    # the processor the release fed
    processor = RewardProcessor.from_pretrained(str(backbone), base.config)
    if model_type == "phi3_v":
        processor.image_processor.num_crops = PHI_RELEASE_NUM_CROPS
    if model_type in ("qwen2_5_vl", "qwen2_vl"):
        processor = RewardProcessor(
            processor.tokenizer,
            processor.image_processor,
            base.config,
            chat_template=QWEN_RELEASE_TEMPLATE,
            max_length=processor.max_length,
            padding_side="left",
        )

    model = LlavaRewardModel.from_backbone(
        base,
        processor=processor,
        perspectives=(),
        tau=float(cfg.get("general_preference_tau", 0.1)),
    )
    model.config.backbone = str(backbone)
    projector = _projector_state(release["heads"], model_type)
    adapter = map_adapter_keys(release["lora"], model._base, model_type)
    lc = release["lora_config"]
    targets = sorted({k.removeprefix("base_model.model.").rsplit(".", 2)[0] for k in adapter})
    all_linear = sorted(
        name
        for name, module in model._base.named_modules()
        if isinstance(module, nn.Linear) and re.fullmatch(model._all_linear, name)
    )
    lora = {
        "r": int(lc["r"]),
        "lora_alpha": lc.get("lora_alpha", 8),
        "lora_dropout": float(lc.get("lora_dropout", 0.0)),
        "use_rslora": bool(lc.get("use_rslora", False)),
        "target_modules": None if targets == all_linear else [f"^{re.escape(t)}$" for t in targets],
    }
    if lora["target_modules"] is not None:
        lora["target_modules"] = "|".join(lora["target_modules"])
    model.add_perspective(
        perspective,
        skipca=skipca,
        head_dim=head_dim,
        lora=lora,
        train_projector=bool(projector),
        norm_eps=SKIPCA_EPS[model_type] if skipca else 1e-6,
    )
    # the projector copy travels in the adapter's state dict (peft's modules_to_save format)
    expected = {n for n, _ in model._base.get_submodule(model.family.projector).named_parameters()}
    expected = {
        n.split(f"modules_to_save.{perspective}.", 1)[-1]
        for n in expected
        if f".{perspective}." in n
    }
    if projector and set(projector) != expected:
        raise ReleaseFormatError(
            f"the release's projector weights {sorted(projector)} do not fit the backbone's "
            f"{model.family.projector} ({sorted(expected)})."
        )
    for name, value in projector.items():
        adapter[f"base_model.model.{model.family.projector}.{name}"] = value
    result = set_peft_model_state_dict(model.backbone, adapter, adapter_name=perspective)
    missing = [
        k
        for k in result.missing_keys
        if f".{perspective}." in k and ("lora_" in k or "modules_to_save" in k)
    ]
    if missing or result.unexpected_keys:
        raise ReleaseFormatError(
            f"the adapter does not cover the LoRA layers of {model_type} (missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]})."
        )
    head = model.heads[perspective]
    head.load_state_dict(_head_state(release["heads"], skipca))
    model.save_pretrained(output, perspectives=[perspective])
    return output
