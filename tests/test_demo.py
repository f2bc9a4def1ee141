"""`make demo` end to end on the bundled tiny world, at its default settings: the chain (the
bundled LLaVA-Reward -> DDPO on the bundled tiny SD -> export) must raise the oracle's alignment
on held-out prompts (colour-shape pairs never seen in pre-training or fine-tuning) by a margin
well above its seed-to-seed noise, on every seed, and write what it promises (summary, report,
grid, a loadable export). About four minutes on one core.
"""

from __future__ import annotations

import json

import pytest
import torch

from alignment.demo import DemoConfig, run


def test_demo_ddpo_raises_held_out_oracle_alignment_well_above_seed_noise(
    tmp_path, record_property
):
    summary = run(DemoConfig(output_dir=str(tmp_path / "demo")))  # the defaults of `make demo`
    out = tmp_path / "demo"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["oracle_alignment_before"] == summary["oracle_alignment_before"]
    ddpo = saved["methods"]["ddpo"]
    noise = saved["oracle_alignment_noise"]
    result = {k: ddpo[k] for k in ("gain", "gain_stderr", "gain_per_seed")} | {"noise": noise}
    print(f"\ndemo (DDPO): {json.dumps(result)}")
    record_property("demo_ddpo", json.dumps(result))
    assert ddpo["gain"] > 4 * noise, result  # learning, measured on held-out prompts
    assert all(g > 0 for g in ddpo["gain_per_seed"]), result  # on every seed
    for key in ("oracle_alignment_before", "oracle_alignment_after", "oracle_alignment_noise"):
        assert 0.0 <= saved[key] <= 1.0
    assert ddpo["reward_first_epoch"] is not None and len(ddpo["gain_per_seed"]) == 4
    parts = ("background", "colour", "shape", "position", "fidelity")
    for model_parts in (saved["oracle_parts_before"], ddpo["oracle_parts_after"]):
        assert set(model_parts) == set(parts) and all(0 <= v <= 1 for v in model_parts.values())
    # the bundled reward's held-out accuracy against the oracle travels into the summary
    accuracy = saved["reward_accuracy_vs_oracle"]
    assert set(accuracy) == {"alignment", "fidelity", "safety", "overall"}
    assert accuracy["alignment"] > 0.7 and accuracy["fidelity"] > 0.95
    report = (out / "report.md").read_text()
    assert report.startswith("# Tiny-world demo") and "| model | background | colour |" in report
    assert "| base |" in report and "| ddpo |" in report
    assert (out / "before_after.png").is_file() and (out / "reward_curve.png").is_file()

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "export", safety_checker=None)
    image = pipe(
        "a red circle at the top left on a white background",
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape[-2:] == (32, 32) and torch.isfinite(image).all()


def test_demo_reward_can_be_one_oracle_part_and_ddpo_settings_are_overridable():
    from alignment.demo import _ddpo_overrides, _load_reward, _reward_fn
    from alignment.world.grammar import parse_caption
    from alignment.world.render import render_captions

    caption = "a red circle at the top left on a white background"
    image = render_captions([caption] * 2)
    other_background = parse_caption(caption).replace(background="black").caption
    other_colour = parse_caption(caption).replace(colour="blue").caption
    cfg = DemoConfig(reward="oracle:background")
    assert _load_reward(cfg, None) == (None, None)
    scores = _reward_fn(None, cfg)(image, [other_colour, other_background])
    assert scores[0] > 0.9 > 0.1 > scores[1]  # the wrong colour does not count, the background does
    with pytest.raises(ValueError, match="size"):
        _reward_fn(None, DemoConfig(reward="oracle:size"))

    cfg = DemoConfig(ddpo_kwargs='{"images_per_prompt": 4, "per_prompt_stat_tracking": true}')
    assert _ddpo_overrides(cfg) == {"images_per_prompt": 4, "per_prompt_stat_tracking": True}
    with pytest.raises(ValueError, match="sample_size_typo"):
        _ddpo_overrides(DemoConfig(ddpo_kwargs='{"sample_size_typo": 1}'))


def test_reward_rise_in_standard_errors_by_hand():
    from alignment.demo import reward_rise

    # first 2: mean 1, var 2 (ddof 1); last 2: mean 4, var 8 -> se = sqrt(2/2 + 8/2) = sqrt(5)
    rise = reward_rise([0.0, 2.0, 9.0, 2.0, 6.0], window=2)
    assert rise["first"] == 1.0 and rise["last"] == 4.0 and rise["diff"] == 3.0
    assert rise["stderr"] == pytest.approx(5**0.5, abs=1e-12)
    assert rise["z"] == pytest.approx(3 / 5**0.5, abs=1e-12)
    assert reward_rise([1.0, 2.0, 3.0], window=2) is None  # too few epochs


def test_words_wrap_whole_and_the_grid_shows_every_caption_and_verdict():
    from alignment.world.figures import verdict_grid, wrap_words
    from alignment.world.oracle import oracle_scores
    from alignment.world.render import render_captions

    caption = "a yellow triangle at the bottom right on a white background"
    lines = wrap_words(caption, 60, lambda s: 6 * len(s))  # 10 characters per line
    assert lines == [
        "a yellow",
        "triangle",
        "at the",
        "bottom",
        "right on a",
        "white",
        "background",
    ]
    assert " ".join(lines) == caption
    assert wrap_words("extraordinarily long", 30, len) == ["extraordinarily long"]
    assert wrap_words("extraordinarily long", 10, len) == ["extraordinarily", "long"]  # not cut

    prompts = [caption, "a red circle in the center on a black background"]
    good = render_captions(prompts)
    bad = render_captions([prompts[1], prompts[0]])  # each image drawn for the other caption
    rows = [("before", bad), ("after DDPO", good)]
    scores = [oracle_scores(bad, prompts), oracle_scores(good, prompts)]
    grid = verdict_grid(prompts, rows, scores, cell=64)
    assert grid.size[0] == 96 + 2 * (64 + 12)
    pixels = set(grid.getdata())
    assert (0, 128, 0) in pixels and (200, 0, 0) in pixels  # both verdict colours are drawn
    with pytest.raises(ValueError, match="2 rows but 1 score"):
        verdict_grid(prompts, rows, scores[:1])
