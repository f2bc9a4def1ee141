"""v-prediction and sample-prediction models in the DDIM posterior (DDPO's step distribution,
:func:`alignment.ddpo.ddim_posterior`) and in the Diffusion-DPO target
(:func:`alignment.dpo.denoising_target`), against values computed by hand from the formulas and
against diffusers' own ``DDIMScheduler.step``.

The scheduler has a constant beta of 0.1, so ``abar_t = 0.9 ** (t + 1)``; 10 training steps and 5
DDIM steps give the timesteps ``[8, 6, 4, 2, 0]``; the step from ``t = 4`` goes to ``t = 2``.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from alignment.ddpo import ddim_posterior, ddim_step_with_logprob
from alignment.dpo import denoising_target

A_T, A_P = 0.9**5, 0.9**3  # t = 4 and the previous DDIM timestep 2


def _scheduler(prediction_type: str = "epsilon", **kw) -> DDIMScheduler:
    s = DDIMScheduler(
        num_train_timesteps=10,
        beta_start=0.1,
        beta_end=0.1,
        beta_schedule="linear",
        clip_sample=kw.pop("clip_sample", False),
        set_alpha_to_one=True,
        prediction_type=prediction_type,
        **kw,
    )
    s.set_timesteps(5)
    return s


def _hand_posterior(x: float, out: float, kind: str, eta: float, clip: float | None = None):
    """DDIM posterior mean and std for one scalar latent ``x_t`` and model output ``out``."""
    a, ap = A_T, A_P
    if kind == "epsilon":
        x0, eps = (x - math.sqrt(1 - a) * out) / math.sqrt(a), out
    elif kind == "v_prediction":
        x0 = math.sqrt(a) * x - math.sqrt(1 - a) * out
        eps = math.sqrt(a) * out + math.sqrt(1 - a) * x
    else:  # sample
        x0, eps = out, (x - math.sqrt(a) * out) / math.sqrt(1 - a)
    if clip is not None:  # the clean estimate is clipped; eps stays the model's (as diffusers)
        x0 = max(-clip, min(clip, x0))
    sigma = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
    return math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma**2) * eps, sigma


X = [1.0, -0.5, 0.25]
OUT = [0.5, 0.25, -1.5]


def _as_latent(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).reshape(1, len(values), 1, 1)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_posterior_by_hand_for_each_prediction_type(kind, eta):
    mean, std = ddim_posterior(_scheduler(kind), _as_latent(OUT), 4, _as_latent(X), eta)
    want = [_hand_posterior(x, o, kind, eta) for x, o in zip(X, OUT)]
    # float32 arithmetic against Python floats: measured max |diff| 2.4e-7 (mean), 0 (std)
    torch.testing.assert_close(
        mean.flatten(), torch.tensor([m for m, _ in want]), atol=1e-6, rtol=0
    )
    assert std.item() == pytest.approx(want[0][1], rel=1e-6)


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_ddim_posterior_clips_the_clean_estimate_not_the_noise(kind):
    # outputs large enough that x0 leaves [-1, 1]
    out = [3.0, -2.5, 0.1] if kind == "sample" else [-4.0, 3.0, 0.1]
    s = _scheduler(kind, clip_sample=True, clip_sample_range=1.0)
    mean, _ = ddim_posterior(s, _as_latent(out), 4, _as_latent(X), 1.0)
    want = [_hand_posterior(x, o, kind, 1.0, clip=1.0)[0] for x, o in zip(X, out)]
    torch.testing.assert_close(mean.flatten(), torch.tensor(want), atol=1e-6, rtol=0)
    unclipped = [_hand_posterior(x, o, kind, 1.0)[0] for x, o in zip(X, out)]
    assert max(abs(a - b) for a, b in zip(want, unclipped)) > 0.1  # the clip mattered


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("extra", [{}, {"thresholding": True, "sample_max_value": 1.2}])
def test_ddim_step_equals_diffusers_for_each_prediction_type(kind, extra):
    """The sampled step (eta 1, same generator) and the deterministic step (eta 0) are those of
    ``DDIMScheduler.step``, also with dynamic thresholding of the clean estimate."""
    s = _scheduler(kind, **extra)
    g = torch.Generator().manual_seed(0)
    x_t, out = 2 * torch.randn(2, 4, 3, 3, generator=g), 2 * torch.randn(2, 4, 3, 3, generator=g)
    for eta in (0.0, 1.0):
        ours, _ = ddim_step_with_logprob(
            s, out, 6, x_t, eta=eta, generator=torch.Generator().manual_seed(1)
        )
        ref = s.step(out, 6, x_t, eta=eta, generator=torch.Generator().manual_seed(1)).prev_sample
        torch.testing.assert_close(ours, ref, atol=2e-6, rtol=0)  # measured 0.0


def test_ddim_posterior_refuses_unknown_types_and_an_unset_schedule():
    s = _scheduler()
    s.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type"):
        ddim_posterior(s, _as_latent(OUT), 4, _as_latent(X))
    fresh = DDIMScheduler(num_train_timesteps=10)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_posterior(fresh, _as_latent(OUT), 4, _as_latent(X))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_dpo_target_by_hand_for_each_prediction_type(kind):
    s = _scheduler(kind)
    x0 = torch.tensor([0.8, -0.3]).reshape(2, 1, 1, 1)
    noise = torch.tensor([-1.2, 0.6]).reshape(2, 1, 1, 1)
    t = torch.tensor([4, 0])  # abar 0.9^5 and 0.9 (one timestep per sample)
    abar = [0.9**5, 0.9]
    if kind == "epsilon":
        want = [-1.2, 0.6]
    elif kind == "sample":
        want = [0.8, -0.3]
    else:  # v = sqrt(abar) eps - sqrt(1 - abar) x0
        want = [
            math.sqrt(a) * e - math.sqrt(1 - a) * x
            for a, e, x in zip(abar, [-1.2, 0.6], [0.8, -0.3])
        ]
    got = denoising_target(s, x0, noise, t)
    torch.testing.assert_close(got.flatten(), torch.tensor(want), atol=1e-6, rtol=0)
    if kind == "v_prediction":  # diffusers' own definition agrees
        torch.testing.assert_close(got, s.get_velocity(x0, noise, t), atol=1e-6, rtol=0)
    s.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type"):
        denoising_target(s, x0, noise, t)


@pytest.mark.parametrize(("train_steps", "steps"), [(10, 5), (10, 3)], ids=["10-5", "10-3"])
def test_every_step_of_a_schedule_equals_diffusers(train_steps, steps):
    """Every timestep of the schedule: the step to t = 0 (abar_0, not the final alpha), the last
    step (the final alpha 1), and a step count that does not divide the training steps (10 // 3:
    the previous timestep is t - 3, an integer); in float64, so the noise is drawn in float64."""
    s = DDIMScheduler(
        num_train_timesteps=train_steps,
        beta_start=0.1,
        beta_end=0.1,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
    )
    s.set_timesteps(steps)
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    out = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    for t in s.timesteps.tolist():
        for eta in (0.0, 1.0):
            ours, _ = ddim_step_with_logprob(
                s, out, t, x_t, eta=eta, generator=torch.Generator().manual_seed(t)
            )
            ref = s.step(out, t, x_t, eta=eta, generator=torch.Generator().manual_seed(t))
            assert ours.dtype == torch.float64
            # float32 maths against diffusers' float64: measured max |diff| 3.1e-7
            torch.testing.assert_close(ours, ref.prev_sample, atol=2e-6, rtol=0)


def test_deterministic_step_draws_no_noise_and_eta_defaults_to_one():
    s = _scheduler()
    x_t, out = torch.randn(3, 2, 1, 1), torch.randn(3, 2, 1, 1)  # batch 3, 2 channels
    g = torch.Generator().manual_seed(4)
    _, lp = ddim_step_with_logprob(s, out, 4, x_t, eta=0.0, generator=g)
    assert lp.shape == (3,) and torch.all(lp == 0)
    # the generator was not touched: its next draw is a fresh generator's first
    assert torch.equal(
        torch.randn(3, generator=g), torch.randn(3, generator=torch.Generator().manual_seed(4))
    )
    mean, std = ddim_posterior(s, out, 4, x_t)  # eta 1 by default (DDPO)
    mean1, std1 = ddim_posterior(s, out, 4, x_t, 1.0)
    assert torch.equal(mean, mean1) and torch.equal(std, std1)
    a = ddim_step_with_logprob(s, out, 4, x_t, generator=torch.Generator().manual_seed(1))
    b = ddim_step_with_logprob(s, out, 4, x_t, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
