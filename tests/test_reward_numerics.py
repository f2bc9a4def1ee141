"""Training numerics: float32 master weights in a bf16 backbone, and the initial Bradley-Terry loss.

- With a bf16 backbone, the trainable parts of a perspective (the projector copy, LoRA, SkipCA and
  the head) are float32, the forward runs without autocast (the float32 projector copy casts its
  bf16 input up and its output back) and under autocast, and an AdamW step moves the float32
  projector weights by updates that bf16 weights would round away.
- A fresh model's Bradley-Terry loss at tau 0.1 is within 0.1 of log 2 at width d = 1024 (head and
  SkipCA init normal with std 1/(d+1), as the official code); with std 1/sqrt(d) it is not.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from reward import LlavaRewardModel
from reward.losses import bradley_terry_loss
from reward.testing import save_tiny_backbone, tiny_llava

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


def _image(seed: int, size: tuple[int, int] = (45, 37)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _bf16(inputs: dict) -> dict:
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl", "idefics3"])
def test_trainable_weights_are_fp32_in_a_bf16_backbone(family, tmp_path):
    backbone = save_tiny_backbone(family, tmp_path / family)
    model = LlavaRewardModel.from_backbone(
        backbone, perspectives=("a", "b"), lora_config=LORA, torch_dtype=torch.bfloat16
    )
    params = model.set_trainable("a")
    names = {id(p): n for n, p in model.named_parameters()}
    assert {p.dtype for p in params} == {torch.float32}
    assert any(".modules_to_save.a." in names[id(p)] for p in params)  # the projector copy
    assert any("lora_" in names[id(p)] for p in params)
    base = [
        p
        for n, p in model.backbone.named_parameters()
        if "lora_" not in n and "modules_to_save" not in n
    ]
    assert base and {p.dtype for p in base} == {torch.bfloat16}  # the frozen backbone stays bf16
    assert not any(p.requires_grad for p in base)
    inputs = _bf16(model.processor(["a red circle", "a dog"], [_image(0), _image(1)]))
    rewards = model(**inputs, perspective="a").rewards  # no autocast: the copy casts in and out
    assert rewards.dtype == torch.float32 and torch.isfinite(rewards).all()
    rewards.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(**inputs, perspective="a").rewards.float()).all()


def test_adamw_updates_survive_in_the_fp32_projector(tmp_path):
    backbone = save_tiny_backbone("llava", tmp_path / "llava")
    model = LlavaRewardModel.from_backbone(
        backbone, perspectives=("a",), lora_config=LORA, torch_dtype=torch.bfloat16
    )
    params = model.set_trainable("a")
    projector = [p for n, p in model.named_parameters() if ".modules_to_save.a." in n]
    before = [p.detach().clone() for p in projector]
    opt = torch.optim.AdamW(params, lr=1e-5)  # Adam's first step moves each weight by ~lr
    inputs = _bf16(model.processor(["a red circle"], [_image(0)]))
    model(**inputs, perspective="a").rewards.sum().backward()
    opt.step()
    moved = torch.cat([(p.detach() - b).flatten() != 0 for p, b in zip(projector, before)])
    # what bf16 weights would have kept of the same step: round(w + step) - round(w)
    kept_bf16 = torch.cat(
        [(p.detach().bfloat16() != b.bfloat16()).flatten() for p, b in zip(projector, before)]
    )
    # ~1e-5 steps on weights of ~0.05: below half a bf16 ulp for most of them
    assert moved.float().mean() > 0.95  # measured 1.0: every float32 master weight moved
    assert kept_bf16.float().mean() < 0.3  # measured 0.18: a bf16 copy loses most updates


def _initial_bt_loss(std: float | None) -> float:
    """BT loss at tau 0.1 of a fresh d = 1024 model (SkipCA on) on 16 random image pairs."""
    torch.manual_seed(0)
    model, tok, ip = tiny_llava(hidden=1024, layers=1, vision_hidden=32, seed=0)
    from reward.processing import RewardProcessor

    proc = RewardProcessor(tok, ip, model.config, chat_template=tok.chat_template)
    reward = LlavaRewardModel.from_backbone(model, processor=proc, lora_config=LORA).eval()
    if std is not None:
        for module in reward.heads["overall"].modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=std)
    prompts = ["a red circle", "a blue square on the left", "a cat", "the big tree at night"] * 4
    with torch.no_grad():
        chosen = reward(**proc(prompts, [_image(i) for i in range(16)])).rewards
        rejected = reward(**proc(prompts, [_image(100 + i) for i in range(16)])).rewards
    return float(bradley_terry_loss(chosen, rejected, tau=0.1))


def test_initial_bt_loss_is_near_log2_at_d1024():
    loss = _initial_bt_loss(None)  # the model's own init: std 1/(d+1)
    assert abs(loss - math.log(2)) < 0.1, loss  # measured 0.723 (log 2 = 0.693)
    # the old init (std 1/sqrt(d)) starts far from it: the test tells the two apart
    assert _initial_bt_loss(1 / math.sqrt(1024)) > math.log(2) + 0.5  # measured 1.96
