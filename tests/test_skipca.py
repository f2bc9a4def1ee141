"""SkipCA (the LLaVA-Reward head) computed by hand, element by element, from random weights.

``RewardHead`` with SkipCA: ``q = W_q e``, ``k_v = W_k x_v``, ``u_v = W_v x_v`` for the visual tokens
``x_v`` that the mask keeps, ``a = softmax_v(q . k_v / sqrt(d))``, ``h = RMSNorm(e + sum_v a_v u_v)``
(gain ``g``, eps 1e-6), ``r = W_h h``. The reference below is written with Python floats in
float64 loops, independent of the einsum/masked_fill code it checks, so that dropping the attention
term, swapping the key and value projections, dropping the mask, the 1/sqrt(d) scale, the residual,
the norm's gain or its eps each changes the result far beyond the tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

from reward.modeling import RewardHead, masked_skip_cross_attention

D = 4


def _matvec(w: torch.Tensor, x: list[float]) -> list[float]:
    w = w.detach()
    return [sum(float(w[i, j]) * x[j] for j in range(len(x))) for i in range(w.shape[0])]


def _hand_head(head: RewardHead, e: torch.Tensor, visual: torch.Tensor, mask: torch.Tensor):
    """(r [B, head_dim], h [B, d]) of ``head`` by hand, float64 loops."""
    rs, hs = [], []
    for b in range(e.shape[0]):
        eb = [float(x) for x in e[b]]
        q = _matvec(head.q_proj.weight, eb)
        kept = [v for v in range(visual.shape[1]) if bool(mask[b, v])]
        scores = []
        for v in kept:
            k = _matvec(head.k_proj.weight, [float(x) for x in visual[b, v]])
            scores.append(sum(qi * ki for qi, ki in zip(q, k)) / math.sqrt(D))
        att = [0.0] * D
        if kept:
            top = max(scores)
            z = sum(math.exp(s - top) for s in scores)
            for s, v in zip(scores, kept):
                u = _matvec(head.v_proj.weight, [float(x) for x in visual[b, v]])
                att = [a + math.exp(s - top) / z * ui for a, ui in zip(att, u)]
        x = [ei + ai for ei, ai in zip(eb, att)]
        rms = math.sqrt(sum(xi * xi for xi in x) / D + 1e-6)
        h = [xi / rms * float(gi) for xi, gi in zip(x, head.norm.weight.detach())]
        hs.append(h)
        rs.append(_matvec(head.score.weight, h))
    return torch.tensor(rs, dtype=torch.float64), torch.tensor(hs, dtype=torch.float64)


@pytest.fixture
def head() -> RewardHead:
    torch.manual_seed(0)
    head = RewardHead(D, head_dim=2, skipca=True)
    with torch.no_grad():  # weights of order 1 (the init's 1/(d+1) would hide the attention term)
        for lin in (head.q_proj, head.k_proj, head.v_proj, head.score):
            lin.weight.normal_()
        head.norm.weight.uniform_(0.5, 1.5)
    return head


def _inputs():
    g = torch.Generator().manual_seed(1)
    e = torch.randn(3, D, generator=g)
    visual = torch.randn(3, 4, D, generator=g)
    # row 0: every token; row 1: the middle two masked (they hold ordinary values, so dropping
    # the mask changes the result); row 2: one token only (attention weight 1)
    mask = torch.tensor(
        [[True, True, True, True], [True, False, False, True], [False, False, True, False]]
    )
    return e, visual, mask


def test_reward_head_equals_the_hand_computed_skipca(head):
    e, visual, mask = _inputs()
    r, h = head(e, visual, mask)
    want_r, want_h = _hand_head(head, e, visual, mask)
    assert r.shape == (3, 2) and h.shape == (3, D)
    # float32 against float64 loops: measured max |diff| 4.0e-7 (r) and 1.8e-7 (h)
    torch.testing.assert_close(r.double(), want_r, atol=2e-6, rtol=0)
    torch.testing.assert_close(h.double(), want_h, atol=1e-6, rtol=0)
    # inputs of another dtype are computed in float32 (the head's dtype)
    r64, h64 = head(e.double(), visual.double(), mask)
    assert r64.dtype == torch.float32
    torch.testing.assert_close(r64, r, atol=0, rtol=0)
    # the pieces the hand value rests on are each visible at this size (so the test can fail):
    no_mask, _ = _hand_head(head, e, visual, torch.ones_like(mask))
    assert (no_mask[1] - want_r[1]).abs().max() > 0.5  # measured 1.09
    swapped = RewardHead(D, head_dim=2)
    swapped.load_state_dict(head.state_dict())
    with torch.no_grad():
        swapped.k_proj.weight.copy_(head.v_proj.weight)
        swapped.v_proj.weight.copy_(head.k_proj.weight)
    assert (_hand_head(swapped, e, visual, mask)[0] - want_r).abs().max() > 0.05


def test_reward_head_without_skipca_is_the_linear_head_of_the_eos_state():
    torch.manual_seed(0)
    head = RewardHead(D, head_dim=1, skipca=False)
    with torch.no_grad():
        head.score.weight.normal_()
    e = torch.randn(2, D)
    r, h = head(e)
    torch.testing.assert_close(h, e, atol=0, rtol=0)
    want = torch.tensor(
        [
            [sum(float(head.score.weight.detach()[0, j] * e[b, j]) for j in range(D))]
            for b in range(2)
        ]
    )
    torch.testing.assert_close(r, want, atol=1e-7, rtol=0)  # measured 1.5e-8
    assert not hasattr(head, "q_proj")


def test_reward_head_refuses_skipca_without_visual_tokens(head):
    e, visual, mask = _inputs()
    with pytest.raises(ValueError, match="SkipCA needs"):
        head(e, None, mask)
    with pytest.raises(ValueError, match="SkipCA needs"):
        head(e, visual, None)


def test_masked_attention_by_hand_and_an_empty_row_attends_to_nothing():
    e, visual, mask = _inputs()
    mask[2] = False  # row 2: no visual token at all
    q, k, v = e * 2.0, visual, visual.flip(-1)
    out = masked_skip_cross_attention(q, k, v, mask)
    for b in range(3):
        kept = [j for j in range(4) if mask[b, j]]
        if not kept:
            assert torch.equal(out[b], torch.zeros(D))  # zeros, not a uniform average
            continue
        s = torch.tensor([float(q[b] @ k[b, j]) / math.sqrt(D) for j in kept], dtype=torch.float64)
        a = torch.softmax(s, 0)
        want = sum(a[i] * v[b, j].double() for i, j in enumerate(kept))
        torch.testing.assert_close(out[b].double(), want, atol=5e-7, rtol=0)  # measured 5.7e-8
