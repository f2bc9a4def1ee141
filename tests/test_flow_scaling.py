"""Best-of-N and FK steering with a flow policy (tiny SD3): the same seeds as N = 1, the reward
raised, FK's potentials computed on the decoded x0 = x - s v, the sampling recipe."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from alignment.draft import mean_brightness
from alignment.flow import flow_predict_x0, sde_step_with_logprob
from alignment.flow_policy import FlowPolicy
from alignment.scaling import best_of_n, fk_steering, resampling_steps

PROMPTS = ["a cat", "a red circle", "a blue square", "a green tree"]


@pytest.fixture(scope="module")
def policy():
    p = FlowPolicy.from_pretrained("tiny-sd3", use_lora=False)
    p.transformer.requires_grad_(False)
    return p


def test_best_of_n_and_fk_raise_the_reward_over_n1(policy):
    kw = dict(num_steps=6, noise_level=0.7, guidance_scale=4.5, seed=0)
    one = best_of_n(policy, PROMPTS, mean_brightness, n=1, **kw)
    bon = best_of_n(policy, PROMPTS, mean_brightness, n=4, keep_all=True, batch_size=8, **kw)
    # N = 1 is the first image of N = 4 (same seeds, per-image generators), so best-of-4 >= it
    torch.testing.assert_close(bon.scores[:, 0], one.scores[:, 0], rtol=0, atol=1e-5)
    assert bon.all_images.shape == (4, 4, 3, 32, 32)
    assert bon.unet_evals == 4 * 4 * 6 * 2  # SD3 with CFG: two transformer halves per step
    fk = fk_steering(
        policy,
        PROMPTS,
        mean_brightness,
        num_particles=4,
        lmbda=3000.0,  # the tiny model's brightness spread is ~0.005
        resample_every=1,
        resample_start=0.2,
        resample_end=0.9,
        **kw,
    )
    assert fk.unet_evals == bon.unet_evals
    assert fk.reward_evals == 4 * 4 * (len(fk.info["resample_steps"]) + 1)
    base, b, f = (float(r.best_scores.mean()) for r in (one, bon, fk))
    print(f"\nflow brightness: N=1 {base:.4f} | best-of-4 {b:.4f} | FK 4 particles {f:.4f}")
    assert b > base and f > base
    assert fk.scores.mean() > one.scores.mean()  # all particles pulled towards the reward


def test_fk_potentials_are_rewards_of_the_decoded_x0(policy):
    """The first resampling step scores decode(x - s v) of the particles that the flow SDE has
    produced so far (no resampling before it): recompute it independently."""
    seen: list[torch.Tensor] = []

    def recording(images, prompts):
        seen.append(images.clone())
        return mean_brightness(images, prompts)

    steps, k = 5, 3
    fk_steering(
        policy,
        ["a cat"],
        recording,
        num_particles=k,
        num_steps=steps,
        noise_level=0.7,
        guidance_scale=1.0,
        resample_every=2,
        resample_start=0.4,
        resample_end=0.9,
        seed=3,
    )
    first = resampling_steps(steps, 2, 0.4, 0.9)[0]
    assert first == 2 and len(seen) == 2  # step 2 (4 = round(0.9 * 5) is the end), then the final
    gens = [torch.Generator().manual_seed(3 + j) for j in range(k)]  # scaling's seeds of prompt 0
    embeds = policy.encode_prompts(["a cat"] * k)
    timesteps = policy.set_timesteps(steps)
    x = randn_tensor(policy.latent_shape(k), generator=gens, dtype=torch.float32)
    with torch.no_grad():
        for t in timesteps[:first]:
            v = policy.predict_velocity(x, t, embeds, 1.0)
            x = sde_step_with_logprob(policy.scheduler, v, t, x, 0.7, generator=gens)[0]
        v = policy.predict_velocity(x, timesteps[first], embeds, 1.0)
        want = policy.decode(flow_predict_x0(policy.scheduler, v, timesteps[first], x))
    torch.testing.assert_close(seen[0], want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="noise_level > 0"):
        fk_steering(policy, ["a cat"], mean_brightness, noise_level=0.0, num_steps=2)


def test_sampling_recipe_loads_a_flow_policy(tmp_path):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bon", root / "recipes/best_of_n.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = tmp_path / "bon"
    args = "--pretrained_model tiny-sd3 --method best_of_n --n 2 --num_steps 3 --max_prompts 2"
    args += f" --reward brightness --guidance_scale 1.0 --noise_level 0 --output_dir {out}"
    report = recipe.main(args.split())
    assert report["unet_evals"] == 2 * 2 * 3  # CFG-free: one pass per image and step
    saved = json.loads((out / "scores.json").read_text())
    assert len(saved["prompts"]) == 2 and (out / saved["prompts"][0]["image"]).is_file()
