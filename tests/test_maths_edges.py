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
    gaussian_kl,
    ppo_clip_loss,
    ppo_stats,
    temporal_discount_weights,
)
from alignment.dpo import diffusion_dpo_loss, per_image_error
from alignment.draft import mean_brightness, reward_loss


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


def test_per_prompt_tracker_defaults_epsilon_and_tensor_rewards():
    tr = PerPromptStatTracker()  # DDPO's reference: a buffer of 32, own statistics from 16
    assert (tr.buffer_size, tr.min_count) == (32, 16)
    # the 1e-6 next to a tiny std: A = (r - mean) / (std + 1e-6) = +-5e-7 / 1.5e-6 = +-1/3,
    # both from the batch statistics (min count not reached) and from the prompt's own buffer
    tiny = torch.tensor([0.0, 1e-6], dtype=torch.float64, requires_grad=True)  # a graph is fine
    np.testing.assert_allclose(tr.update(["a", "b"], tiny), [-1 / 3, 1 / 3], rtol=1e-4)
    own = PerPromptStatTracker(buffer_size=4, min_count=2)
    np.testing.assert_allclose(
        own.update(["a", "a"], np.array([0.0, 1e-6])), [-1 / 3, 1 / 3], rtol=1e-4
    )


def test_gaussian_terms_and_errors_use_both_means():
    # KL and errors between two non-zero means, per sample (a sum of the means would differ)
    mp = torch.tensor([[1.0, 2.0], [0.5, 0.5]]).reshape(2, 2, 1, 1)
    mq = torch.tensor([[0.5, 3.0], [0.5, -0.5]]).reshape(2, 2, 1, 1)
    std = torch.tensor([0.5, 1.0]).reshape(2, 1, 1, 1)
    # sample 0: (0.25 + 1) / (2 * 0.25) / 2 = 1.25; sample 1: (0 + 1) / 2 / 2 = 0.25
    torch.testing.assert_close(gaussian_kl(mp, mq, std), torch.tensor([1.25, 0.25]))
    # mean squared error per image: (0.25 + 1) / 2 and (0 + 1) / 2
    torch.testing.assert_close(per_image_error(mq, mp), torch.tensor([0.625, 0.5]))
    # PPO with non-zero old log-probs: ratio = exp(new - old) = 1.5 and 0.5 (clip 0.2, A = +-1)
    old = torch.log(torch.tensor([2.0, 4.0]))
    new = torch.log(torch.tensor([3.0, 2.0]))
    assert ppo_clip_loss(torch.tensor([1.0, -1.0]), new, old, 0.2).item() == pytest.approx(-0.2)
    stats = ppo_stats(new, old, 0.6)  # |0.5| and |-0.5| are inside 0.6, not clipped
    assert stats["clipfrac"].item() == 0.0
    want = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2
    assert stats["approx_kl"].item() == pytest.approx(want, rel=1e-6)
    assert ppo_stats(new, old, 0.4)["clipfrac"].item() == 1.0


def test_defaults_of_the_losses_and_the_toy_reward():
    # exact in float32: model_err_w - model_err_l = -2^-11, so logits (2^-12, 0)
    mw, ml = torch.tensor([0.5, 0.25]), torch.tensor([0.5 + 2**-11, 0.25])
    ref = torch.tensor([0.1, 0.2])
    # default beta 5000 (with the 1/2 inside): beta * logits = (5000 / 4096, 0)
    loss, acc = diffusion_dpo_loss(mw, ml, ref, ref)
    want = (math.log1p(math.exp(-5000 / 4096)) + math.log(2)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6) and acc.item() == 0.5
    small, _ = diffusion_dpo_loss(mw, ml, ref, ref, beta=0.5)  # any positive beta is allowed
    assert small.item() == pytest.approx(math.log(2), rel=1e-4)
    r = torch.tensor([0.5, 1.5])
    assert reward_loss(r).item() == pytest.approx(-1.0)  # default "neg"
    assert reward_loss(r, "relu").item() == pytest.approx(0.25)  # default margin 1
    images = torch.stack([torch.full((3, 2, 2), 0.25), torch.linspace(0, 1, 12).reshape(3, 2, 2)])
    images[0, 0, 0, 0] = 1.0  # 0.25 + 0.75 / 12
    torch.testing.assert_close(mean_brightness(images, ["a", "b"]), torch.tensor([0.3125, 0.5]))
