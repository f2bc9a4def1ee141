"""The reward registry: built-ins, user callables and errors."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from alignment.rewards import available_rewards, get_reward_fn, register_reward


def _images() -> torch.Tensor:
    flat = torch.full((1, 3, 32, 32), 0.5)
    noisy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return torch.cat([flat, noisy])


def test_builtin_names_registered():
    assert {"jpeg_compressibility", "jpeg_incompressibility", "brightness", "llava_reward"} <= set(
        available_rewards()
    )


def test_jpeg_rewards_rank_flat_above_noise():
    imgs = _images()
    comp = get_reward_fn("jpeg_compressibility")(imgs, ["a", "b"])
    incomp = get_reward_fn("jpeg_incompressibility", quality=80)(imgs, ["a", "b"])
    assert comp.shape == (2,) and comp.dtype == torch.float32
    assert comp[0] > comp[1]  # a flat image compresses better than noise
    assert incomp[1] > incomp[0]
    torch.testing.assert_close(comp, -get_reward_fn("jpeg_incompressibility")(imgs, ["a", "b"]))


def test_brightness_is_mean_pixel():
    imgs = torch.stack([torch.zeros(3, 4, 4), torch.full((3, 4, 4), 0.25)])
    assert get_reward_fn("brightness")(imgs, ["x", "y"]).tolist() == [0.0, 0.25]


def test_module_function_and_factory():
    mod = types.ModuleType("my_rewards_mod")

    def plain(images, prompts):
        return torch.tensor([float(len(p)) for p in prompts])

    def factory(scale: float = 1.0):
        return lambda images, prompts: torch.full((len(prompts),), scale)

    mod.plain, mod.factory = plain, factory
    sys.modules["my_rewards_mod"] = mod
    try:
        assert get_reward_fn("my_rewards_mod:plain")(_images(), ["ab", "c"]).tolist() == [2.0, 1.0]
        assert get_reward_fn("my_rewards_mod:factory", scale=3.0)(_images(), ["a"]).tolist() == [
            3.0
        ]
        with pytest.raises(KeyError, match="Cannot import"):
            get_reward_fn("my_rewards_mod:missing")
    finally:
        del sys.modules["my_rewards_mod"]


def test_unknown_name_and_duplicate_registration():
    with pytest.raises(KeyError, match="Registered"):
        get_reward_fn("no_such_reward")

    @register_reward("_test_const")
    def const():
        return lambda images, prompts: torch.ones(len(prompts))

    assert get_reward_fn("_test_const")(_images(), ["a", "b"]).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="already registered"):
        register_reward("_test_const")(lambda: None)


def test_bad_image_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        get_reward_fn("brightness")(torch.zeros(3, 4, 4), ["a"])


def test_world_oracle_entry_scores_renders_above_mismatches():
    from alignment.rewards import get_reward_fn
    from alignment.world.render import render_scene

    fn = get_reward_fn("world_oracle", perspective="alignment")
    caption = "a red circle at the top left on a white background"
    wrong = "a blue square at the bottom right on a black background"
    images = torch.stack([render_scene(caption), render_scene(wrong)])
    scores = fn(images, [caption, caption])
    assert scores.shape == (2,) and scores[0] > 0.5 > scores[1]


def test_llava_reward_entry_matches_the_scorer(tmp_path):
    from reward import LlavaRewardModel, RewardScorer
    from reward.testing import save_tiny_backbone

    backbone = save_tiny_backbone("llava", tmp_path / "bb")
    model = LlavaRewardModel.from_backbone(
        backbone, perspectives=("overall", "safety"), lora_config={"r": 4, "lora_alpha": 8}
    )
    model.save_pretrained(tmp_path / "rm")
    images = torch.rand(3, 3, 32, 32)
    prompts = ["a red circle", "a blue square", "a cat"]
    fn = get_reward_fn("llava_reward", path=str(tmp_path / "rm"), perspective="safety")
    expected = RewardScorer.from_pretrained(tmp_path / "rm").score(prompts, images, "safety")
    torch.testing.assert_close(fn(images, prompts), expected, atol=1e-6, rtol=0)  # 3.0e-8
    weighted = get_reward_fn(
        "llava_reward", path=str(tmp_path / "rm"), perspective={"overall": 1.0, "safety": 0.5}
    )
    assert weighted(images, prompts).shape == (3,)
