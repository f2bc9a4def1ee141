"""Edges of the DDPO and Diffusion-DPO maths that mutation testing found unpinned: boundaries
(a ratio exactly at the clip range, logits exactly 0, a discount above 1), the per-prompt
tracker's arguments and state, and the argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignment.ddpo import (
    PerPromptStatTracker,
    ppo_clip_loss,
    ppo_stats,
    temporal_discount_weights,
)
from alignment.dpo import diffusion_dpo_loss, per_image_error


def test_ppo_boundaries():
    # |ratio - 1| equal to the clip range is not clipped (strict >): ratio 1 with clip range 0
    zero = torch.zeros(3)
    assert ppo_stats(zero, zero, 0.0)["clipfrac"].item() == 0.0
    assert ppo_stats(zero, zero, 0.0)["approx_kl"].item() == 0.0
    # clip range 0.5 around ratio 2 (clipped to 1.5) and 0.25 (clipped to 0.5), A = -1:
    # max(2, 1.5) = 2 and max(0.25, 0.5) = 0.5
    adv = -torch.ones(2)
    new = torch.log(torch.tensor([2.0, 0.25]))
    assert ppo_clip_loss(adv, new, torch.zeros(2), 0.5).item() == pytest.approx(1.25, rel=1e-6)
    stats = ppo_stats(new, torch.zeros(2), 0.5)
    assert stats["clipfrac"].item() == 1.0
    want = 0.5 * (math.log(2.0) ** 2 + math.log(0.25) ** 2) / 2
    assert stats["approx_kl"].item() == pytest.approx(want, rel=1e-6)


def test_temporal_discount_range_and_an_integer_step_index():
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="temporal discount"):
            temporal_discount_weights(torch.arange(3), bad, 3)
    # long step indices (as the trainer passes them), two steps of gamma 0.8: (1, 0.8) / 0.9
    w = temporal_discount_weights(torch.tensor([1, 0]), 0.8, 2)
    torch.testing.assert_close(w, torch.tensor([0.8 / 0.9, 1 / 0.9]))


def test_per_prompt_tracker_arguments_and_state():
    for bad in ((0, 16), (32, 0)):
        with pytest.raises(ValueError, match=">= 1"):
            PerPromptStatTracker(*bad)
    tr = PerPromptStatTracker(buffer_size=1, min_count=1)
    with pytest.raises(ValueError, match="2 prompts but 3 rewards"):
        tr.update(["a", "b"], np.zeros(3))
    # buffer size 1 and min count 1: each prompt normalised by its own last reward (std 0)
    adv = tr.update(["a", "b"], torch.tensor([2.0, 5.0]))
    np.testing.assert_allclose(adv, [0.0, 0.0])
    assert adv.dtype == np.float32
    assert tr.get_stats() == {
        "a": {"mean": 2.0, "std": 0.0, "count": 1},
        "b": {"mean": 5.0, "std": 0.0, "count": 1},
    }
    state = tr.state_dict()
    assert state == {"buffer_size": 1, "min_count": 1, "stats": {"a": [2.0], "b": [5.0]}}
    clone = PerPromptStatTracker(buffer_size=7, min_count=9)
    clone.load_state_dict(state)
    assert (clone.buffer_size, clone.min_count) == (1, 1)
    assert clone.state_dict() == state
    clone.update(["a"], np.array([4.0]))
    assert clone.get_stats()["a"]["count"] == 1  # the restored buffer keeps its size
    tr.clear()
    assert tr.get_stats() == {} and tr.state_dict()["stats"] == {}


def test_dpo_accuracy_at_zero_logits_and_argument_checks():
    e = torch.tensor([0.1, 0.2])
    # policy == reference: logits exactly 0, loss log 2, and a zero margin is not "correct"
    loss, acc = diffusion_dpo_loss(e, e, e, e, beta=10.0)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6) and acc.item() == 0.0
    for beta in (0.0, -1.0):
        with pytest.raises(ValueError, match="beta"):
            diffusion_dpo_loss(e, e, e, e, beta=beta)
    with pytest.raises(ValueError, match="differ"):
        per_image_error(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 1))
    # bf16 predictions are scored in float32
    err = per_image_error(
        torch.zeros(1, 1, 1, 2), torch.tensor([[[[0.5, 1.5]]]], dtype=torch.bfloat16)
    )
    assert err.dtype == torch.float32 and err.item() == pytest.approx(1.25)
