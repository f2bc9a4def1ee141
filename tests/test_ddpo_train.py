"""DDPO training loop: resume continues identically, export loads both ways, DeepSpeed ZeRO-2/3
through `accelerate launch`, and the learning test (held-out reward rises above seed noise)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _launch import free_port, launch_env
from _tiny_sd import saved_tiny_pipeline, tiny_ddpo_config
from diffusers import StableDiffusionPipeline

from alignment.ddpo_trainer import DDPOConfig, DDPOTrainer, evaluate_policy
from alignment.policy import DiffusionPolicy
from alignment.rewards import get_reward_fn

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a cat", "a dog", "a red circle"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _config(out: Path, **kw) -> DDPOConfig:
    base = dict(save_every=1, log_with="tensorboard", log_images_every=1, num_log_images=2)
    return tiny_ddpo_config(out, **{**base, **kw})


def _train(cfg: DDPOConfig) -> DDPOTrainer:
    trainer = DDPOTrainer(cfg, prompts=PROMPTS)
    trainer.train()
    return trainer


def _lora(trainer: DDPOTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.policy.unet.named_parameters() if "lora" in n}


def test_temporal_discount_reweights_the_update_and_one_keeps_plain_ddpo(tmp_path):
    """``temporal_discount`` only reweights the per-timestep losses: 1.0 equals the default run
    bit for bit, 0.3 (the first steps count most) trains other weights from the same samples."""
    kw = dict(num_epochs=1, save_every=0, log_with="none", log_images_every=0)
    plain = _train(_config(tmp_path / "a", **kw))
    one = _train(_config(tmp_path / "b", temporal_discount=1.0, **kw))
    low = _train(_config(tmp_path / "c", temporal_discount=0.3, **kw))
    assert plain.history[0]["reward_mean"] == low.history[0]["reward_mean"]  # same samples
    a, b, c = _lora(plain), _lora(one), _lora(low)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.allclose(a[n], c[n]) for n in a if "lora_B" in n)


def test_images_per_prompt_samples_groups_and_normalises_within_them(tmp_path):
    """``images_per_prompt=k`` draws each sampling batch as ``B / k`` prompts x k images, so the
    per-prompt tracker (``stat_min_count <= k``) compares each image with its own prompt's."""
    cfg = _config(tmp_path, images_per_prompt=2, stat_min_count=2, save_every=0, log_with="none")
    trainer = DDPOTrainer(cfg, prompts=PROMPTS)
    samples, _ = trainer.sample_epoch()
    prompts = samples["prompts"]
    assert len(prompts) == 4 and prompts[0] == prompts[1] and prompts[2] == prompts[3]
    adv, _ = trainer.compute_advantages(prompts, samples["rewards"])
    # a fresh prompt's rewards normalise by their own mean and population std (both batches may
    # have drawn the same prompt: then its four rewards normalise together)
    r = samples["rewards"].double()
    for p in set(prompts):
        idx = [i for i, q in enumerate(prompts) if q == p]
        want = (r[idx] - r[idx].mean()) / (r[idx].std(unbiased=False) + 1e-6)
        torch.testing.assert_close(adv[idx], want.float(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="images_per_prompt"):
        _config(tmp_path, images_per_prompt=3)


def test_resume_continues_identically_and_export_loads_both_ways(tmp_path):
    straight = _train(_config(tmp_path / "a"))
    h = straight.history
    assert [r["epoch"] for r in h] == [0, 1] and straight.global_step == 2
    for key in ("reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "time/sampling"):
        assert key in h[0]
    out = tmp_path / "a"
    assert (out / "reward_curve.png").stat().st_size > 1000
    assert list((out / "samples").glob("*.png")) and list((out / "logs").rglob("events.*"))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [
        "checkpoint-000001",
        "checkpoint-000002",
    ]
    ckpt_weights = out / "checkpoints" / "checkpoint-000002" / "model.safetensors"
    assert ckpt_weights.stat().st_size < 200_000  # trainable (LoRA) weights only

    # interrupted after one epoch, then resumed from "latest"
    _train(_config(tmp_path / "b", num_epochs=1))
    resumed = _train(_config(tmp_path / "b", num_epochs=2, resume_from="latest"))
    assert [r["epoch"] for r in resumed.history] == [0, 1]
    assert resumed.stat_tracker.state_dict() == straight.stat_tracker.state_dict()
    for key in ("reward_mean", "reward_std", "loss", "approx_kl"):
        assert resumed.history[1][key] == pytest.approx(h[1][key], rel=1e-6, abs=1e-9)
    a, b = _lora(straight), _lora(resumed)
    assert any(v.abs().sum() > 0 for n, v in a.items() if "lora_B" in n)  # it trained
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-7)

    # export: a full pipeline (LoRA merged) and the LoRA file; both reproduce the policy
    export = tmp_path / "export"
    straight.export(str(export))
    assert (export / "unet" / "config.json").is_file()
    assert (export / "pytorch_lora_weights.safetensors").is_file()
    kw = dict(num_inference_steps=4, eta=1.0, guidance_scale=2.0, output_type="pt")
    with torch.no_grad():
        want = straight.policy.sample(
            ["a cat"], 4, 1.0, 2.0, generator=torch.Generator().manual_seed(11)
        ).images
    merged = StableDiffusionPipeline.from_pretrained(export)
    got = merged("a cat", generator=torch.Generator().manual_seed(11), **kw).images
    torch.testing.assert_close(got, want, rtol=0, atol=5e-6)  # merged LoRA: measured 4.8e-7
    base = StableDiffusionPipeline.from_pretrained(saved_tiny_pipeline())
    before = base("a cat", generator=torch.Generator().manual_seed(11), **kw).images
    base.load_lora_weights(export)
    got2 = base("a cat", generator=torch.Generator().manual_seed(11), **kw).images
    torch.testing.assert_close(got2, want, rtol=0, atol=1e-6)  # measured 0.0
    assert (before - want).abs().max() > 1e-3  # the tuned policy differs from the base


def test_kl_penalty_and_full_unet(tmp_path):
    lora_kl = _train(
        _config(
            tmp_path / "kl",
            num_epochs=1,
            save_every=0,
            kl_coef=0.1,
            timesteps_per_call=1,
            log_with="none",
        )
    )
    rec = lora_kl.history[0]
    assert "kl" in rec and rec["kl"] >= 0 and torch.isfinite(torch.tensor(rec["loss"]))
    full = _train(
        _config(
            tmp_path / "full",
            num_epochs=1,
            save_every=0,
            use_lora=False,
            kl_coef=0.1,
            learning_rate=1e-5,
            log_with="none",
            export_dir=str(tmp_path / "full_export"),
        )
    )
    assert full.history[0]["kl"] >= 0
    assert not (tmp_path / "full_export" / "pytorch_lora_weights.safetensors").exists()
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "full_export")
    img = pipe("a dog", num_inference_steps=2, output_type="pt").images
    assert img.shape == (1, 3, 32, 32)


