"""The maths of the DDPO trainer, by value, through its public steps (``sample_epoch``
and ``train_on_samples``) on the tiny pipeline:

- at learning rate 0 the recomputed log-probs equal the sampled ones (PPO ratios exactly 1), which
  holds only if latents, next latents, timesteps, embeddings and old log-probs stay aligned through
  the sample shuffle and the per-sample timestep permutation;
- the KL penalty adds exactly ``kl_coef`` times the gradient of the KL term to the gradient;
- the temporal-discount weight of every (sample, denoising step), recovered from the gradient.

Gradients are read with hooks on the trainable parameters (the sum over every backward of a call),
so the tests do not depend on how the trainer accumulates or steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _tiny_sd import saved_tiny_pipeline

from alignment.ddpo import gaussian_kl
from alignment.ddpo_trainer import DDPOConfig, DDPOTrainer

PROMPTS = ["a cat", "a dog", "a red circle", "a blue square"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _trainer(out: Path, **kw) -> DDPOTrainer:
    base = dict(
        pretrained_model=str(saved_tiny_pipeline()),
        output_dir=str(out),
        reward="brightness",
        num_steps=4,
        eta=1.0,
        guidance_scale=2.0,
        sample_batch_size=4,
        num_batches_per_epoch=1,
        train_batch_size=2,
        gradient_accumulation_steps=1,
        timesteps_per_call=1,
        lora_rank=4,
        # the config refuses 0; 1e-30 moves no float32 weight (checked below: weights unchanged)
        learning_rate=1e-30,
        adam_weight_decay=0.0,
        max_grad_norm=1e9,
        clip_range=1e-4,
        stat_min_count=1,
        num_epochs=1,
        save_every=0,
        log_with="none",
        log_images_every=0,
        async_reward=False,
        progress_bar=False,
        mixed_precision="no",
        seed=5,
    )
    base.update(kw)
    trainer = DDPOTrainer(DDPOConfig(**base), prompts=PROMPTS)
    with torch.no_grad():  # move the policy off the reference (LoRA B starts at zero)
        for name, p in trainer.policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    return trainer


class _GradSum:
    """Sum of the gradients that every backward sends to ``params`` (before any clipping)."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.total = [torch.zeros_like(p) for p in params]
        self._handles = [p.register_hook(self._add(i)) for i, p in enumerate(params)]

    def _add(self, i: int):
        def hook(grad: torch.Tensor) -> None:
            self.total[i] += grad.detach()

        return hook

    def close(self) -> torch.Tensor:
        for h in self._handles:
            h.remove()
        return torch.cat([g.flatten() for g in self.total])


def _flat_grad(value: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)]
    )


@pytest.mark.parametrize(
    ("timestep_fraction", "timesteps_per_call"), [(0.5, 1), (0.75, 3)], ids=["half-1", "3of4-3"]
)
def test_learning_rate_zero_gives_ratios_of_exactly_one(
    tmp_path, timestep_fraction, timesteps_per_call
):
    """Two inner epochs over four samples of four different prompts, a random subset of the
    timesteps each: any misalignment between what was sampled and what is re-scored (a latent
    paired with another step's timestep, another sample's embedding or log-prob) moves the
    log-prob by far more than 1e-10."""
    trainer = _trainer(
        tmp_path,
        num_inner_epochs=2,
        timestep_fraction=timestep_fraction,
        timesteps_per_call=timesteps_per_call,
    )
    samples, _ = trainer.sample_epoch()
    assert len(set(samples["prompts"])) > 1
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])  # non-zero, so the PPO loss has a gradient
    before = [p.detach().clone() for p in trainer.trainable]
    info = trainer.train_on_samples(samples, adv)
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.trainable))  # "lr 0": unchanged
    # measured approx_kl 0.0 (the same float32 UNet calls); a latent re-scored at another step's
    # timestep gives ~1e2, another sample's embedding ~3e-5, another step's old log-prob ~2
    assert info["approx_kl"] < 1e-10
    assert info["clipfrac"] == 0.0


