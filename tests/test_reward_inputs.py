"""What a user passes in: image tensors (validated, one 8-bit rounding rule), Qwen's visual-token
budget (``min_pixels`` / ``max_pixels``) and the token budget (``max_length``), through the API,
a saved folder, the scorer and the CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from reward import ImageInputError, LlavaRewardModel, RewardScorer
from reward.cli import main
from reward.families import qwen2_vl_smart_resize
from reward.families.image_ops import quantize_8bit, to_8bit_levels
from reward.images import load_images, to_pil
from reward.processing import CaptionTruncatedWarning
from reward.testing import save_tiny_backbone

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    backbone = save_tiny_backbone("llava", tmp_path_factory.mktemp("llava"))
    torch.manual_seed(0)
    model = LlavaRewardModel.from_backbone(backbone, lora_config=LORA)
    out = tmp_path_factory.mktemp("llava-rm")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def scorer(llava_dir):
    return RewardScorer.from_pretrained(llava_dir, device="cpu")


# ----------------------------------------------------------------------------- validation

BAD = {
    "[2, 3, 8]": (torch.rand(2, 3, 8), r"#0.*\(2, 3, 8\).*neither the first nor the last"),
    "NaN": (torch.full((3, 8, 8), float("nan")), r"#0.*192 NaN/inf"),
    "above 1": (torch.full((3, 8, 8), 1.5), r"#0.*\[0, 1\], got \[1\.5, 1\.5\]"),
    "below 0": (torch.full((3, 8, 8), -0.25), r"#0.*\[0, 1\], got \[-0\.25"),
    "int > 255": (torch.full((3, 8, 8), 300, dtype=torch.int64), r"#0.*\[0, 255\], got \[300"),
    "bool": (torch.ones(3, 8, 8, dtype=torch.bool), r"#0.*dtype torch.bool"),
    "4-d": (torch.rand(1, 3, 8, 8), r"#0.*3-d tensor"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_image_tensors_raise_an_error_naming_the_input(scorer, case):
    image, message = BAD[case]
    with pytest.raises(ImageInputError, match=message):
        scorer.score("a red circle", [image])
    with pytest.raises(ImageInputError, match=message.replace("#0", "#1")):
        load_images([torch.rand(3, 8, 8), image])


def test_good_tensor_layouts_and_dtypes_agree(scorer):
    x = torch.rand(3, 9, 7, generator=torch.Generator().manual_seed(0))
    levels = to_8bit_levels(x)
    u8 = levels.to(torch.uint8)
    variants = [x, x.permute(1, 2, 0), u8, u8.permute(1, 2, 0), levels.to(torch.int64), x.double()]
    arrays = [np.asarray(to_pil(v)) for v in variants]
    for arr in arrays[1:]:
        assert np.array_equal(arr, arrays[0])
    assert np.array_equal(arrays[0], u8.permute(1, 2, 0).numpy())
    scores = scorer.score("a red circle", variants)
    assert torch.allclose(scores, scores[:1].expand_as(scores), atol=1e-6, rtol=0)


DIFF_BAD = {
    "NaN in image #1": (
        lambda x: x.index_fill_(0, torch.tensor([1]), float("nan")),
        r"image #1 of images: 192 NaN",
    ),
    "out of range in #0": (
        lambda x: x.index_fill_(0, torch.tensor([0]), 2.0),
        r"image #0 of images: float values must lie in \[0, 1\], got \[2, 2\]",
    ),
    "4 channels": (lambda x: torch.rand(2, 4, 8, 8), r"\(2, 4, 8, 8\)"),
    "uint8": (lambda x: (x * 255).to(torch.uint8), r"floats in \[0, 1\], got dtype torch.uint8"),
}


@pytest.mark.parametrize("case", list(DIFF_BAD))
def test_differentiable_path_validates_its_batch(scorer, case):
    make, message = DIFF_BAD[case]
    images = make(torch.rand(2, 3, 8, 8))
    fn = scorer.as_reward_fn("overall", differentiable=True)
    with pytest.raises(ImageInputError, match=message):
        fn(images, ["a", "b"])


def test_one_rounding_rule_for_float_images_in_both_paths(scorer):
    """Float pixels exactly halfway between two 8-bit levels round up in the PIL path (to_pil)
    and in the torch path (quantize_8bit) alike (the PIL path rounded half to even before)."""
    candidates = (torch.arange(255, dtype=torch.float32) + 0.5) / 255
    ties = candidates[candidates * 255 == torch.floor(candidates * 255) + 0.5]
    assert len(ties) > 50  # exact float32 ties exist (measured: all 255 of them)
    assert torch.equal(to_8bit_levels(ties), torch.floor(ties * 255) + 1)  # half up, by value
    side = int(len(ties) ** 0.5)
    image = ties[: side * side].view(1, side, side).expand(3, side, side)
    pil_levels = torch.from_numpy(np.array(to_pil(image))).permute(2, 0, 1).float()
    torch_levels = quantize_8bit(image) * 255
    assert torch.equal(pil_levels, torch.round(torch_levels))
    family = scorer.processor.family
    official = family.pixel_inputs([to_pil(image)])["pixel_values"]
    ours = family.pixel_inputs_torch(image[None])["pixel_values"]
    assert (ours - official).abs().max().item() <= 1e-6  # measured 0.0


# ----------------------------------------------------------------------------- Qwen budget


@pytest.fixture(scope="module")
def qwen_backbone(tmp_path_factory):
    # tiny processor's own budget: min 14*14*4 = 784, max 56*56 = 3136 pixels
    return save_tiny_backbone("qwen2_vl", tmp_path_factory.mktemp("qwen"))


def _n_image_tokens(inputs: dict, model) -> int:
    return int((inputs["input_ids"] == model.config.image_token_id).sum())


def test_qwen_pixel_budget_from_config_to_folder_to_cli(qwen_backbone, tmp_path, capsys):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 74, 3), dtype=np.uint8))
    default = LlavaRewardModel.from_backbone(qwen_backbone, lora_config=LORA)
    assert default.processor.family.pixel_budget() == (784, 3136)  # the processor's own
    assert default.config.min_pixels is None and default.config.max_pixels is None
    h, w = qwen2_vl_smart_resize(90, 74, 14, 784, 3136)  # 7 px patches merged 2x2: 14 px
    assert (h, w) == (56, 42)
    assert _n_image_tokens(default.processor(["a"], [image]), default) == h * w // 14**2 == 12

    torch.manual_seed(0)
    small = LlavaRewardModel.from_backbone(qwen_backbone, lora_config=LORA, max_pixels=28 * 28)
    assert small.processor.family.pixel_budget() == (784, 784)
    assert (small.config.min_pixels, small.config.max_pixels) == (None, 784)
    h, w = qwen2_vl_smart_resize(90, 74, 14, 784, 784)
    assert _n_image_tokens(small.processor(["a"], [image]), small) == h * w // 14**2 == 2
    # the torch path uses the same budget
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    grid = small.processor.family.pixel_inputs_torch(x)["image_grid_thw"]
    assert grid.tolist() == [[1, h // 7, w // 7]]

    small.save_pretrained(tmp_path / "rm")
    loaded = RewardScorer.from_pretrained(tmp_path / "rm", device="cpu")
    assert loaded.processor.family.pixel_budget() == (784, 784)
    assert loaded.model.config.max_pixels == 784
    wider = RewardScorer.from_pretrained(tmp_path / "rm", device="cpu", max_pixels=56 * 56)
    assert wider.processor.family.pixel_budget() == (784, 3136)
    image.save(tmp_path / "img.png")
    args = [
        "score",
        "--model",
        str(tmp_path / "rm"),
        "--prompt",
        "a dog",
        str(tmp_path / "img.png"),
    ]
    for extra, expected in (([], loaded), (["--max-pixels", str(56 * 56)], wider)):
        assert main([*args, *extra, "--json", "--device", "cpu"]) == 0
        cli = json.loads(capsys.readouterr().out)["scores"][0]["overall"]
        api = float(expected.score("a dog", [tmp_path / "img.png"])[0])
        assert cli == pytest.approx(api, abs=1e-6)
    assert float(loaded.score("a dog", [image])[0]) != pytest.approx(
        float(wider.score("a dog", [image])[0]), abs=1e-6
    )  # the budget reaches the model


def test_pixel_budget_errors(qwen_backbone, llava_dir):
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        LlavaRewardModel.from_backbone(qwen_backbone, min_pixels=5000, max_pixels=1000)
    with pytest.raises(ValueError, match="below one visual token"):
        LlavaRewardModel.from_backbone(qwen_backbone, min_pixels=100, max_pixels=150)
    with pytest.raises(ValueError, match="fixed size"):
        RewardScorer.from_pretrained(llava_dir, device="cpu", max_pixels=4096)


# ----------------------------------------------------------------------------- token budget


def test_max_length_from_config_to_folder_scorer_and_cli(llava_dir, tmp_path, capsys):
    scorer = RewardScorer.from_pretrained(llava_dir, device="cpu")
    assert scorer.processor.max_length is None and scorer.processor.token_budget == 512
    long = " ".join(["a red circle on the left of the big tree"] * 60)  # ~540 tokens
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scorer.score([long, "dog", long], [Image.new("RGB", (28, 28))] * 3, batch_size=1)
    cut = [str(w.message) for w in caught if issubclass(w.category, CaptionTruncatedWarning)]
    assert len(cut) == 1 and cut[0].startswith("2 of 3 captions were cut")  # one per call

    # <s> USER: + 16 image tokens + </s> = 19 tokens around the caption
    short = RewardScorer.from_pretrained(llava_dir, device="cpu", max_length=24)
    assert short.processor.max_length == short.model.config.max_length == 24
    with pytest.warns(CaptionTruncatedWarning, match=r"1 of 1 captions.*max_length=24"):
        short.score("a red circle on the left of the big tree", [Image.new("RGB", (28, 28))])
    Image.new("RGB", (28, 28)).save(tmp_path / "img.png")
    args = ["score", "--model", str(llava_dir), "--prompt", long, str(tmp_path / "img.png")]
    with pytest.warns(CaptionTruncatedWarning, match="max_length=24"):
        assert main([*args, "--max-length", "24", "--json", "--device", "cpu"]) == 0
    cli = json.loads(capsys.readouterr().out)["scores"][0]["overall"]
    with pytest.warns(CaptionTruncatedWarning):
        api = float(short.score(long, [tmp_path / "img.png"])[0])
    assert cli == pytest.approx(api, abs=1e-6)

    torch.manual_seed(0)
    model = LlavaRewardModel.from_pretrained(llava_dir)
    model.processor.max_length = 40
    model.config.max_length = 40
    model.save_pretrained(tmp_path / "rm40")
    assert RewardScorer.from_pretrained(tmp_path / "rm40", device="cpu").processor.max_length == 40


def test_qwen3_vl_takes_the_same_budget(tmp_path):
    backbone = save_tiny_backbone("qwen3_vl", tmp_path / "qwen3", tokenizer="bytelevel")
    model = LlavaRewardModel.from_backbone(backbone, lora_config=LORA, max_pixels=28 * 28)
    assert model.processor.family.pixel_budget() == (784, 784)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 74, 3), dtype=np.uint8))
    h, w = qwen2_vl_smart_resize(90, 74, 14, 784, 784)
    inputs = model.processor(["a dog"], [image])
    assert _n_image_tokens(inputs, model) == h * w // 14**2 == 2
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    assert torch.equal(
        model.processor.family.pixel_inputs_torch(x)["image_grid_thw"], inputs["image_grid_thw"]
    )
