"""DRaFT / ReFL (alignment.draft) on the tiny random pipeline: where the graph is built (DRaFT-K's
last K steps, ReFL's one-step x0 at the stop step, ``DiffusionPolicy.sample(grad=K)``), counted on
every UNet forward with a hook (grad mode on and an output that requires grad); ``predict_x0`` for
each prediction type by hand; the differentiable rewards by name."""

from __future__ import annotations

import pytest
import torch

from alignment.draft import predict_x0, sample_with_grad
from alignment.policy import DiffusionPolicy

PROMPTS = ["a cat", "a red circle"]
STEPS = 4


@pytest.fixture(scope="module")
def policy():
    return DiffusionPolicy.from_pretrained("tiny", lora_rank=4)


class _GraphCounter:
    """Records, for each UNet forward, whether it was built with a graph."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls: list[bool] = []
        self._handle = unet.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        sample = output.sample if hasattr(output, "sample") else output[0]
        self.calls.append(torch.is_grad_enabled() and sample.requires_grad)

    def close(self) -> list[bool]:
        self._handle.remove()
        return self.calls


def _noise(policy: DiffusionPolicy) -> torch.Tensor:
    return torch.randn(
        policy.latent_shape(len(PROMPTS)), generator=torch.Generator().manual_seed(0)
    )


@pytest.mark.parametrize("k", [0, 1, 2, STEPS])
@pytest.mark.parametrize("use_checkpoint", [True, False])
def test_draft_k_builds_its_graph_through_exactly_the_last_k_unet_calls(policy, k, use_checkpoint):
    counter = _GraphCounter(policy.unet)
    out = sample_with_grad(
        policy,
        PROMPTS,
        num_steps=STEPS,
        grad_steps=k,
        guidance_scale=2.0,
        latents=_noise(policy),
        use_checkpoint=use_checkpoint,
    )
    calls = counter.close()  # counted before backward (checkpointing re-runs forwards there)
    assert calls == [False] * (STEPS - k) + [True] * k
    assert out["unet_calls"] == STEPS and out["images"].requires_grad == (k > 0)
    # and the images are those of the same sampling without any graph
    with torch.no_grad():
        ref = policy.sample(PROMPTS, STEPS, 0.0, 2.0, latents=_noise(policy))
    torch.testing.assert_close(out["images"].detach(), ref.images, atol=1e-6, rtol=0)  # 0.0


@pytest.mark.parametrize("use_checkpoint", [True, False])
def test_checkpointing_recomputes_the_graph_steps_in_backward(policy, use_checkpoint):
    """Activation checkpointing (the default) re-runs each UNet call with a graph, and the
    decode, during backward; without it nothing runs again."""
    # pre-hooks: a recomputation stops once it has what backward needs, before the forward ends
    unet, decodes = [], []
    handles = [
        policy.unet.register_forward_pre_hook(lambda *a: unet.append(1)),
        policy.vae.decoder.register_forward_pre_hook(lambda *a: decodes.append(1)),
    ]
    kw = {} if use_checkpoint else {"use_checkpoint": False}
    out = sample_with_grad(
        policy, PROMPTS, num_steps=3, grad_steps=2, guidance_scale=2.0, latents=_noise(policy), **kw
    )
    assert (len(unet), len(decodes)) == (3, 1)
    out["images"].mean().backward()
    for h in handles:
        h.remove()
    policy.unet.zero_grad(set_to_none=True)
    again = 1 if use_checkpoint else 0
    assert (len(unet), len(decodes)) == (3 + 2 * again, 1 + again)


def test_defaults_are_draft_1_with_50_deterministic_steps_and_cfg_5(policy):
    counter = _GraphCounter(policy.unet)
    out = sample_with_grad(policy, PROMPTS[:1], latents=_noise(policy)[:1])
    assert counter.close() == [False] * 49 + [True]
    with torch.no_grad():
        ref = policy.sample(PROMPTS[:1], 50, 0.0, 5.0, latents=_noise(policy)[:1])
    torch.testing.assert_close(out["images"].detach(), ref.images, atol=1e-6, rtol=0)


def test_noise_comes_from_the_generator_as_in_policy_sample(policy):
    """Without latents, the initial noise and (eta > 0) every step's noise are drawn from the
    generator, in the order DiffusionPolicy.sample draws them."""
    kw = dict(num_steps=3, eta=1.0, guidance_scale=2.0)
    out = sample_with_grad(
        policy, PROMPTS, grad_steps=1, generator=torch.Generator().manual_seed(5), **kw
    )
    with torch.no_grad():
        ref = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(5), **kw)
    torch.testing.assert_close(out["images"].detach(), ref.images, atol=1e-6, rtol=0)


def test_refl_latent_is_the_one_step_x0_prediction_at_the_stop_step(policy):
    stop = 2
    counter = _GraphCounter(policy.unet)
    refl = sample_with_grad(
        policy, PROMPTS, num_steps=STEPS, stop_step=stop, guidance_scale=2.0, latents=_noise(policy)
    )
    calls = counter.close()
    assert calls == [False] * stop + [True] and refl["unet_calls"] == stop + 1
    # by hand: x_t after `stop` DDIM steps, the UNet's (CFG) output there, then
    # x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    with torch.no_grad():
        traj = policy.sample(PROMPTS, STEPS, 0.0, 2.0, latents=_noise(policy))
        x_t, t = traj.latents[:, stop], traj.timesteps[stop]
        eps = policy.predict_noise(x_t, t, traj.prompt_embeds, 2.0)
        abar = policy.scheduler.alphas_cumprod[int(t)]
        want = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        # not the DDIM step to the next latent (what a wrong ReFL would return)
        assert (want - traj.latents[:, stop + 1]).abs().max() > 0.01  # measured 0.056
    torch.testing.assert_close(refl["latents"].detach(), want, atol=1e-5, rtol=0)  # 0.0
    torch.testing.assert_close(
        refl["images"].detach(), policy.decode(want).detach(), atol=1e-5, rtol=0
    )
    for bad in (STEPS, -1):
        with pytest.raises(ValueError, match="stop_step"):
            sample_with_grad(policy, PROMPTS, num_steps=STEPS, stop_step=bad)


def test_refl_at_step_zero_and_no_graph_under_no_grad(policy):
    counter = _GraphCounter(policy.unet)
    refl = sample_with_grad(
        policy, PROMPTS, num_steps=STEPS, stop_step=0, guidance_scale=1.0, latents=_noise(policy)
    )
    assert counter.close() == [True] and refl["unet_calls"] == 1
    with torch.no_grad():  # x0 from pure noise: x_T = noise * init_noise_sigma (1 for DDIM)
        t = policy.set_timesteps(STEPS)[0]
        x = _noise(policy)
        eps = policy.predict_noise(x, t, policy.encode_prompts(PROMPTS), 1.0)
        abar = policy.scheduler.alphas_cumprod[int(t)]
        want = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    torch.testing.assert_close(refl["latents"].detach(), want, atol=1e-5, rtol=0)
    counter = _GraphCounter(policy.unet)
    with torch.no_grad():  # an outer no_grad wins over grad_steps
        out = sample_with_grad(policy, PROMPTS, num_steps=2, grad_steps=2, latents=_noise(policy))
    assert counter.close() == [False, False] and not out["images"].requires_grad


@pytest.mark.parametrize(("grad", "with_graph"), [(False, 0), (1, 1), (3, 3), (True, STEPS)])
def test_policy_sample_truncates_the_graph_to_the_last_k_steps(policy, grad, with_graph):
    counter = _GraphCounter(policy.unet)
    out = policy.sample(
        PROMPTS, STEPS, eta=1.0, guidance_scale=2.0, latents=_noise(policy), grad=grad
    )
    calls = counter.close()
    assert calls == [False] * (STEPS - with_graph) + [True] * with_graph
    assert out.images.requires_grad == (with_graph > 0)
    assert not out.latents.requires_grad and not out.log_probs.requires_grad


def test_predict_x0_for_each_prediction_type_by_hand(policy):
    from types import SimpleNamespace

    abar = torch.tensor([0.9, 0.36])
    x = torch.tensor([1.0, -2.0]).reshape(2, 1, 1, 1)
    out = torch.tensor([0.5, 0.25]).reshape(2, 1, 1, 1)
    t = torch.tensor([0, 1])  # one timestep per sample
    want = {
        "epsilon": [(1.0 - 0.1**0.5 * 0.5) / 0.9**0.5, (-2.0 - 0.8 * 0.25) / 0.6],
        "v_prediction": [0.9**0.5 * 1.0 - 0.1**0.5 * 0.5, 0.6 * -2.0 - 0.8 * 0.25],
        "sample": [0.5, 0.25],
    }
    for kind, values in want.items():
        sched = SimpleNamespace(alphas_cumprod=abar, config=SimpleNamespace(prediction_type=kind))
        got = predict_x0(sched, out, t, x).flatten()
        torch.testing.assert_close(got, torch.tensor(values), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="prediction_type"):
        predict_x0(
            SimpleNamespace(alphas_cumprod=abar, config=SimpleNamespace(prediction_type="x")),
            out,
            t,
            x,
        )


def test_differentiable_reward_fn_by_name(tmp_path):
    """``differentiable_reward_fn``: ``brightness`` is the mean pixel, other names come from the
    reward registry, and ``llava_reward`` is a frozen scorer's reward with a graph to the pixels,
    equal to the frozen ``score()`` of the named perspective (``overall`` by default)."""
    from alignment.draft import differentiable_reward_fn, mean_brightness
    from alignment.rewards import get_reward_fn
    from reward.modeling import LlavaRewardModel
    from reward.scorer import RewardScorer
    from reward.testing import save_tiny_backbone

    assert differentiable_reward_fn("brightness") is mean_brightness
    images = torch.rand(2, 3, 24, 20, generator=torch.Generator().manual_seed(3))
    prompts = ["a cat", "a dog"]
    for kw in ({}, {"quality": 20}):  # keyword arguments reach the registry's factory
        torch.testing.assert_close(
            differentiable_reward_fn("jpeg_compressibility", **kw)(images, prompts),
            get_reward_fn("jpeg_compressibility", **kw)(images, prompts),
            atol=0,
            rtol=0,
        )
    low = differentiable_reward_fn("jpeg_compressibility", quality=20)(images, prompts)
    assert (low - get_reward_fn("jpeg_compressibility")(images, prompts)).abs().max() > 0
    torch.manual_seed(0)
    model = LlavaRewardModel.from_backbone(
        save_tiny_backbone("llava", tmp_path / "bb"),
        perspectives=("overall", "safety"),
        lora_config={"r": 4, "lora_alpha": 8},
    )
    with torch.no_grad():  # distinct heads, so the perspective that is used matters
        model.heads["safety"].score.weight.mul_(-3.0)
    model.save_pretrained(tmp_path / "rm")
    frozen = RewardScorer.from_pretrained(tmp_path / "rm")
    for perspective, name in ((None, "overall"), ("safety", "safety")):
        fn = differentiable_reward_fn(
            "llava_reward", path=str(tmp_path / "rm"), perspective=perspective, device="cpu",
            dtype="float32",
        )  # fmt: skip
        x = images.clone().requires_grad_(True)
        r = fn(x, prompts)
        assert r.requires_grad
        r.sum().backward()
        assert x.grad.abs().sum() > 0
        want = frozen.score(prompts, images, name)
        torch.testing.assert_close(r.detach(), want, atol=1e-6, rtol=0)  # measured 0.0
    # dtype by name: a bfloat16 scorer (its rewards round differently from the float32 ones)
    fn16 = differentiable_reward_fn("llava_reward", path=str(tmp_path / "rm"), dtype="bfloat16")
    r16 = fn16(images, prompts).detach().float()
    gap16 = (r16 - frozen.score(prompts, images, "overall")).abs().max()
    assert 0 < gap16 < 0.01, gap16  # measured 1.3e-3
    # (the two perspectives differ, so the default really is "overall")
    gap = frozen.score(prompts, images, "overall") - frozen.score(prompts, images, "safety")
    assert gap.abs().max() > 1e-4


def test_llava_reward_by_name_passes_device_and_dtype_and_freezes_the_scorer(tmp_path, monkeypatch):
    """The scorer is built with the given device and dtype (None: the scorer's default, this
    process's device) and frozen, so DRaFT's backward reaches the pixels, never the reward model's
    weights."""
    from alignment.draft import differentiable_reward_fn
    from reward.modeling import LlavaRewardModel
    from reward.scorer import RewardScorer
    from reward.testing import save_tiny_backbone

    torch.manual_seed(0)
    LlavaRewardModel.from_backbone(
        save_tiny_backbone("llava", tmp_path / "bb"), lora_config={"r": 4, "lora_alpha": 8}
    ).save_pretrained(tmp_path / "rm")
    built = []
    real = RewardScorer.from_pretrained

    def spy(path, device=None, dtype=None, **kw):
        built.append((device, dtype))
        scorer = real(path, device="cpu", dtype=dtype, **kw)
        built.append(scorer)
        return scorer

    monkeypatch.setattr(RewardScorer, "from_pretrained", staticmethod(spy))
    differentiable_reward_fn("llava_reward", path=str(tmp_path / "rm"), device="cpu:0")
    assert built[0] == ("cpu:0", None)
    assert not any(p.requires_grad for p in built[1].model.parameters())
    differentiable_reward_fn("llava_reward", path=str(tmp_path / "rm"), dtype=torch.float32)
    assert built[2] == (None, torch.float32)
