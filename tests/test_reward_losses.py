"""reward.losses against hand-computed values.

softplus(x) = log(1 + e^x):  softplus(-1) = 0.3132617,  softplus(2) = 2.1269280,
softplus(-2) = 0.1269280,  softplus(-4) = 0.0181499,  log 2 = 0.6931472,
sigmoid(2) = 0.8807971,  sigmoid(1) = 0.7310586.
"""

from __future__ import annotations

import pytest
import torch

from reward.losses import (
    bradley_terry_loss,
    gpm_loss,
    paired_bce_loss,
    pairwise_probability,
    preference_logit,
    unpaired_bce_loss,
)

SP_M1 = 0.3132617  # softplus(-1)
SP_2 = 2.1269280  # softplus(2)
SP_M2 = 0.1269280  # softplus(-2)
SP_M4 = 0.0181499  # softplus(-4)
LOG2 = 0.6931472


def close(a: torch.Tensor, b, tol: float = 1e-5) -> bool:
    return torch.allclose(a, torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=0)


def test_bradley_terry_hand_values():
    rc = torch.tensor([1.0, 0.0])
    rr = torch.tensor([0.9, 0.2])
    # (rc - rr) / 0.1 = [1, -2]  ->  -log sigmoid = [softplus(-1), softplus(2)]
    per = bradley_terry_loss(rc, rr, tau=0.1, reduction="none")
    assert close(per, [SP_M1, SP_2])
    assert close(bradley_terry_loss(rc, rr), (SP_M1 + SP_2) / 2)
    assert close(bradley_terry_loss(rc, rr, reduction="sum"), SP_M1 + SP_2)
    # weighted mean: (1 * 0.3132617 + 3 * 2.1269280) / 4
    w = torch.tensor([1.0, 3.0])
    assert close(bradley_terry_loss(rc, rr, weights=w), (SP_M1 + 3 * SP_2) / 4)
    assert close(bradley_terry_loss(rc, rr, weights=w, reduction="none"), [SP_M1, 3 * SP_2])
    # [N, 1] is accepted like [N]
    assert close(bradley_terry_loss(rc[:, None], rr[:, None]), (SP_M1 + SP_2) / 2)


def test_bradley_terry_tau_scales_margin():
    rc, rr = torch.tensor([0.5]), torch.tensor([0.0])
    # tau = 0.25 -> margin 2 -> softplus(-2)
    assert close(bradley_terry_loss(rc, rr, tau=0.25), SP_M2)


def test_losses_are_stable_for_huge_margins():
    rc = torch.tensor([1000.0, -1000.0], requires_grad=True)
    rr = torch.tensor([-1000.0, 1000.0])
    per = bradley_terry_loss(rc, rr, tau=0.1, reduction="none")
    # margin +20000 -> 0 ; margin -20000 -> 20000 (softplus(x) = x for large x)
    assert close(per, [0.0, 20000.0], tol=1e-3)
    per.sum().backward()
    assert torch.isfinite(rc.grad).all()
    assert close(rc.grad, [0.0, -10.0])  # d/drc softplus(-(rc-rr)/tau) = -sigmoid(..)/tau
    big = torch.tensor([1e4, -1e4])
    assert torch.isfinite(paired_bce_loss(big, -big)).all()
    assert torch.isfinite(unpaired_bce_loss(big, torch.tensor([0.0, 1.0]))).all()
    assert close(unpaired_bce_loss(big, torch.tensor([0.0, 1.0]), reduction="none"), [1e4, 1e4])


def test_gpm_hand_values_and_convention():
    # c = (1, 2) chosen, r = (3, 4) rejected: c0*r1 - c1*r0 = 4 - 6 = -2 -> softplus(2)
    c = torch.tensor([[1.0, 2.0], [2.0, 0.0]])
    r = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    per = gpm_loss(c, r, tau=1.0, reduction="none")
    # second pair: 2*1 - 0*0 = 2 -> softplus(-2)
    assert close(per, [SP_2, SP_M2])
    # tau = 0.5 doubles the logit: second pair 4 -> softplus(-4)
    assert close(gpm_loss(c[1:], r[1:], tau=0.5), SP_M4)
    # antisymmetry: swapping chosen/rejected flips the logit's sign
    assert close(preference_logit(c, r, 1.0), -preference_logit(r, c, 1.0))
    assert close(preference_logit(c, c, 1.0), [0.0, 0.0])


def test_paired_bce_hand_values():
    # rc = rr = 0: (log 2 + log 2) / 2 = log 2
    assert close(paired_bce_loss(torch.tensor([0.0]), torch.tensor([0.0])), LOG2)
    # rc = 2, rr = -1: (softplus(-2) + softplus(-1)) / 2
    assert close(paired_bce_loss(torch.tensor([2.0]), torch.tensor([-1.0])), (SP_M2 + SP_M1) / 2)


def test_unpaired_bce_hand_values():
    r = torch.tensor([0.0, 2.0])
    y = torch.tensor([1.0, 0.0])
    # [log 2, softplus(2)]
    assert close(unpaired_bce_loss(r, y, reduction="none"), [LOG2, SP_2])
    assert close(unpaired_bce_loss(r, y), (LOG2 + SP_2) / 2)
    # bool labels and weights
    assert close(
        unpaired_bce_loss(r, torch.tensor([True, False]), weights=torch.tensor([0.0, 1.0])), SP_2
    )


def test_pairwise_probability_hand_values():
    # (0.3 - 0.1) / 0.1 = 2 -> sigmoid(2)
    p = pairwise_probability(torch.tensor([0.3]), torch.tensor([0.1]), tau=0.1)
    assert close(p, [0.8807971])
    assert close(pairwise_probability(torch.tensor([0.5]), torch.tensor([0.5])), [0.5])
    # GPM a = (1, 0), b = (0, 1): 1*1 - 0*0 = 1 -> sigmoid(1)
    p = pairwise_probability(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), tau=1.0)
    assert close(p, [0.7310586])
    # consistency with the losses: loss = -log P(chosen > rejected)
    rc, rr = torch.tensor([0.3, -0.2]), torch.tensor([0.1, 0.4])
    assert close(
        bradley_terry_loss(rc, rr, reduction="none"), -torch.log(pairwise_probability(rc, rr))
    )


def test_bf16_inputs_give_float32_loss_and_grads():
    rc = torch.tensor([0.5, 0.1], dtype=torch.bfloat16, requires_grad=True)
    rr = torch.tensor([0.0, 0.3], dtype=torch.bfloat16)
    loss = bradley_terry_loss(rc, rr)
    assert loss.dtype == torch.float32
    loss.backward()
    assert rc.grad is not None and rc.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: bradley_terry_loss(torch.zeros(3), torch.zeros(2)), "shapes differ"),
        (lambda: bradley_terry_loss(torch.zeros(3, 2), torch.zeros(3, 2)), "gpm_loss"),
        (lambda: gpm_loss(torch.zeros(3), torch.zeros(3)), r"\[N, 2\]"),
        (lambda: bradley_terry_loss(torch.zeros(2), torch.zeros(2), tau=0.0), "tau"),
        (lambda: bradley_terry_loss(torch.zeros(2), torch.zeros(2), reduction="avg"), "reduction"),
        (
            lambda: bradley_terry_loss(torch.zeros(2), torch.zeros(2), weights=torch.ones(3)),
            "weights",
        ),
        (lambda: unpaired_bce_loss(torch.zeros(2), torch.tensor([0.0, 2.0])), r"\[0, 1\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
