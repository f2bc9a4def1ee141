"""reward.losses at its edges: shapes it accepts ([N, 1] is [N]), weighted reductions by hand,
and errors that start with the name of the offending argument (found by mutation testing: no test
looked at which argument an error names, or at the [N, 3] GPM shape)."""

from __future__ import annotations

import math

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

Z2, Z3, Z22, Z23, Z32 = (torch.zeros(*s) for s in ((2,), (3,), (2, 2), (2, 3), (3, 2)))


@pytest.mark.parametrize(
    ("call", "prefix"),
    [
        (lambda: bradley_terry_loss(Z23, Z23), "r_chosen: expected scalar rewards"),
        (lambda: bradley_terry_loss(Z2, Z23), "r_rejected: expected scalar rewards"),
        (lambda: bradley_terry_loss(Z2, Z3), "r_chosen, r_rejected: shapes differ"),
        (lambda: gpm_loss(Z2, Z22), "r_chosen: expected 2-d GPM rewards"),
        (lambda: gpm_loss(Z22, Z23), "r_rejected: expected 2-d GPM rewards"),
        (lambda: gpm_loss(Z23, Z23), "r_chosen: expected 2-d GPM rewards"),  # [N, 3] is not GPM
        (lambda: gpm_loss(Z22, Z32), "r_chosen, r_rejected: shapes differ"),
        (lambda: paired_bce_loss(Z23, Z2), "r_chosen: expected scalar rewards"),
        (lambda: paired_bce_loss(Z2, Z23), "r_rejected: expected scalar rewards"),
        (lambda: paired_bce_loss(Z2, Z3), "r_chosen, r_rejected: shapes differ"),
        (lambda: unpaired_bce_loss(Z23, Z2), "r: expected scalar rewards"),
        (lambda: unpaired_bce_loss(Z2, Z3), "r, labels: shapes differ"),
        (lambda: preference_logit(Z2, Z3), "r_a, r_b: shapes differ"),
        (lambda: preference_logit(Z23, Z23), "r_a: expected scalar rewards"),
        (lambda: pairwise_probability(Z2, Z3), "r_a, r_b: shapes differ"),
        (lambda: preference_logit(Z2, Z2, tau=-1.0), "tau must be > 0"),
        (lambda: bradley_terry_loss(Z2, Z2, weights=torch.tensor([1.0, -1.0])), "weights must"),
        (lambda: bradley_terry_loss(Z2, Z2, weights=torch.ones(3)), "weights: expected shape"),
        (lambda: bradley_terry_loss(Z2, Z2, reduction="avg"), "reduction must be one of"),
    ],
)
def test_errors_start_with_the_offending_argument(call, prefix):
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value).startswith(prefix), str(err.value)


def test_column_rewards_are_scalar_rewards_and_any_positive_tau_works():
    rc, rr = torch.tensor([0.3, -0.2]), torch.tensor([0.1, 0.4])
    for fn in (bradley_terry_loss, paired_bce_loss):
        torch.testing.assert_close(
            fn(rc[:, None], rr[:, None], reduction="none"), fn(rc, rr, reduction="none")
        )
    y = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(unpaired_bce_loss(rc, y[:, None]), unpaired_bce_loss(rc, y))
    torch.testing.assert_close(unpaired_bce_loss(rc[:, None], y), unpaired_bce_loss(rc, y))
    # default tau 0.1: (0.3 - 0.1) / 0.1 = 2, (-0.2 - 0.4) / 0.1 = -6
    torch.testing.assert_close(preference_logit(rc, rr), torch.tensor([2.0, -6.0]))
    # tau 0.5: (0.3 - 0.1) / 0.5 = 0.4, (-0.2 - 0.4) / 0.5 = -1.2
    torch.testing.assert_close(preference_logit(rc, rr, tau=0.5), torch.tensor([0.4, -1.2]))
    # integer labels are labels too: BCE(0.3, 1) = softplus(-0.3)
    want = math.log1p(math.exp(-0.3))
    assert unpaired_bce_loss(rc[:1], torch.tensor([1])).item() == pytest.approx(want, rel=1e-6)


def test_weighted_reductions_by_hand():
    rc, rr = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.0, 0.1, -0.1])
    per = bradley_terry_loss(rc, rr, reduction="none")  # softplus((rr - rc) / 0.1)
    want = [math.log(2), math.log1p(math.e), math.log1p(math.exp(-1))]
    torch.testing.assert_close(per, torch.tensor(want))
    w = torch.tensor([2.0, 0.0, 1.0])
    torch.testing.assert_close(
        bradley_terry_loss(rc, rr, weights=w, reduction="sum"),
        torch.tensor(2 * want[0] + want[2]),
    )
    torch.testing.assert_close(
        bradley_terry_loss(rc, rr, weights=w, reduction="none"),
        torch.tensor([2 * want[0], 0.0, want[2]]),
    )
    torch.testing.assert_close(
        bradley_terry_loss(rc, rr, weights=w), torch.tensor((2 * want[0] + want[2]) / 3)
    )
    # all weights zero: the weighted mean is 0, not 0 / 0
    assert bradley_terry_loss(rc, rr, weights=torch.zeros(3)).item() == 0.0
    # weights as a list are accepted (converted to a tensor on the loss's device)
    torch.testing.assert_close(
        bradley_terry_loss(rc, rr, weights=[2.0, 0.0, 1.0]), bradley_terry_loss(rc, rr, weights=w)
    )


def test_gpm_and_paired_bce_defaults_and_weights():
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    r = torch.tensor([[0.0, 0.2], [0.1, 0.0]])
    # GPM logit (c0 r1 - c1 r0) / tau with the default tau 0.1: 2.0 and -1.0
    per = gpm_loss(c, r, reduction="none")
    torch.testing.assert_close(per, torch.tensor([math.log1p(math.exp(-2.0)), math.log1p(math.e)]))
    w = torch.tensor([3.0, 1.0])
    torch.testing.assert_close(gpm_loss(c, r, weights=w), (3 * per[0] + per[1]) / 4)
    rc, rr = torch.tensor([0.0, 1.0]), torch.tensor([0.0, -1.0])
    per_bce = paired_bce_loss(rc, rr, reduction="none")
    torch.testing.assert_close(
        paired_bce_loss(rc, rr, weights=w), (3 * per_bce[0] + per_bce[1]) / 4
    )
