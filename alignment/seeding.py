"""Random streams that do not depend on the number of processes.

A run's randomness (sampling noise, data order, the ReFL stop step) is drawn from streams keyed by
what they are for, not by which process draws them: ``stream_seed(seed, "noise", epoch, index)``
is the same on 1 or 8 processes, and a run resumed on another process count draws the streams it
would have drawn, never epoch 0's again.
"""

from __future__ import annotations

import hashlib

import torch


def stream_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed from the run ``seed`` and the stream's keys (ints or strings).

    ``blake2b(repr((seed, *keys)))`` truncated to 63 bits: distinct keys give unrelated seeds,
    equal keys the same seed on every process and platform.
    """
    digest = hashlib.blake2b(repr((int(seed), *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def stream_generator(
    seed: int, *keys: int | str, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`stream_seed` ``(seed, *keys)``."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, *keys))


__all__ = ["stream_generator", "stream_seed"]
