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
