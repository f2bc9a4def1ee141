"""The world policy's own samples as captioner data (alignment/world/policy_samples.py) and the
ResNet-tower (FastVLM) world backbone that learns from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignment.world.grammar import all_scenes
from alignment.world.policy_samples import draw_policy_samples, oracle_caption_distribution
from alignment.world.render import render_scene
from alignment.world.reward_model import BACKBONE, pretrain_world_backbone, world_backbone

WEIGHTS = Path(__file__).resolve().parents[1] / "alignment/world/weights"


def test_the_oracle_captions_a_render_with_its_own_caption_most_often():
    captions = [s.caption for s in all_scenes()]
    scenes = all_scenes()[::37]  # 5 scenes, every attribute varied
    images = torch.stack([render_scene(s, 32, rng=i) for i, s in enumerate(scenes)])
    p = oracle_caption_distribution(images, captions)
    assert p.shape == (len(scenes), len(captions))
    torch.testing.assert_close(p.sum(1), torch.ones(len(scenes)))
    assert [captions[i] for i in p.argmax(1).tolist()] == [s.caption for s in scenes]
    # by hand for one image: the oracle's alignment with each caption over its sum
    from alignment.world.oracle import oracle_alignment

    a = oracle_alignment(images[:1].expand(len(captions), -1, -1, -1), captions)
    torch.testing.assert_close(p[0], a / a.sum())


def test_policy_samples_are_8_bit_and_do_not_depend_on_the_chunk():
    from alignment.flow_policy import load_frozen_policy

    policy = load_frozen_policy(WEIGHTS / "tiny-world-sd3")
    captions = [s.caption for s in all_scenes()[:3]]
    a, asked = draw_policy_samples(policy, captions, per_caption=2, seed=1, num_steps=2, chunk=2)
    b, _ = draw_policy_samples(policy, captions, per_caption=2, seed=1, num_steps=2, chunk=64)
    c, _ = draw_policy_samples(policy, captions, per_caption=2, seed=2, num_steps=2, chunk=64)
    assert asked == captions * 2 and a.shape == (6, 3, 32, 32)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert torch.equal(a * 255, (a * 255).round()) and not torch.equal(a, c)


def test_the_resnet_tower_backbone_is_a_fastvlm_with_the_clip_backbones_lm():
    clip, tokenizer, processor = world_backbone(**BACKBONE)
    fast, _, _ = world_backbone(**{**BACKBONE, "tower": "resnet"})
    assert fast.config.model_type == "fast_vlm" and fast.config.vision_config.model_type == "resnet"
    lm, clip_lm = fast.model.language_model.state_dict(), clip.model.language_model.state_dict()
    assert all(torch.equal(v, clip_lm[k]) for k, v in lm.items())
    from reward.processing import RewardProcessor

    proc = RewardProcessor(tokenizer, processor, fast.config, tokenizer.chat_template)
    image = render_scene(all_scenes()[0], 32, rng=0)
    from reward.images import to_pil

    inputs = proc(["a red circle"], [to_pil(image)])
    assert int((inputs["input_ids"] == fast.config.image_token_id).sum()) == 64  # 8 x 8 map
    with torch.no_grad():
        assert torch.isfinite(fast(**inputs).logits).all()
    with pytest.raises(ValueError, match="tower='vit'"):
        world_backbone(**{**BACKBONE, "tower": "vit"})


def test_the_captioner_learns_from_policy_samples_only_when_given_the_policy(tmp_path):
    with pytest.raises(ValueError, match="needs the world policy"):
        pretrain_world_backbone(tmp_path / "x", captioner={"policy_frac": 0.5})
    out = pretrain_world_backbone(
        tmp_path / "bb",
        backbone={"tower": "resnet"},
        captioner={"steps": 2, "batch_size": 4, "policy_frac": 1.0, "policy_per_caption": 1},
        policy=WEIGHTS / "tiny-world-sd3",
    )
    record = json.loads((out / "pretrain.json").read_text())
    assert record["policy_frac"] == 1.0 and record["tower"] == "resnet"
    from transformers import AutoModelForImageTextToText

    assert AutoModelForImageTextToText.from_pretrained(out).config.model_type == "fast_vlm"


def test_oracle_shape_targets_are_the_oracles_shape_part_for_each_shape():
    from alignment.world.grammar import SHAPES, parse_caption
    from alignment.world.oracle import alignment_components
    from alignment.world.policy_samples import oracle_shape_targets

    scenes = all_scenes()[::45]
    images = torch.stack([render_scene(s, 32, rng=i) for i, s in enumerate(scenes)])
    q = oracle_shape_targets(images, [s.caption for s in scenes])
    torch.testing.assert_close(q.sum(1), torch.ones(len(scenes)))
    assert [SHAPES[k] for k in q.argmax(1).tolist()] == [s.shape for s in scenes]
    k = 1  # one column by hand: the caption with the shape word set to SHAPES[1]
    asked = [parse_caption(s.caption).replace(shape=SHAPES[k]).caption for s in scenes]
    torch.testing.assert_close(q[:, k], alignment_components(images, asked)["shape"])


def test_a_tower_taught_the_shapes_tells_them_apart_on_held_out_images():
    """The ResNet tower + probe, 300 steps on 96 renders: the cross-entropy with the oracle's
    shape probabilities on 48 other renders falls well below its start (about log 3; measured
    1.09 -> 0.53)."""
    from alignment.world.policy_samples import ShapeProbe, train_tower_on_shapes

    def renders(n, seed):
        g = torch.Generator().manual_seed(seed)
        pick = torch.randint(len(all_scenes()), (n,), generator=g).tolist()
        scenes = [all_scenes()[i] for i in pick]
        return torch.stack([render_scene(s, 32, rng=seed + i) for i, s in enumerate(scenes)]), [
            s.caption for s in scenes
        ]

    (x, caps), (hx, hcaps) = renders(96, 0), renders(48, 1000)
    model, _, processor = world_backbone(**{**BACKBONE, "tower": "resnet"})
    tower = model.model.vision_tower
    mean, std = processor.image_mean, processor.image_std
    with torch.no_grad():
        before = ShapeProbe(tower, mean, std).eval().loss(hx, hcaps).item()
    probe, losses = train_tower_on_shapes(tower, x, caps, mean, std, steps=300, batch_size=32)
    with torch.no_grad():
        after = probe.loss(hx, hcaps).item()
    print(f"held-out shape cross-entropy {before:.3f} -> {after:.3f}")
    assert before > 0.9 and after < 0.6 * before, (before, after)
    assert len(losses) == 300 and not probe.training
