"""LLaVA-Reward: text-to-image rewards read from a multimodal LLM's hidden state.

Public API (imported lazily, so `import reward` is cheap and has no side effects)::

    from reward import LlavaRewardModel, LlavaRewardConfig, RewardScorer
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LlavaRewardConfig": "reward.configuration",
    "LlavaRewardModel": "reward.modeling",
    "RewardHead": "reward.modeling",
    "UnknownPerspectiveError": "reward.modeling",
    "RewardProcessor": "reward.processing",
    "RewardScorer": "reward.scorer",
    "ImageInputError": "reward.images",
    "load_image": "reward.images",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'reward' has no attribute {name!r}")