def _launch(zero: int, out: Path, *extra: str) -> dict:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", f"recipes/accelerate/zero{zero}.yaml",
        "--main_process_port", str(free_port()),
        "--num_cpu_threads_per_process", "1",
        "recipes/ddpo_sd15.py", "--config", "recipes/configs/ddpo_tiny.yaml",
        "--pretrained_model", str(saved_tiny_pipeline()), "--output_dir", str(out),
        "--num_steps", "2", "--sample_batch_size", "2", "--num_batches_per_epoch", "1",
        "--train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--timesteps_per_call", "2", "--save_every", "1", "--progress_bar", "false",
        "--log_with", "none", *extra,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "history.json").read_text())


def _generates(folder: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    img = pipe("a cat", num_inference_steps=2, output_type="pt").images
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()


@pytest.mark.slow
def test_accelerate_launch_deepspeed_zero2_resume_and_zero3(tmp_path):
    out2 = tmp_path / "z2"
    first = _launch(2, out2, "--num_epochs", "1")
    ckpt = out2 / "checkpoints" / "checkpoint-000001"
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "latest").is_file()
    resumed = _launch(
        2,
        out2,
        "--num_epochs",
        "2",
        "--resume_from",
        "latest",
        "--export_dir",
        str(out2 / "export"),
    )
    assert [r["epoch"] for r in resumed] == [0, 1]
    assert resumed[0] == first[0]  # restored from the checkpoint, not re-run
    _generates(out2 / "export")

    out3 = tmp_path / "z3"
    hist = _launch(3, out3, "--num_epochs", "1", "--export_dir", str(out3 / "export"))
    assert len(hist) == 1 and (out3 / "checkpoints" / "checkpoint-000001" / "latest").is_file()
    assert (out3 / "export" / "pytorch_lora_weights.safetensors").is_file()
    _generates(out3 / "export")


@pytest.mark.slow
def test_ddpo_raises_held_out_brightness_above_seed_noise(tmp_path):
    """Learning test: 6 DDPO epochs (16 samples each, one optimiser step per epoch) on mean
    brightness raise the mean reward on held-out prompts and seeds by far more than the
    seed-to-seed noise of that mean, measured on the base policy with disjoint seed sets."""
    cfg = _config(
        tmp_path,
        num_steps=6,
        guidance_scale=3.0,
        sample_batch_size=8,
        num_batches_per_epoch=2,
        train_batch_size=8,
        gradient_accumulation_steps=2,
        timesteps_per_call=6,
        lora_rank=8,
        lora_target_modules="to_q,to_k,to_v,to_out.0,conv_out",
        learning_rate=1e-2,
        clip_range=1e-3,
        stat_min_count=1000,
        num_epochs=6,
        save_every=0,
        log_with="none",
        log_images_every=0,
        seed=0,
    )
    policy = DiffusionPolicy.from_pretrained(
        cfg.pretrained_model, lora_rank=8, lora_target_modules=cfg.lora_target_modules.split(",")
    )
    reward = get_reward_fn("brightness")
    held_out = ["a photo of a horse", "a small boat", "a bird in the sky", "a red house"]
    train_prompts = ["a cat", "a dog", "a tree", "a car", "a blue square", "a person"]

    def held_out_mean(seed_sets):
        r = evaluate_policy(policy, reward, held_out, seed_sets, cfg.num_steps, 3.0)
        return r.mean(dim=1)  # [seeds]

    eval_seeds = [100, 101]
    before = held_out_mean(eval_seeds)
    # seed-to-seed noise of the held-out mean: the base policy on 4 disjoint seed sets
    other = held_out_mean(list(range(200, 208))).reshape(4, 2).mean(dim=1)
    noise = torch.cat([other, before.mean().reshape(1)]).std().item()
    trainer = DDPOTrainer(cfg, policy=policy, prompts=train_prompts)
    trainer.train()
    after = held_out_mean(eval_seeds)
    gain = (after.mean() - before.mean()).item()
    train_curve = [r["reward_mean"] for r in trainer.history]
    print(f"held-out gain {gain:.4f}, seed noise {noise:.4f}, train curve {train_curve}")
    assert gain > 4 * noise, (gain, noise)
    assert torch.all(after > before)  # better on every held-out seed
