"""Which perspective is scored when none is named (one rule for the API, the registry, DRaFT's
differentiable reward and the command line), the README's API example run as written, and backbones that contradict a folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from reward import LlavaRewardModel, RewardScorer
from reward.cli import main as cli
from reward.modeling import BackboneMismatchError
from reward.scorer import PerspectiveNotChosenError, default_perspective
from reward.testing import save_tiny_backbone

README = Path(__file__).resolve().parents[1] / "README.md"
LORA = {"r": 4, "lora_alpha": 8}
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return save_tiny_backbone("llava", tmp_path_factory.mktemp("bb"))


@pytest.fixture(scope="module")
def folders(backbone, tmp_path_factory):
    """One model with three perspectives, saved as folders holding one, two or three of them."""
    torch.manual_seed(0)
    model = LlavaRewardModel.from_backbone(
        backbone, perspectives=("alignment", "safety", "overall"), lora_config=LORA
    )
    with torch.no_grad():  # distinct heads, so that a wrong perspective shows in the values
        for i, head in enumerate(model.heads.values()):
            for p in head.parameters():
                p.add_(0.05 * (i + 1))
    root = tmp_path_factory.mktemp("rm")
    out = {}
    for name, keep in {
        "one": ["alignment"],
        "two": ["alignment", "safety"],
        "three": ["alignment", "safety", "overall"],
    }.items():
        model.save_pretrained(root / name, perspectives=keep)
        out[name] = root / name
    return out


def test_default_perspective_rule():
    assert default_perspective(["safety"]) == "safety"
    assert default_perspective(["alignment", "overall", "safety"]) == "overall"
    with pytest.raises(PerspectiveNotChosenError, match=r"alignment, safety.*none is 'overall'"):
        default_perspective(["alignment", "safety"])
    with pytest.raises(PerspectiveNotChosenError, match="no perspective"):
        default_perspective([])


def test_api_registry_and_cli_share_the_default(folders, tmp_path, capsys):
    from alignment.draft import differentiable_reward_fn
    from alignment.rewards import get_reward_fn

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pngs = []
    for i, img in enumerate(images):
        pngs.append(str(tmp_path / f"{i}.png"))
        Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()).save(pngs[-1])
    for folder, expected in (("one", "alignment"), ("three", "overall")):
        scorer = RewardScorer.from_pretrained(folders[folder])
        assert scorer.default_perspective == expected
        named = scorer.score(PROMPTS, pngs, perspective=expected)
        others = [p for p in scorer.perspectives if p != expected]
        assert all(not torch.equal(scorer.score(PROMPTS, pngs, p), named) for p in others)
        assert torch.equal(scorer.score(PROMPTS, pngs), named)
        r = scorer.score([PROMPTS[0]] * 2, pngs, perspective=expected)
        p_a = torch.sigmoid((r[0] - r[1]) / scorer.tau).item()
        assert scorer.compare(PROMPTS[0], pngs[0], pngs[1]) == pytest.approx(p_a, abs=1e-6)
        assert torch.equal(scorer.rank(PROMPTS[0], pngs)[1], r)
        fn = scorer.as_reward_fn()
        assert fn.perspective_weights == {expected: 1.0}
        from_registry = get_reward_fn("llava_reward", path=str(folders[folder]))
        torch.testing.assert_close(from_registry(images, PROMPTS), fn(images, PROMPTS))
        draft_fn = differentiable_reward_fn("llava_reward", path=str(folders[folder]))
        assert draft_fn.perspective_weights == {expected: 1.0}
        assert cli(["score", "--model", str(folders[folder]), "--prompt", PROMPTS[0], *pngs]) == 0
        assert capsys.readouterr().out.splitlines()[1].split() == ["image", expected]

    # several perspectives without 'overall': every entry point refuses, naming them
    scorer = RewardScorer.from_pretrained(folders["two"])
    for call in (
        lambda: scorer.score(PROMPTS, pngs),
        lambda: scorer.compare(PROMPTS[0], pngs[0], pngs[1]),
        lambda: scorer.rank(PROMPTS[0], pngs),
        lambda: scorer.as_reward_fn(),
        lambda: get_reward_fn("llava_reward", path=str(folders["two"])),
        lambda: differentiable_reward_fn("llava_reward", path=str(folders["two"])),
    ):
        with pytest.raises(PerspectiveNotChosenError, match="alignment, safety"):
            call()
    assert cli(["score", "--model", str(folders["two"]), "--prompt", "x", *pngs]) == 2
    err = capsys.readouterr().err
    assert "alignment, safety" in err and "--perspective alignment" in err


def test_readme_api_example_runs_as_written(backbone, tmp_path, monkeypatch):
    """The code block of README's "The API in ten lines", with only the hub id replaced by a
    tiny local backbone, run in a folder that holds a.png and b.png."""
    text = README.read_text()
    section = text[text.index("## The API in ten lines") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    hub_id = '"Qwen/Qwen2.5-VL-7B-Instruct"'
    assert code.count(hub_id) == 1
    code = code.replace(hub_id, repr(str(backbone)))
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (40, 30), (200, 30, 30)).save("a.png")
    Image.new("RGB", (40, 30), (30, 30, 200)).save("b.png")
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - the README's own code

    scorer, rewards, images = ns["scorer"], ns["rewards"], ns["images"]
    assert sorted(scorer.perspectives) == ["alignment", "safety"]
    assert (tmp_path / "rm" / "heads" / "alignment.safetensors").is_file()
    r = scorer.score(["a cat"] * 2, ["a.png", "b.png"], perspective="alignment")
    expected = torch.sigmoid((r[0] - r[1]) / scorer.tau).item()
    got = scorer.compare("a cat", "a.png", "b.png", perspective="alignment")
    assert got == pytest.approx(expected, abs=1e-6)
    frozen = scorer.as_reward_fn({"alignment": 1.0, "safety": 0.5})(images.detach(), ns["prompts"])
    torch.testing.assert_close(rewards.detach(), frozen, atol=1e-4, rtol=0)
    rewards.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0  # grads reach the pixels


def test_a_backbone_that_contradicts_the_folder_is_refused(backbone, tmp_path):
    from reward.training import RewardScriptArguments, RewardTrainingArguments, build_reward_model

    other = save_tiny_backbone("llava", tmp_path / "other_bb")
    out = tmp_path / "rm"
    first = LlavaRewardModel.from_backbone(backbone, perspectives=("alignment",), lora_config=LORA)
    first.save_pretrained(out)

    # the API: saving a model on another backbone beside the folder's perspectives
    second = LlavaRewardModel.from_backbone(other, perspectives=("safety",), lora_config=LORA)
    with pytest.raises(BackboneMismatchError) as err:
        second.save_pretrained(out)
    msg = str(err.value)
    assert str(backbone) in msg and str(other) in msg and "new output folder" in msg
    assert not (out / "heads" / "safety.safetensors").exists()  # nothing was written
    second.save_pretrained(tmp_path / "elsewhere")  # a new folder is fine

    # the recipe: --backbone naming another backbone than OUTPUT_DIR's
    args = RewardTrainingArguments(
        output_dir=str(out), perspective="safety", use_cpu=True, report_to="none"
    )
    small = dict(lora_r=4, lora_alpha=8)
    with pytest.raises(BackboneMismatchError, match="leave --backbone out"):
        build_reward_model(RewardScriptArguments(backbone=str(other), **small), args)
    with pytest.raises(BackboneMismatchError, match="tiny_backbone"):
        build_reward_model(RewardScriptArguments(backbone="tiny-llava", **small), args)
    for given in (None, str(backbone), str(backbone) + "/"):  # the folder's own, or left out
        model = build_reward_model(RewardScriptArguments(backbone=given, **small), args)
        assert model.perspectives == ["alignment", "safety"]
        assert model.config.backbone == str(backbone)
