"""Atomic, resumable training checkpoints on accelerate (shared by every trainer).

A checkpoint is a folder ``{output_dir}/checkpoints/checkpoint-{step:06d}`` holding

- what ``accelerator.save_state`` writes: the *trainable* weights of the prepared models (frozen
  weights are left out: a LoRA checkpoint of SD 1.5 is megabytes, not gigabytes), optimizer and
  LR-scheduler states, the RNG states of ``random``, numpy and torch (CPU and CUDA) of every
  process; under DeepSpeed the engine's own checkpoint (``exclude_frozen_parameters``);
- ``trainer_state.json``: the trainer's own JSON state (epoch and step counters, per-prompt
  statistics, reward history, ...) and, under ``"launch"``, how the run was launched (number of
  processes, distributed type, ZeRO stage);
- ``trainable.safetensors`` (DeepSpeed runs): the trainable weights, gathered (ZeRO-3) and written
  once, for a weights-only resume (non-DeepSpeed runs have them in accelerate's
  ``model.safetensors``).

It is first written to ``.tmp-checkpoint-{step}`` and renamed into place when complete, so an
interrupted save never leaves a half-written checkpoint that ``resume_from="latest"`` would pick.
Only the last ``keep_last`` checkpoints are kept.

Resuming on another number of processes:

- without DeepSpeed (one process, DDP) the whole state resumes on any count: weights and
  optimiser state are saved whole; a process without a saved RNG state keeps its own (the
  trainers draw their data order and noise from :mod:`alignment.seeding` streams keyed by the
  global sample index, so nothing depends on it);
- DeepSpeed's checkpoint holds one optimiser partition per rank and loads only on the same number
  of processes and ZeRO stage: :func:`load_checkpoint` refuses any other launch with an error that
  says so, and ``weights_only=True`` (``--resume_weights_only``) restarts from the checkpoint's
  trainable weights and trainer state (step, statistics, history) with a fresh optimiser, on any
  launch (DeepSpeed or not, any count).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

TRAINER_STATE = "trainer_state.json"
TRAINABLE_WEIGHTS = "trainable.safetensors"
#: accelerate's (trainable-only, see the save hook) weights of a non-DeepSpeed run
ACCELERATE_WEIGHTS = "model.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def launch_info(accelerator: Any) -> dict[str, Any]:
    """How this run is launched: ``{"num_processes", "distributed_type", "zero_stage"}``."""
    plugin = (
        getattr(accelerator.state, "deepspeed_plugin", None) if _is_deepspeed(accelerator) else None
    )
    return {
        "num_processes": int(accelerator.num_processes),
        "distributed_type": str(accelerator.distributed_type.value),
        "zero_stage": None if plugin is None else int(plugin.zero_stage),
    }


def _describe(launch: dict[str, Any]) -> str:
    n = launch["num_processes"]
    kind = launch["distributed_type"]
    if kind == "DEEPSPEED":
        kind = f"DeepSpeed ZeRO-{launch['zero_stage']}"
    return f"{n} process{'es' if n != 1 else ''} ({kind})"


def check_resumable(saved: dict[str, Any] | None, now: dict[str, Any], path: Path) -> None:
    """Raise a ``ValueError`` when a full resume of checkpoint ``path`` (written under launch
    ``saved``) cannot work under launch ``now``: DeepSpeed on either side and another number of
    processes, distributed type or ZeRO stage."""
    if not saved:
        return
    deepspeed = "DEEPSPEED" in (saved["distributed_type"], now["distributed_type"])
    same = all(
        saved.get(k) == now.get(k) for k in ("num_processes", "distributed_type", "zero_stage")
    )
    if deepspeed and not same:
        raise ValueError(
            f"Checkpoint {path} was written by {_describe(saved)}; this run has {_describe(now)}. "
            "A DeepSpeed checkpoint keeps one optimiser partition per process and resumes only "
            "with the same number of processes and ZeRO stage. Relaunch as it was written, or add "
            "--resume_weights_only (resume_weights_only: true) to restart from its trained weights "
            "and trainer state (step, statistics, history) with a fresh optimiser."
        )


def _prepared_models(accelerator: Any) -> list[Any]:
    # accelerate keeps the models given to ``prepare`` in this (private) list; save/load_state use it
    return list(accelerator._models)


def _named_trainable(model: Any) -> dict[str, Any]:
    unwrapped = getattr(model, "module", model)
    return {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}


def _gathered(params: list, modifier_rank: int | None = None) -> Any:
    """DeepSpeed ZeRO-3: gather the partitioned ``params`` in this context (a no-op for
    parameters DeepSpeed does not partition); without DeepSpeed a null context."""
    import contextlib
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def _weights_name(i: int) -> str:
    return TRAINABLE_WEIGHTS if i == 0 else TRAINABLE_WEIGHTS.replace(".", f"_{i}.")


def save_trainable_weights(accelerator: Any, folder: Path) -> None:
    """Write every prepared model's trainable weights (gathered under ZeRO-3) to
    ``folder/trainable.safetensors`` (``trainable_1.safetensors``, ... for further models) on the
    main process. Call on every process."""
    from safetensors.torch import save_file

    for i, model in enumerate(_prepared_models(accelerator)):
        named = _named_trainable(model)
        with _gathered(list(named.values())):
            if accelerator.is_main_process:
                state = {n: p.detach().cpu().contiguous().clone() for n, p in named.items()}
                save_file(state, str(folder / _weights_name(i)))


def load_trainable_weights(accelerator: Any, path: str | os.PathLike) -> None:
    """Copy checkpoint ``path``'s trainable weights into the prepared models (any launch: the
    weights are stored whole), and refresh DeepSpeed's fp32 master copies from them. The
    optimiser state is left as it is (fresh). Call on every process."""
    from safetensors.torch import load_file

    path = Path(path)
    for i, model in enumerate(_prepared_models(accelerator)):
        candidates = [path / _weights_name(i)]
        if i == 0:
            candidates.append(path / ACCELERATE_WEIGHTS)
        else:
            candidates.append(path / ACCELERATE_WEIGHTS.replace(".", f"_{i}."))
        found = next((f for f in candidates if f.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"{path} holds no weights for a weights-only resume (looked for "
                f"{', '.join(c.name for c in candidates)}); it was written before weights-only "
                "resume existed: resume it with the launch that wrote it."
            )
        state = {k.removeprefix("module."): v for k, v in load_file(str(found)).items()}
        named = _named_trainable(model)
        missing, unexpected = sorted(set(named) - set(state)), sorted(set(state) - set(named))
        if missing or unexpected:
            raise ValueError(
                f"{found} does not match the model's trainable weights: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]} (another LoRA rank / targets or use_lora setting?)."
            )
        params = list(named.values())
        with _gathered(params, modifier_rank=0), torch.no_grad():
            for name, p in named.items():
                p.data.copy_(state[name].to(device=p.device, dtype=p.dtype))
        optimizer = getattr(model, "optimizer", None)  # the DeepSpeed engine's ZeRO optimiser
        if _is_deepspeed(accelerator) and hasattr(optimizer, "refresh_fp32_params"):
            optimizer.refresh_fp32_params()


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
    process_tensors: dict[str, torch.Tensor] | None = None,
    process_metadata: dict[str, str] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and prune old ones. Call on *every* process.

    Args:
        accelerator: the run's ``Accelerator`` (models/optimizers already prepared).
        output_dir: the run folder; checkpoints go under ``output_dir/checkpoints``.
        step: the counter naming the checkpoint (an epoch or an optimiser step).
        trainer_state: JSON-serialisable trainer state, returned by :func:`load_checkpoint`.
        keep_last: how many checkpoints to keep (None or 0 keeps all).
        process_tensors / process_metadata: this process's own state (e.g. online DPO's pair
            buffer), written as ``process<rank>.safetensors`` (strings as its metadata) and read
            back by :func:`load_process_tensors`.

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
    if _is_deepspeed(accelerator):
        save_trainable_weights(accelerator, tmp)
    if process_tensors:
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in process_tensors.items()}
        save_file(tensors, tmp / _process_file(accelerator.process_index), process_metadata)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / TRAINER_STATE, "w", encoding="utf-8") as f:
            json.dump({**trainer_state, "launch": launch_info(accelerator)}, f)
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


def _process_file(rank: int) -> str:
    return f"process{rank}.safetensors"


def load_process_tensors(
    accelerator: Any, path: str | os.PathLike
) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """This process's own state saved in checkpoint ``path`` (:func:`save_checkpoint`'s
    ``process_tensors`` and ``process_metadata``), or None when there is none for it (a
    checkpoint of a launch with fewer processes, or none saved)."""
    from safetensors import safe_open

    file = Path(path) / _process_file(accelerator.process_index)
    if not file.is_file():
        return None
    with safe_open(str(file), framework="pt") as f:  # one read: tensors and metadata
        names = f.keys()
        return {k: f.get_tensor(k) for k in names}, dict(f.metadata() or {})


_LEGACY_PICKLE = re.compile(r"^custom_checkpoint_\d+\.pkl$")


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


def load_checkpoint(
    accelerator: Any, path: str | os.PathLike, weights_only: bool = False
) -> dict[str, Any]:
    """Restore weights, optimizer, schedulers and RNG states from ``path`` (on every process)
    and return its trainer state.

    ``weights_only``: restore only the trainable weights (:func:`load_trainable_weights`), on
    any launch; the optimiser, LR schedule and RNG states stay fresh. A full resume of a
    DeepSpeed checkpoint on another launch raises (:func:`check_resumable`)."""
    path = Path(path)
    with open(path / TRAINER_STATE, encoding="utf-8") as f:
        state = json.load(f)
    if weights_only:
        load_trainable_weights(accelerator, path)
        return state
    check_resumable(state.get("launch"), launch_info(accelerator), path)
    if any(_LEGACY_PICKLE.match(f.name) for f in path.iterdir()):
        raise RuntimeError(
            f"{path} holds a pickled LR schedule (custom_checkpoint_*.pkl) written before the "
            "schedule moved into trainer_state.json; loading it would unpickle (run code). Resume "
            "its weights only (resume_weights_only=true), or delete the .pkl file if you trust "
            "the checkpoint and accept a fresh schedule."
        )
    if _is_deepspeed(accelerator):
        accelerator.load_state(str(path), load_module_strict=False)
    else:
        accelerator.load_state(str(path), strict=False)
    return state


def resume_if_requested(
    accelerator: Any,
    output_dir: str | os.PathLike,
    resume_from: str | None,
    weights_only: bool = False,
) -> tuple[Path, dict[str, Any]] | None:
    """The resume step of every trainer: resolve ``resume_from`` (``"latest"`` without a
    checkpoint starts fresh, with a message), restore the accelerator state (only the trainable
    weights with ``weights_only``) and return ``(checkpoint path, trainer state)``, or None when
    nothing was loaded."""
    path = resolve_checkpoint(output_dir, resume_from)
    if path is None:
        if resume_from:
            accelerator.print(f"No checkpoint under {output_dir}; starting fresh.")
        return None
    state = load_checkpoint(accelerator, path, weights_only=weights_only)
    if weights_only:
        accelerator.print(f"Loaded the trained weights of {path}; the optimiser starts fresh.")
    return path, state