def test_kl_penalty_adds_kl_coef_times_the_gradient_of_the_kl(tmp_path):
    """grad(loss with kl_coef c) - grad(loss with kl_coef 0) == c * grad(KL term), where the KL
    term is the mean over every trained (sample, step) of the exact Gaussian KL between the
    policy's and the reference's DDIM step (one optimiser step spans all of them here)."""
    c = 0.3
    trainer = _trainer(tmp_path, train_batch_size=4, timesteps_per_call=4, kl_coef=c)
    samples, _ = trainer.sample_epoch()
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75])
    params = trainer.trainable
    grads = {}
    for coef in (0.0, c):
        trainer.config.kl_coef = coef
        torch.manual_seed(0)  # the same shuffles for both runs
        rec = _GradSum(params)
        info = trainer.train_on_samples(samples, adv)
        grads[coef] = rec.close()
    # the KL term by hand: policy vs reference (adapter off) step means, shared std
    policy, cfg = trainer.policy, trainer.config
    n, steps = samples["latents"].shape[:2]
    x = samples["latents"].flatten(0, 1)
    t = samples["timesteps"].flatten(0, 1)
    emb = samples["embeds"].repeat_interleave(steps, dim=0)
    mean, std = policy.step_distribution(x, t, emb, cfg.guidance_scale, cfg.eta)
    with torch.no_grad(), policy.reference():
        ref_mean, _ = policy.step_distribution(x, t, emb, cfg.guidance_scale, cfg.eta)
    kl = gaussian_kl(mean, ref_mean, std).mean()
    assert info["kl"] == pytest.approx(kl.item(), rel=1e-5)  # measured rel 1e-7
    g_kl = _flat_grad(kl, params)
    assert g_kl.norm() > 0.1 * grads[0.0].norm()  # the KL gradient is not negligible here
    diff = grads[c] - grads[0.0]
    # measured max |diff - c g_kl| = 2.3e-6 of max |c g_kl| (1.2e-5 with other shuffles)
    torch.testing.assert_close(diff, c * g_kl, atol=1e-4 * (c * g_kl).abs().max().item(), rtol=0)


def test_temporal_discount_weight_of_each_step_recovered_from_the_gradient(tmp_path):
    """A 3-step run with temporal_discount 0.5: at ratio 1 the gradient is
    ``sum_{i,k} w_k * (-A_i) / N * grad log p_{i,k}`` (N = samples x steps in the optimiser step),
    so solving for the coefficient of each (sample i, step k) gradient gives ``w_k``, which must
    be ``0.5^k / mean_j(0.5^j)`` for the k-th denoising step (k = 0 from pure noise), whatever
    order the trainer visits the steps in."""
    trainer = _trainer(
        tmp_path,
        num_steps=3,
        temporal_discount=0.5,
        sample_batch_size=2,
        train_batch_size=2,
        timesteps_per_call=1,
    )
    samples, _ = trainer.sample_epoch()
    adv = torch.tensor([1.0, -2.0])
    params = trainer.trainable
    rec = _GradSum(params)
    torch.manual_seed(3)
    trainer.train_on_samples(samples, adv)
    total = rec.close()
    policy, cfg = trainer.policy, trainer.config
    columns, keys = [], []
    for i in range(2):
        for k in range(3):
            lp = policy.log_prob(
                samples["latents"][i : i + 1, k],
                samples["next_latents"][i : i + 1, k],
                samples["timesteps"][i : i + 1, k],
                samples["embeds"][i : i + 1],
                cfg.guidance_scale,
                cfg.eta,
            )
            columns.append(_flat_grad(lp.sum(), params))
            keys.append((i, k))
    basis = torch.stack(columns, dim=1).double()  # [P, 6]
    coef = torch.linalg.lstsq(basis, total.double().unsqueeze(1)).solution.flatten()
    residual = (basis @ coef - total.double()).norm() / total.double().norm()
    assert residual < 1e-4  # the gradient lies in the span: measured 7.9e-6
    n_rows = 2 * 3
    weights = torch.tensor([-c * n_rows / adv[i] for (i, _), c in zip(keys, coef)]).reshape(2, 3)
    want = torch.tensor([1.0, 0.5, 0.25]).double() * 3 / 1.75  # 0.5^k, mean 1 over the 3 steps
    # rows: samples; columns: denoising step k. Measured max relative error 5e-4 (float32
    # gradients); a weight on the wrong step is off by a factor of 2 or more.
    torch.testing.assert_close(weights, want.expand(2, 3), rtol=5e-3, atol=0)
