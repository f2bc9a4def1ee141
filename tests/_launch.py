"""Shared helper of the tests that run a recipe or a driver in a subprocess (``accelerate launch``,
``torchrun``): the offline, one-thread environment and a free local port for the process group."""

from __future__ import annotations

import os
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free port on 127.0.0.1 (other test workers may launch DeepSpeed at the same time)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(*, pythonpath: bool = False, drop_accelerate: bool = False, **extra: str) -> dict:
    """This process's environment, offline, one thread, no trackers; DeepSpeed's compiled CPU
    comm op cached under the repository's ``.cache`` (as ``make install`` builds it).

    Args:
        pythonpath: put the repository first on ``PYTHONPATH`` (a script run by path that imports
            the packages or the tests' helpers).
        drop_accelerate: leave out this process's ``ACCELERATE_*`` variables (a ``torchrun``
            driver whose accelerator must not inherit them).
        extra: further variables, set last.
    """
    env = {
        k: v for k, v in os.environ.items() if not (drop_accelerate and k.startswith("ACCELERATE_"))
    }
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        MPLBACKEND="Agg",
        WANDB_DISABLED="true",
    )
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env
