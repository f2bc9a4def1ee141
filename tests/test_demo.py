"""`make demo` end to end on the bundled tiny world, in short settings.

- The default chain (the bundled LLaVA-Reward -> DRaFT on the bundled SD 3-architecture world
  policy -> export) *learns*: the held-out oracle alignment rises by more than 4x its
  seed-to-seed noise on every evaluation seed (a shorter run than `make demo`'s).
- The DDPO chain on the SD 1.5-architecture policy writes what it promises (summary with every
  measured key, report, grid, curves, a loadable export), and the measurements are what they
  say: the seed-to-seed noise and the per-seed gains are computed from the same prompts and
  seeds, and the training reward is scored on the same held-out images. Whether DDPO raises the
  held-out alignment is measured by `--method all`, not asserted: at the demo's budget it does
  not (alignment/world/weights/README.md).
"""

from __future__ import annotations

import json

import pytest
import torch

from alignment.demo import DemoConfig, run

#: A short DDPO setting (3 epochs, 8 held-out prompts x 2 seeds, 2 seed sets).
SHORT = dict(method="ddpo", epochs=3, eval_prompts=8, eval_seeds=2, noise_seed_sets=2, eval_every=2)
#: The CI setting of the default chain: `make demo`'s DRaFT run at half its batch and 5/6 of its
#: steps at 6/5 of its rate (100 steps of 8 images at 3.6e-4 instead of 120 of 16 at 3e-4) and its
#: evaluation (every evaluation caption x 4 seeds), the noise over 3 disjoint seed sets instead
#: of 4. One thread, alone beside another run: 114 s, every seed +0.042 to +0.071 (noise 0.003).
#: 120 steps at 3e-4 took 148 s (+0.043 to +0.073); 100 at 3e-4 gained as little as +0.023 on a
#: seed, 90 at 3e-4 +0.007; 60 steps at twice the rate gained 0.035, 2.8x the noise.
CI_DEFAULT = dict(
    eval_seeds=4,
    noise_seed_sets=3,
    eval_every=2,
    flow_draft_batch=8,
    flow_draft_steps=100,
    flow_draft_learning_rate=3.6e-4,
)


def _assert_export_draws(pipe) -> None:
    """The demo's export, loaded in plain diffusers, draws a finite 32x32 world image."""
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle at the top left on a white background",
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape[-2:] == (32, 32) and torch.isfinite(image).all()


