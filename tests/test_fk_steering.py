"""FK steering against best-of-N at the same seeds and particles, by value.

- Without resampling, FK's particles are best-of-N's images (same initial and step noise), so the
  scores and the selection are equal: checked on the tiny pipeline.
- With resampling, on a policy whose every DDIM step is affine (the UNet predicts zero noise and
  the decoder is the identity, so ``x0_hat = x_t / sqrt(abar_t)``, one step is
  ``x -> sqrt(abar_prev / abar_t) x + sigma z``, and the reward is the mean of ``x0_hat``), a
  particle ``k`` that takes the state of particle ``j`` at the resampling step ``s`` and then
  keeps its own noise ends with exactly ``score_bon[k] + sqrt(abar_final) * (r_s[j] - r_s[k])``,
  where ``r_s`` are the rewards FK saw at step ``s``. Greedy resampling (large lambda) must pick
  ``j = argmax r_s`` for every particle; a finite lambda picks some ``j`` of the same prompt.
"""

from __future__ import annotations

import math

import torch

from alignment.draft import mean_brightness
from alignment.policy import DiffusionPolicy
from alignment.scaling import best_of_n, fk_steering

PROMPTS = ["a cat", "a red circle"]


def test_fk_without_resampling_is_best_of_n_on_the_same_seeds():
    policy = DiffusionPolicy.from_pretrained("tiny", use_lora=False)
    kw = dict(num_steps=4, eta=1.0, guidance_scale=2.0, seed=7)
    bon = best_of_n(policy, PROMPTS, mean_brightness, n=3, keep_all=True, **kw)
    # no resampling step at all, and resampling steps whose ESS never falls below the threshold
    for extra in ({"resample_start": 0.5, "resample_end": 0.5}, {"ess_threshold": 1e-9}):
        fk = fk_steering(
            policy, PROMPTS, mean_brightness, num_particles=3, resample_every=1, keep_all=True,
            **extra, **kw,
        )  # fmt: skip
        assert fk.info["resampled_prompts"] == [0] * len(fk.info["resample_steps"])
        # measured max |diff| 0.0 (scores) and 0.0 (images)
        torch.testing.assert_close(fk.scores, bon.scores, atol=1e-6, rtol=0)
        torch.testing.assert_close(fk.all_images, bon.all_images, atol=1e-6, rtol=0)
        assert torch.equal(fk.best_index, bon.best_index)
        assert fk.unet_evals == bon.unet_evals


class _AffinePolicy(DiffusionPolicy):
    """A policy whose UNet predicts zero noise and whose decoder is the identity (3 x 2 x 2
    latents), with SD's DDIM schedule."""

    device = torch.device("cpu")

    def __init__(self) -> None:  # no pipeline: only what sampling needs
        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )

    def encode_prompts(self, prompts):
        return torch.zeros(len(prompts), 1, 1)

    def negative_embeds(self, batch_size):
        return torch.zeros(batch_size, 1, 1)

    def latent_shape(self, batch_size, height=None):
        return (batch_size, 3, 2, 2)

    def predict_noise(self, latents, t, embeds, guidance_scale=1.0, negative_embeds=None):
        return torch.zeros_like(latents)

    def decode(self, latents):
        return latents.float()


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def __call__(self, images, prompts):
        r = mean_brightness(images, prompts)
        self.calls.append(r.clone())
        return r


def _run(lmbda: float, k: int = 4, steps: int = 6, at: int = 3):
    policy = _AffinePolicy()
    kw = dict(num_steps=steps, eta=1.0, guidance_scale=1.0, seed=3)
    bon = best_of_n(policy, PROMPTS, mean_brightness, n=k, **kw)
    rec = _Recorder()
    fk = fk_steering(
        policy, PROMPTS, rec, num_particles=k, lmbda=lmbda, resample_every=steps,
        resample_start=at / steps, resample_end=(at + 1) / steps, **kw,
    )  # fmt: skip
    assert fk.info["resample_steps"] == [at] and len(rec.calls) == 2
    r_s = rec.calls[0].reshape(len(PROMPTS), k)  # the rewards of x0_hat at the resampling step
    scale = math.sqrt(float(policy.scheduler.final_alpha_cumprod))
    return bon, fk, r_s, scale


def test_greedy_fk_copies_the_best_particle_at_the_resampling_step():
    bon, fk, r_s, scale = _run(lmbda=1e6)
    want = bon.scores + scale * (r_s.max(dim=1, keepdim=True).values - r_s)
    # measured max |diff| 4.8e-7 (float32)
    torch.testing.assert_close(fk.scores, want, atol=1e-5, rtol=0)
    assert (want - bon.scores).abs().max() > 0.05  # resampling moved the particles
    assert (fk.scores >= bon.scores - 1e-6).all()  # and each one only upwards
    assert fk.best_scores.mean() > bon.best_scores.mean()


def test_fk_with_a_finite_temperature_resamples_within_each_prompt():
    bon, fk, r_s, scale = _run(lmbda=20.0)
    # each particle ends as bon + scale * (r_s[j] - r_s[k]) for an ancestor j of its own prompt
    cand = bon.scores[:, :, None] + scale * (r_s[:, None, :] - r_s[:, :, None])  # [P, k, j]
    err = (cand - fk.scores[:, :, None]).abs()
    assert (err.min(dim=2).values < 1e-5).all()  # float32, as above (4.8e-7)
    ancestor = err.argmin(dim=2)
    assert (ancestor != torch.arange(4)).any()  # some particle took another's state
    # the weights favour the better particles: the mean ancestor reward is above the mean reward
    assert torch.gather(r_s, 1, ancestor).mean() > r_s.mean()
