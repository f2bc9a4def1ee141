"""Every backbone family (LLaVA, Qwen2-VL, Qwen3-VL, Idefics3) end to end, on tiny random backbones
built in code with tokenizers of the real kinds (SentencePiece for LLaVA, byte-level BPE for Qwen
and Idefics3; :mod:`reward.testing`), saved to a folder and loaded through the real
``from_pretrained`` path.

Per family:

- the input ids equal the official processor's for the official LLaVA-Reward text
  (tests/_official.py; tests/test_sequences.py covers more captions and tokenizers);
- the torch (differentiable) preprocessing matches the official PIL image processor within
  :data:`PIXEL_TOL` (normalised units; measured values next to it);
- the differentiable reward has finite, non-zero pixel gradients and agrees with the frozen
  ``score()`` path within :data:`REWARD_TOL`;
- batch == one by one (1e-5, fp32), left == right padding, save -> load identical, peft
  mixed-adapter batch == adapter switching;
- SkipCA ignores padded visual positions (rows with different visual token counts in one batch).

Qwen2.5-VL and SmolVLM (same families, other model classes) get a shorter smoke test.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _official import official_inputs
from PIL import Image

from reward import LlavaRewardModel, RewardScorer
from reward.modeling import gather_visual_tokens
from reward.processing import RewardProcessor
from reward.testing import save_tiny_backbone

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
FAMILIES = ["llava", "qwen2_vl", "qwen3_vl", "idefics3", "fast_vlm"]
#: the tokenizer kind each family's real checkpoints use
TOKENIZERS = {
    "llava": "sentencepiece",
    "qwen2_vl": "bytelevel",
    "qwen3_vl": "bytelevel",
    "idefics3": "bytelevel",
    "fast_vlm": "bytelevel",
}
CAPTION = "a red circle on the left of the big tree"
PROMPTS = ["a red circle", "a blue square on the left of the big tree", "dog"]
#: (height, width) of the test images: non-square, square, wide.
SIZES = [(45, 37), (64, 64), (20, 56)]

#: ``emulate_8bit=True`` (the default): the torch preprocessing reproduces PIL's 8-bit rounding
#: (straight-through), so its ``pixel_values`` equal the official ones; measured max |diff| 0.0
#: for every family, size and image tried (noise and smooth, 45x37 / 64x64 / 30x56).
EXACT_PIXEL_TOL = 1e-6
#: ``emulate_8bit=False`` (plain float resampling): max |torch - official| of ``pixel_values`` in
#: normalised units on 8-bit noise images of 45x37 and 64x64 (noise is the worst case; one grey
#: level is 1/255/std ~ 0.015). Measured: llava 0.0150 (bicubic, CLIP std), qwen2_vl 0.0157
#: (bicubic), qwen3_vl the same, idefics3 0.0126 with splitting (three Lanczos resizes), 0.0109
#: without.
FLOAT_PIXEL_TOL = {
    "llava": 0.02,
    "qwen2_vl": 0.02,
    "qwen3_vl": 0.02,
    "idefics3": 0.02,
    "fast_vlm": 0.02,
}
#: max |differentiable - frozen reward| (exact mode) on 8-bit images. Measured 0.0 for every
#: family (the same pixel values and token ids go through the same model).
REWARD_TOL = 1e-5


def _image(height: int, width: int, seed: int, smooth: bool = True) -> Image.Image:
    """An 8-bit RGB image: smooth (coarse noise upsampled) or pure noise."""
    g = torch.Generator().manual_seed(seed)
    if smooth:
        coarse = torch.rand(1, 3, 6, 5, generator=g)
        x = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")[0]
    else:
        x = torch.rand(3, height, width, generator=g)
    arr = (x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(arr)


def _tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack(
        [torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in images]
    )


def _with_processor(proc: RewardProcessor, **changes) -> RewardProcessor:
    """A copy of ``proc`` with other settings (``padding_side``, image processor fields)."""
    image_processor = copy.deepcopy(proc.image_processor)
    for key, value in changes.pop("image_processor", {}).items():
        setattr(image_processor, key, value)
    kwargs = {
        "chat_template": proc.chat_template,
        "max_length": proc.max_length,
        "padding_side": proc.padding_side,
    }
    kwargs.update(changes)
    return RewardProcessor(proc.tokenizer, image_processor, proc.model_config, **kwargs)


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory):
    family = request.param
    backbone = save_tiny_backbone(
        family, tmp_path_factory.mktemp(family), tokenizer=TOKENIZERS[family]
    )
    torch.manual_seed(0)
    model = LlavaRewardModel.from_backbone(
        backbone, perspectives=("overall", "safety"), lora_config=LORA
    )
    with torch.no_grad():  # non-trivial adapters (LoRA B starts at zero)
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    reward_dir = tmp_path_factory.mktemp(f"{family}-reward")
    model.save_pretrained(reward_dir)
    return SimpleNamespace(
        family=family,
        backbone=backbone,
        model=model,
        reward_dir=reward_dir,
        scorer=RewardScorer.from_pretrained(reward_dir),
    )


def _official_ids(proc: RewardProcessor, family: str, image: Image.Image) -> list[int]:
    """The ids the family's official processor gives for the official LLaVA-Reward text."""
    out = official_inputs(
        copy.deepcopy(proc.tokenizer),
        proc.image_processor,
        proc.model_config,
        proc.chat_template,
        CAPTION,
        image,
    )
    return out["input_ids"][0].tolist()