def test_default_demo_learns_above_four_times_the_seed_noise_on_every_seed(tmp_path):
    """`make demo`'s chain (one thread, half the DRaFT batch, 100 steps at 6/5 the rate, noise
    over 3 seed sets instead of 4): the held-out oracle
    alignment of the bundled SD 3 world policy rises on every evaluation seed by more than 4x the
    seed-to-seed noise of the mean (the std of the base policy's mean over disjoint seed sets),
    the bundled reward sees every kind of mismatch (>= 0.85 each, from its build report), the
    export loads in plain diffusers. The gain differs with the CPU's float reductions (one
    thread: every seed +0.04 to +0.07; two threads: +0.02 to +0.08; `make demo`'s batch of 16
    in two threads: +0.07 to +0.09)."""
    from diffusers import StableDiffusion3Pipeline

    summary = run(DemoConfig(output_dir=str(tmp_path / "demo"), **CI_DEFAULT))
    draft = summary["methods"]["flow_draft"]
    noise = summary["oracle_alignment_noise"]
    print(
        f"\ndefault demo (CI setting): {summary['oracle_alignment_before']:.4f} -> "
        f"{summary['oracle_alignment_after']:.4f}, per seed {draft['gain_per_seed']}, "
        f"noise {noise:.4f}, parts {draft['oracle_parts_after']}"
    )
    assert summary["oracle_alignment_after"] == draft["oracle_alignment_after"]
    assert draft["policy"].endswith("tiny-world-sd3") and noise > 0
    assert len(draft["gain_per_seed"]) == 4
    assert all(g > 4 * noise for g in draft["gain_per_seed"]), (draft["gain_per_seed"], noise)
    assert draft["reward_rise"]["z"] > 3, draft["reward_rise"]
    kinds = summary["reward_accuracy_per_mismatch"]
    assert min(kinds.values()) >= 0.85, kinds
    assert set(summary["reward_accuracy_per_mismatch"]) == {
        "background",
        "colour",
        "shape",
        "position",
    }
    out = tmp_path / "demo"
    assert (out / "training_curves.png").is_file() and (out / "before_after.png").is_file()
    assert [p["epoch"] for p in draft["held_out_curve"]] == [0, 25, 50, 75, 100]
    _assert_export_draws(StableDiffusion3Pipeline.from_pretrained(out / "export"))


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
    # the reward against the oracle on the base policy's own images (2 sets x 2 seeds per
    # prompt: up to 6 pairs of each of the 8 prompts), and on the tuned policy's (1 pair each)
    agree = saved["reward_on_policy_agreement"]
    assert 0 < agree["pairs"] <= 8 * 6 and 0.0 <= agree["agreement"] <= 1.0
    assert ddpo["reward_on_policy_agreement_after"]["pairs"] <= 8
    report = (out / "report.md").read_text()
    assert report.startswith("# Tiny-world demo") and "| model | background | colour |" in report
    assert "| base |" in report and "| ddpo |" in report
    assert f"orders {agree['agreement']:.3f} of {agree['pairs']} pairs" in report
    assert (out / "before_after.png").is_file() and (out / "training_curves.png").is_file()

    from diffusers import StableDiffusionPipeline

    _assert_export_draws(StableDiffusionPipeline.from_pretrained(out / "export"))


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


def test_draft_epochs_pool_the_steps_by_hand():
    from alignment.demo import draft_epochs

    steps = [
        {"step": 1, "reward_mean": 1.0, "reward_std": 1.0},
        {"step": 2, "reward_mean": 3.0, "reward_std": 1.0},
        {"step": 3, "reward_mean": 5.0, "reward_std": 2.0},
    ]
    first, last = draft_epochs(steps, 2)
    # mean (1 + 3) / 2 = 2; pooled variance = mean(1, 1) + mean(1, 1) = 2
    assert first == {"epoch": 2, "reward_mean": 2.0, "reward_std": pytest.approx(2**0.5)}
    assert last == {"epoch": 3, "reward_mean": 5.0, "reward_std": 2.0}


def test_reward_rise_in_standard_errors_by_hand():
    from alignment.demo import reward_rise

    # first 2: mean 1, var 2 (ddof 1); last 2: mean 4, var 8 -> se = sqrt(2/2 + 8/2) = sqrt(5)
    rise = reward_rise([0.0, 2.0, 9.0, 2.0, 6.0], window=2)
    assert rise["first"] == 1.0 and rise["last"] == 4.0 and rise["diff"] == 3.0
    assert rise["stderr"] == pytest.approx(5**0.5, abs=1e-12)
    assert rise["z"] == pytest.approx(3 / 5**0.5, abs=1e-12)
    assert reward_rise([1.0, 2.0, 3.0], window=2) is None  # too few epochs


