"""DRaFT-K / ReFL: x0 prediction and losses by hand, truncated gradients, DRaFT-1 learning a
differentiable toy reward (held-out seeds), the recipe with export."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline

from alignment.ddpo_trainer import evaluate_policy
from alignment.draft import mean_brightness, predict_x0, reward_loss, sample_with_grad
from alignment.draft_trainer import DraftConfig, DraftTrainer
from alignment.policy import DiffusionPolicy

PROMPTS = ["a cat", "a red circle", "a blue square", "a green tree"]


def test_predict_x0_and_losses_by_hand():
    sched = SimpleNamespace(
        alphas_cumprod=torch.tensor([0.9, 0.25]),
        config=SimpleNamespace(prediction_type="epsilon"),
    )
    x = torch.ones(1, 1, 1, 1)
    eps = torch.ones(1, 1, 1, 1)
    # (1 - sqrt(1 - 0.25) * 1) / sqrt(0.25) = 2 - sqrt(3)
    assert predict_x0(sched, eps, 1, x).item() == pytest.approx(2 - math.sqrt(3), rel=1e-6)
    sched.config.prediction_type = "v_prediction"
    # sqrt(0.25) * 1 - sqrt(0.75) * 1
    assert predict_x0(sched, eps, 1, x).item() == pytest.approx(0.5 - math.sqrt(0.75), rel=1e-6)
    r = torch.tensor([0.5, 1.5])
    assert reward_loss(r, "neg").item() == pytest.approx(-1.0)
    assert reward_loss(r, "relu", margin=1.0).item() == pytest.approx(0.25)  # (0.5 + 0) / 2


@pytest.fixture(scope="module")
def policy_factory():
    def make():
        return DiffusionPolicy.from_pretrained(
            "tiny",
            lora_rank=8,
            lora_target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv_out"],
        )

    return make


def test_truncated_graph_and_refl(policy_factory):
    policy = policy_factory()
    g = torch.Generator().manual_seed(0)
    out = sample_with_grad(policy, PROMPTS[:2], num_steps=4, grad_steps=1, generator=g)
    with torch.no_grad():
        ref = policy.sample(PROMPTS[:2], 4, 0.0, 5.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["images"].detach(), ref.images, rtol=0, atol=1e-6)  # 0.0
    out["images"].mean().backward()
    grads = [p.grad for p in policy.trainable_parameters() if p.grad is not None]
    assert grads and any(gr.abs().sum() > 0 for gr in grads)
    # ReFL: one UNet call with a graph at the stop step, x0 predicted in one step
    policy.unet.zero_grad(set_to_none=True)
    refl = sample_with_grad(policy, PROMPTS[:2], num_steps=4, stop_step=2, generator=g)
    assert refl["unet_calls"] == 3 and refl["images"].shape == (2, 3, 32, 32)
    reward_loss(mean_brightness(refl["images"], PROMPTS[:2]), "relu", 1.0).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())


def test_a_reward_without_a_graph_is_refused_by_its_own_name(policy_factory, tmp_path):
    def detached_score(images, prompts):
        return images.detach().mean(dim=(1, 2, 3))

    cfg = DraftConfig(
        pretrained_model="tiny",
        num_steps=2,
        max_steps=1,
        train_batch_size=2,
        output_dir=str(tmp_path / "run"),
        save_every=0,
        log_with="none",
        progress_bar=False,
    )
    trainer = DraftTrainer(cfg, policy=policy_factory(), prompts=PROMPTS, reward_fn=detached_score)
    with pytest.raises(ValueError, match="'detached_score' is not differentiable"):
        trainer.train()


@pytest.mark.slow
def test_draft1_raises_a_differentiable_reward_on_held_out_seeds(policy_factory, tmp_path):
    policy = policy_factory()
    held_out = [11, 12]  # training noise comes from the global RNG (seed 0), never these

    def held_out_reward():
        return evaluate_policy(policy, mean_brightness, PROMPTS, held_out, 8, 5.0, 0.0)

    before = held_out_reward()
    cfg = DraftConfig(
        pretrained_model="tiny",
        grad_steps=1,
        num_steps=8,
        eta=0.0,
        guidance_scale=5.0,
        max_steps=8,
        train_batch_size=4,
        learning_rate=3e-3,
        reward="brightness",
        output_dir=str(tmp_path / "run"),
        save_every=0,
        log_with="none",
        progress_bar=False,
        mixed_precision="no",
        seed=0,
    )
    history = DraftTrainer(cfg, policy=policy, prompts=PROMPTS).train()
    after = held_out_reward()
    print(
        f"\nDRaFT-1 brightness on held-out seeds: {before.mean():.4f} -> {after.mean():.4f} "
        f"(per-image std before {before.std():.4f}); train reward "
        f"{history[0]['reward_mean']:.4f} -> {history[-1]['reward_mean']:.4f}"
    )
    assert after.mean() > before.mean() + 3 * before.std() / before.numel() ** 0.5
    assert (after > before).float().mean() >= 0.75


def test_draft_recipe_exports_a_pipeline(tmp_path):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("draft_recipe", root / "recipes/draft_sd15.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = tmp_path / "run"
    history = recipe.main(
        [
            "--config",
            str(root / "recipes/configs/draft_tiny.yaml"),
            "--output_dir",
            str(out),
            "--export_dir",
            str(out / "export"),
            "--max_steps",
            "2",
            "--eval_every",
            "0",
            "--log_with",
            "none",
            "--progress_bar",
            "false",
            "--method",
            "refl",
        ]
    )
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
    assert (out / "checkpoints").is_dir()
    pipe = StableDiffusionPipeline.from_pretrained(out / "export")
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a cat", num_inference_steps=2, output_type="pt").images
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()


def test_gradients_reach_the_policy_through_a_tiny_llava_reward(tmp_path, policy_factory):
    """RewardScorer.as_reward_fn(weights, differentiable=True) as the DRaFT reward."""
    from reward.modeling import LlavaRewardModel
    from reward.scorer import RewardScorer
    from reward.testing import save_tiny_backbone

    save_tiny_backbone("llava", tmp_path / "bb")
    model = LlavaRewardModel.from_backbone(
        tmp_path / "bb", perspectives=("overall",), lora_config={"r": 4, "lora_alpha": 8}
    )
    model.requires_grad_(False)
    reward_fn = RewardScorer(model).as_reward_fn({"overall": 1.0}, differentiable=True)
    policy = policy_factory()
    out = sample_with_grad(
        policy, PROMPTS[:2], num_steps=3, grad_steps=1, generator=torch.Generator().manual_seed(0)
    )
    r = reward_fn(out["images"], PROMPTS[:2])
    assert r.shape == (2,) and r.requires_grad
    reward_loss(r, "neg").backward()
    grads = [p.grad for p in policy.trainable_parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_draft_k_on_a_flow_policy_raises_brightness_on_held_out_seeds_and_exports(tmp_path):
    """DRaFT-K on an SD 3-architecture policy (graph through the last K Euler steps): the
    brightness of held-out seeds rises, and the export loads in plain diffusers."""
    from diffusers import StableDiffusion3Pipeline

    from alignment.flow_policy import FlowPolicy

    policy = FlowPolicy.from_pretrained("tiny-sd3", lora_rank=4)
    held_out = [11, 12, 13]

    def held_out_reward():
        return evaluate_policy(policy, mean_brightness, PROMPTS, held_out, 4, 3.0, 0.0)

    before = held_out_reward()
    cfg = DraftConfig(
        pretrained_model="tiny-sd3",
        grad_steps=2,
        num_steps=4,
        guidance_scale=3.0,
        max_steps=6,
        train_batch_size=4,
        learning_rate=3e-2,
        reward="brightness",
        output_dir=str(tmp_path / "run"),
        export_dir=str(tmp_path / "export"),
        save_every=0,
        log_with="none",
        progress_bar=False,
        mixed_precision="no",
        seed=0,
    )
    trainer = DraftTrainer(cfg, policy=policy, prompts=PROMPTS)
    assert trainer.is_flow
    history = trainer.train()
    after = held_out_reward()
    print(
        f"\nflow DRaFT-2 brightness on held-out seeds: {before.mean():.4f} -> {after.mean():.4f}"
        f" (per-image std {before.std():.4f})"
    )
    assert all(math.isfinite(h["loss"]) for h in history)
    assert after.mean() > before.mean() + 3 * before.std() / before.numel() ** 0.5
    assert (after > before).float().mean() >= 0.75
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "export")
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a cat", num_inference_steps=2, output_type="pt").images
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()