def _processors(setup) -> list[RewardProcessor]:
    proc = setup.scorer.processor
    if setup.family == "idefics3":  # with and without image splitting
        return [proc, _with_processor(proc, image_processor={"do_image_splitting": False})]
    return [proc]


# ----------------------------------------------------------------------------- loading


def test_loads_through_from_pretrained(setup):
    model = setup.scorer.model
    assert model.config.backbone == str(setup.backbone)
    assert model.perspectives == ["overall", "safety"]
    assert model._base.config.model_type == setup.family
    names = [n for n, _ in model.backbone.named_parameters()]
    # LoRA on every linear of the language model and nowhere else; a projector copy each
    in_decoder = {id(m) for m in model._base.get_decoder().modules()}
    lora = [m for m in model._base.modules() if hasattr(m, "lora_A")]
    assert lora and all(id(m) in in_decoder for m in lora)
    wrapped = {id(sub) for m in lora for sub in m.modules()}  # base layers, lora_A/B
    linears = [m for m in model._base.get_decoder().modules() if isinstance(m, torch.nn.Linear)]
    assert all(id(m) in wrapped for m in linears)
    projector = model.family.projector
    for p in ("overall", "safety"):
        assert any(f"{projector}.modules_to_save.{p}." in n for n in names)


# ----------------------------------------------------------------------------- image tokens


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_image_tokens_match_the_official_processor(setup, size):
    image = _image(*size, seed=3)
    for proc in _processors(setup):
        ours = proc([CAPTION], [image])["input_ids"][0].tolist()
        official = _official_ids(proc, setup.family, image)
        assert ours == official
        assert ours[-1] == proc.tokenizer.eos_token_id
        n_image = ours.count(proc.family.image_token_id)
        if setup.family.startswith("qwen"):
            grid = proc.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
            assert n_image == int(grid[0].prod()) // proc.image_processor.merge_size**2
            start = ours.index(proc.model_config.vision_start_token_id)
            assert ours[start + n_image + 1] == proc.model_config.vision_end_token_id


# ----------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("size", SIZES[:2], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("emulate_8bit", [True, False], ids=["exact", "float"])
def test_torch_preprocessing_matches_the_official_image_processor(setup, size, emulate_8bit):
    image = _image(*size, seed=4, smooth=False)  # noise: the worst case
    tol = EXACT_PIXEL_TOL if emulate_8bit else FLOAT_PIXEL_TOL[setup.family]
    for proc in _processors(setup):
        family = copy.copy(proc.family)
        family.emulate_8bit = emulate_8bit
        official = family.pixel_inputs([image])
        ours = family.pixel_inputs_torch(_tensor([image]))
        for key in family.pixel_keys:
            assert ours[key].shape == official[key].shape, key
            if key == "pixel_values":
                diff = (ours[key] - official[key].float()).abs().max().item()
                assert diff <= tol, diff
            else:  # image_grid_thw, pixel_attention_mask: exact
                assert torch.equal(ours[key].long(), official[key].long()), key
        # the layout the token expansion reads agrees too
        assert family.image_token_ids(ours, 0) == family.image_token_ids(official, 0)


def test_differentiable_reward_gives_pixel_gradients_and_agrees_with_frozen(setup):
    scorer = setup.scorer
    images = _tensor([_image(45, 37, seed=5), _image(45, 37, seed=6)])
    x = images.clone().requires_grad_(True)
    r = scorer.as_reward_fn("overall", differentiable=True)(x, PROMPTS[:2])
    r.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()  # every image gets a gradient
    frozen = scorer.score(PROMPTS[:2], images, "overall")
    assert (r.detach() - frozen).abs().max().item() < REWARD_TOL


# ----------------------------------------------------------------------------- batching


def _mixed_batch():
    return [_image(h, w, seed=10 + i) for i, (h, w) in enumerate(SIZES)]


