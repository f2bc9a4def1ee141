"""DDPO maths against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from alignment.ddpo import (
    PerPromptStatTracker,
    clip_advantages,
    ddim_step_with_logprob,
    gaussian_kl,
    gaussian_log_prob,
    ppo_clip_loss,
    ppo_stats,
    temporal_discount_weights,
)


def _scheduler(**kw) -> DDIMScheduler:
    # constant beta 0.1 -> alphas_cumprod[t] = 0.9 ** (t + 1); 10 train steps, 5 DDIM steps:
    # timesteps [8, 6, 4, 2, 0], step ratio 2.
    s = DDIMScheduler(
        num_train_timesteps=10,
        beta_start=0.1,
        beta_end=0.1,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        **kw,
    )
    s.set_timesteps(5)
    return s


def _hand_logprob(x_t, eps, x_prev, a_t, a_p, eta):
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    mu = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma**2) * eps
    lp = -((x_prev - mu) ** 2) / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    return mu, lp


def test_ddim_logprob_matches_hand_computation():
    s = _scheduler()
    a_t, a_p = 0.9**5, 0.9**3  # t = 4, previous t = 2
    x_t = torch.tensor([1.0, -0.5]).reshape(1, 2, 1, 1)
    eps = torch.tensor([0.5, 0.25]).reshape(1, 2, 1, 1)
    x_prev = torch.tensor([0.7, -0.2]).reshape(1, 2, 1, 1)
    _, lp = ddim_step_with_logprob(s, eps, 4, x_t, eta=1.0, prev_sample=x_prev)
    _, lp0 = _hand_logprob(1.0, 0.5, 0.7, a_t, a_p, 1.0)
    _, lp1 = _hand_logprob(-0.5, 0.25, -0.2, a_t, a_p, 1.0)
    assert lp.shape == (1,)
    assert lp.item() == pytest.approx((lp0 + lp1) / 2, rel=1e-5)  # mean over latent dims


def test_ddim_last_step_uses_final_alpha_and_per_sample_timesteps():
    # SD-style: set_alpha_to_one=False (final alpha = alphas_cumprod[0] = 0.9), steps_offset=1:
    # timesteps [9, 7, 5, 3, 1]
    s = DDIMScheduler(
        num_train_timesteps=10,
        beta_start=0.1,
        beta_end=0.1,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    s.set_timesteps(5)
    assert s.timesteps.tolist() == [9, 7, 5, 3, 1]
    x_t = torch.tensor([0.3, 0.3]).reshape(2, 1, 1, 1)
    eps = torch.tensor([0.1, 0.1]).reshape(2, 1, 1, 1)
    x_prev = torch.tensor([0.2, 0.2]).reshape(2, 1, 1, 1)
    # sample 0 at t=1 (previous index -1 -> final alpha 0.9), sample 1 at t=7 (previous 5)
    _, lp = ddim_step_with_logprob(s, eps, torch.tensor([1, 7]), x_t, eta=0.5, prev_sample=x_prev)
    _, want0 = _hand_logprob(0.3, 0.1, 0.2, 0.9**2, 0.9, 0.5)
    _, want1 = _hand_logprob(0.3, 0.1, 0.2, 0.9**8, 0.9**6, 0.5)
    assert lp[0].item() == pytest.approx(want0, rel=1e-5)
    assert lp[1].item() == pytest.approx(want1, rel=1e-5)


def test_ddim_sampled_step_matches_diffusers_step():
    s = _scheduler()
    torch.manual_seed(0)
    x_t, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    prev, lp = ddim_step_with_logprob(
        s, eps, 6, x_t, eta=1.0, generator=torch.Generator().manual_seed(1)
    )
    ref = s.step(eps, 6, x_t, eta=1.0, generator=torch.Generator().manual_seed(1)).prev_sample
    torch.testing.assert_close(prev, ref, rtol=1e-5, atol=1e-5)
    # scoring the sampled point again gives the same log-prob
    _, lp2 = ddim_step_with_logprob(s, eps, 6, x_t, eta=1.0, prev_sample=prev)
    torch.testing.assert_close(lp, lp2)
    # deterministic DDIM: mean, zero log-prob
    det, lp_det = ddim_step_with_logprob(s, eps, 6, x_t, eta=0.0)
    torch.testing.assert_close(det, s.step(eps, 6, x_t, eta=0.0).prev_sample, rtol=1e-5, atol=1e-5)
    assert torch.all(lp_det == 0)


def test_temporal_discount_weights_hand_value():
    # gamma 0.5 over 3 steps: raw 1, 0.5, 0.25 with mean 1.75 / 3
    w = temporal_discount_weights(torch.tensor([[0, 1, 2], [2, 0, 1]]), 0.5, 3)
    want = torch.tensor([1.0, 0.5, 0.25]) * 3 / 1.75
    assert torch.allclose(w[0], want) and torch.allclose(w[1], want[[2, 0, 1]])
    assert torch.allclose(w[0].mean(), torch.tensor(1.0))
    assert torch.equal(temporal_discount_weights(torch.arange(4), 1.0, 4), torch.ones(4))
    with pytest.raises(ValueError, match="temporal discount"):
        temporal_discount_weights(torch.arange(3), 0.0, 3)


def test_ppo_clip_loss_hand_value():
    adv = torch.tensor([1.0, -1.0])
    old = torch.zeros(2)
    new = torch.log(torch.tensor([1.5, 0.5]))
    # sample 0: max(-1.5, -1.2) = -1.2; sample 1: max(0.5, 0.8) = 0.8; mean = -0.2
    assert ppo_clip_loss(adv, new, old, 0.2).item() == pytest.approx(-0.2, abs=1e-6)
    # inside the trust region the loss is -mean(A * ratio)
    new2 = torch.log(torch.tensor([1.1, 0.9]))
    assert ppo_clip_loss(adv, new2, old, 0.2).item() == pytest.approx((-1.1 + 0.9) / 2, abs=1e-6)
    # per-row weights: mean(w * per-row loss) = (2 * -1.2 + 0.5 * 0.8) / 2
    w = torch.tensor([2.0, 0.5])
    assert ppo_clip_loss(adv, new, old, 0.2, w).item() == pytest.approx(-1.0, abs=1e-6)
    stats = ppo_stats(new, old, 0.2)
    assert stats["clipfrac"].item() == pytest.approx(1.0)
    want_kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2
    assert stats["approx_kl"].item() == pytest.approx(want_kl, rel=1e-5)


def test_clip_advantages():
    out = clip_advantages(torch.tensor([-7.0, 0.5, 6.0]), 5.0)
    assert out.tolist() == [-5.0, 0.5, 5.0]


def test_per_prompt_tracker_hand_values_and_resume():
    tr = PerPromptStatTracker(buffer_size=4, min_count=2)
    adv = tr.update(["a", "a", "b"], np.array([1.0, 3.0, 5.0]))
    # a: its own buffer [1, 3]: mean 2, std 1; b: 1 < min_count -> batch mean 3, std sqrt(8/3)
    np.testing.assert_allclose(adv, [-1.0, 1.0, 2.0 / math.sqrt(8 / 3)], rtol=1e-5)
    clone = PerPromptStatTracker()
    clone.load_state_dict(tr.state_dict())
    nxt = (["b", "b", "a"], np.array([7.0, 9.0, 5.0]))
    np.testing.assert_allclose(tr.update(*nxt), clone.update(*nxt))
    # b's buffer [5, 7, 9]: mean 7, std sqrt(8/3); a's buffer [1, 3, 5]
    np.testing.assert_allclose(tr.update(["b"], np.array([7.0])), [0.0], atol=1e-6)
    assert tr.get_stats()["a"]["count"] == 3
    tr.update(["a"] * 3, np.array([0.0, 0.0, 0.0]))
    assert tr.get_stats()["a"]["count"] == 4  # FIFO buffer of size 4


def test_gaussian_kl_and_log_prob_hand_values():
    mp = torch.tensor([1.0, 2.0]).reshape(1, 2, 1, 1)
    mq = torch.zeros(1, 2, 1, 1)
    std = torch.tensor(0.5).reshape(1, 1, 1, 1)
    # mean over dims of (mu_p - mu_q)^2 / (2 * 0.25): (2 + 8) / 2 = 5
    assert gaussian_kl(mp, mq, std).item() == pytest.approx(5.0)
    # log N(x=1 | 0, 0.5^2) = -2 - log 0.5 - log sqrt(2 pi); x=2: -8 - ...
    want = (-2 - 8) / 2 - math.log(0.5) - 0.5 * math.log(2 * math.pi)
    assert gaussian_log_prob(mp, mq, std).item() == pytest.approx(want, rel=1e-6)
