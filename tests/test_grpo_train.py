"""Flow-GRPO runs end to end: an interrupted run resumed from its checkpoint is bit-identical to an
uninterrupted one (EMA included), full-transformer training keeps a frozen reference, the export
loads in plain diffusers both ways (SD3, FLUX), and the acceptance command under DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny_flow import tiny_grpo_config

from alignment.grpo_trainer import GRPOTrainer

PROMPTS = ["a cat", "a dog", "a red circle", "a blue square"]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _run(out: Path, **kw) -> GRPOTrainer:
    base = dict(
        num_epochs=2,
        save_every=1,
        ema=True,
        ema_update_every=1,
        kl_coef=0.04,
        eval_every=1,
        log_with="tensorboard",
        log_images_every=1,
    )
    trainer = GRPOTrainer(tiny_grpo_config(out, **{**base, **kw}), prompts=PROMPTS)
    trainer.train()
    return trainer


def _trained(trainer: GRPOTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.trained_named_parameters() if p.requires_grad}


def _metrics(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in history]


def test_resume_from_latest_is_bit_identical_to_the_uninterrupted_run(tmp_path):
    straight = _run(tmp_path / "a")
    out = tmp_path / "a"
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [
        "checkpoint-000001",
        "checkpoint-000002",
    ]
    ckpt = out / "checkpoints" / "checkpoint-000002"
    assert (ckpt / "ema.safetensors").is_file()
    assert (ckpt / "model.safetensors").stat().st_size < 300_000  # LoRA weights only
    assert (out / "reward_curve.png").is_file() and list((out / "eval").glob("*.png"))
    h = straight.history
    assert "eval/reward_mean_initial" in h[0] and "eval/reward_mean" in h[1]

    _run(tmp_path / "b", num_epochs=1)  # interrupted after one epoch ...
    resumed = _run(tmp_path / "b", resume_from="latest")  # ... and resumed
    # every metric of both epochs bit for bit (the wall times aside)
    assert _metrics(resumed.history) == _metrics(straight.history)
    a, b = _trained(straight), _trained(resumed)
    assert any(v.abs().sum() > 0 for n, v in a.items() if "lora_B" in n)  # it trained
    assert all(torch.equal(a[n], b[n]) for n in a)
    for x, y in zip(straight.ema.shadow_params, resumed.ema.shadow_params):
        assert torch.equal(x, y)
    assert straight.ema.optimization_step == resumed.ema.optimization_step == 2

    assert json.loads((out / "history.json").read_text()) == h
    # a weights-only resume (another launch) restores the checkpoint's EMA too
    from safetensors.torch import load_file

    first = tmp_path / "b" / "checkpoints" / "checkpoint-000001"
    cfg = tiny_grpo_config(
        tmp_path / "b", ema=True, resume_from=str(first), resume_weights_only=True
    )
    again = GRPOTrainer(cfg, prompts=PROMPTS)
    assert again.maybe_resume() and again.epoch == 1
    stored = load_file(str(first / "ema.safetensors"))
    assert all(torch.equal(again.ema_state()[n], stored[n]) for n in stored)
    latest = resumed.ema_state()
    assert not all(torch.equal(again.ema_state()[n], latest[n]) for n in stored)
    _run(tmp_path / "c", num_epochs=1, ema=False)
    with pytest.raises(FileNotFoundError, match="written without EMA"):
        _run(tmp_path / "c", resume_from="latest")


def test_full_transformer_training_keeps_a_frozen_reference_for_the_kl(tmp_path):
    trainer = _run(
        tmp_path,
        use_lora=False,
        learning_rate=1e-4,
        gradient_accumulation_steps=1,
        num_epochs=1,
        save_every=0,
        eval_every=0,
    )
    ref = trainer.policy.reference_model
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    moved = [
        not torch.equal(p, q)
        for p, q in zip(trainer.policy.transformer.parameters(), ref.parameters())
    ]
    assert any(moved)  # the policy trained, the reference stayed
    assert trainer.history[0]["kl"] > 0
    assert len(trainer.trainable) == len(list(trainer.policy.transformer.parameters()))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_export_generates_in_plain_diffusers_merged_and_as_a_lora_file(tmp_path, kind):
    """The export (EMA weights) loads with the pipeline's own ``from_pretrained`` (LoRA merged,
    ``transformer/`` on its own) and as a LoRA file on the base model; both generate what the
    policy generates with its EMA weights (same ODE, same generator), which the base does not."""
    from _tiny_flow import saved_tiny_flow_pipeline
    from diffusers import FluxPipeline, SD3Transformer2DModel, StableDiffusion3Pipeline

    pipe_cls = StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline
    g = 3.0 if kind == "sd3" else 3.5
    export = tmp_path / "export"
    trainer = _run(
        tmp_path / "run",
        kind=kind,
        num_epochs=2,
        save_every=0,
        eval_every=0,
        gradient_accumulation_steps=1,
        export_dir=str(export),
    )
    assert trainer.ema is not None and (export / "pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "export.tmp").exists()
    policy = trainer.policy
    kw = dict(num_inference_steps=4, guidance_scale=g, height=32, width=32, output_type="pt")
    kw["max_sequence_length"] = policy.max_sequence_length

    def generate(pipe):
        return pipe("a cat", generator=torch.Generator().manual_seed(11), **kw).images

    with torch.no_grad():
        gen = torch.Generator().manual_seed(11)
        live = policy.sample(["a cat"], 4, 0.0, g, generator=gen, height=32).images
        with trainer.ema_weights():
            gen = torch.Generator().manual_seed(11)
            want = policy.sample(["a cat"], 4, 0.0, g, generator=gen, height=32).images
    assert (live - want).abs().max() > 1e-2  # the EMA lags the live weights: it is exported
    # max abs diff measured: SD3 1.0e-5 merged, 1.7e-5 LoRA file; FLUX 6.6e-7, 0 (issue: < 1e-3)
    merged = pipe_cls.from_pretrained(export)
    assert (generate(merged) - want).abs().max() < 1e-4
    if kind == "sd3":
        alone = SD3Transformer2DModel.from_pretrained(export / "transformer")
        assert sum(p.numel() for p in alone.parameters()) > 0
    base = pipe_cls.from_pretrained(saved_tiny_flow_pipeline(kind))
    before = generate(base)
    base.load_lora_weights(export)
    assert (generate(base) - want).abs().max() < 1e-4
    assert (before - want).abs().max() > 1e-2  # the tuned policy differs from the base


@pytest.mark.slow
def test_accelerate_launch_zero3_recipe_and_its_export_in_plain_diffusers(tmp_path):
    """The acceptance command (ZeRO-3; ZeRO-2 runs in tests/test_multiprocess.py on two ranks):
    `accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/grpo_sd3.py --config
    recipes/configs/grpo_tiny.yaml --output_dir OUT --export_dir OUT/export`, shortened to two
    epochs; the checkpoint holds DeepSpeed's files and the EMA, the export generates in plain
    diffusers, merged and as a LoRA file."""
    import subprocess
    import sys

    from _launch import ROOT, free_port, launch_env
    from diffusers import StableDiffusion3Pipeline

    from alignment.tiny_flow import tiny_sd3_pipeline

    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", "recipes/accelerate/zero3.yaml", "--num_cpu_threads_per_process", "1",
        "--main_process_port", str(free_port()),
        "recipes/grpo_sd3.py", "--config", "recipes/configs/grpo_tiny.yaml",
        "--output_dir", str(out), "--export_dir", str(out / "export"),
        "--num_epochs", "2", "--num_steps", "3", "--eval_num_steps", "3", "--eval_every", "1",
        "--save_every", "1", "--progress_bar", "false", "--log_with", "none",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == [0, 1] and "eval/reward_mean" in history[1]
    ckpt = out / "checkpoints" / "checkpoint-000002"
    assert (ckpt / "latest").is_file() and (ckpt / "ema.safetensors").is_file()
    kw = dict(num_inference_steps=3, guidance_scale=3.0, output_type="pt", max_sequence_length=16)
    gen = torch.Generator().manual_seed(0)
    merged = StableDiffusion3Pipeline.from_pretrained(out / "export")("a cat", generator=gen, **kw)
    base = tiny_sd3_pipeline()
    base.load_lora_weights(out / "export")
    gen = torch.Generator().manual_seed(0)
    lora = base("a cat", generator=gen, **kw)
    assert merged.images.shape == (1, 3, 32, 32) and torch.isfinite(merged.images).all()
    assert (merged.images - lora.images).abs().max() < 1e-4
