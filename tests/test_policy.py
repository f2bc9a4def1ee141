"""DiffusionPolicy: sampling equals diffusers' pipeline, log-probs, gradients, reference."""

from __future__ import annotations

import pytest
import torch
from _tiny_sd import saved_tiny_pipeline
from diffusers import StableDiffusionPipeline

from alignment.policy import DiffusionPolicy
from alignment.tiny import tiny_clip_tokenizer

PROMPTS = ["a red circle", "a blue dog"]


@pytest.fixture(scope="module")
def tiny_dir():
    return saved_tiny_pipeline()


def test_tiny_tokenizer_words_and_roundtrip(tmp_path):
    tok = tiny_clip_tokenizer(["zebra", "red"], max_length=8)
    assert tok.tokenize("zebra red") == ["zebra</w>", "red</w>"]
    assert len(tok.tokenize("unknownword")) > 1  # still tokenizes, byte by byte
    ids = tok("zebra", padding="max_length", max_length=8).input_ids
    assert len(ids) == 8 and ids[0] == tok.bos_token_id and ids[2] == tok.eos_token_id
    tok.save_pretrained(tmp_path)
    from transformers import CLIPTokenizer

    assert (
        CLIPTokenizer.from_pretrained(tmp_path)("zebra red").input_ids == tok("zebra red").input_ids
    )


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampling_reproduces_the_diffusers_pipeline(tiny_dir, eta):
    policy = DiffusionPolicy.from_pretrained(str(tiny_dir), lora_rank=4)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = policy.sample(
            PROMPTS,
            num_steps=6,
            eta=eta,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(7),
        )
    want = pipe(
        PROMPTS,
        num_inference_steps=6,
        eta=eta,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
    ).images
    assert out.images.shape == (2, 3, 32, 32)
    assert out.latents.shape == (2, 7, 4, 16, 16)
    assert out.log_probs.shape == (2, 6) and out.timesteps.shape == (6,)
    torch.testing.assert_close(out.images, want, rtol=0, atol=1e-6)  # measured 0.0
    assert out.images.min() >= 0.0 and out.images.max() <= 1.0
    if eta == 0.0:
        assert torch.all(out.log_probs == 0)
    else:
        assert torch.isfinite(out.log_probs).all() and out.log_probs.abs().sum() > 0


def test_log_prob_recomputes_stored_values_and_reference_is_adapter_off(tiny_dir):
    policy = DiffusionPolicy.from_pretrained(str(tiny_dir), lora_rank=4)
    with torch.no_grad():
        out = policy.sample(PROMPTS, num_steps=5, eta=1.0, guidance_scale=3.0)
    i = 2
    ts = out.timesteps[i].expand(2)
    args = (out.latents[:, i], out.latents[:, i + 1], ts, out.prompt_embeds, 3.0)
    lp = policy.log_prob(*args)
    torch.testing.assert_close(lp.detach(), out.log_probs[:, i], rtol=0, atol=1e-6)  # measured 0.0
    lp.sum().backward()
    grads = [p.grad for p in policy.trainable_parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    # Move the adapter: the policy changes, the reference (adapter off) does not.
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.2)
        moved = policy.log_prob(*args)
        with policy.reference():
            ref = policy.log_prob(*args)
    assert (moved - out.log_probs[:, i]).abs().max() > 1e-4
    torch.testing.assert_close(ref, out.log_probs[:, i], rtol=0, atol=1e-6)  # measured 0.0


def test_grad_through_last_steps_and_full_unet_reference(tiny_dir):
    policy = DiffusionPolicy.from_pretrained(str(tiny_dir), use_lora=False, keep_reference=True)
    assert len(policy.trainable_parameters()) == len(list(policy.unet.parameters()))
    out = policy.sample(["a cat"], num_steps=4, eta=1.0, guidance_scale=1.0, grad=1)
    assert out.images.requires_grad and not out.latents.requires_grad
    out.images.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.unet.parameters())
    with torch.no_grad():
        i = 1
        args = (
            out.latents[:, i],
            out.latents[:, i + 1],
            out.timesteps[i : i + 1],
            out.prompt_embeds,
            1.0,
        )
        for p in policy.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
        with policy.reference():
            ref = policy.log_prob(*args)
        moved = policy.log_prob(*args)
    torch.testing.assert_close(ref, out.log_probs[:, i], rtol=0, atol=1e-6)  # measured 0.0
    assert (moved - ref).abs().max() > 1e-4
