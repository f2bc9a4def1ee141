"""`make demo`: the main job on the bundled tiny default.

Interim version (until the tiny world's chain lands): build a tiny LLaVA-Reward on a random tiny
LLaVA backbone, save and reload it through the real `from_pretrained` path, and score the four real
Stable Diffusion images bundled with the tests, printing a table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests" / "data" / "imagereward_example"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/demo")
    args = parser.parse_args(argv)

    import torch

    from reward import LlavaRewardModel, RewardScorer
    from reward.cli import main as cli_main
    from reward.testing import save_tiny_backbone

    torch.manual_seed(0)
    out = Path(args.output_dir)
    with tempfile.TemporaryDirectory() as tmp:
        backbone = save_tiny_backbone("llava", Path(tmp) / "backbone")
        model = LlavaRewardModel.from_backbone(
            backbone,
            perspectives=("alignment", "fidelity", "safety", "overall"),
            lora_config={"r": 4, "lora_alpha": 8},
        )
        model.save_pretrained(out / "reward", save_backbone=True)
    RewardScorer.from_pretrained(out / "reward")  # the real loading path
    prompt = (EXAMPLE / "prompt.txt").read_text().strip()
    images = [str(EXAMPLE / f"{i}.webp") for i in range(1, 5)]
    return cli_main(
        [
            "score",
            "--model",
            str(out / "reward"),
            "--prompt",
            prompt,
            *images,
            "--perspective",
            "all",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