def test_batch_equals_one_by_one(setup):
    scorer = setup.scorer
    images = _mixed_batch()
    batch = scorer.score(PROMPTS, images, "safety", batch_size=len(images))
    single = torch.stack([scorer.score([p], [im], "safety")[0] for p, im in zip(PROMPTS, images)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)


def test_left_and_right_padding_give_the_same_reward(setup):
    model = setup.scorer.model
    left = model.processor
    right = _with_processor(left, padding_side="right")
    images = _mixed_batch()
    inputs_l, inputs_r = left(PROMPTS, images), right(PROMPTS, images)
    assert not torch.equal(inputs_l["attention_mask"], inputs_r["attention_mask"])
    with torch.no_grad():
        r_left = model(**inputs_l, perspective="overall").rewards
        r_right = model(**inputs_r, perspective="overall").rewards
    torch.testing.assert_close(r_left, r_right, atol=1e-5, rtol=0)


def test_save_then_load_gives_identical_scores(setup):
    images = _mixed_batch()
    in_memory = RewardScorer(setup.model)
    loaded = setup.scorer
    for perspective in ("overall", "safety"):
        torch.testing.assert_close(
            loaded.score(PROMPTS, images, perspective),
            in_memory.score(PROMPTS, images, perspective),
            atol=0,
            rtol=0,
        )


def test_mixed_adapter_batch_equals_adapter_switching(setup):
    # Qwen2-VL's pixel_values are patch-major ([sum of patches, D]), not batch-major: repeating
    # a batch per perspective must still route each row to its own image
    torch.manual_seed(0)
    model = LlavaRewardModel.from_backbone(
        setup.backbone, perspectives=("overall", "safety"), lora_config=LORA, train_projector=False
    ).eval()
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
        inputs = model.processor(PROMPTS, _mixed_batch())
        mixed = model.forward_perspectives(**inputs, perspectives=["overall", "safety"])
        switched = model.forward_perspectives(
            **inputs, perspectives=["overall", "safety"], mixed=False
        )
    assert not torch.allclose(switched["overall"], switched["safety"])
    for name in ("overall", "safety"):
        torch.testing.assert_close(mixed[name], switched[name], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- SkipCA


def test_skipca_ignores_padded_visual_positions(setup):
    model = setup.scorer.model
    proc = model.processor
    images = _mixed_batch()[1:]  # 64x64 and 20x56
    inputs = proc(PROMPTS[1:], images)
    counts = (inputs["input_ids"] == model.config.image_token_id).sum(1)
    if setup.family not in ("llava", "fast_vlm"):  # dynamic resolution: counts differ per row
        assert counts[0] != counts[1]
    with torch.no_grad():
        out = model(**inputs, perspective="overall")
        for i, (p, im) in enumerate(zip(PROMPTS[1:], images)):
            alone = model(**proc([p], [im]), perspective="overall")
            torch.testing.assert_close(out.hidden[i], alone.hidden[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(out.rewards[i], alone.rewards[0], atol=1e-5, rtol=0)

    # at the head: extra masked visual slots holding garbage change nothing
    captured = {}
    hook = model._base.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: captured.update(embeds=kw["inputs_embeds"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**inputs, perspective="overall")
    finally:
        hook.remove()
    visual, mask = gather_visual_tokens(
        captured["embeds"],
        inputs["input_ids"],
        inputs["attention_mask"],
        model.config.image_token_id,
    )
    head = model.heads["overall"]
    eos = torch.randn(visual.shape[0], visual.shape[-1])
    garbage = 1e3 * torch.randn(visual.shape[0], 7, visual.shape[-1])
    padded = torch.cat([visual, garbage], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(mask.shape[0], 7, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(head(eos, padded, padded_mask), head(eos, visual, mask))


# ----------------------------------------------------------------------------- other model classes


@pytest.mark.parametrize("family,model_type", [("qwen2_vl", "qwen2_5_vl"), ("idefics3", "smolvlm")])
def test_sibling_model_types(family, model_type, tmp_path):
    backbone = save_tiny_backbone(
        family, tmp_path / model_type, model_type=model_type, tokenizer=TOKENIZERS[family]
    )
    model = LlavaRewardModel.from_backbone(backbone, perspectives=("overall",), lora_config=LORA)
    assert model._base.config.model_type == model_type
    scorer = RewardScorer(model)
    images = _mixed_batch()[:2]
    # official preprocessing and token expansion agree with the torch path
    image = _image(45, 37, seed=4, smooth=False)
    fam = scorer.processor.family
    ours, official = fam.pixel_inputs_torch(_tensor([image])), fam.pixel_inputs([image])
    assert (ours["pixel_values"] - official["pixel_values"]).abs().max() <= EXACT_PIXEL_TOL
    assert fam.image_token_ids(ours, 0) == fam.image_token_ids(official, 0)
    batch = scorer.score(PROMPTS[:2], images, batch_size=2)
    single = torch.stack([scorer.score([p], [im])[0] for p, im in zip(PROMPTS[:2], images)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)
    x = _tensor([images[0]]).requires_grad_(True)
    r = scorer.as_reward_fn("overall", differentiable=True)(x, PROMPTS[:1])
    r.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert (r.detach() - scorer.score(PROMPTS[:1], x.detach())).abs().max() < REWARD_TOL
