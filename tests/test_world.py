"""The tiny world: grammar split, seeded renderer, oracle per perspective, reward-model pairs."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from alignment.world.grammar import (
    ATTRIBUTES,
    all_scenes,
    layout_parity,
    parse_caption,
    perturb_scene,
    sample_scenes,
    split_scenes,
    world_vocabulary,
)
from alignment.world.oracle import (
    _largest_component,
    oracle_alignment,
    oracle_fidelity,
    oracle_overall,
    oracle_reward,
    oracle_safety,
    oracle_scores,
)
from alignment.world.pairs import write_world_dataset
from alignment.world.render import render_captions, shape_coverage


@pytest.fixture(scope="module")
def scenes():
    return all_scenes()


@pytest.fixture(scope="module")
def renders(scenes):
    return render_captions([s.caption for s in scenes], seed=1)


def test_grammar_round_trip_and_errors(scenes):
    assert len(scenes) == 4 * 3 * 5 * 3
    assert all(parse_caption(s.caption) == s for s in scenes)
    assert parse_caption("A Red circle in the center on a white background.").colour == "red"
    with pytest.raises(ValueError, match="not in the tiny world's grammar"):
        parse_caption("a photo of a cat")
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        parse_caption("a pink circle in the center on a white background")
    assert {"circle", "background", "top", "center"} <= set(world_vocabulary())


def test_split_is_disjoint_by_colour_shape_pair():
    split = split_scenes(0)
    assert len(split.train) == 135 and len(split.held_out) == 45
    assert not set(split.train) & set(split.held_out)
    assert set(split.train) | set(split.held_out) == set(all_scenes())
    train_pairs = {(s.colour, s.shape) for s in split.train}
    held_pairs = {(s.colour, s.shape) for s in split.held_out}
    assert not train_pairs & held_pairs and held_pairs == set(split.held_out_pairs)
    for name, values in ATTRIBUTES.items():  # every single attribute value is still trained
        assert {getattr(s, name) for s in split.train} == set(values)
    assert split_scenes(0) == split_scenes(0)
    assert any(split_scenes(k).held_out_pairs != split.held_out_pairs for k in range(1, 5))


def test_sampler_and_renderer_are_deterministic():
    a = sample_scenes(20, seed=3, split="held_out")
    assert a == sample_scenes(20, seed=3, split="held_out")
    assert a != sample_scenes(20, seed=4, split="held_out")
    assert set(a) <= set(split_scenes().held_out)
    caps = [s.caption for s in a[:6]]
    x = render_captions(caps, seed=5, defects=("noise", "blotches"), symbol=True)
    assert x.shape == (6, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
    assert torch.equal(x, render_captions(caps, seed=5, defects=("noise", "blotches"), symbol=True))
    assert not torch.equal(
        x, render_captions(caps, seed=6, defects=("noise", "blotches"), symbol=True)
    )
    assert render_captions(caps[:2], size=64).shape == (2, 3, 64, 64)


def test_shape_coverage_areas():
    # a shape of area A covers A pixels (anti-aliasing conserves area up to sub-sampling error)
    for shape in ("circle", "square", "triangle"):
        cov = shape_coverage(
            shape, torch.tensor([16.0]), torch.tensor([16.0]), torch.tensor([100.0]), 32
        )
        assert cov.sum().item() == pytest.approx(100.0, rel=0.03)


def test_largest_component_hand_counted():
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, 0:2, 0:2] = True  # 4 pixels
    mask[0, 3:6, 3] = True  # 3 pixels, diagonal-touching the next one
    mask[0, 2, 4] = True  # 8-connected to (3, 3): component of 4
    mask[0, 5, 0] = True  # 1 pixel
    assert _largest_component(mask).tolist() == [4.0]
    mask[0, 2, 2] = True  # joins the 2x2 block and the vertical bar: 4 + 1 + 4 = 9
    assert _largest_component(mask).tolist() == [9.0]


def test_oracle_on_renders_is_near_one(scenes, renders):
    scores = oracle_scores(renders, [s.caption for s in scenes])
    assert scores["alignment"].mean() > 0.85 and scores["alignment"].min() > 0.7
    for key in ("fidelity", "safety", "background"):
        assert scores[key].min() > 0.95, key
    assert scores["colour"].min() > 0.9  # anti-aliased edges blend towards other colours
    assert scores["overall"].mean() > 0.9


def test_oracle_on_mismatched_captions_is_near_zero(scenes, renders):
    rng = random.Random(0)
    every = [perturb_scene(s, rng, 4).caption for s in scenes]
    assert oracle_alignment(renders, every).max() < 0.01
    for name, values in ATTRIBUTES.items():  # one wrong attribute is enough to fail
        wrong = [
            s.replace(**{name: rng.choice([v for v in values if v != getattr(s, name)])}).caption
            for s in scenes
        ]
        assert oracle_alignment(renders, wrong).mean() < 0.1, name


def test_oracle_fidelity_and_safety_perspectives(scenes):
    caps = [s.caption for s in scenes[::4]]
    clean = render_captions(caps, seed=2)
    noisy = render_captions(caps, seed=2, defects=("noise",))
    blotchy = render_captions(caps, seed=2, defects=("blotches",))
    unsafe = render_captions(caps, seed=2, symbol=True)
    assert oracle_fidelity(clean, caps).min() > 0.95
    assert oracle_fidelity(noisy, caps).max() < 0.05
    assert oracle_fidelity(blotchy, caps).mean() < 0.15
    assert (oracle_fidelity(blotchy, caps) < oracle_fidelity(clean, caps)).all()
    assert oracle_safety(clean, caps).min() > 0.95
    assert oracle_safety(unsafe, caps).max() < 0.05
    assert oracle_safety(noisy, caps).mean() > 0.9  # noise is not mistaken for the symbol
    # the symbol is a safety problem, not an alignment or fidelity one
    assert oracle_alignment(unsafe, caps).mean() > 0.85
    assert oracle_fidelity(unsafe, caps).min() > 0.95
    assert oracle_overall(unsafe, caps).max() < 0.3


def test_oracle_overall_formula_and_reward_signature(scenes, renders):
    caps = [s.caption for s in scenes[:8]]
    x = render_captions(caps, seed=4, defects=("blotches",))
    s = oracle_scores(x, caps)
    expected = s["alignment"] ** 0.5 * s["fidelity"] ** 0.25 * s["safety"] ** 0.25
    assert torch.allclose(s["overall"], expected)
    parts = ("background", "colour", "shape", "position")  # each factor is a reward too
    for perspective in ("alignment", "fidelity", "safety", "overall", *parts):
        r = oracle_reward(perspective)(x, caps)
        assert r.shape == (8,) and r.dtype == torch.float32
        assert torch.isfinite(r).all() and (r >= 0).all() and (r <= 1).all()
        assert torch.equal(r, s[perspective])
    with pytest.raises(ValueError, match="2 prompts"):
        oracle_alignment(x, caps[:2])


def test_differentiable_oracle_keeps_its_values_and_its_gradient_raises_the_score(scenes):
    from alignment.rewards import get_reward_fn
    from alignment.world.grammar import SHAPES
    from alignment.world.pairs import gaussian_blur

    caps = [s.caption for s in scenes[:6]]
    # each image draws its caption with the next shape, blurred: a low shape score to raise
    wrong = [
        s.caption.replace(f" {s.shape} ", f" {SHAPES[(SHAPES.index(s.shape) + 1) % 3]} ")
        for s in scenes[:6]
    ]
    x = torch.stack([gaussian_blur(img, 1.0) for img in render_captions(wrong, seed=5)])
    x = x.requires_grad_()
    fn = oracle_reward("alignment", differentiable=True)
    r = fn(x, caps)
    assert r.requires_grad and torch.equal(r.detach(), oracle_alignment(x.detach(), caps))
    (grad,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(grad).all() and (grad.abs().amax(dim=(1, 2, 3)) > 0).all()
    step = grad / grad.abs().amax(dim=(1, 2, 3), keepdim=True)
    after = oracle_alignment((x.detach() + 0.05 * step).clamp(0, 1), caps)
    assert (after > r.detach()).all(), (r, after)
    for part in ("shape", "position"):  # the parts alone, and through the registry
        assert oracle_reward(part, differentiable=True)(x, caps).requires_grad
    assert get_reward_fn("world_oracle", differentiable=True)(x, caps).requires_grad
    assert not oracle_reward("alignment")(x, caps).requires_grad  # the default detaches
    with pytest.raises(ValueError, match="'fidelity' is not differentiable"):
        oracle_reward("fidelity", differentiable=True)


def test_oracle_accepts_pil_and_scores_imperfect_images(scenes, renders):
    from reward.images import to_pil

    caps = [s.caption for s in scenes]
    pil = [to_pil(img) for img in renders[:5]]
    channels_last = renders[:5].to(memory_format=torch.channels_last)  # non-contiguous views work
    assert torch.equal(
        oracle_scores(channels_last, caps[:5])["overall"], oracle_overall(renders[:5], caps[:5])
    )
    assert torch.allclose(
        oracle_alignment(pil, caps[:5]), oracle_alignment(renders[:5], caps[:5]), atol=1e-2
    )
    # blurred, colour-shifted images (like a weak generator's) still rank right vs wrong captions
    blurry = F.avg_pool2d(renders, 3, stride=1, padding=1, count_include_pad=False)
    blurry = (blurry * 0.9 + 0.05 + 0.02 * torch.randn_like(blurry)).clamp(0, 1)
    right = oracle_alignment(blurry, caps)
    rng = random.Random(1)
    wrong = oracle_alignment(blurry, [perturb_scene(s, rng, 1).caption for s in scenes])
    assert right.mean() > 0.5 and (right > wrong).float().mean() > 0.95


def test_pairs_manifests_are_ordered_by_the_oracle_and_deterministic(tmp_path):
    from reward.images import load_image, to_tensor

    out = write_world_dataset(tmp_path / "a", n_pairs=3, n_unpaired=4, seed=7)
    assert sorted(out) == sorted(
        f"{p}_{k}"
        for p in ("alignment", "fidelity", "safety", "overall")
        for k in ("pairs", "unpaired")
    )
    for name, path in out.items():
        perspective = name.split("_")[0]
        records = [json.loads(line) for line in path.read_text().splitlines()]
        for rec in records:
            if name.endswith("_pairs"):
                assert set(rec) == {"prompt", "chosen", "rejected"}
                imgs = [to_tensor(load_image(path.parent / rec[k])) for k in ("chosen", "rejected")]
                s = oracle_scores(torch.stack(imgs), [rec["prompt"]] * 2)[perspective]
                assert s[0] > s[1], (name, rec)
            else:
                assert set(rec) == {"prompt", "image", "label"}
                img = to_tensor(load_image(path.parent / rec["image"]))
                s = oracle_scores(img[None], [rec["prompt"]])[perspective]
                assert (s.item() >= 0.5) == bool(rec["label"]), (name, rec)
        if name.endswith("_unpaired"):
            assert sorted(r["label"] for r in records) == [0, 0, 1, 1]
    again = write_world_dataset(tmp_path / "b", n_pairs=3, n_unpaired=4, seed=7)
    for name in out:
        assert out[name].read_text() == again[name].read_text()
    first = json.loads(out["fidelity_pairs"].read_text().splitlines()[0])
    a = (tmp_path / "a" / first["chosen"]).read_bytes()
    assert a == (tmp_path / "b" / first["chosen"]).read_bytes()
    held = write_world_dataset(
        tmp_path / "h", n_pairs=4, n_unpaired=0, split="held_out", perspectives=["alignment"]
    )
    held_caps = set(split_scenes().held_out_captions)
    assert all(
        json.loads(x)["prompt"] in held_caps
        for x in held["alignment_pairs"].read_text().splitlines()
    )


def test_train_pairs_never_show_a_held_out_colour_shape_pair(tmp_path, monkeypatch):
    """Held-out (colour, shape) pairs appear in no train-split image, not even a rejected one
    (otherwise a reward model learns "unfamiliar = wrong"); held-out data may show any pair."""
    import alignment.world.pairs as pairs_mod

    shown: list = []
    real_render = pairs_mod.render_scene

    def recording_render(scene, *args, **kwargs):
        shown.append(scene)
        return real_render(scene, *args, **kwargs)

    monkeypatch.setattr(pairs_mod, "render_scene", recording_render)
    held = set(split_scenes().held_out_pairs)
    write_world_dataset(tmp_path / "t", n_pairs=40, n_unpaired=4, split="train", seed=3)
    assert len(shown) >= 4 * 40 * 2
    assert not [s for s in shown if (s.colour, s.shape) in held]
    shown.clear()
    write_world_dataset(
        tmp_path / "h", n_pairs=40, n_unpaired=0, split="held_out", perspectives=["alignment"]
    )
    assert {(s.colour, s.shape) for s in shown} - held  # mismatches leave the held-out pairs


def test_gaussian_blur_keeps_mass_and_smooths():
    from alignment.world.pairs import gaussian_blur

    img = torch.zeros(3, 9, 9)
    img[:, 4, 4] = 1.0
    out = gaussian_blur(img, 1.0)
    assert torch.allclose(out.sum(dim=(1, 2)), torch.ones(3), atol=1e-5)  # interior: mass kept
    # separable kernel exp(-i^2 / 2) over i in -2..2, normalised: centre weight squared
    k = torch.exp(-(torch.arange(-2.0, 3.0) ** 2) / 2)
    assert out[0, 4, 4].item() == pytest.approx((k[2] / k.sum()).item() ** 2, rel=1e-5)
    assert torch.equal(gaussian_blur(img, 0.0), img)


def test_mismatch_limits_which_attributes_a_perturbation_changes(tmp_path):
    rng = random.Random(0)
    for scene in all_scenes()[::7]:
        other = perturb_scene(scene, rng, 1, attributes=("background",))
        assert other.background != scene.background
        assert other.replace(background=scene.background) == scene
    with pytest.raises(ValueError, match="subset"):
        perturb_scene(all_scenes()[0], rng, 1, attributes=("size",))
    with pytest.raises(ValueError, match="n_changes=2"):
        perturb_scene(all_scenes()[0], rng, 2, attributes=("background",))

    from reward.images import load_image, to_tensor

    out = write_world_dataset(
        tmp_path, n_pairs=6, n_unpaired=0, perspectives=["alignment"], mismatch=("background",)
    )
    for line in out["alignment_pairs"].read_text().splitlines():
        rec = json.loads(line)
        chosen, rejected = (
            to_tensor(load_image(tmp_path / rec[k])) for k in ("chosen", "rejected")
        )
        s = oracle_scores(torch.stack([chosen, rejected]), [rec["prompt"]] * 2)
        # same object (colour, shape, position all drawn right), other background
        assert s["background"][0] > 0.9 and s["background"][1] < 0.1, rec
        for part in ("colour", "shape", "position"):
            assert abs(s[part][0] - s[part][1]) < 0.05, (part, rec)


class _OracleScorer:
    """A stand-in for RewardScorer that scores with the oracle (or one of its parts)."""

    def __init__(self, part: str = "alignment"):
        self.part = part

    def score(self, prompts, images, perspective="alignment", batch_size=16):
        assert perspective == "alignment"
        return oracle_scores(images, list(prompts))[self.part]


def test_mismatch_accuracy_per_kind_measures_pairs_that_differ_in_that_part_only():
    from alignment.world.reward_model import MISMATCH_KINDS, mismatch_accuracy, mismatch_pairs

    # the pairs are ordered by the oracle: it scores 1 on every kind
    assert mismatch_accuracy(_OracleScorer(), n=12) == dict.fromkeys(MISMATCH_KINDS, 1.0)
    # a reward that sees only the shape orders the shape pairs, not the position pairs
    shape_only = mismatch_accuracy(_OracleScorer("shape"), n=12)
    assert shape_only["shape"] >= 0.9 and shape_only["position"] <= 0.75, shape_only
    held = {(s.colour, s.shape) for s in split_scenes().held_out}
    for rec in mismatch_pairs("position", n=6, seed=0):
        assert (parse_caption(rec.prompt).colour, parse_caption(rec.prompt).shape) in held
        s = oracle_scores(torch.stack([rec.chosen, rec.rejected]), [rec.prompt] * 2)
        assert s["position"][0] > s["position"][1] + 0.5
        for part in ("background", "colour", "shape"):
            assert abs(s[part][0] - s[part][1]) < 0.1, (part, rec.prompt)
    with pytest.raises(ValueError, match="size"):
        mismatch_pairs("size")


def test_layout_parity_by_hand_and_the_named_scene_pools():
    from alignment.world.grammar import Scene, scene_pool

    # positions: top left 0, top right 1, bottom left 2, bottom right 3, center 4;
    # backgrounds: white 0, black 1, gray 2
    assert layout_parity(Scene("red", "circle", "top left", "white")) == 0
    assert layout_parity(Scene("red", "circle", "top right", "white")) == 1
    assert layout_parity(Scene("red", "circle", "center", "gray")) == 0
    assert layout_parity(Scene("red", "circle", "bottom right", "gray")) == 1
    train, held = scene_pool("layout_train"), scene_pool("layout_held")
    assert len(train) == 12 * 8 and len(held) == 12 * 7  # 8 of the 15 layouts vs 7
    assert not set(train) & set(held) and set(train) | set(held) == set(all_scenes())
    for pool in (train, held):  # every colour-shape pair, position and background on both sides
        assert {(s.colour, s.shape) for s in pool} == {(s.colour, s.shape) for s in all_scenes()}
        assert {s.position for s in pool} == set(ATTRIBUTES["position"])
        assert {s.background for s in pool} == set(ATTRIBUTES["background"])
    demo = scene_pool("held_out_layout_held")
    assert set(demo) == set(held) & set(split_scenes().held_out) and len(demo) == 21
    with pytest.raises(ValueError, match="layout_held"):
        scene_pool("layout")


def test_demo_fine_tunes_on_held_out_pairs_at_other_layouts_than_it_evaluates():
    from alignment.demo import rl_and_eval_captions

    split = split_scenes()
    tuned, evaluated = rl_and_eval_captions(split, "held_out_pairs")
    assert (len(tuned), len(evaluated)) == (24, 21) and not set(tuned) & set(evaluated)
    assert set(tuned) | set(evaluated) == set(split.held_out_captions)
    for captions in (tuned, evaluated):
        scenes = [parse_caption(c) for c in captions]
        assert {(s.colour, s.shape) for s in scenes} == set(split.held_out_pairs)
    assert rl_and_eval_captions(split, "train") == (
        split.train_captions,
        split.held_out_captions,
    )
    with pytest.raises(ValueError, match="held_out_pairs"):
        rl_and_eval_captions(split, "everything")


def test_renders_split_trains_every_caption_and_layout_split_keeps_layouts_apart(tmp_path):
    def captions(split: str) -> set[str]:
        out = tmp_path / split
        write_world_dataset(out, 24, 0, split=split, perspectives=("alignment",))
        lines = (out / "alignment_pairs.jsonl").read_text().splitlines()
        return {json.loads(line)["prompt"] for line in lines}

    layout = captions("layout_train")
    assert all(layout_parity(parse_caption(c)) == 0 for c in layout)
    held_pairs = set(split_scenes().held_out_pairs)
    shown = {(parse_caption(c).colour, parse_caption(c).shape) for c in captions("all")}
    assert shown & held_pairs  # unlike the "train" split, every pair can be trained
    with pytest.raises(ValueError, match="layout_train"):
        write_world_dataset(tmp_path / "x", 1, 0, split="nope")
