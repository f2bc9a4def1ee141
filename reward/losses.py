"""Reward-model losses as pure functions (SPEC section 1).

Conventions shared by every function here:

* A *scalar* reward batch is ``Tensor[N]`` (``Tensor[N, 1]`` is accepted and squeezed). A *GPM*
  (general-preference) reward batch is ``Tensor[N, 2]``: the 2-d head's output per image.
* ``r_chosen[i]`` and ``r_rejected[i]`` are the rewards of the preferred and the rejected image of
  pair ``i`` (same prompt).
* Every loss is computed in float32 (bf16 inputs are up-cast; gradients flow back in the input
  dtype) with ``logsigmoid`` / BCE-with-logits, so large margins neither overflow nor give NaN.
* ``weights`` (optional ``Tensor[N]``, >= 0) weight each example; with ``reduction="mean"`` the
  result is ``sum(w * l) / sum(w)``. ``reduction`` is ``"mean"`` (default), ``"sum"`` or ``"none"``
  (per-example ``Tensor[N]``).

The preference logit :func:`preference_logit` is the single place where the two conventions are
defined; the losses, :func:`pairwise_probability` and the pairwise metrics in
``reward.evaluate`` all go through it, so training and evaluation cannot disagree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_REDUCTIONS = ("mean", "sum", "none")


def _as_scalar_rewards(r: torch.Tensor, name: str) -> torch.Tensor:
    if r.ndim == 2 and r.shape[-1] == 1:
        r = r.squeeze(-1)
    if r.ndim != 1:
        raise ValueError(
            f"{name}: expected scalar rewards of shape [N] or [N, 1], got {tuple(r.shape)}. "
            "For a 2-d (GPM) head use gpm_loss."
        )
    return r.float()


def _as_gpm_rewards(r: torch.Tensor, name: str) -> torch.Tensor:
    if r.ndim != 2 or r.shape[-1] != 2:
        raise ValueError(
            f"{name}: expected 2-d GPM rewards of shape [N, 2], got {tuple(r.shape)}. "
            "For a scalar head use bradley_terry_loss."
        )
    return r.float()


def _check_same(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}.")


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}.")


def _reduce(loss: torch.Tensor, weights: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Weighted reduction of a per-example loss ``Tensor[N]``."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")
    if weights is not None:
        weights = torch.as_tensor(weights, device=loss.device).float()
        if weights.shape != loss.shape:
            raise ValueError(
                f"weights: expected shape {tuple(loss.shape)} (one per example), "
                f"got {tuple(weights.shape)}."
            )
        if bool((weights < 0).any()):
            raise ValueError("weights must be non-negative.")
        weighted = loss * weights
        if reduction == "none":
            return weighted
        if reduction == "sum":
            return weighted.sum()
        return weighted.sum() / weights.sum().clamp_min(torch.finfo(torch.float32).tiny)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


def preference_logit(r_a: torch.Tensor, r_b: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Logit of ``P(a preferred over b)``, per pair.

    * scalar rewards ``r_a, r_b: Tensor[N]`` (or ``[N, 1]``):  ``(r_a - r_b) / tau``;
    * GPM rewards ``r_a, r_b: Tensor[N, 2]``:  ``(a0 * b1 - a1 * b0) / tau``
      (the SPEC's ``(c0*r1 - c1*r0)/tau`` with ``c = a``, ``r = b``).

    The GPM form is antisymmetric (``logit(a, b) = -logit(b, a)``, ``logit(a, a) = 0``). It equals
    ``<R v_a, v_b>`` with the rotation ``R = [[0, 1], [-1, 0]]``; the GPM paper writes the
    opposite orientation (``R^T``), which only flips the learned head's direction: what matters is
    that training and scoring use this same function. A shape ``[N, 2]`` is always read as GPM.

    Returns ``Tensor[N]`` (float32).
    """
    _check_tau(tau)
    _check_same(r_a, r_b, "r_a, r_b")
    if r_a.ndim == 2 and r_a.shape[-1] == 2:
        a, b = _as_gpm_rewards(r_a, "r_a"), _as_gpm_rewards(r_b, "r_b")
        return (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]) / tau
    a, b = _as_scalar_rewards(r_a, "r_a"), _as_scalar_rewards(r_b, "r_b")
    return (a - b) / tau


