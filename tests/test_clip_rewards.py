"""PickScore and CLIP score on a tiny random CLIP saved to folders: the registry loads them, the
scores equal CLIPModel's logits on the processor's own inputs, the torch preprocessing equals the
processor bit for bit, gradients reach the pixels, prompts are encoded once."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from alignment.clip_rewards import ClipScorer
from alignment.rewards import available_rewards, get_reward_fn
from alignment.tiny import tiny_clip_tokenizer
from reward.images import to_pil

PROMPTS = ["a red circle", "a blue dog", "a green tree"]


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """A tiny CLIP (32-pixel images, logit scale 100) saved without a processor, as the PickScore
    checkpoint is, and its processor saved to a folder of its own."""
    tok = tiny_clip_tokenizer(max_length=16)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=16,
        logit_scale_init_value=math.log(100.0),
    )
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("tiny-pickscore")
    CLIPModel(cfg).save_pretrained(model_dir)
    proc_dir = tmp_path_factory.mktemp("tiny-clip-processor")
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(proc_dir)
    return str(model_dir), str(proc_dir)


def _images(h: int, w: int, n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _reference_logits(model_dir, proc_dir, images, prompts):
    """CLIPModel's own forward on the processor's inputs of the 8-bit PIL images."""
    model = CLIPModel.from_pretrained(model_dir).eval()
    proc = CLIPProcessor.from_pretrained(proc_dir)
    inputs = proc(
        text=prompts, images=[to_pil(x) for x in images], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        return model(**inputs).logits_per_image.diagonal()


@pytest.mark.parametrize("size", [(32, 32), (40, 48), (20, 28)], ids=["same", "down", "up"])
def test_torch_preprocessing_equals_the_processor(clip_dirs, size):
    scorer = ClipScorer.from_pretrained(clip_dirs[0], clip_dirs[1], device="cpu")
    images = _images(*size)
    proc = CLIPProcessor.from_pretrained(clip_dirs[1])
    want = proc(images=[to_pil(x) for x in images], return_tensors="pt").pixel_values
    got = scorer.pixel_values(images)
    assert got.shape == want.shape == (3, 3, 32, 32)
    assert torch.equal(got, want)  # bit for bit (also measured at 512 px -> 32)


def test_registry_scores_equal_clipmodel_logits(clip_dirs):
    assert {"pickscore", "clip_score"} <= set(available_rewards())
    model_dir, proc_dir = clip_dirs
    images = _images(40, 48)
    pick = get_reward_fn("pickscore", model=model_dir, processor=proc_dir, device="cpu")
    scores = pick(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    want = _reference_logits(model_dir, proc_dir, images, PROMPTS)
    torch.testing.assert_close(scores, want, rtol=0, atol=1e-5)  # measured 1.5e-6
    assert len(set(scores.tolist())) == 3
    # CLIP score is the cosine: PickScore divided by exp(logit_scale) = 100
    cos = get_reward_fn("clip_score", model=model_dir, processor=proc_dir, device="cpu")(
        images, PROMPTS
    )
    torch.testing.assert_close(cos * 100.0, scores, rtol=1e-5, atol=1e-5)
    assert cos.abs().max() <= 1.0
    scaled = get_reward_fn(
        "clip_score", model=model_dir, processor=proc_dir, device="cpu", scale=100.0
    )
    torch.testing.assert_close(scaled(images, PROMPTS), cos * 100.0)
    # batched without gradients in chunks of 2: the same values
    chunked = get_reward_fn(
        "pickscore", model=model_dir, processor=proc_dir, device="cpu", batch_size=2
    )
    torch.testing.assert_close(chunked(images, PROMPTS), scores, rtol=0, atol=2e-5)  # measured 5e-6


def test_gradients_reach_the_pixels_and_the_model_stays_frozen(clip_dirs):
    fn = get_reward_fn("pickscore", model=clip_dirs[0], processor=clip_dirs[1], device="cpu")
    scorer = fn.scorer
    images = _images(32, 32).requires_grad_(True)
    r = fn(images, PROMPTS)
    assert r.requires_grad
    r.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in scorer.model.parameters())
    # the gradient is the float path's (straight-through 8-bit rounding): a small step along it
    # raises the score by about the predicted amount
    step = 1e-3 * images.grad / images.grad.norm()
    with torch.no_grad():
        before = scorer.cosine(images, PROMPTS).sum() * scorer.logit_scale()
        after = scorer.cosine(images + step * 50, PROMPTS).sum() * scorer.logit_scale()
    predicted = float((images.grad * step * 50).sum())
    assert after - before > 0.3 * predicted > 0


def test_prompts_are_encoded_once_and_errors_are_clear(clip_dirs, tmp_path):
    scorer = ClipScorer.from_pretrained(clip_dirs[0], clip_dirs[1], device="cpu")
    calls = []
    scorer.model.text_model.register_forward_hook(lambda *_: calls.append(1))
    fn = scorer.reward_fn()
    first = fn(_images(32, 32), PROMPTS)
    again = fn(_images(32, 32), PROMPTS[::-1])
    assert len(calls) == 1
    assert not torch.equal(first, again)  # same images, prompts permuted
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        fn(torch.rand(3, 32, 32), PROMPTS)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        scorer.cosine(_images(32, 32), PROMPTS[:2])
    with pytest.raises(OSError, match="yuvalkirstain/PickScore_v1"):
        ClipScorer.from_pretrained(str(tmp_path / "missing"), device="cpu")
