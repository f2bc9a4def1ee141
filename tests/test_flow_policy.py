"""FlowPolicy on tiny SD3 and FLUX pipelines: the ODE reproduces diffusers' pipelines, SDE
log-probs recompute, LoRA/reference/KL, the Fast window, the prompt cache, memory options."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from alignment.flow import sde_kl, sde_step_distribution
from alignment.flow_policy import FLOW_LORA_TARGETS, FlowEmbeds, FlowPolicy, pipeline_kind
from alignment.tiny_flow import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_t5_tokenizer

PROMPTS = ["a red circle", "a blue dog"]
_DIRS: dict[str, Path] = {}


def _saved(kind: str) -> Path:
    """The tiny pipeline of ``kind`` saved once per test process."""
    if kind not in _DIRS:
        root = Path(tempfile.mkdtemp(prefix=f"tiny-{kind}-"))
        (tiny_sd3_pipeline if kind == "sd3" else tiny_flux_pipeline)(seed=0).save_pretrained(root)
        _DIRS[kind] = root
    return _DIRS[kind]


def _policy(kind: str, **kw) -> FlowPolicy:
    kw.setdefault("lora_rank", 4)
    return FlowPolicy.from_pretrained(str(_saved(kind)), resolution=32, **kw)


def test_tiny_builders_are_small_seeded_and_tokenize_words(tmp_path):
    tok = tiny_t5_tokenizer(["zebra", "red"], max_length=8)
    assert tok.tokenize("zebra red") == ["▁zebra", "▁red"]
    assert tok.tokenize("zoo") == ["▁", "z", "o", "o"]  # unknown words fall back to characters
    assert tok("zebra").input_ids == [tok.convert_tokens_to_ids("▁zebra"), tok.eos_token_id]
    for build in (tiny_sd3_pipeline, tiny_flux_pipeline):
        a, b = build(seed=0), build(seed=0)
        n = sum(
            p.numel()
            for m in a.components.values()
            if isinstance(m, torch.nn.Module)
            for p in m.parameters()
        )
        assert 100_000 < n < 500_000, n  # measured: SD3 303K, FLUX 285K
        for x, y in zip(a.transformer.parameters(), b.transformer.parameters()):
            assert torch.equal(x, y)
        assert not torch.equal(
            next(a.transformer.parameters()), next(build(seed=1).transformer.parameters())
        )
    assert pipeline_kind(str(_saved("sd3"))) == "sd3" and pipeline_kind("tiny-flux") == "flux"
    assert pipeline_kind(str(tmp_path)) is None
    with pytest.raises(TypeError, match="StableDiffusion3Pipeline or FluxPipeline"):
        from alignment.tiny import tiny_sd_pipeline

        FlowPolicy(tiny_sd_pipeline())


@pytest.mark.parametrize(
    "kind,guidance", [("sd3", 4.5), ("sd3", 1.0), ("flux", 3.5)], ids=["sd3-cfg", "sd3", "flux"]
)
def test_ode_sampling_reproduces_the_diffusers_pipeline(kind, guidance):
    policy = _policy(kind)
    cls = StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline
    pipe = cls.from_pretrained(_saved(kind))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = policy.sample(
            PROMPTS,
            num_steps=6,
            noise_level=0.0,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(7),
        )
    want = pipe(
        PROMPTS,
        num_inference_steps=6,
        guidance_scale=guidance,
        height=32,
        width=32,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
    ).images
    assert out.images.shape == (2, 3, 32, 32) and out.latents.shape == (2, 7, 4, 16, 16)
    # measured max |diff|: 8e-7 (SD3 with CFG), 0 (CFG-free, FLUX)
    torch.testing.assert_close(out.images, want, rtol=0, atol=1e-5)
    assert torch.all(out.log_probs == 0) and not out.sde_mask.any()
    assert out.images.std() > 0.05  # not a constant image
    assert (out.negative_prompt_embeds is not None) == (kind == "sd3" and guidance > 1)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_log_prob_recomputes_sampling_and_reference_is_adapter_off(kind):
    g = 4.5 if kind == "sd3" else 3.5
    policy = _policy(kind)
    with torch.no_grad():
        out = policy.sample(PROMPTS, num_steps=5, noise_level=0.7, guidance_scale=g)
    assert out.sde_mask.all() and torch.isfinite(out.log_probs).all()
    i = 2
    t = out.timesteps[i].expand(2)
    args = (out.latents[:, i], out.latents[:, i + 1], t, out.prompt_embeds, g)
    lp, mean, std = policy.log_prob(*args, return_stats=True)
    torch.testing.assert_close(lp.detach(), out.log_probs[:, i], rtol=0, atol=1e-5)
    lp.sum().backward()
    grads = [p.grad for p in policy.trainable_parameters() if p.grad is not None]
    assert grads and any(gr.abs().sum() > 0 for gr in grads)
    # the mean and std are the SDE step of the transformer's velocity
    with torch.no_grad():
        v = policy.predict_velocity(out.latents[:, i], t, out.prompt_embeds, g)
    want_mean, want_std, _ = sde_step_distribution(policy.scheduler, v, t, out.latents[:, i])
    torch.testing.assert_close(mean.detach(), want_mean)
    torch.testing.assert_close(std, want_std)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.add_(0.3)
        moved, moved_mean, _ = policy.log_prob(*args, return_stats=True)
        with policy.reference():
            ref, ref_mean, _ = policy.log_prob(*args, return_stats=True)
    assert (moved - out.log_probs[:, i]).abs().max() > 1e-3
    torch.testing.assert_close(ref, out.log_probs[:, i], rtol=0, atol=1e-5)
    torch.testing.assert_close(ref_mean, mean.detach())
    assert torch.all(sde_kl(moved_mean, ref_mean, std) > 0)
    assert torch.all(sde_kl(mean.detach(), ref_mean, std) < 1e-10)
    # log_prob resets the schedule of the sampling step count itself
    policy.set_timesteps(40)
    torch.testing.assert_close(
        policy.log_prob(*args, num_steps=5).detach(), moved, rtol=0, atol=1e-6
    )


def test_lora_targets_the_joint_attention_projections():
    policy = _policy("sd3", lora_rank=8)
    adapted = {
        n.rsplit(".lora_A", 1)[0] for n, _ in policy.transformer.named_modules() if ".lora_A" in n
    }
    suffixes = {n.split(".attn.", 1)[1] for n in adapted}
    assert suffixes == set(FLOW_LORA_TARGETS)
    cfg = policy.lora_config
    assert cfg.r == 8 and cfg.lora_alpha == 16  # alpha defaults to 2 * rank (Flow-GRPO 32/64)
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    n_lora = sum(p.numel() for p in policy.trainable_parameters())
    assert n_lora == sum(
        p.numel() for n, p in policy.transformer.named_parameters() if "lora_" in n
    )


def test_fast_window_is_ode_outside_and_sde_inside():
    policy = _policy("sd3")
    kw = dict(num_steps=6, guidance_scale=4.5)
    with torch.no_grad():
        ode = policy.sample(
            PROMPTS, noise_level=0.0, generator=torch.Generator().manual_seed(3), **kw
        )
        fast = policy.sample(
            PROMPTS,
            noise_level=0.7,
            sde_steps=[2, 3],
            generator=torch.Generator().manual_seed(3),
            **kw,
        )
    assert fast.sde_mask.tolist() == [False, False, True, True, False, False]
    assert torch.all(fast.log_probs[:, [0, 1, 4, 5]] == 0)
    assert torch.all(fast.log_probs[:, [2, 3]] != 0)
    # before the window no noise is drawn: the same path as the ODE; from it on they part
    torch.testing.assert_close(fast.latents[:, :3], ode.latents[:, :3], rtol=0, atol=0)
    assert (fast.latents[:, 3] - ode.latents[:, 3]).abs().max() > 1e-2
    # the stored SDE transitions score as sampled
    i = 3
    lp = policy.log_prob(
        fast.latents[:, i],
        fast.latents[:, i + 1],
        fast.timesteps[i].expand(2),
        fast.prompt_embeds,
        4.5,
    )
    torch.testing.assert_close(lp.detach(), fast.log_probs[:, i], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"must lie in \[0, 6\)"):
        policy.sample(PROMPTS, sde_steps=[6], **kw)


def test_prompt_cache_encodes_once_and_works_with_text_encoders_offloaded():
    policy = _policy("sd3", max_cached_prompts=3)
    calls = []
    for m in policy.text_encoders:
        m.register_forward_hook(lambda *_: calls.append(1))
    first = policy.encode_prompts(PROMPTS)
    assert len(calls) == 3  # CLIP-L, CLIP-G and T5, once for the batch
    again = policy.encode_prompts(PROMPTS[::-1])
    assert len(calls) == 3
    torch.testing.assert_close(again.embeds, first.embeds.flip(0))
    assert isinstance(first, FlowEmbeds) and first.shape == (2, 32, 32)  # 16 CLIP + 16 T5 tokens
    assert first.pooled.shape == (2, 32)
    # the text encoders leave (to the meta device: unusable), cached prompts still encode
    policy.offload_text_encoders("meta")
    assert all(p.device.type == "meta" for m in policy.text_encoders for p in m.parameters())
    torch.testing.assert_close(policy.encode_prompts(PROMPTS).embeds, first.embeds)
    with torch.no_grad():
        out = policy.sample(PROMPTS, num_steps=2, guidance_scale=1.0)
    assert torch.isfinite(out.images).all()
    with pytest.raises((NotImplementedError, RuntimeError)):
        policy.encode_prompts(["a prompt never seen"])  # would need the encoders
    # LRU: at most 3 prompts kept, the least recently used leaves first
    lru = _policy("sd3", max_cached_prompts=3)
    calls.clear()
    for m in lru.text_encoders:
        m.register_forward_hook(lambda *_: calls.append(1))
    lru.cache_prompts(["p0", "p1", "x"], batch_size=2)
    assert len(calls) == 6  # two batches through the three encoders
    lru.encode_prompts(["p0"])
    lru.encode_prompts(["y"])
    assert list(lru._cache) == ["x", "p0", "y"]


def test_full_transformer_reference_and_gradient_checkpointing():
    torch.manual_seed(0)
    plain = _policy("sd3", use_lora=False, keep_reference=True)
    ckpt = _policy("sd3", use_lora=False, gradient_checkpointing=True)
    assert ckpt.transformer.gradient_checkpointing
    assert len(plain.trainable_parameters()) == len(list(plain.transformer.parameters()))
    grads = []
    for policy in (plain, ckpt):
        out = policy.sample(
            ["a cat"],
            num_steps=3,
            guidance_scale=4.5,
            grad=1,
            generator=torch.Generator().manual_seed(1),
        )
        assert out.images.requires_grad and not out.latents.requires_grad
        out.images.mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.trainable_parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)
    i, args = 1, None
    with torch.no_grad():
        s = plain.sample(["a cat"], num_steps=3, guidance_scale=4.5)
        args = (s.latents[:, i], s.latents[:, i + 1], s.timesteps[i : i + 1], s.prompt_embeds, 4.5)
        for p in plain.transformer.parameters():
            p.add_(0.01 * torch.randn_like(p))
        with plain.reference():
            ref = plain.log_prob(*args)
        moved = plain.log_prob(*args)
    torch.testing.assert_close(ref, s.log_probs[:, i], rtol=0, atol=1e-5)
    assert (moved - ref).abs().max() > 1e-4
    with pytest.raises(RuntimeError, match="keep_reference=True"), ckpt.reference():
        pass


def test_bf16_frozen_weights_keep_fp32_lora_and_latents():
    policy = _policy("flux", weight_dtype=torch.bfloat16)
    assert policy.vae.dtype == torch.bfloat16
    assert all(m.dtype == torch.bfloat16 for m in policy.text_encoders)
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    with torch.no_grad():
        out = policy.sample(PROMPTS, num_steps=3, guidance_scale=3.5)
    assert out.latents.dtype == torch.float32 and out.images.dtype == torch.float32
    assert torch.isfinite(out.log_probs).all() and torch.isfinite(out.images).all()


@pytest.mark.parametrize("kind", ["sd3", "sd15"])
def test_the_full_reference_runs_in_float32_when_deepspeed_casts_the_trained_model(kind):
    """DeepSpeed bf16 casts the weights of the model it wraps in place; the frozen reference copy
    of full training stays float32. A reference pass (DPO's, or DDPO's KL) takes its input dtype
    from the model it calls, not from the trained one (it crashed: 'mat1 and mat2 must have the
    same dtype')."""
    from alignment.policy import DiffusionPolicy

    torch.manual_seed(0)
    if kind == "sd3":
        policy = _policy("sd3", use_lora=False, keep_reference=True)
        predict = policy.predict_velocity
        x = torch.randn(2, 4, 16, 16)
        t = torch.tensor([500.0, 250.0])
    else:
        policy = DiffusionPolicy.from_pretrained("tiny", use_lora=False, keep_reference=True)
        predict = policy.predict_noise
        x = torch.randn(2, 4, 8, 8)
        t = torch.tensor([500, 250])
    with torch.no_grad():
        embeds = policy.encode_prompts(["a cat", "a dog"])
        expected = predict(x, t, embeds, 3.0)
        for p in policy.trained_model.parameters():  # what the engine does at prepare
            p.data = p.data.to(torch.bfloat16)
        with policy.reference():
            ref = predict(x, t, embeds, 3.0)
        tuned = predict(x, t, embeds, 3.0)
    assert ref.dtype == torch.float32 and tuned.dtype == torch.bfloat16
    torch.testing.assert_close(ref, expected, rtol=0, atol=0)
    torch.testing.assert_close(tuned.float(), expected, rtol=0.1, atol=0.1)


def test_flux_gets_the_pipelines_timestep_in_bf16():
    """FluxPipeline casts ``t`` to the latents' dtype, then divides by 1000; in bf16 the order
    matters (bf16 has steps of 4 between 512 and 1024): 850 -> 848 -> 0.848, not 0.852."""
    policy = _policy("flux", weight_dtype=torch.bfloat16)
    seen = []
    policy.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"]), with_kwargs=True
    )
    t = torch.tensor([850.0, 1000.0, 3.3])
    with torch.no_grad():
        embeds = policy.encode_prompts(PROMPTS[:1] * 3)
        policy.predict_velocity(torch.randn(3, 4, 16, 16), t, embeds, 3.5)
    expected = t.to(torch.bfloat16) / 1000
    assert seen[0].dtype == torch.bfloat16
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)
    assert not torch.equal(expected, (t / 1000).to(torch.bfloat16))  # the order is seen


