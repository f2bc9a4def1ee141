"""Shared helper of the GRPO tests: tiny SD3 / FLUX pipelines saved once per test process and a
GRPO config for a few-second run on them."""

from __future__ import annotations

import tempfile
from pathlib import Path

_DIRS: dict[str, Path] = {}


def saved_tiny_flow_pipeline(kind: str = "sd3") -> Path:
    """:func:`alignment.tiny_flow.tiny_sd3_pipeline` / ``tiny_flux_pipeline`` (seed 0) saved
    once per process (the real ``from_pretrained`` path on a local folder)."""
    if kind not in _DIRS:
        from alignment.tiny_flow import tiny_flux_pipeline, tiny_sd3_pipeline

        root = Path(tempfile.mkdtemp(prefix=f"tiny-{kind}-"))
        (tiny_sd3_pipeline if kind == "sd3" else tiny_flux_pipeline)(seed=0).save_pretrained(root)
        _DIRS[kind] = root
    return _DIRS[kind]


def tiny_grpo_config(out: Path, kind: str = "sd3", **overrides):
    """A :class:`~alignment.grpo_trainer.GRPOConfig` on a saved tiny flow pipeline: brightness
    reward, 4 SDE steps, 2 batches of 4 images in groups of 4, one optimiser step per epoch over
    every step of the 8 samples, no EMA, evaluation or logging."""
    from alignment.grpo_trainer import GRPOConfig

    base = dict(
        pretrained_model=str(saved_tiny_flow_pipeline(kind)),
        resolution=32,
        output_dir=str(out),
        reward="brightness",
        num_steps=4,
        eval_num_steps=6,
        guidance_scale=3.0 if kind == "sd3" else 3.5,
        sample_batch_size=4,
        num_batches_per_epoch=2,
        images_per_prompt=4,
        train_batch_size=4,
        gradient_accumulation_steps=2,
        timesteps_per_call=4,
        timestep_fraction=1.0,
        lora_rank=4,
        learning_rate=3e-2,
        clip_range=1e-3,
        kl_coef=0.0,
        num_epochs=1,
        save_every=0,
        ema=False,
        eval_every=0,
        num_eval_images=4,
        log_with="none",
        log_images_every=0,
        progress_bar=False,
        seed=3,
    )
    base.update(overrides)
    return GRPOConfig(**base)
