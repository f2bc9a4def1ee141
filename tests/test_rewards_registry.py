"""The reward registry: built-ins, user callables and errors."""

from __future__ import annotations

import math
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


def test_caption_contrast_by_hand():
    """log softmax(s / tau)[own]: scores (2, 0) at tau 2, own 0: 1 - log(e + 1); an absent
    alternative (-inf) weighs nothing; the gradient is (onehot - softmax) / tau."""
    from alignment.rewards import caption_contrast

    scores = torch.tensor([[2.0, 0.0, float("-inf")], [1.0, 1.0, 1.0]], requires_grad=True)
    out = caption_contrast(scores, torch.tensor([0, 2]), tau=2.0)
    assert out.tolist() == pytest.approx([1 - math.log(math.e + 1), -math.log(3)], rel=1e-6)
    out[0].backward()
    p = math.e / (math.e + 1)
    assert scores.grad[0].tolist() == pytest.approx([(1 - p) / 2, -(1 - p) / 2, 0.0], rel=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        caption_contrast(scores, torch.tensor([0, 0]), tau=0.0)


def test_contrastive_reward_pays_only_for_what_the_caption_names():
    """A reward that sees the colour word and also pays for brightness: through the contrast the
    brightness term cancels (same values, no gradient from it), the colour term is what is left,
    as computed by hand for the world's four colour captions (the other attributes' groups see
    no difference and add log(1/3), log(1/5), log(1/3))."""
    from alignment.rewards import contrastive_reward
    from alignment.world.grammar import attribute_alternatives

    def sees_red(images, prompts):
        red = images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3))
        is_red = torch.tensor([float(" red " in p) for p in prompts])
        return 20.0 * red * is_red

    def also_bright(images, prompts):
        return sees_red(images, prompts) + 50.0 * images.mean((1, 2, 3))

    images = torch.zeros(2, 3, 4, 4)
    images[0, 0] = 0.5  # reddish
    images[1] = 0.4  # gray
    prompts = ["a red circle at the top left on a white background"] * 2
    plain = contrastive_reward(sees_red, attribute_alternatives, tau=2.0)
    bright = contrastive_reward(also_bright, attribute_alternatives, tau=2.0)
    x = images.clone().requires_grad_(True)
    value = bright(x, prompts)
    assert torch.allclose(value, plain(images, prompts), atol=1e-5)
    s = 20.0 * 0.5 / 2.0  # the red caption's score over tau for image 0; 0 for the rest
    rest = -math.log(3) - math.log(5) - math.log(3)
    expected0 = s - math.log(math.exp(s) + 3) + rest
    expected1 = -math.log(4) + rest  # gray: every colour caption scores the same
    assert value.tolist() == pytest.approx([expected0, expected1], rel=1e-5)
    value[1].backward()  # the gray image's value moves only through its red - other channels
    g = x.grad[1]
    assert torch.allclose(g.sum(0), torch.zeros(4, 4), atol=1e-6)  # brightness: no pull
    assert g[0].mean() > 0  # more red makes the red caption fit better

    def no_own(prompt):
        return [(["another caption"], 1)]

    with pytest.raises(ValueError, match="names caption 1 as its own"):
        contrastive_reward(sees_red, no_own)(images, prompts)
    with pytest.raises(ValueError, match="finite number > 0"):
        contrastive_reward(sees_red, attribute_alternatives, tau=float("nan"))


def test_attribute_alternatives_are_canonical_and_name_their_own():
    """Every group is in the grammar's wording (the caption's own entry too, whatever its case or
    full stop), one attribute varied, its own index at the caption's value."""
    from alignment.world.grammar import attribute_alternatives

    groups = attribute_alternatives("A blue square at the top right on a gray background.")
    assert [len(g) for g, _ in groups] == [4, 3, 5, 3]
    (colours, c), (shapes, s), _, (backgrounds, b) = groups
    own = "a blue square at the top right on a gray background"
    assert colours[c] == shapes[s] == backgrounds[b] == own
    assert shapes == [own.replace("square", x) for x in ("circle", "square", "triangle")]
