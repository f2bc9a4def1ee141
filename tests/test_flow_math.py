"""Flow-GRPO maths (alignment/flow.py) against values computed by hand, diffusers' Euler step and
the marginals of a Gaussian toy problem whose velocity is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from alignment.ddpo import gaussian_log_prob
from alignment.flow import (
    flow_interpolate,
    flow_predict_x0,
    flow_step_sigmas,
    flow_velocity_target,
    group_advantages,
    sde_kl,
    sde_std,
    sde_step_distribution,
    sde_step_with_logprob,
    sde_window,
)

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _quarter_schedule() -> FlowMatchEulerDiscreteScheduler:
    """sigmas 1, 0.75, 0.5, 0.25 (then the terminal 0); timesteps 1000, 750, 500, 250."""
    sch = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sch.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    return sch


def test_sigma_lookup_per_sample_and_errors():
    sch = _quarter_schedule()
    x = torch.zeros(3, 2, 2, 2)
    s, s_next, s_max = flow_step_sigmas(sch, torch.tensor([1000.0, 500.0, 250.0]), x)
    assert s.shape == (3, 1, 1, 1)
    assert s.flatten().tolist() == [1.0, 0.5, 0.25]
    assert s_next.flatten().tolist() == [0.75, 0.25, 0.0]
    assert float(s_max) == 0.75
    # bf16 storage rounds 750 -> 752: still the nearest entry, inside the tolerance of 5
    s, _, _ = flow_step_sigmas(sch, torch.tensor(750.0).to(torch.bfloat16), x)
    assert s.flatten().tolist() == [0.75] * 3
    with pytest.raises(ValueError, match="not in the scheduler's schedule"):
        flow_step_sigmas(sch, torch.tensor(740.0), x)
    with pytest.raises(ValueError, match="set_timesteps"):
        flow_step_sigmas(FlowMatchEulerDiscreteScheduler(), 1000.0, x)
    with pytest.raises(ValueError, match="2 timesteps for a batch of 3"):
        flow_step_sigmas(sch, torch.tensor([1000.0, 750.0]), x)


def test_sde_step_by_hand():
    sch = _quarter_schedule()
    # sample 0 at s = 1 (x = 0.5, v = 2); sample 1 at s = 0.5 (x = 1, v = 2); dt = -0.25 for both
    x = torch.tensor([0.5, 1.0]).reshape(2, 1, 1, 1).expand(2, 1, 2, 2).contiguous()
    v = torch.full((2, 1, 2, 2), 2.0)
    t = torch.tensor([1000.0, 500.0])
    # s = 1: std_s = 0.7 sqrt(1 / (1 - 0.75)) = 1.4 (the second sigma in the denominator);
    #   eps_hat = x + (1 - s) v = 0.5; drift = 2 + 1.4^2 / 2 * 0.5 = 2.49; mean = 0.5 - 0.25 * 2.49
    # s = 0.5: std_s = 0.7 sqrt(0.5 / 0.5) = 0.7; eps_hat = 1 + 0.5 * 2 = 2;
    #   drift = 2 + 0.49 / 1 * 2 = 2.98; mean = 1 - 0.25 * 2.98 = 0.255
    mean, std_s, step_std = sde_step_distribution(sch, v, t, x, noise_level=0.7)
    torch.testing.assert_close(mean[:, 0, 0, 0], torch.tensor([-0.1225, 0.255]))
    torch.testing.assert_close(std_s.flatten(), torch.tensor([1.4, 0.7]))
    torch.testing.assert_close(step_std.flatten(), torch.tensor([0.7, 0.35]))  # * sqrt(0.25)
    # scoring a given x_next = mean + step_std * z with z = (1, -1, 2, 0): mean z^2 = 1.5
    z = torch.tensor([1.0, -1.0, 2.0, 0.0]).reshape(1, 1, 2, 2)
    nxt = mean + step_std * z
    prev, log_prob, m, s = sde_step_with_logprob(sch, v, t, x, 0.7, prev_sample=nxt)
    want = -0.75 - torch.log(torch.tensor([0.7, 0.35])) - LOG_SQRT_2PI
    torch.testing.assert_close(log_prob, want)
    assert prev is nxt and torch.equal(m, mean) and torch.equal(s, std_s)
    # the formula by itself, elementwise
    torch.testing.assert_close(
        sde_std(torch.tensor([1.0, 0.5, 0.2]), torch.tensor(0.75), 0.5),
        torch.tensor([0.5 * 2.0, 0.5, 0.5 * math.sqrt(0.25)]),
    )


def test_sampled_step_has_the_stated_distribution_and_dtype():
    sch = _quarter_schedule()
    x = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    v = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    t = torch.full((4000,), 500.0)
    nxt, log_prob, mean, _ = sde_step_with_logprob(
        sch, v, t, x, 0.7, generator=torch.Generator().manual_seed(2)
    )
    z = (nxt - mean) / 0.35
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02  # measured 0.007, 0.002
    # the mean log-density of draws from the step is the negative entropy per dimension
    entropy = 0.5 + math.log(0.35) + LOG_SQRT_2PI
    assert abs(log_prob.mean() + entropy) < 0.01  # measured 0.002
    half = sde_step_with_logprob(sch, v.bfloat16(), t, x.bfloat16(), 0.7)
    assert half[0].dtype == torch.bfloat16 and half[1].dtype == torch.float32
    assert half[2].dtype == torch.float32


def test_noise_level_zero_is_the_schedulers_euler_step():
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD 3.5's schedule
    sch.set_timesteps(10)
    ours = FlowMatchEulerDiscreteScheduler.from_config(sch.config)
    ours.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 3, generator=g)
    for t in sch.timesteps:
        v = torch.randn(2, 4, 3, 3, generator=g)
        want = sch.step(v, t, x).prev_sample
        gen = torch.Generator().manual_seed(5)
        state = gen.get_state()
        nxt, log_prob, mean, std = sde_step_with_logprob(
            ours, v, t.expand(2), x, noise_level=0.0, generator=gen
        )
        torch.testing.assert_close(mean, want, rtol=0, atol=1e-6)
        assert torch.equal(nxt, mean) and torch.all(log_prob == 0) and torch.all(std == 0)
        assert torch.equal(gen.get_state(), state)  # no noise drawn
        x = want


@pytest.mark.parametrize("noise_level", [0.0, 0.7])
def test_sde_keeps_the_odes_marginals_on_a_gaussian(noise_level):
    """x0 ~ N(0, c^2): x_s has variance m(s) = (1 - s)^2 c^2 + s^2 and the exact velocity is
    E[eps - x0 | x_s] = x_s (s - (1 - s) c^2) / m(s). Integrating from N(0, 1) at s = 1 with the
    ODE or the SDE must end at variance c^2. With the drift's correction halved (a wrong 4 s
    instead of 2 s) the SDE ends at 0.46, without it at 1.17."""
    c2 = 0.25
    sch = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sch.set_timesteps(200)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 1, generator=g)
    for t in sch.timesteps:
        s = float(t) / 1000
        v = x * (s - (1 - s) * c2) / ((1 - s) ** 2 * c2 + s**2)
        x, _, _, _ = sde_step_with_logprob(sch, v, t, x, noise_level, generator=g)
    # measured: ODE 0.2486, SDE 0.2497 (Euler error plus sampling error ~0.0025)
    assert abs(float(x.var()) - c2) < 0.008


def test_kl_by_hand_and_its_relation_to_the_exact_kl():
    sch = _quarter_schedule()
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    v = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([750.0, 250.0])
    mean, std_s, step_std = sde_step_distribution(sch, v, t, x)
    mean_ref = mean + torch.tensor([0.1, -0.1, 0.2, 0.0]).reshape(1, 1, 2, 2)
    # mean of the squared differences = (0.01 + 0.01 + 0.04 + 0) / 4 = 0.015
    kl = sde_kl(mean, mean_ref, std_s)
    torch.testing.assert_close(kl, 0.015 / (2 * std_s.flatten() ** 2))
    # the exact KL between the two step Gaussians (same std, step_std), in closed form...
    exact = sde_kl(mean, mean_ref, step_std)
    # ...equals the sampled estimate E_p[log p - log q] over draws from the policy's step
    n = 20000
    xs, vs = x.repeat(n, 1, 1, 1), v.repeat(n, 1, 1, 1)
    draws, lp, _, _ = sde_step_with_logprob(
        sch, vs, t.repeat(n), xs, generator=torch.Generator().manual_seed(3)
    )
    lq = gaussian_log_prob(draws, mean_ref.repeat(n, 1, 1, 1), step_std.repeat(n, 1, 1, 1))
    mc = (lp - lq).reshape(n, 2).mean(0)
    torch.testing.assert_close(mc, exact, rtol=0.05, atol=1e-3)  # measured 2.2%, 1.3%
    # the reference's normalisation is the exact KL times -dt (= 0.25 on this schedule)
    torch.testing.assert_close(kl, exact * 0.25)


def _reference_advantages(rewards, prompts, global_std):
    """An independent loop version (numpy, population std) of the GRPO normalisation."""
    rewards, prompts = np.asarray(rewards, dtype=np.float64), np.asarray(prompts)
    out = np.zeros_like(rewards)
    for p in np.unique(prompts):
        m = prompts == p
        std = rewards.std() if global_std else rewards[m].std()
        out[m] = (rewards[m] - rewards[m].mean()) / (std + 1e-4)
    return out


def test_group_advantages_by_hand_and_against_a_loop():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, float("nan")])
    groups = ["a", "a", "a", "b", "b", "b"]
    adv = group_advantages(r, groups)
    d = math.sqrt(2 / 3) + 1e-4  # group a: mean 2, population std sqrt(2/3)
    torch.testing.assert_close(adv, torch.tensor([-1 / d, 0.0, 1 / d, 0.0, 0.0, 0.0]))
    # global std over the finite rewards (1, 2, 3, 10, 10): mean 5.2, variance 78.8 / 5 = 15.76
    adv = group_advantages(r, groups, global_std=True)
    d = math.sqrt(15.76) + 1e-4
    torch.testing.assert_close(adv, torch.tensor([-1 / d, 0.0, 1 / d, 0.0, 0.0, 0.0]))
    # one group (0, 0, 0, 100): mean 25, std sqrt(1875); clipped at 1
    adv = group_advantages(torch.tensor([0.0, 0.0, 0.0, 100.0]), [7, 7, 7, 7], clip=1.0)
    d = math.sqrt(1875) + 1e-4
    torch.testing.assert_close(adv, torch.tensor([-25 / d] * 3 + [1.0]))
    # an all-NaN group and an infinite reward: 0, and no NaN leaks into the other group
    adv = group_advantages(
        torch.tensor([float("nan"), float("nan"), 1.0, 3.0, float("inf")]),
        torch.tensor([0, 0, 1, 1, 1]),
    )
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, -1 / 1.0001, 1 / 1.0001, 0.0]))
    # random groups, interleaved: the same as the independent loop
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(24, generator=g) * 3 + 1
    prompts = [f"p{int(i)}" for i in torch.randint(0, 4, (24,), generator=g)]
    for gs in (False, True):
        want = torch.tensor(
            _reference_advantages(rewards.numpy(), prompts, gs), dtype=torch.float32
        )
        torch.testing.assert_close(group_advantages(rewards, prompts, global_std=gs), want)
    with pytest.raises(ValueError, match="3 group keys but 2 rewards"):
        group_advantages(torch.zeros(2), ["a", "b", "c"])


def test_sde_window():
    assert sde_window(10, 0) == list(range(10))
    seen = {tuple(sde_window(10, 2, (0, 5), torch.Generator().manual_seed(s))) for s in range(60)}
    assert seen == {(k, k + 1) for k in range(4)}  # starts 0..3: the window stays inside [0, 5)
    assert sde_window(10, 3, (7, 10)) == [7, 8, 9]
    with pytest.raises(ValueError, match="does not fit"):
        sde_window(10, 4, (0, 3))


def test_x0_prediction_and_flow_dpo_pieces():
    sch = _quarter_schedule()
    x0 = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    s = torch.tensor([0.75, 0.25])
    xs = flow_interpolate(x0, eps, s)
    torch.testing.assert_close(xs[0], 0.25 * x0[0] + 0.75 * eps[0])
    torch.testing.assert_close(xs[1], 0.75 * x0[1] + 0.25 * eps[1])
    v = flow_velocity_target(x0, eps)
    torch.testing.assert_close(v, eps - x0)
    # with the exact velocity, x_s - s v recovers x0
    torch.testing.assert_close(flow_predict_x0(sch, v, torch.tensor([750.0, 250.0]), xs), x0)
    # by hand: x = 1, v = 2 at s = 0.5 -> 0
    one = torch.ones(1, 1, 1, 1)
    assert float(flow_predict_x0(sch, 2 * one, 500.0, one)) == 0.0
