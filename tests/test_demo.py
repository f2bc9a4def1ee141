"""`make demo` end to end on the bundled tiny world, in a short setting: the chain (the bundled
LLaVA-Reward -> DDPO on the bundled tiny SD -> export) runs and writes what it promises (summary
with every measured key, report, grid, curves, a loadable export), and the measurements are
what they say: the seed-to-seed noise and the per-seed gains are computed from the same
prompts and seeds, and the training reward is scored on the same held-out images.

Whether DDPO raises the held-out oracle alignment is *measured* by `make demo`, not asserted
here: at the demo's budget it does not do so reliably (alignment/world/weights/README.md, "DDPO
on the bundled world"); the algorithms' learning tests are tests/test_ddpo_train.py,
tests/test_grpo.py, tests/test_dpo.py, tests/test_online_dpo.py and tests/test_draft.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from alignment.demo import DemoConfig, run

#: A short setting of `make demo` (3 DDPO epochs, 8 held-out prompts x 2 seeds, 2 seed sets).
SHORT = dict(epochs=3, eval_prompts=8, eval_seeds=2, noise_seed_sets=2, eval_every=2)


def test_demo_chain_writes_every_measure_and_a_loadable_export(tmp_path):
    summary = run(DemoConfig(output_dir=str(tmp_path / "demo"), **SHORT))
    out = tmp_path / "demo"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["oracle_alignment_before"] == summary["oracle_alignment_before"]
    ddpo = saved["methods"]["ddpo"]
    assert saved["oracle_alignment_after"] == ddpo["oracle_alignment_after"]
    # gains are after - before on the same prompts and seeds, per seed and overall
    per_seed = torch.tensor(ddpo["gain_per_seed"])
    assert per_seed.shape == (2,)
    assert ddpo["gain"] == pytest.approx(
        ddpo["oracle_alignment_after"] - saved["oracle_alignment_before"], abs=1e-12
    )
    assert per_seed.mean().item() == pytest.approx(ddpo["gain"], abs=1e-6)
    for key in ("oracle_alignment_before", "oracle_alignment_after", "oracle_alignment_noise"):
        assert 0.0 <= saved[key] <= 1.0
    parts = ("background", "colour", "shape", "position", "fidelity")
    for model_parts in (saved["oracle_parts_before"], ddpo["oracle_parts_after"]):
        assert set(model_parts) == set(parts) and all(0 <= v <= 1 for v in model_parts.values())
    assert set(saved["oracle_parts_noise"]) == set(parts)
    assert all(len(v) == 2 for v in ddpo["part_gain_per_seed"].values())
    # the training reward scored on the same held-out images, before and after
    assert len(ddpo["reward_gain_per_seed"]) == 2 and saved["reward_noise"] > 0
    assert torch.tensor(ddpo["reward_gain_per_seed"]).mean().item() == pytest.approx(
        ddpo["reward_after"] - saved["reward_before"], abs=1e-5
    )
    # the interim held-out evaluation (epoch 2) sits between before and after on the curve
    assert [p["epoch"] for p in ddpo["held_out_curve"]] == [0, 2, 3]
    assert ddpo["reward_first_epoch"] is not None
    # what the bundled reward can see, overall and per kind of mismatch
    accuracy = saved["reward_accuracy_vs_oracle"]
    assert set(accuracy) == {"alignment", "fidelity", "safety", "overall"}
    assert accuracy["alignment"] > 0.7 and accuracy["fidelity"] > 0.95
    kinds = saved["reward_accuracy_per_mismatch"]
    assert set(kinds) == {"background", "colour", "shape", "position"}
    assert kinds["background"] > 0.95  # what the demo's reward is known to see
    report = (out / "report.md").read_text()
    assert report.startswith("# Tiny-world demo") and "| model | background | colour |" in report
    assert "| base |" in report and "| ddpo |" in report
    assert (out / "before_after.png").is_file() and (out / "training_curves.png").is_file()

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


def test_demo_grpo_runs_on_the_sd15_world_policy_and_is_measured_like_ddpo(tmp_path):
    short = dict(SHORT, epochs=2, eval_every=0, eval_prompts=4)
    summary = run(DemoConfig(output_dir=str(tmp_path / "demo"), method="grpo", **short))
    grpo = summary["methods"]["grpo"]
    assert len(grpo["gain_per_seed"]) == 2 and set(grpo["oracle_parts_after"]) >= {"colour"}
    assert grpo["reward_first_epoch"] is not None and len(grpo["reward_gain_per_seed"]) == 2
    assert summary["oracle_alignment_after"] == grpo["oracle_alignment_after"]
    assert "| grpo |" in (tmp_path / "demo" / "report.md").read_text()