def pairwise_probability(r_a: torch.Tensor, r_b: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """``P(a > b) = sigmoid(preference_logit(r_a, r_b, tau))``, ``Tensor[N]`` in ``[0, 1]``.

    Scalar rewards: ``sigmoid((r_a - r_b) / tau)``; GPM ``[N, 2]``:
    ``sigmoid((a0 * b1 - a1 * b0) / tau)``. Equal rewards give exactly 0.5.
    """
    return torch.sigmoid(preference_logit(r_a, r_b, tau))


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    tau: float = 0.1,
    *,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Bradley-Terry loss ``l_i = -log sigmoid((r_chosen_i - r_rejected_i) / tau)``.

    Shapes: ``r_chosen, r_rejected: Tensor[N]`` (or ``[N, 1]``); ``weights: Tensor[N]``; returns
    a scalar, or ``Tensor[N]`` with ``reduction="none"``. Equals ``softplus(-(rc - rr) / tau)``.
    """
    r_chosen = _as_scalar_rewards(r_chosen, "r_chosen")
    r_rejected = _as_scalar_rewards(r_rejected, "r_rejected")
    _check_same(r_chosen, r_rejected, "r_chosen, r_rejected")
    loss = -F.logsigmoid(preference_logit(r_chosen, r_rejected, tau))
    return _reduce(loss, weights, reduction)


def gpm_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    tau: float = 0.1,
    *,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """General-preference (GPM) loss for 2-d heads: ``l_i = -log sigmoid((c0*r1 - c1*r0) / tau)``.

    ``c = r_chosen[i] = (c0, c1)`` is the 2-d reward of the *chosen* image and
    ``r = r_rejected[i] = (r0, r1)`` that of the *rejected* one (SPEC section 1). The preference
    logit is :func:`preference_logit` (antisymmetric; see there for the orientation).

    Shapes: ``r_chosen, r_rejected: Tensor[N, 2]``; ``weights: Tensor[N]``; returns a scalar, or
    ``Tensor[N]`` with ``reduction="none"``.
    """
    _as_gpm_rewards(r_chosen, "r_chosen")
    _as_gpm_rewards(r_rejected, "r_rejected")
    _check_same(r_chosen, r_rejected, "r_chosen, r_rejected")
    loss = -F.logsigmoid(preference_logit(r_chosen, r_rejected, tau))
    return _reduce(loss, weights, reduction)


def unpaired_bce_loss(
    r: torch.Tensor,
    labels: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Binary cross-entropy on single-image rewards used as logits.

    ``l_i = -(y_i log sigmoid(r_i) + (1 - y_i) log(1 - sigmoid(r_i)))``, i.e.
    ``binary_cross_entropy_with_logits(r, y)``. ``y = 1`` is the positive class (e.g. safe = 1);
    soft labels in ``[0, 1]`` are allowed. No temperature: evaluation thresholds ``sigmoid(r)`` at
    0.5 on the same scale.

    Shapes: ``r: Tensor[N]`` (or ``[N, 1]``), ``labels: Tensor[N]`` (float, bool or int),
    ``weights: Tensor[N]``; returns a scalar, or ``Tensor[N]`` with ``reduction="none"``.
    """
    r = _as_scalar_rewards(r, "r")
    labels = torch.as_tensor(labels, device=r.device).float()
    if labels.ndim == 2 and labels.shape[-1] == 1:
        labels = labels.squeeze(-1)
    _check_same(r, labels, "r, labels")
    if bool(((labels < 0) | (labels > 1)).any()):
        raise ValueError("labels must lie in [0, 1] (1 = positive class, e.g. safe).")
    loss = F.binary_cross_entropy_with_logits(r, labels, reduction="none")
    return _reduce(loss, weights, reduction)


def paired_bce_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Paired BCE: each image of a pair is classified on its own, chosen = 1, rejected = 0.

    ``l_i = (-log sigmoid(rc_i) - log(1 - sigmoid(rr_i))) / 2
          = (softplus(-rc_i) + softplus(rr_i)) / 2``

    The ``1/2`` makes the mean equal to BCE-with-logits averaged over the ``2N`` images, the same
    scale as :func:`unpaired_bce_loss`. Shapes: ``r_chosen, r_rejected: Tensor[N]`` (or
    ``[N, 1]``); ``weights: Tensor[N]`` (per pair); returns a scalar, or ``Tensor[N]`` with
    ``reduction="none"``.
    """
    r_chosen = _as_scalar_rewards(r_chosen, "r_chosen")
    r_rejected = _as_scalar_rewards(r_rejected, "r_rejected")
    _check_same(r_chosen, r_rejected, "r_chosen, r_rejected")
    loss = 0.5 * (F.softplus(-r_chosen) + F.softplus(r_rejected))
    return _reduce(loss, weights, reduction)


__all__ = [
    "bradley_terry_loss",
    "gpm_loss",
    "paired_bce_loss",
    "pairwise_probability",
    "preference_logit",
    "unpaired_bce_loss",
]
