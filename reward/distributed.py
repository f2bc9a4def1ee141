"""Several processes on a machine without GPUs: the one place where the trainers fix accelerate's
process-group choice for DeepSpeed (used by :mod:`reward.training` and every ``alignment`` trainer;
it lives in ``reward`` because ``reward`` never imports ``alignment``).

When a launcher (``torchrun``, ``accelerate launch`` with a DeepSpeed config) starts several
processes for DeepSpeed (``ACCELERATE_USE_DEEPSPEED=true``, ``LOCAL_RANK`` set) on a machine with no
accelerator, accelerate 1.x chooses no distributed backend: its state reports one process while
DeepSpeed initialises with the real ``WORLD_SIZE``, so DeepSpeed's batch-size check fails and
every rank believes it is the main one. With ``backend="gloo"`` handed to accelerate (its
``InitProcessGroupKwargs``, or ``TrainingArguments.ddp_backend`` for the transformers ``Trainer``)
accelerate and DeepSpeed agree on the world size, as on GPUs. Everywhere else (GPUs, plain DDP,
one process) nothing changes.

Two processes of plain DDP on a CPU need no fix: ``ACCELERATE_USE_CPU=1 torchrun
--nproc_per_node 2 RECIPE ...`` gives gloo with the real world size.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def _has_accelerator() -> bool:
    if torch.cuda.is_available():
        return True
    api = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, NPU, ...
    return bool(api is not None and api.is_available())


def cpu_deepspeed_backend() -> str | None:
    """``"gloo"`` when DeepSpeed runs under a multi-process launcher on a machine without an
    accelerator (``ACCELERATE_USE_DEEPSPEED=true``, ``LOCAL_RANK`` set, no GPU), else None (leave
    accelerate's own choice)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    if int(os.environ.get("LOCAL_RANK", -1)) == -1 or _has_accelerator():
        return None
    return "gloo"


def process_group_kwargs() -> list[Any]:
    """``kwargs_handlers`` for ``accelerate.Accelerator``: an ``InitProcessGroupKwargs`` with
    :func:`cpu_deepspeed_backend` where it applies, else an empty list."""
    backend = cpu_deepspeed_backend()
    if backend is None:
        return []
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(backend=backend)]


__all__ = ["cpu_deepspeed_backend", "process_group_kwargs"]
