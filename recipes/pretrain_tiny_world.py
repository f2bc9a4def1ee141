"""Pre-train the tiny Stable-Diffusion-architecture model on the procedural world (CPU).

    python recipes/pretrain_tiny_world.py --config recipes/configs/pretrain_tiny_world.yaml

Trains the VAE, then the UNet + CLIP text encoder on renders of the world's train captions,
saves a diffusers ``StableDiffusionPipeline`` folder (safetensors) to ``output_dir`` and prints
the final losses and the oracle's scores of its images for held-out captions as JSON.
"""

from __future__ import annotations

import json
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> dict[str, float]:
    from trl import TrlParser

    from alignment.world.pretrain import PretrainConfig, pretrain

    (cfg,) = TrlParser((PretrainConfig,)).parse_args_and_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = pretrain(cfg)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
