"""`llava-reward score` on the four real Stable Diffusion images (WebP) of the ImageReward example."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reward import LlavaRewardModel, RewardScorer
from reward.cli import main
from reward.testing import save_tiny_backbone

EXAMPLE = Path(__file__).parent / "data" / "imagereward_example"
IMAGES = [str(EXAMPLE / f"{i}.webp") for i in range(1, 5)]
PROMPT = (EXAMPLE / "prompt.txt").read_text().strip()


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    backbone = save_tiny_backbone("llava", tmp_path_factory.mktemp("bb"))
    torch.manual_seed(0)
    model = LlavaRewardModel.from_backbone(
        backbone, perspectives=("overall", "safety"), lora_config={"r": 4, "lora_alpha": 8}
    )
    out = tmp_path_factory.mktemp("rm")
    model.save_pretrained(out)
    return out


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The real command line, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "reward.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_scores_real_webp_images_as_table_and_json(reward_dir, capsys):
    res = _cli(
        "score", "--model", str(reward_dir), "--prompt", PROMPT, *IMAGES, "--perspective", "all"
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == f"prompt: {PROMPT}"
    assert "overall" in lines[1] and "safety" in lines[1]
    rows = [line for line in lines if line.split() and line.split()[0] in IMAGES]
    assert len(rows) == 4

    assert main(["score", "--model", str(reward_dir), "--prompt", PROMPT, *IMAGES, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    cli_scores = torch.tensor([row["overall"] for row in data["scores"]])
    api_scores = RewardScorer.from_pretrained(reward_dir).score(PROMPT, IMAGES)
    torch.testing.assert_close(cli_scores, api_scores, atol=1e-5, rtol=0)
    assert [row["image"] for row in data["scores"]] == IMAGES


def test_cli_reports_bad_input_by_name(reward_dir, tmp_path, capsys):
    assert (
        main(["score", "--model", str(reward_dir), "--prompt", "x", str(tmp_path / "nope.png")])
        == 2
    )
    err = capsys.readouterr().err
    assert "nope.png" in err and "not found" in err
    args = [
        "score",
        "--model",
        str(reward_dir),
        "--prompt",
        "x",
        IMAGES[0],
        "--perspective",
        "beauty",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "beauty" in err and "overall" in err
