"""Shared helper of the tests that run a recipe through ``accelerate launch`` in a subprocess:
the offline, one-thread environment and a free local port for the process group."""

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


def launch_env() -> dict[str, str]:
    """This process's environment, offline, one thread, no trackers; DeepSpeed's compiled CPU
    comm op cached under the repository's ``.cache`` (as ``make install`` builds it)."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        MPLBACKEND="Agg",
        WANDB_DISABLED="true",
    )
    return env