def test_on_policy_agreement_by_hand():
    from alignment.demo import on_policy_agreement

    # prompt 0: oracle 0.9, 0.5, 0.45 over three seeds; pairs (0,1) and (0,2) differ by >= 0.1,
    # (1,2) by 0.05 (not counted). The reward orders (0,1) rightly, (0,2) wrongly.
    # prompt 1: oracle 0.2, 0.2, 0.6; pairs (0,2) and (1,2); the reward ties (1,2): wrong.
    oracle = torch.tensor([[0.9, 0.2], [0.5, 0.2], [0.45, 0.6]])
    reward = torch.tensor([[2.0, 0.0], [1.0, 1.0], [3.0, 1.0]])
    assert on_policy_agreement(reward, oracle) == {"agreement": 2 / 4, "pairs": 4}
    assert on_policy_agreement(reward, oracle, margin=0.5) == {"agreement": None, "pairs": 0}
    # pooled over pairs, not averaged over prompts: prompt 1 now has one counted pair, (0, 2)
    # (0.35 - 0.2), which the reward orders rightly: 2 of 3 (a mean per prompt would be 0.75)
    oracle[:, 1] = torch.tensor([0.2, 0.28, 0.35])
    assert on_policy_agreement(reward, oracle) == {"agreement": 2 / 3, "pairs": 3}
    with pytest.raises(ValueError, match="margin > 0"):
        on_policy_agreement(reward, oracle, margin=0.0)
    with pytest.raises(ValueError, match=r"\[seeds, prompts\]"):
        on_policy_agreement(reward, oracle[:2])


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
    short = dict(SHORT, method="grpo", epochs=2, eval_every=0, eval_prompts=4)
    summary = run(DemoConfig(output_dir=str(tmp_path / "demo"), **short))
    grpo = summary["methods"]["grpo"]
    assert len(grpo["gain_per_seed"]) == 2 and set(grpo["oracle_parts_after"]) >= {"colour"}
    assert grpo["reward_first_epoch"] is not None and len(grpo["reward_gain_per_seed"]) == 2
    assert summary["oracle_alignment_after"] == grpo["oracle_alignment_after"]
    assert "| grpo |" in (tmp_path / "demo" / "report.md").read_text()


def test_demo_flow_grpo_and_online_dpo_tune_the_sd3_policy_and_are_measured_against_it(tmp_path):
    short = dict(eval_prompts=4, eval_seeds=2, noise_seed_sets=2, eval_every=0)
    summary = run(
        DemoConfig(
            output_dir=str(tmp_path / "demo"),
            method="flow_grpo,flow_dpo,ddpo",
            flow_epochs=1,
            dpo_steps=2,
            epochs=1,
            **short,
        )
    )
    methods = summary["methods"]
    flow_before = methods["flow_grpo"]["oracle_alignment_before"]
    assert methods["flow_dpo"]["oracle_alignment_before"] == flow_before
    # each method is measured against the base it tunes: the SD 1.5-architecture model draws
    # the held-out captions far worse than the SD 3 one
    assert methods["ddpo"]["oracle_alignment_before"] < flow_before
    assert summary["oracle_alignment_before"] == flow_before  # the first method's base
    for name in ("flow_grpo", "flow_dpo"):
        assert methods[name]["policy"].endswith("tiny-world-sd3")
        assert len(methods[name]["gain_per_seed"]) == 2
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| flow_grpo |" in report and "| flow_dpo |" in report and "| ddpo |" in report


def test_unknown_methods_and_bad_overrides_are_refused_before_anything_runs(tmp_path):
    """A typo in --method is refused when the config is built (it failed after the base
    evaluation and every method before it had run); a bad ddpo_kwargs key before the base
    evaluation."""
    from alignment.demo import DemoConfig, main

    with pytest.raises(ValueError, match="unknown 'dpo'; use one of flow_draft"):
        DemoConfig(method="flow_draft,dpo")
    assert DemoConfig(method="all").methods()[0] == "flow_draft"
    with pytest.raises(ValueError, match="ddpo_kwargs"):
        main(["--output_dir", str(tmp_path), "--ddpo_kwargs", '{"not_a_field": 1}'])
    with pytest.raises(ValueError, match="flow_draft_kwargs"):
        main(["--output_dir", str(tmp_path), "--flow_draft_kwargs", '{"not_a_field": 1}'])
    with pytest.raises(ValueError, match="flow_draft_batch = 0"):
        DemoConfig(flow_draft_batch=0)
    with pytest.raises(ValueError, match="max_steps is set by --flow_draft_steps"):
        main(["--output_dir", str(tmp_path), "--flow_draft_kwargs", '{"max_steps": 10}'])
    for tau in ("-1", "nan"):
        with pytest.raises(ValueError, match="reward_contrast_tau"):
            main(["--output_dir", str(tmp_path), "--reward_contrast_tau", tau])
    assert not (tmp_path / "summary.json").exists()
