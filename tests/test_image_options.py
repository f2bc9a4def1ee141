"""The differentiable preprocessing honours every image-processor option it meets, or refuses.

For each option, on and off: the torch path (``pixel_inputs_torch`` on ``Tensor[N, 3, H, W]``)
equals the official PIL image processor on the same 8-bit image. With ``emulate_8bit`` (the
default) every case below measured max |torch - PIL| = 0.0 in normalised units (PIL's 8-bit
arithmetic is reproduced), so the tolerance is :data:`TOL`. An option the torch path does not
implement is refused with an error that names it, and frozen scoring then takes the PIL path.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from reward import LlavaRewardModel, RewardScorer
from reward.processing import RewardProcessor
from reward.testing import tiny_idefics3, tiny_llava, tiny_qwen2_vl

#: measured 0.0 for every case of this file (exact 8-bit emulation); tolerance just above it
TOL = 1e-6
#: non-square sizes (tall, wide) and a square one
SIZES = [(45, 37), (20, 56), (30, 30)]


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def _max_diff(family, image: Image.Image) -> float:
    official = family.pixel_inputs([image])["pixel_values"].float()
    ours = family.pixel_inputs_torch(_tensor(image))["pixel_values"]
    assert ours.shape == official.shape
    return (ours - official).abs().max().item()


@pytest.fixture(scope="module")
def llava():
    model, tok, _ = tiny_llava()
    return model.config, tok


def _llava_family(llava, processor):
    config, tok = llava
    return RewardProcessor(tok, processor, config, chat_template=tok.chat_template).family


LLAVA_CASES = {
    # LLaVA's do_pad: pad to a square with int(255 * mean) first (the issue's 2.85 divergence)
    "llava do_pad on": (LlavaImageProcessorPil, {"do_pad": True}),
    "llava do_pad off": (LlavaImageProcessorPil, {"do_pad": False}),
    "do_pad on, no crop, fixed size": (
        LlavaImageProcessorPil,
        {"do_pad": True, "do_center_crop": False, "size": {"height": 24, "width": 32}},
    ),
    # center crop on / off, and a crop larger than the resized image (zero padding)
    "crop off": (CLIPImageProcessorPil, {"do_center_crop": False}),
    "crop larger than image": (
        CLIPImageProcessorPil,
        {"size": {"height": 21, "width": 25}, "crop_size": {"height": 28, "width": 28}},
    ),
    # resize modes
    "bilinear": (CLIPImageProcessorPil, {"resample": 2}),
    "lanczos": (CLIPImageProcessorPil, {"resample": 1}),
    "resize off": (CLIPImageProcessorPil, {"do_resize": False}),
    # size forms of the PIL backend
    "shortest+longest edge": (
        CLIPImageProcessorPil,
        {"size": {"shortest_edge": 28, "longest_edge": 40}, "do_center_crop": False},
    ),
    "max height/width": (
        CLIPImageProcessorPil,
        {"size": {"max_height": 30, "max_width": 30}, "do_center_crop": False},
    ),
    # rescale / normalise off
    "rescale off": (CLIPImageProcessorPil, {"do_rescale": False}),
    "normalize off": (CLIPImageProcessorPil, {"do_normalize": False}),
    # the generic batch pad of the PIL backend, to pad_size
    "pad to pad_size": (
        CLIPImageProcessorPil,
        {"do_pad": True, "pad_size": {"height": 33, "width": 31}},
    ),
}


@pytest.mark.parametrize("case", list(LLAVA_CASES))
def test_llava_torch_path_equals_pil_per_option(llava, case):
    cls, options = LLAVA_CASES[case]
    base = {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}}
    family = _llava_family(llava, cls(**{**base, **options}))
    for size in SIZES:
        assert _max_diff(family, _image(*size)) <= TOL, (case, size)


def test_llava_do_pad_changes_pixels_so_the_test_can_see_it(llava):
    """With do_pad on, ignoring it (the old torch path) is far off: the parity above means
    something."""
    base = {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}}
    padded = _llava_family(llava, LlavaImageProcessorPil(**base, do_pad=True))
    plain = _llava_family(llava, LlavaImageProcessorPil(**base, do_pad=False))
    image = _image(45, 37)
    gap = (
        (padded.pixel_inputs([image])["pixel_values"] - plain.pixel_inputs([image])["pixel_values"])
        .abs()
        .max()
    )
    assert gap > 1.0  # normalised units (measured 2.36 on this 45x37 noise image)


def test_unknown_option_and_filter_are_refused_by_name(llava):
    base = {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}}
    ip = CLIPImageProcessorPil(**base)
    ip.do_flip_horizontal = True
    family = _llava_family(llava, ip)
    with pytest.raises(ValueError, match="do_flip_horizontal=True"):
        family.pixel_inputs_torch(_tensor(_image(30, 30)))
    assert not family.supports_torch_preprocessing()
    nearest = _llava_family(llava, CLIPImageProcessorPil(**base, resample=0))
    with pytest.raises(ValueError, match="resample"):
        nearest.pixel_inputs_torch(_tensor(_image(30, 30)))
    odd_size = CLIPImageProcessorPil(**base)
    odd_size.size = {"longest_edge": 30}
    with pytest.raises(ValueError, match="size"):
        _llava_family(llava, odd_size).pixel_inputs_torch(_tensor(_image(30, 30)))


def test_do_pad_differentiable_reward_equals_frozen_score(llava):
    """The issue's case end to end: LlavaImageProcessor with do_pad, reward through the torch
    path (with gradients) == frozen score through the PIL processor (measured |diff| 0.0)."""
    torch.manual_seed(0)
    model, tok, _ = tiny_llava()
    ip = LlavaImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_pad=True
    )
    proc = RewardProcessor(tok, ip, model.config, chat_template=tok.chat_template)
    reward = LlavaRewardModel.from_backbone(model, processor=proc, lora_config={"r": 4})
    scorer = RewardScorer(reward, device="cpu", dtype=torch.float32)
    images = torch.cat([_tensor(_image(45, 37, seed=1)), _tensor(_image(45, 37, seed=2))])
    x = images.clone().requires_grad_(True)
    r = scorer.as_reward_fn("overall", differentiable=True)(x, ["a red circle", "a dog"])
    r.sum().backward()
    assert x.grad.abs().sum() > 0
    frozen = scorer.score(["a red circle", "a dog"], [Image.fromarray(_u8(im)) for im in images])
    assert (r.detach() - frozen).abs().max().item() <= 1e-5


def _u8(image: torch.Tensor) -> np.ndarray:
    return (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def test_refused_option_falls_back_to_pil_for_frozen_scores():
    torch.manual_seed(0)
    model, tok, ip = tiny_llava()
    ip = copy.deepcopy(ip)
    ip.do_flip_horizontal = True  # an option no path implements: PIL ignores it, torch refuses
    proc = RewardProcessor(tok, ip, model.config, chat_template=tok.chat_template)
    scorer = RewardScorer(
        LlavaRewardModel.from_backbone(model, processor=proc, lora_config={"r": 4}),
        device="cpu",
        dtype=torch.float32,
    )
    images = _tensor(_image(30, 30))
    frozen = scorer.as_reward_fn("overall")(images, ["a dog"])  # PIL path, no error
    torch.testing.assert_close(frozen, scorer.score(["a dog"], images), atol=0, rtol=0)
    with pytest.raises(ValueError, match="do_flip_horizontal"):
        scorer.as_reward_fn("overall", differentiable=True)(images, ["a dog"])


# ----------------------------------------------------------------------------- Qwen, Idefics3

QWEN_CASES = {
    "default budget": {},
    "smaller max_pixels": {"size": {"shortest_edge": 14 * 14, "longest_edge": 28 * 28}},
    "larger min_pixels": {"size": {"shortest_edge": 56 * 56, "longest_edge": 70 * 70}},
    "bilinear": {"resample": 2},
    "rescale off": {"do_rescale": False},
    "normalize off": {"do_normalize": False},
    "do_pad / crop (no effect in Qwen2VL)": {
        "do_pad": True,
        "do_center_crop": True,
        "crop_size": {"height": 14, "width": 14},
    },
}


@pytest.mark.parametrize("case", list(QWEN_CASES))
def test_qwen_torch_path_equals_pil_per_option(case):
    model, tok, ip = tiny_qwen2_vl()
    for key, value in QWEN_CASES[case].items():
        setattr(ip, key, value)
    family = RewardProcessor(tok, ip, model.config, chat_template=tok.chat_template).family
    for size in SIZES:
        image = _image(*size)
        assert _max_diff(family, image) <= TOL, (case, size)
        grid_pil = family.pixel_inputs([image])["image_grid_thw"]
        grid_torch = family.pixel_inputs_torch(_tensor(image))["image_grid_thw"]
        assert torch.equal(grid_pil, grid_torch)


IDEFICS3_CASES = {
    "splitting on": {"do_image_splitting": True},
    "splitting off": {"do_image_splitting": False},
    "bicubic": {"resample": 3},
    "fixed size": {"size": {"height": 42, "width": 42}},
    "normalize off": {"do_normalize": False},
}


@pytest.mark.parametrize("case", list(IDEFICS3_CASES))
def test_idefics3_torch_path_equals_pil_per_option(case):
    model, tok, ip = tiny_idefics3()
    for key, value in IDEFICS3_CASES[case].items():
        setattr(ip, key, value)
    family = RewardProcessor(tok, ip, model.config, chat_template=tok.chat_template).family
    for size in SIZES:
        assert _max_diff(family, _image(*size)) <= TOL, (case, size)
