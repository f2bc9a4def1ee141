"""Shared helper for the alignment tests: one tiny SD pipeline saved once per test process."""

from __future__ import annotations

import tempfile
from pathlib import Path

_CACHE: dict[str, Path] = {}


def saved_tiny_pipeline() -> Path:
    """Build :func:`alignment.tiny.tiny_sd_pipeline` (seed 0) and save it once per process."""
    if "dir" not in _CACHE:
        from alignment.tiny import tiny_sd_pipeline

        root = Path(tempfile.mkdtemp(prefix="tiny-sd-"))
        tiny_sd_pipeline(seed=0).save_pretrained(root)
        _CACHE["dir"] = root
    return _CACHE["dir"]


def tiny_ddpo_config(out: Path, **overrides):
    """A :class:`~alignment.ddpo_trainer.DDPOConfig` for a few-second run on the saved tiny
    pipeline: brightness reward, 3 DDIM steps, 2 x 2 samples per epoch, no logging."""
    from alignment.ddpo_trainer import DDPOConfig

    base = dict(
        pretrained_model=str(saved_tiny_pipeline()),
        output_dir=str(out),
        reward="brightness",
        num_steps=3,
        guidance_scale=2.0,
        sample_batch_size=2,
        num_batches_per_epoch=2,
        train_batch_size=2,
        gradient_accumulation_steps=2,
        timesteps_per_call=2,
        lora_rank=4,
        learning_rate=1e-2,
        clip_range=1e-3,
        stat_min_count=2,
        num_epochs=2,
        save_every=0,
        log_with="none",
        log_images_every=0,
        progress_bar=False,
        seed=3,
    )
    base.update(overrides)
    return DDPOConfig(**base)
