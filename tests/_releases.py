"""Tiny LLaVA-Reward releases in the official layout and names (sjz5202/LLaVA-Reward, SPEC section
6), built in code, and the reference reward of each computed by an independent hand-written
forward (LoRA merged by hand into a fresh backbone, projector copied by hand, SkipCA and the value
head written out with torch ops, the input ids built by the official string rules).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import yaml
from PIL import Image

from reward.modeling import load_backbone

#: official adapter module names, as transformers 4.50 named them, per backbone kind
OFFICIAL_LORA = {
    "qwen2_5_vl": (
        "model.layers.{i}.",
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
        + ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    ),
    "llava_next": (
        "language_model.model.layers.{i}.",
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
        + ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    ),
    "phi3_v": (
        "model.layers.{i}.",
        ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"],
    ),
}
#: official projector keys of pytorch_model.bin -> the tiny backbone's module holding them
OFFICIAL_PROJECTOR = {
    "qwen2_5_vl": ("visual.merger.", "visual.merger", ["ln_q", "mlp.0", "mlp.2"]),
    "llava_next": ("multi_modal_projector.", "multi_modal_projector", ["linear_1", "linear_2"]),
    "phi3_v": (
        "model.vision_embed_tokens.img_projection.",
        "multi_modal_projector.img_projection",
        ["0", "2"],
    ),
}
RANK, ALPHA = 4, 8


def write_release(
    folder: Path,
    backbone: Path,
    kind: str,
    skipca: bool = False,
    gpm: bool = False,
    seed: int = 0,
    safetensors_adapter: bool = False,
    merger_short_names: bool = False,
) -> Path:
    """An official release folder for the tiny ``backbone`` with random weights (seeded)."""
    g = torch.Generator().manual_seed(seed)
    base = load_backbone(str(backbone))
    d = base.config.get_text_config().hidden_size
    prefix, subs = OFFICIAL_LORA[kind]
    decoder = base.get_decoder()
    lora = {}
    for i, layer in enumerate(decoder.layers):
        for sub in subs:
            lin = layer.get_submodule(sub)
            name = prefix.format(i=i) + sub
            lora[f"{name}.lora_A.weight"] = 0.3 * torch.randn(RANK, lin.in_features, generator=g)
            lora[f"{name}.lora_B.weight"] = 0.3 * torch.randn(lin.out_features, RANK, generator=g)
    heads = {"value_head.weight": torch.randn(2 if gpm else 1, d, generator=g) / math.sqrt(d)}
    if skipca:
        for w in ("W_q", "W_k", "W_v"):
            heads[f"{w}.weight"] = torch.randn(d, d, generator=g) / math.sqrt(d)
        heads["ca_layernorm.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
    key_prefix, module_path, parts = OFFICIAL_PROJECTOR[kind]
    projector = base.get_submodule(module_path)
    for part in parts:
        for pname, p in projector.get_submodule(part).named_parameters():
            key = f"{key_prefix}{part}.{pname}"
            if merger_short_names:
                key = key.replace("merger.mlp.", "merger.")
            heads[key] = p.detach() + 0.2 * torch.randn(p.shape, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reward_config.yaml").write_text(
        yaml.safe_dump(
            {
                "is_general_preference": gpm,
                "add_cross_attention": skipca,
                "value_head_dim": 2 if gpm else 1,
                "general_preference_tau": 0.1,
            }
        )
    )
    (folder / "lora").mkdir(exist_ok=True)
    (folder / "lora" / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": RANK,
                "lora_alpha": ALPHA,
                "lora_dropout": 0.05,
                "target_modules": sorted({s.rsplit(".", 1)[-1] for s in subs}),
                "init_lora_weights": "gaussian",
                "base_model_name_or_path": str(backbone),
                "task_type": None,
                "bias": "none",
            }
        )
    )
    if safetensors_adapter:
        from safetensors.torch import save_file

        save_file(lora, str(folder / "lora" / "adapter_model.safetensors"))
    else:
        torch.save(lora, folder / "lora" / "adapter_model.bin")
    torch.save(heads, folder / "pytorch_model.bin")
    return folder


def _merged_backbone(backbone: Path, release: Path, kind: str):
    """A fresh backbone with the release's LoRA merged by hand (``W += alpha / r * B A``) and its
    projector copied by hand."""
    base = load_backbone(str(backbone)).eval()
    if (release / "lora" / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        lora = load_file(str(release / "lora" / "adapter_model.safetensors"))
    else:
        lora = torch.load(release / "lora" / "adapter_model.bin", weights_only=True)
    heads = torch.load(release / "pytorch_model.bin", weights_only=True)
    prefix = OFFICIAL_LORA[kind][0].split("{i}")[0]
    layers = base.get_decoder().layers
    with torch.no_grad():
        for key, a in lora.items():
            if not key.endswith("lora_A.weight"):
                continue
            path = key[len(prefix) :].removesuffix(".lora_A.weight")
            i, sub = path.split(".", 1)
            b = lora[key.replace("lora_A", "lora_B")]
            layers[int(i)].get_submodule(sub).weight += ALPHA / RANK * b @ a
        key_prefix, module_path, _ = OFFICIAL_PROJECTOR[kind]
        projector = base.get_submodule(module_path)
        for key, value in heads.items():
            if kind == "qwen2_5_vl" and re.match(r"visual\.merger\.\d", key):  # merger.0.*
                projector.get_parameter("mlp." + key[len("visual.merger.") :]).copy_(value)
            elif key.startswith(key_prefix):
                projector.get_parameter(key[len(key_prefix) :]).copy_(value)
    return base, heads


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def reference_rewards(
    backbone: Path, release: Path, kind: str, processor, captions: list[str], images: list
) -> torch.Tensor:
    """The release's rewards, one image at a time, by the official rules written out here."""
    base, heads = _merged_backbone(backbone, release, kind)
    cfg = yaml.safe_load((release / "reward_config.yaml").read_text())
    tok, ip = processor.tokenizer, processor.image_processor
    out = []
    for caption, image in zip(captions, images):
        extra = {}
        if kind == "qwen2_5_vl":
            pix = ip(images=[image], return_tensors="pt")
            n = int(pix["image_grid_thw"][0].prod()) // ip.merge_size**2
            text = (
                "<|im_start|>user\n<|vision_start|>"
                + "<|image_pad|>" * n
                + f"<|vision_end|>{caption}<|im_end|>"
            )
            ids = tok(text, add_special_tokens=False)["input_ids"]
            image_id = base.config.image_token_id
            inputs = {"pixel_values": pix["pixel_values"], "image_grid_thw": pix["image_grid_thw"]}
            extra["mm_token_type_ids"] = (torch.tensor([ids]) == image_id).to(torch.int32)
        elif kind == "llava_next":
            from transformers import LlavaNextProcessor

            official = LlavaNextProcessor(
                image_processor=ip,
                tokenizer=tok,
                patch_size=base.config.vision_config.patch_size,
                vision_feature_select_strategy="default",
                num_additional_image_tokens=1,
            )
            message = [
                {"role": "user", "content": [{"type": "text", "text": caption}, {"type": "image"}]}
            ]
            rendered = tok.apply_chat_template(
                message,
                chat_template=processor.chat_template,
                tokenize=False,
                add_generation_prompt=True,
            )
            text = rendered[:-11] + tok.eos_token
            enc = official(text=[text], images=[image], return_tensors="pt")
            ids = enc["input_ids"][0].tolist()
            inputs = {"pixel_values": enc["pixel_values"], "image_sizes": enc["image_sizes"]}
        else:  # phi3_v: the official tokenizer helper
            message = {"role": "user", "content": f"<|image_1|>\n{caption}"}
            prompt = tok.apply_chat_template([message], tokenize=False, add_generation_prompt=True)
            prompt = prompt[:-22] + tok.eos_token
            pix = ip(images=[image])
            h, w = (int(v) for v in pix["image_sizes"][0])
            s = ip.crop_size
            g = base.config.vision_config.image_size // base.config.vision_config.patch_size // 2
            n = (h // s * w // s + 1) * g * g + 1 + (h // s + 1) * g
            chunks = [tok(c)["input_ids"] for c in re.split(r"<\|image_\d+\|>", prompt)]
            ids = chunks[0] + [base.config.image_token_id] * n + chunks[1]
            inputs = {"pixel_values": pix["pixel_values"], "image_sizes": pix["image_sizes"]}
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            hidden = base(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                **inputs,
                **extra,
            ).last_hidden_state[0, -1]
            if cfg["add_cross_attention"] and kind == "phi3_v":
                visual = torch.cat(base.get_image_features(**inputs), dim=0)
                q = heads["W_q.weight"] @ hidden
                k = visual @ heads["W_k.weight"].T
                v = visual @ heads["W_v.weight"].T
                att = torch.softmax(k @ q / math.sqrt(hidden.shape[-1]), dim=0) @ v
                hidden = _rms(hidden + att, heads["ca_layernorm.weight"], 1e-5)
            out.append(heads["value_head.weight"] @ hidden)
    rewards = torch.stack(out)
    return rewards.squeeze(-1) if rewards.shape[-1] == 1 else rewards


def image(height: int, width: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 5, 4, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")[0]
    return Image.fromarray((x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
