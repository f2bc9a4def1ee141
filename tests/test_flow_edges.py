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
