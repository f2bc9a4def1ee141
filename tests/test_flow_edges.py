"""Edges of alignment.flow that mutation testing found unpinned: singleton and all-failed groups
and the two-sided clip in GRPO's advantages, the Flow-GRPO-Fast window's range and generator, and
the dtype of the forward process."""

from __future__ import annotations

import math

import pytest
import torch

from alignment.flow import flow_interpolate, group_advantages, sde_window


def test_group_advantages_singletons_clip_and_failed_rewards():
    # group a: mean 1.5, std 0.5; group b has one member: its advantage is 0
    adv = group_advantages(torch.tensor([1.0, 2.0, 4.0]), ["a", "a", "b"])
    want = torch.tensor([-0.5 / (0.5 + 1e-4), 0.5 / (0.5 + 1e-4), 0.0])
    torch.testing.assert_close(adv, want)
    # both ends of the clip: one high and one low outlier, |A| = 1.5 / sqrt(0.75) > 1
    r = torch.tensor([0.0, 0.0, 0.0, 10.0, 0.0, 0.0, 0.0, -10.0])
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    free = group_advantages(r, groups)
    clipped = group_advantages(r, groups, clip=1.0)
    assert free.max() > 1.5 and free.min() < -1.5
    torch.testing.assert_close(clipped, free.clamp(-1.0, 1.0))
    # every reward failed: zeros, with or without the global std
    bad = torch.tensor([math.nan, math.inf])
    for global_std in (False, True):
        assert torch.equal(group_advantages(bad, ["a", "a"], global_std=global_std), torch.zeros(2))


def test_sde_window_range_size_and_generator():
    assert sde_window(5, 0) == [0, 1, 2, 3, 4]  # size 0: every step is an SDE step
    # size 1 is a window of one step; the default range reaches both ends
    starts = {sde_window(6, 1, generator=torch.Generator().manual_seed(s))[0] for s in range(60)}
    assert starts == set(range(6))
    starts = {sde_window(6, 2, generator=torch.Generator().manual_seed(s))[0] for s in range(60)}
    assert starts == set(range(5))
    # a range: windows inside [2, 7) only
    for s in range(20):
        w = sde_window(10, 3, (2, 7), generator=torch.Generator().manual_seed(s))
        assert w == list(range(w[0], w[0] + 3)) and 2 <= w[0] <= 4
    # the window is the generator's, whatever the global RNG holds
    for s in range(10):
        torch.manual_seed(100 + s)
        a = sde_window(12, 2, generator=torch.Generator().manual_seed(s))
        torch.manual_seed(200 + s)
        assert sde_window(12, 2, generator=torch.Generator().manual_seed(s)) == a
    with pytest.raises(ValueError, match="does not fit"):
        sde_window(10, 3, (6, 8))  # two steps left in the range, though 6 + 8 > 3


def test_flow_interpolate_keeps_the_latents_dtype():
    x0 = torch.tensor([[1.0, -1.0], [0.5, 0.25]], dtype=torch.bfloat16)
    noise = torch.tensor([[0.0, 2.0], [-1.0, 1.0]], dtype=torch.bfloat16)
    out = flow_interpolate(x0, noise, torch.tensor([0.25, 0.5]))  # float32 sigmas
    assert out.dtype == torch.bfloat16
    # (1 - s) x0 + s eps: row 0 at s 0.25, row 1 at s 0.5
    want = torch.tensor([[0.75, -0.25], [-0.25, 0.625]])
    torch.testing.assert_close(out.float(), want, atol=1e-2, rtol=0)


def _schedule(steps: int | None = None, **kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=1.0, **kw)
    if steps is None:
        sch.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])  # timesteps 1000, 750, 500, 250
    else:
        sch.set_timesteps(steps)
    return sch


def test_sde_sample_is_mean_plus_std_times_the_generators_noise_in_the_samples_dtype():
    from alignment.flow import sde_step_distribution, sde_step_with_logprob

    sch = _schedule()
    x = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    v = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1000.0, 750.0, 500.0])
    prev, lp, mean, std_s = sde_step_with_logprob(
        sch, v, t, x, generator=torch.Generator().manual_seed(2)
    )
    want_mean, want_std, step_std = sde_step_distribution(sch, v, t, x)
    z = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(prev, want_mean + step_std * z, atol=0, rtol=0)
    assert torch.equal(mean, want_mean) and torch.equal(std_s, want_std)
    # bf16 latents come back in bf16 (the maths stays float32), with noise and without
    for level in (0.7, 0.0):
        out = sde_step_with_logprob(sch, v.bfloat16(), t, x.bfloat16(), noise_level=level)
        assert out[0].dtype == torch.bfloat16 and out[2].dtype == torch.float32
    # noise level 0: one zero log-prob per sample (batch 3, 2 channels)
    _, lp0, _, _ = sde_step_with_logprob(sch, v, t, x, noise_level=0.0)
    assert torch.equal(lp0, torch.zeros(3))


def test_schedule_checks_and_the_timestep_tolerance():
    from types import SimpleNamespace

    from alignment.flow import flow_step_sigmas

    x = torch.zeros(2, 1)
    with pytest.raises(ValueError, match="invert_sigmas"):
        flow_step_sigmas(_schedule(invert_sigmas=True), 1000.0, x)
    # a scheduler-like object whose config has no invert_sigmas is taken as not inverted
    sch = _schedule()
    bare = SimpleNamespace(
        num_inference_steps=4,
        timesteps=sch.timesteps,
        sigmas=sch.sigmas,
        config=SimpleNamespace(num_train_timesteps=1000),
    )
    assert flow_step_sigmas(bare, 750.0, x)[0].flatten().tolist() == [0.75, 0.75]
    one = _schedule(1)  # a one-step schedule: s = 1 -> 0
    s, s_next, _ = flow_step_sigmas(one, float(one.timesteps[0]), x)
    assert s.flatten().tolist() == [1.0, 1.0] and s_next.flatten().tolist() == [0.0, 0.0]
    # 400 steps: entries ~2.5 apart, so the tolerance is half the smallest gap (< 0.005 * 1000)
    fine = _schedule(400)
    gap = float((fine.timesteps[:-1] - fine.timesteps[1:]).abs().min())
    above = float(fine.timesteps[0]) + 0.6 * gap
    with pytest.raises(ValueError, match=f"{above:.1f}"):
        flow_step_sigmas(fine, torch.tensor([above, above]), x)
    assert flow_step_sigmas(fine, float(fine.timesteps[0]) + 0.4 * gap, x)[0][0].item() == 1.0
    # the error lists the first three bad timesteps
    with pytest.raises(ValueError) as err:
        flow_step_sigmas(sch, torch.tensor([10.0, 20.0, 30.0, 40.0]), torch.zeros(4, 1))
    assert "[10.0, 20.0, 30.0]" in str(err.value) and "40.0" not in str(err.value)
