"""Inference-time scaling: FK weights by hand, best-of-N and FK steering raise a toy reward over
N = 1 on the same seeds, FK against best-of-N at equal UNet evaluations, the sampling recipe."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignment.draft import mean_brightness
from alignment.policy import DiffusionPolicy
from alignment.scaling import best_of_n, fk_steering, fk_weights, resampling_steps

PROMPTS = ["a cat", "a dog", "a red circle", "a blue square", "a green tree", "a bird"]


def test_fk_weights_and_schedule_by_hand():
    r, prev = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 0.5]])
    e = math.e
    # diff: g = (0.5, 1.5) -> softmax = (1, e) / (1 + e); the state becomes r
    w, s = fk_weights(r, prev, "diff", 1.0)
    torch.testing.assert_close(w, torch.tensor([[1 / (1 + e), e / (1 + e)]]))
    torch.testing.assert_close(s, r)
    # max: state = max(r, prev) = (1, 2), weights softmax(1, 2) (same ratio e)
    w, s = fk_weights(r, prev, "max", 1.0)
    torch.testing.assert_close(w, torch.tensor([[1 / (1 + e), e / (1 + e)]]))
    torch.testing.assert_close(s, torch.tensor([[1.0, 2.0]]))
    # add with lambda 2: state (1.5, 2.5), softmax(3, 5) = (1, e^2) / (1 + e^2)
    w, s = fk_weights(r, prev, "add", 2.0)
    torch.testing.assert_close(w, torch.tensor([[1 / (1 + e**2), e**2 / (1 + e**2)]]))
    torch.testing.assert_close(s, torch.tensor([[1.5, 2.5]]))
    assert resampling_steps(10, 2, 0.2, 0.9) == [2, 4, 6, 8]
    assert resampling_steps(20, 5, 0.0, 1.0) == [0, 5, 10, 15]


@pytest.mark.slow
def test_best_of_n_and_fk_raise_the_reward_over_n1():
    policy = DiffusionPolicy.from_pretrained("tiny", use_lora=False)
    kw = dict(num_steps=10, eta=1.0, guidance_scale=5.0, seed=0)
    one = best_of_n(policy, PROMPTS, mean_brightness, n=1, **kw)
    bon = best_of_n(policy, PROMPTS, mean_brightness, n=4, keep_all=True, **kw)
    # N = 1 is the first image of N = 4 (same seeds), so best-of-4 can only be >= it
    torch.testing.assert_close(bon.scores[:, 0], one.scores[:, 0], rtol=1e-4, atol=1e-5)
    assert bon.all_images.shape == (6, 4, 3, 32, 32) and bon.images.shape == (6, 3, 32, 32)
    # the brightness spread of the tiny model's images is ~0.005, so lambda is large
    fk = fk_steering(
        policy,
        PROMPTS,
        mean_brightness,
        num_particles=4,
        lmbda=1000.0,
        potential="diff",
        resample_every=2,
        resample_start=0.2,
        resample_end=0.9,
        **kw,
    )
    assert fk.unet_evals == bon.unet_evals == 6 * 4 * 10 * 2
    assert fk.reward_evals == 6 * 4 * (len(fk.info["resample_steps"]) + 1)
    base = one.best_scores.mean().item()
    b, f = bon.best_scores.mean().item(), fk.best_scores.mean().item()
    print(
        f"\nmean brightness over {len(PROMPTS)} prompts, same seeds: N=1 {base:.4f} | "
        f"best-of-4 {b:.4f} | FK 4 particles {f:.4f} (all FK particles {fk.scores.mean():.4f}) "
        f"(best-of-4 particles {bon.scores.mean():.4f}) | UNet evals {bon.unet_evals} each, FK reward evals {fk.reward_evals} vs "
        f"{bon.reward_evals}; FK ESS per resampling {[round(e, 2) for e in fk.info['ess']]}"
    )
    assert b > base and f > base
    # FK's particles are all pulled towards the reward, not just the best one: their mean beats
    # best-of-N's particles from the same seeds (equal without resampling, see test_fk_steering)
    # best-of-N's particles from the same seeds (equal without resampling, see test_fk_steering).
    # Measured 0.5097 vs 0.5033; the old comparison with N = 1 passed without resampling.
    assert fk.scores.mean() > bon.scores.mean()


def test_sampling_recipe_writes_images_and_scores(tmp_path):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bon", root / "recipes/best_of_n.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = tmp_path / "fk"
    recipe.main(
        [
            "--pretrained_model",
            "tiny",
            "--method",
            "fk",
            "--n",
            "2",
            "--num_steps",
            "4",
            "--prompts",
            "short",
            "--max_prompts",
            "2",
            "--reward",
            "brightness",
            "--lmbda",
            "100",
            "--resample_every",
            "1",
            "--output_dir",
            str(out),
        ]
    )
    report = json.loads((out / "scores.json").read_text())
    assert report["method"] == "fk" and len(report["prompts"]) == 2
    assert len(report["prompts"][0]["scores"]) == 2 and report["unet_evals"] == 2 * 2 * 4 * 2
    assert (out / report["prompts"][0]["image"]).is_file()


def test_fk_in_prompt_chunks_equals_one_batch():
    policy = DiffusionPolicy.from_pretrained("tiny", use_lora=False)
    kw = dict(
        num_particles=2,
        num_steps=4,
        eta=1.0,
        guidance_scale=1.0,
        lmbda=1000.0,
        resample_every=1,
        resample_start=0.0,
        resample_end=1.0,
        seed=3,
    )
    whole = fk_steering(policy, PROMPTS[:3], mean_brightness, **kw)
    chunked = fk_steering(policy, PROMPTS[:3], mean_brightness, batch_size=2, **kw)
    torch.testing.assert_close(chunked.scores, whole.scores, rtol=0, atol=1e-6)  # 6.0e-8
    assert chunked.unet_evals == whole.unet_evals == 3 * 2 * 4
    assert len(chunked.info["ess"]) == len(whole.info["ess"]) == 4
