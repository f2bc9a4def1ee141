"""The bundled tiny-world Stable Diffusion pipeline: loads offline and draws better than random."""

from __future__ import annotations

import pytest
import torch

from alignment.world.grammar import split_scenes
from alignment.world.oracle import oracle_scores
from alignment.world.pretrain import (
    BUNDLED_FLOW_PIPELINE,
    BUNDLED_PIPELINE,
    PretrainConfig,
    build_pipeline,
    generate,
)


def test_bundled_pipeline_is_small_safetensors_and_loads():
    files = [p for p in BUNDLED_PIPELINE.rglob("*") if p.is_file()]
    assert (BUNDLED_PIPELINE / "model_index.json").exists()
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)


def test_the_three_bundled_models_stay_under_10_mb_in_safetensors():
    weights = BUNDLED_PIPELINE.parent
    files = [p for p in weights.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    assert {p.name for p in weights.iterdir() if p.is_dir()} >= {
        "tiny-world-sd",
        "tiny-world-sd3",
        "tiny-world-reward",
    }
    bins = [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pth")]
    assert not bins


def test_bundled_flow_pipeline_draws_held_out_pairs_far_better_than_random_init():
    """The SD 3-architecture world model: background, colour and position of held-out captions
    right most of the time (its shape is what fine-tuning is for), far above a random-init
    pipeline of the same sizes; the float16 transformer loads as float32."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(BUNDLED_FLOW_PIPELINE)
    assert pipe.transformer.dtype == torch.float32
    prompts = split_scenes().held_out_captions[::6]  # 8 held-out captions
    trained = oracle_scores(generate(pipe, prompts, seed=0, steps=10, guidance_scale=5.0), prompts)
    t = pipe.transformer.config
    random_pipe = build_pipeline(
        PretrainConfig(
            architecture="sd3",
            transformer_layers=t.num_layers,
            transformer_heads=t.num_attention_heads,
            transformer_head_dim=t.attention_head_dim,
            text_hidden_size=pipe.text_encoder.config.hidden_size,
            vae_channels=list(pipe.vae.config.block_out_channels),
        )
    )
    baseline = oracle_scores(generate(random_pipe, prompts, seed=0, steps=10), prompts)
    assert trained["alignment"].mean() > baseline["alignment"].mean() + 0.1
    for part in ("background", "colour", "position"):
        assert trained[part].mean() > 0.6 and trained[part].mean() > baseline[part].mean() + 0.3


def test_bundled_reward_sees_every_kind_of_mismatch_as_its_report_says():
    """The bundled LLaVA-Reward, measured now: held-out pairwise accuracy against the oracle of
    at least 0.85 on pairs that differ only in the background, the colour, the shape or the
    position (128 new renders each of the held-out colour-shape pairs' captions), the numbers
    its build report (world_report.json, which the demo's summary quotes) holds."""
    import json

    from alignment.demo import WEIGHTS
    from alignment.world.reward_model import mismatch_accuracy
    from reward.scorer import RewardScorer

    folder = WEIGHTS / "tiny-world-reward"
    measured = mismatch_accuracy(RewardScorer.from_pretrained(folder), split="held_out")
    report = json.loads((folder / "world_report.json").read_text())["alignment"]
    assert measured == pytest.approx(report["per_mismatch"], abs=0.01)
    assert min(measured.values()) >= 0.85, measured


def test_bundled_pipeline_beats_random_init_on_held_out_prompts():
    """Generated images for held-out captions score above a random-init pipeline of equal size.

    The pre-trained model draws the background and colour well but the shape and position
    poorly (see alignment/world/weights/README.md), so the oracle's product ``alignment`` is
    small but above random, and its parts are clearly above random.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(BUNDLED_PIPELINE)
    prompts = split_scenes().held_out_captions[::6]  # 8 held-out captions
    images = generate(pipe, prompts, seed=0, steps=10, guidance_scale=5.0)
    assert images.shape == (len(prompts), 3, 32, 32)
    trained = oracle_scores(images, prompts)
    random_pipe = build_pipeline(
        PretrainConfig(
            unet_channels=list(pipe.unet.config.block_out_channels),
            vae_channels=list(pipe.vae.config.block_out_channels),
        )
    )
    baseline = oracle_scores(generate(random_pipe, prompts, seed=0, steps=10), prompts)
    for key in ("alignment", "fidelity", "safety", "overall"):
        assert torch.isfinite(trained[key]).all(), key
    assert trained["alignment"].mean() > baseline["alignment"].mean()
    assert trained["overall"].mean() > baseline["overall"].mean()
    assert trained["background"].mean() > baseline["background"].mean() + 0.5
    assert trained["colour"].mean() > baseline["colour"].mean() + 0.3
    assert trained["fidelity"].mean() > baseline["fidelity"].mean() + 0.5


@pytest.mark.parametrize("architecture", ["sd", "sd3"])
def test_pretrain_resumes_after_a_crash_to_the_same_weights(tmp_path, monkeypatch, architecture):
    """A run interrupted after its step-2 checkpoint and restarted equals an uninterrupted run
    (both architectures: the UNet's epsilon-prediction and the SD 3 transformer's flow matching)."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    import alignment.world.pretrain as pretrain_mod
    from alignment.world.pretrain import PretrainConfig, pretrain

    def cfg(name: str) -> PretrainConfig:
        return PretrainConfig(
            output_dir=str(tmp_path / name / "pipe"),
            checkpoint_dir=str(tmp_path / name / "ckpt"),
            architecture=architecture,
            transformer_layers=1,
            transformer_heads=2,
            transformer_head_dim=8,
            text_hidden_size=16,
            text_dropout=0.5,  # dropout's random draws are restored on resume too
            unet_channels=[8, 16],
            vae_channels=[8, 16],
            renders_per_caption=1,
            vae_steps=2,
            vae_batch_size=4,
            unet_steps=4,
            batch_size=4,
            warmup_steps=1,
            save_steps=2,
            eval_prompts=0,
            num_threads=1,
        )

    straight = pretrain(cfg("straight"))
    real_encode, calls = pretrain_mod.encode_text, []

    def crash_on_fourth_step(pipe, captions):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated crash")
        return real_encode(pipe, captions)

    monkeypatch.setattr(pretrain_mod, "encode_text", crash_on_fourth_step)
    with pytest.raises(KeyboardInterrupt, match="simulated crash"):
        pretrain(cfg("resumed"))
    monkeypatch.setattr(pretrain_mod, "encode_text", real_encode)
    assert (tmp_path / "resumed" / "ckpt" / "trainer_state.pt").exists()
    assert not (tmp_path / "resumed" / "pipe").exists()
    resumed = pretrain(cfg("resumed"))
    assert not (tmp_path / "resumed" / "ckpt").exists()  # removed after a finished run
    assert resumed["vae_rec_mse"] == straight["vae_rec_mse"]
    assert resumed["unet_loss_last100"] == pytest.approx(straight["unet_loss_last100"])
    parts = {
        "sd": ("unet", "text_encoder", "vae"),
        "sd3": ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"),
    }[architecture]
    for part in parts:
        a = load_file(next((tmp_path / "straight" / "pipe" / part).glob("*.safetensors")))
        b = load_file(next((tmp_path / "resumed" / "pipe" / part).glob("*.safetensors")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "resumed" / "pipe")
    expected = {"sd": "StableDiffusionPipeline", "sd3": "StableDiffusion3Pipeline"}[architecture]
    assert type(pipe).__name__ == expected
    assert pipe.vae.config.scaling_factor == pytest.approx(straight["vae_scaling_factor"])


def test_background_noise_rewrites_only_the_background_word_of_that_fraction():
    from alignment.world.grammar import parse_caption
    from alignment.world.pretrain import PretrainConfig, render_pool

    clean_images, clean = render_pool(PretrainConfig(renders_per_caption=2))
    images, noisy = render_pool(PretrainConfig(renders_per_caption=2, background_noise=0.5))
    assert torch.equal(images, clean_images)  # the pictures are the same, only captions change
    wrong = 0
    for a, b in zip(clean, noisy, strict=True):
        sa, sb = parse_caption(a), parse_caption(b)
        assert sa.replace(background=sb.background) == sb
        wrong += sa.background != sb.background
    assert 0.4 < wrong / len(clean) < 0.6


def test_pretrain_refuses_to_overwrite_the_bundled_pipeline_by_default(tmp_path):
    from alignment.world.pretrain import PretrainConfig, check_output_dir, pretrain

    assert PretrainConfig().output_dir != str(BUNDLED_PIPELINE)
    with pytest.raises(ValueError, match="replace_bundled"):
        pretrain(PretrainConfig(output_dir=str(BUNDLED_PIPELINE)))  # stops before any training
    check_output_dir(PretrainConfig(output_dir=str(BUNDLED_PIPELINE), replace_bundled=True))
    check_output_dir(PretrainConfig(output_dir=str(tmp_path / "pipe")))
    import yaml

    from alignment.demo import WEIGHTS

    recipe = yaml.safe_load(
        (WEIGHTS.parents[2] / "recipes/configs/pretrain_tiny_world.yaml").read_text()
    )
    assert "weights" not in recipe["output_dir"] and not recipe.get("replace_bundled", False)
