"""Atomic, resumable training checkpoints on accelerate (shared by every trainer).

A checkpoint is a folder ``{output_dir}/checkpoints/checkpoint-{step:06d}`` holding

- what ``accelerator.save_state`` writes: the *trainable* weights of the prepared models (frozen
  weights are left out: a LoRA checkpoint of SD 1.5 is megabytes, not gigabytes), optimizer and
  LR-scheduler states, the RNG states of ``random``, numpy and torch (CPU and CUDA) of every
  process; under DeepSpeed the engine's own checkpoint (``exclude_frozen_parameters``);
- ``trainer_state.json``: the trainer's own JSON state (epoch and step counters, per-prompt
  statistics, reward history, ...).

It is first written to ``.tmp-checkpoint-{step}`` and renamed into place when complete, so an
interrupted save never leaves a half-written checkpoint that ``resume_from="latest"`` would pick.
Only the last ``keep_last`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

TRAINER_STATE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _trainable_only_hook(models: list, weights: list, output_dir: str) -> None:
    """accelerate save pre-hook: keep only parameters that require grad in each model's state."""
    for model, state in zip(models, weights):
        unwrapped = getattr(model, "module", model)
        trainable = {n for n, p in unwrapped.named_parameters() if p.requires_grad}
        if not trainable:
            continue
        prefix = "module." if any(k.startswith("module.") for k in state) else ""
        for key in list(state):
            if key[len(prefix) :] not in trainable:
                del state[key]


def register_trainable_only_saving(accelerator: Any) -> None:
    """Make ``accelerator.save_state`` store only trainable weights (call once after prepare)."""
    if not getattr(accelerator, "_alignment_trainable_hook", False):
        accelerator.register_save_state_pre_hook(_trainable_only_hook)
        accelerator._alignment_trainable_hook = True


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found) if (p / TRAINER_STATE).is_file()]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(
    accelerator: Any,
    output_dir: str | os.PathLike,
    step: int,
    trainer_state: dict[str, Any],
    keep_last: int | None = 2,
) -> Path:
    """Write checkpoint ``step`` atomically and prune old ones. Call on *every* process.

    Args:
        accelerator: the run's ``Accelerator`` (models/optimizers already prepared).
        output_dir: the run folder; checkpoints go under ``output_dir/checkpoints``.
        step: the counter naming the checkpoint (an epoch or an optimiser step).
        trainer_state: JSON-serialisable trainer state, returned by :func:`load_checkpoint`.
        keep_last: how many checkpoints to keep (None or 0 keeps all).

    Returns:
        The final checkpoint folder.
    """
    register_trainable_only_saving(accelerator)
    root = checkpoint_dir(output_dir)
    final = root / f"checkpoint-{step:06d}"
    tmp = root / f".tmp-checkpoint-{step:06d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    kwargs = {"exclude_frozen_parameters": True} if _is_deepspeed(accelerator) else {}
    accelerator.save_state(str(tmp), **kwargs)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / TRAINER_STATE, "w", encoding="utf-8") as f:
            json.dump(trainer_state, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last:
            for old in list_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(output_dir: str | os.PathLike, resume_from: str | None) -> Path | None:
    """``None`` -> None; ``"latest"`` -> newest complete checkpoint (None if there is none);
    otherwise the given folder, which must be a complete checkpoint."""
    if not resume_from:
        return None
    if resume_from == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume_from)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (no {TRAINER_STATE}); give a "
            f"'checkpoint-N' folder under {checkpoint_dir(output_dir)} or 'latest'."
        )
    return path


def load_checkpoint(accelerator: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Restore weights, optimizer, schedulers and RNG states from ``path`` (on every process)
    and return its trainer state."""
    path = Path(path)
    if _is_deepspeed(accelerator):
        accelerator.load_state(str(path), load_module_strict=False)
    else:
        accelerator.load_state(str(path), strict=False)
    with open(path / TRAINER_STATE, encoding="utf-8") as f:
        return json.load(f)


def resume_if_requested(
    accelerator: Any, output_dir: str | os.PathLike, resume_from: str | None
) -> tuple[Path, dict[str, Any]] | None:
    """The resume step of every trainer: resolve ``resume_from`` (``"latest"`` without a
    checkpoint starts fresh, with a message), restore the accelerator state and return
    ``(checkpoint path, trainer state)``, or None when nothing was loaded."""
    path = resolve_checkpoint(output_dir, resume_from)
    if path is None:
        if resume_from:
            accelerator.print(f"No checkpoint under {output_dir}; starting fresh.")
        return None
    return path, load_checkpoint(accelerator, path)
