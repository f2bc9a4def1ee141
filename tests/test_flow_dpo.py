"""Online Diffusion-DPO with a flow policy (SD 3.x / FLUX): the flow form of the loss and SD3's
training sigmas by hand, pairs from the FlowPolicy's own sampler with the reward's winner as the
chosen latent, the loss at initialisation (log 2) and equal to the pure maths, learning on a tiny
SD3, resume, the offline manifest path, the tiny config through the recipe and DeepSpeed."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from alignment.dpo import (
    FLOW_DPO_BETA,
    flow_dpo_loss,
    flow_matching_error,
    flow_training_sigmas,
)

# ----------------------------------------------------------------------------- pure maths


def test_flow_dpo_loss_and_its_gradient_by_hand():
    # pair 1: x0_w = (1, 0), x0_l = (0, 1), eps = (0.5, 0.5): targets eps - x0 = (-.5, .5), (.5, -.5)
    # pair 2: x0 = 0 for both, eps = (1, -1): both targets (1, -1)
    x0_w = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).reshape(2, 1, 1, 2)
    x0_l = torch.tensor([[0.0, 1.0], [0.0, 0.0]]).reshape(2, 1, 1, 2)
    eps = torch.tensor([[0.5, 0.5], [1.0, -1.0]]).reshape(2, 1, 1, 2)
    v_w = torch.tensor([[0.0, 0.0], [1.0, -1.0]]).reshape(2, 1, 1, 2)
    v_l = torch.tensor([[0.5, -0.5], [0.0, 0.0]]).reshape(2, 1, 1, 2)
    ref_w = torch.tensor([[-0.5, 0.5], [0.0, 0.0]]).reshape(2, 1, 1, 2)
    ref_l = torch.zeros(2, 1, 1, 2)
    # errors (mean over the 2 dims): model w (0.25, 0), l (0, 1); ref w (0, 1), l (0.25, 1)
    torch.testing.assert_close(flow_matching_error(v_w, x0_w, eps), torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(flow_matching_error(v_l, x0_l, eps), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(flow_matching_error(ref_w, x0_w, eps), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(flow_matching_error(ref_l, x0_l, eps), torch.tensor([0.25, 1.0]))
    # logits -1/2 ((0.25 - 0) - (0 - 0.25)) = -0.25 ; -1/2 ((0 - 1) - (1 - 1)) = 0.5; beta 2
    loss, acc = flow_dpo_loss(v_w, v_l, ref_w, ref_l, x0_w, x0_l, eps, beta=2.0)
    expected = (math.log(1 + math.exp(0.5)) + math.log(1 + math.exp(-1.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert acc.item() == 0.5
    hinge, _ = flow_dpo_loss(v_w, v_l, ref_w, ref_l, x0_w, x0_l, eps, 2.0, "hinge")
    assert hinge.item() == pytest.approx((1.5 + 0.0) / 2)  # relu(1 + 0.5), relu(1 - 1)
    assert FLOW_DPO_BETA == 100.0

    # At the reference (logits 0) the flow form still has a gradient: the two images' targets
    # differ. dL/dv_w = beta / (2 D B) (v_w - target_w) = 2 / (2 * 2 * 1) * (0 - (-.5, .5))
    v = torch.zeros(1, 1, 1, 2, requires_grad=True)
    loss, acc = flow_dpo_loss(
        v, ref_l[:1], v.detach(), ref_l[:1], x0_w[:1], x0_l[:1], eps[:1], beta=2.0
    )
    assert loss.item() == pytest.approx(math.log(2.0)) and acc.item() == 0.0
    loss.backward()
    torch.testing.assert_close(v.grad.flatten(), torch.tensor([0.25, -0.25]))


def test_training_sigmas_are_sd3s_logit_normal_draw_by_hand():
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's training schedule, 1000 sigmas
    sig, ts = sch.sigmas, sch.timesteps
    # entry i of the schedule: raw sigma (1000 - i) / 1000, shifted 3 s / (1 + 2 s)
    phi1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))  # P(z < 1)
    r = torch.tensor([0.5, phi1, 0.0])
    s, t = flow_training_sigmas(r, sig, ts)  # logit-normal(0, 1)
    # r = 0.5 -> u = sigmoid(0) = 0.5 -> i = 500 -> s_raw 0.5 -> 1.5 / 2 = 0.75
    # r = P(z<1) -> u = sigmoid(1) = 0.7311 -> i = 731 -> s_raw 0.269 -> 0.807 / 1.538
    # r = 0 -> u = 0 -> i = 0 -> s = 1 (pure noise)
    torch.testing.assert_close(s, torch.tensor([0.75, 0.807 / 1.538, 1.0]))
    torch.testing.assert_close(t, 1000 * s)
    s, _ = flow_training_sigmas(torch.tensor([0.25]), sig, ts, "uniform")
    torch.testing.assert_close(s, torch.tensor([2.25 / 2.5]))  # i = 250, s_raw 0.75
    s, _ = flow_training_sigmas(torch.tensor([0.5]), sig, ts, logit_mean=1.0)
    torch.testing.assert_close(s, torch.tensor([0.807 / 1.538]))  # sigmoid(1 + 0)
    with pytest.raises(ValueError, match="timestep sampling"):
        flow_training_sigmas(r, sig, ts, "mode")
    # in distribution: diffusers' SD3 training draw (compute_density_for_timestep_sampling)
    from diffusers.training_utils import compute_density_for_timestep_sampling

    g = torch.Generator().manual_seed(0)
    ours, _ = flow_training_sigmas(torch.rand(20000, generator=g), sig, ts)
    u = compute_density_for_timestep_sampling("logit_normal", 20000, 0.0, 1.0, generator=g)
    theirs = sig[(u * 1000).long()]
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    # measured max gap between the two empirical quantiles: 0.004
    torch.testing.assert_close(ours.quantile(q), theirs.quantile(q), rtol=0, atol=0.015)