def test_export_builds_the_transformer_in_the_run_dtype_and_leaves_the_live_one_alone(tmp_path):
    """The export's transformer is built without weights and takes CPU copies of the state (a
    FLUX transformer: one bf16 copy in host memory, not two float32 ones): its weights stay in the
    run's bf16, the LoRA in float32; fusing the LoRA into it never touches the live policy; the
    folder loads in plain diffusers with the fused weights."""
    from alignment.export import build_tuned_module, export_policy

    policy = _policy("flux", weight_dtype=torch.bfloat16)
    with torch.no_grad():
        for n, p in policy.transformer.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))  # a trained adapter
    live = {k: v.clone() for k, v in policy.transformer.state_dict().items()}
    tuned = build_tuned_module(policy)
    dtypes = {n: p.dtype for n, p in tuned.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora" not in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "lora" in n} == {torch.float32}
    assert not any(p.is_meta for p in tuned.parameters())
    export = export_policy(policy, tmp_path / "export")
    after = policy.transformer.state_dict()
    assert all(torch.equal(live[k], after[k]) for k in live)  # the live model is untouched
    loaded = FluxPipeline.from_pretrained(export, torch_dtype=torch.bfloat16).transformer
    name = next(n for n in live if n.endswith("to_q.base_layer.weight"))
    fused = loaded.state_dict()[name.replace(".base_layer", "")]
    assert fused.dtype == torch.bfloat16 and not torch.equal(fused, live[name])
