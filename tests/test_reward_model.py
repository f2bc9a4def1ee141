"""LLaVA-Reward model and scorer on a tiny LLaVA backbone built in code and loaded from a folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from reward import ImageInputError, LlavaRewardModel, RewardScorer, UnknownPerspectiveError
from reward.modeling import gather_visual_tokens, masked_skip_cross_attention
from reward.processing import CaptionTruncatedWarning, RewardProcessor
from reward.testing import save_tiny_backbone

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
PROMPTS = [
    "a red circle",
    "a blue square on the left of the big tree",
    "dog",
    "a cat riding a horse at night",
    "sun",
]


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    return save_tiny_backbone("llava", tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def reward_dir(backbone_dir, tmp_path_factory):
    torch.manual_seed(0)
    model = LlavaRewardModel.from_backbone(
        backbone_dir, perspectives=("overall", "safety"), lora_config=LORA
    )
    # make the adapters non-trivial (LoRA B starts at zero)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    out = tmp_path_factory.mktemp("reward")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def scorer(reward_dir):
    return RewardScorer.from_pretrained(reward_dir)


@pytest.fixture(scope="module")
def images():
    # smooth random images (natural images are smooth at the pixel scale; pure noise maximises
    # the 8-bit / resampling differences between PIL and torch)
    g = torch.Generator().manual_seed(1)
    coarse = torch.rand(len(PROMPTS), 3, 10, 9, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(40, 36), mode="bilinear")


# ----------------------------------------------------------------------------- maths


def test_masked_skip_cross_attention_hand_computed():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    v = torch.tensor([[[2.0, 0.0], [0.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    out = masked_skip_cross_attention(q, k, v, mask)
    # scores over the two real keys: [1, 0] / sqrt(2); the third key is masked out
    w = torch.softmax(torch.tensor([1.0 / math.sqrt(2), 0.0]), 0)
    expected = w[0] * torch.tensor([2.0, 0.0]) + w[1] * torch.tensor([0.0, 4.0])
    torch.testing.assert_close(out[0], expected)
    # a row without visual tokens attends to nothing
    none = masked_skip_cross_attention(q, k, v, torch.zeros(1, 3, dtype=torch.bool))
    assert torch.equal(none, torch.zeros(1, 2))


def test_gather_visual_tokens_left_aligns_and_masks():
    img = 9
    ids = torch.tensor([[0, 0, 1, 9, 9, 2], [1, 9, 9, 9, 2, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    embeds = torch.arange(2 * 6 * 1, dtype=torch.float).view(2, 6, 1)
    visual, vmask = gather_visual_tokens(embeds, ids, mask, img)
    assert visual.shape == (2, 3, 1)
    assert vmask.tolist() == [[True, True, False], [True, True, True]]
    assert visual[0, :2, 0].tolist() == [3.0, 4.0] and visual[0, 2, 0] == 0
    assert visual[1, :, 0].tolist() == [7.0, 8.0, 9.0]


def test_skipca_ignores_padded_visual_positions():
    torch.manual_seed(0)
    from reward.modeling import RewardHead

    head = RewardHead(8, skipca=True)
    e = torch.randn(1, 8)
    visual = torch.randn(1, 3, 8)
    r_short, _ = head(e, visual, torch.ones(1, 3, dtype=torch.bool))
    padded = torch.cat([visual, 1e3 * torch.randn(1, 4, 8)], dim=1)
    pmask = torch.tensor([[True, True, True, False, False, False, False]])
    r_padded, _ = head(e, padded, pmask)
    torch.testing.assert_close(r_short, r_padded)


# ----------------------------------------------------------------------------- format


def test_sequence_format_image_then_caption_then_eos(scorer):
    proc = scorer.processor
    tok = proc.tokenizer
    inputs = proc(["a red circle"], [Image.new("RGB", (30, 30))])
    ids = inputs["input_ids"][0].tolist()
    image_id = scorer.model.config.image_token_id
    first_img = ids.index(image_id)
    last_img = len(ids) - 1 - ids[::-1].index(image_id)
    caption = tok("a red circle", add_special_tokens=False)["input_ids"]
    assert ids[-1] == tok.eos_token_id
    assert ids.count(image_id) == proc.family.num_image_tokens() == 16
    assert ids[last_img + 1 : last_img + 1 + len(caption)] == caption
    assert first_img < ids.index(caption[0])


def test_truncation_keeps_image_tokens_and_eos(scorer):
    proc = scorer.processor
    long_caption = " ".join(["red circle"] * 50)
    full = proc.sequence_ids(long_caption, [7] * 16)
    short = RewardProcessor(
        proc.tokenizer, proc.image_processor, proc.model_config, proc.chat_template, max_length=30
    )
    with pytest.warns(CaptionTruncatedWarning, match="1 of 1 captions were cut"):
        cut = short.sequence_ids(long_caption, [7] * 16)
    assert len(cut) == 30 < len(full)
    assert cut.count(7) == 16 and cut[-1] == proc.tokenizer.eos_token_id
    assert cut[:-1] == full[: len(cut) - 1]  # only the caption's tail is cut
    tiny = RewardProcessor(
        proc.tokenizer, proc.image_processor, proc.model_config, proc.chat_template, max_length=10
    )
    with pytest.raises(ValueError, match="too small"):
        tiny.sequence_ids("a red circle", [7] * 16)


# ----------------------------------------------------------------------------- scoring


def test_batch_scores_equal_one_by_one(scorer, images):
    batch = scorer.score(PROMPTS, images, "overall", batch_size=2)
    single = torch.stack(
        [scorer.score([p], [img], "overall")[0] for p, img in zip(PROMPTS, images)]
    )
    assert batch.shape == (len(PROMPTS),)
    torch.testing.assert_close(batch, single, atol=1e-6, rtol=0)  # measured 4.5e-8
    # and perspectives really differ
    assert not torch.allclose(batch, scorer.score(PROMPTS, images, "safety"))


def test_left_and_right_padding_give_the_same_reward(reward_dir, scorer, images):
    right = RewardScorer.from_pretrained(reward_dir)
    right.processor.padding_side = "right"
    left_scores = scorer.score(PROMPTS, images, "overall", batch_size=5)
    right_scores = right.score(PROMPTS, images, "overall", batch_size=5)
    inputs = right.processor(PROMPTS[:2], [Image.new("RGB", (28, 28))] * 2)
    assert inputs["attention_mask"][:, -1].tolist() == [0, 1]  # really right-padded
    torch.testing.assert_close(left_scores, right_scores, atol=1e-6, rtol=0)  # measured 3.0e-8


def test_save_load_identical_scores(scorer, reward_dir, tmp_path, images):
    scorer.model.save_pretrained(tmp_path / "again")
    again = RewardScorer.from_pretrained(tmp_path / "again")
    for p in ("overall", "safety"):
        assert torch.equal(scorer.score(PROMPTS, images, p), again.score(PROMPTS, images, p))
    files = {p.name for p in (tmp_path / "again").iterdir()}
    assert {"config.json", "heads", "adapters", "processor"} <= files
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in (tmp_path / "again").rglob("*"))
    assert not (tmp_path / "again" / "backbone").exists()  # the frozen backbone is referenced


def test_save_backbone_copy_loads_without_the_original(scorer, tmp_path, images):
    scorer.model.save_pretrained(tmp_path / "full", save_backbone=True)
    loaded = RewardScorer.from_pretrained(tmp_path / "full")
    assert loaded.model.config.backbone == "backbone"
    torch.testing.assert_close(
        loaded.score(PROMPTS, images, "overall"), scorer.score(PROMPTS, images, "overall")
    )


def test_adding_a_perspective_to_an_existing_folder_keeps_the_others(reward_dir, tmp_path, images):
    base = RewardScorer.from_pretrained(reward_dir)
    model = LlavaRewardModel.from_pretrained(reward_dir, perspectives=["overall"])
    model.add_perspective("alignment", lora=LORA)
    target = tmp_path / "grow"
    base.model.save_pretrained(target)
    model.save_pretrained(target, perspectives=["alignment"])
    grown = RewardScorer.from_pretrained(target)
    assert set(grown.perspectives) == {"overall", "safety", "alignment"}
    torch.testing.assert_close(
        grown.score(PROMPTS, images, "safety"), base.score(PROMPTS, images, "safety")
    )


def test_differentiable_reward_gives_pixel_gradients_and_agrees_with_frozen(scorer, images):
    fn = scorer.as_reward_fn({"overall": 1.0, "safety": 0.5}, differentiable=True)
    x = images.clone().requires_grad_(True)
    r = fn(x, PROMPTS)
    r.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    frozen = scorer.score(PROMPTS, images, "overall") + 0.5 * scorer.score(
        PROMPTS, images, "safety"
    )
    # the frozen path goes through PIL (8-bit) and the official image processor; the torch path
    # emulates its 8-bit rounding, so the same pixel values reach the model: measured max |diff|
    # 3.0e-8 (4.8e-7 on another run), against a reward spread of 0.11
    torch.testing.assert_close(r.detach(), frozen, atol=2e-6, rtol=0)
    fast = scorer.as_reward_fn({"overall": 1.0, "safety": 0.5})(images, PROMPTS)
    assert fast.requires_grad is False
    torch.testing.assert_close(fast, r.detach(), atol=1e-5, rtol=0)


def test_torch_preprocessing_matches_the_official_image_processor(scorer, images):
    from reward.images import to_pil

    family = scorer.processor.family
    big = torch.nn.functional.interpolate(images[:2], size=(512, 384), mode="bilinear")
    for batch in (images, big):
        ours = family.pixel_inputs_torch(batch)["pixel_values"]
        official = family.pixel_inputs([to_pil(x) for x in batch])["pixel_values"]
        assert ours.shape == official.shape
        # the torch path emulates PIL's 8-bit rounding (emulate_8bit, the default): measured max
        # |diff| 0.0 at 40x36 and 512x384 (one 8-bit grey level is 1/255/std = 0.015)
        assert (ours - official).abs().max() <= 1e-6


def test_compare_and_rank(scorer, images):
    r = scorer.score("a red circle", images[:3], "overall")
    p = scorer.compare("a red circle", images[0], images[1])
    assert p == pytest.approx(float(torch.sigmoid((r[0] - r[1]) / scorer.tau)), abs=1e-5)
    order, scores = scorer.rank("a red circle", list(images[:3]))
    assert order == torch.argsort(r, descending=True).tolist()
    torch.testing.assert_close(scores, r)


# ----------------------------------------------------------------------------- inputs and errors


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "I;16"])
def test_image_modes_are_converted_not_refused(scorer, mode, tmp_path):
    arr = (np.random.default_rng(0).random((20, 24)) * 255).astype(np.uint8)
    if mode == "I;16":
        img = Image.fromarray(arr.astype(np.uint16) * 200)
    else:
        img = Image.fromarray(arr).convert(mode)
    assert img.mode == mode
    path = tmp_path / "img.png"
    img.save(path)
    for item in (img, path):
        r = scorer.score("a red circle", [item])
        assert r.shape == (1,) and torch.isfinite(r).all()


def test_bad_inputs_raise_named_errors(scorer, tmp_path):
    with pytest.raises(ImageInputError, match="missing.png"):
        scorer.score("x", [tmp_path / "missing.png"])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageInputError, match="broken.png"):
        scorer.score("x", [bad])
    with pytest.raises(ImageInputError, match="zero-size"):
        scorer.score("x", [torch.zeros(3, 0, 5)])
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        scorer.score(["a", "b", "c"], [Image.new("RGB", (8, 8))] * 2)
    with pytest.raises(UnknownPerspectiveError, match="'beauty'.*overall, safety"):
        scorer.score("x", [Image.new("RGB", (8, 8))], perspective="beauty")
    with pytest.raises(UnknownPerspectiveError, match="beauty"):
        scorer.as_reward_fn({"beauty": 1.0})


def test_backbone_without_image_token_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=50,
        )
    )
    with pytest.raises(ValueError, match="no image token"):
        LlavaRewardModel.from_backbone(lm, processor=object())


def test_not_a_reward_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a LLaVA-Reward folder"):
        RewardScorer.from_pretrained(tmp_path)


def test_gpm_head_and_no_skipca_variants(backbone_dir, images):
    model = LlavaRewardModel.from_backbone(
        backbone_dir, perspectives=("overall",), lora_config=LORA, skipca=False
    )
    model.add_perspective("gpm", head_dim=2, lora=LORA)
    scorer = RewardScorer(model)
    assert scorer.score(PROMPTS, images, "overall").shape == (len(PROMPTS),)
    assert scorer.score(PROMPTS, images, "gpm").shape == (len(PROMPTS), 2)
    assert not hasattr(model.heads["overall"], "q_proj")


def test_only_the_trained_perspective_is_trainable(backbone_dir):
    model = LlavaRewardModel.from_backbone(
        backbone_dir, perspectives=("overall", "safety"), lora_config=LORA
    )
    params = model.set_trainable("safety")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(("safety" in n) for n in names)
    assert any("lora_" in n for n in names) and any("modules_to_save" in n for n in names)
    assert sum(p.numel() for p in params) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    # scoring another perspective does not unfreeze it
    inputs = model.processor(["a red circle"], [Image.new("RGB", (28, 28))])
    model(**inputs, perspective="overall")
    names_after = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names_after == names


def test_mixed_adapter_batch_equals_adapter_switching(backbone_dir, images):
    model = LlavaRewardModel.from_backbone(
        backbone_dir,
        perspectives=("overall", "safety", "alignment"),
        lora_config=LORA,
        train_projector=False,
    )
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    scorer = RewardScorer(model)
    names = ["overall", "safety", "alignment"]
    switched = scorer.score_perspectives(PROMPTS, images, names)
    scorer.mixed_adapters = True
    mixed = scorer.score_perspectives(PROMPTS, images, names)
    for n in names:
        torch.testing.assert_close(mixed[n], switched[n], atol=1e-5, rtol=0)
    assert not torch.allclose(mixed["overall"], mixed["safety"])


def test_a_folder_cannot_turn_on_remote_code_by_itself(reward_dir, tmp_path):
    """A reward folder whose config.json says trust_remote_code (as a downloaded one may) is
    refused unless the caller passes True; False loads it without remote code."""
    import shutil

    folder = tmp_path / "remote"
    shutil.copytree(reward_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "trust_remote_code": True}))
    with pytest.raises(ValueError, match="saved with remote code trusted.*if you trust"):
        LlavaRewardModel.from_pretrained(folder)
    for choice in (False, True):
        model = LlavaRewardModel.from_pretrained(folder, trust_remote_code=choice)
        assert model.config.trust_remote_code is choice
    # the trainers' reward loaders pass the user's choice on (reward_kwargs)
    from alignment.draft import differentiable_reward_fn
    from alignment.rewards import get_reward_fn

    with pytest.raises(ValueError, match="saved with remote code trusted"):
        get_reward_fn("llava_reward", path=str(folder), device="cpu")
    for build in (get_reward_fn, differentiable_reward_fn):
        assert callable(build("llava_reward", path=str(folder), trust_remote_code=True))


def test_a_save_interrupted_while_moving_is_completed_on_the_next_open(
    reward_dir, tmp_path, images, monkeypatch
):
    """Once every new file is written the save is committed; a crash after it moved the new
    head but before the adapter would load as a perspective with a new head and an old adapter,
    without an error. The next open finishes the moves: the folder scores exactly as the
    model that was being saved."""
    import shutil

    import reward.modeling as modeling

    folder = tmp_path / "half"
    shutil.copytree(reward_dir, folder)
    model = LlavaRewardModel.from_pretrained(folder, is_trainable=True)
    with torch.no_grad():  # new weights in every head and every adapter
        for w in model.parameters():
            if w.requires_grad:
                w.add_(0.05 * torch.randn_like(w))
    prompts = ["a red circle", "a blue square"]
    reference = tmp_path / "reference"
    shutil.copytree(reward_dir, reference)
    model.save_pretrained(reference)  # the same model, saved without a crash
    want = RewardScorer.from_pretrained(reference)
    want = {p: want.score(prompts, images[:2], p) for p in want.model.perspectives}

    real, moved = modeling._replace, []

    def crash_before_first_adapter(src, dst):  # the processor and the heads are moved
        if moved and dst.suffix != ".safetensors":
            raise KeyboardInterrupt  # the process dies between two moves
        moved.append(dst)
        real(src, dst)

    monkeypatch.setattr(modeling, "_replace", crash_before_first_adapter)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(folder)
    monkeypatch.setattr(modeling, "_replace", real)
    assert moved and [f.name for f in folder.glob(".staging-*/COMMIT.json")] == ["COMMIT.json"]
    after = RewardScorer.from_pretrained(folder)
    for p, scores in want.items():
        torch.testing.assert_close(after.score(prompts, images[:2], p), scores, rtol=0, atol=0)
    assert not [f for f in folder.rglob(".*")]  # staging and renamed-aside folders are gone
    assert modeling.finish_interrupted_save(folder) == []


def test_a_commit_file_that_moves_files_out_of_the_folder_is_refused(reward_dir, tmp_path):
    """A downloaded folder decides nothing: a commit file listing a path outside the folder (or
    anything but a reward folder's own files) is refused before any file moves."""
    import shutil

    folder = tmp_path / "shipped" / "rm"
    shutil.copytree(reward_dir, folder)
    (folder / "notes.txt").write_text("mine")
    stage = folder / ".staging-x"
    stage.mkdir()
    for moves in (["../notes.txt"], ["/etc/passwd"], ["tokenizer.json"], ["heads/../../x"]):
        (stage / "COMMIT.json").write_text(json.dumps({"moves": moves}))
        with pytest.raises(ValueError, match="not a file of a reward folder"):
            LlavaRewardModel.from_pretrained(folder)
    assert (folder / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "shipped" / "notes.txt").exists()


def test_an_interrupted_save_leaves_the_folder_as_it_was(reward_dir, tmp_path, images, monkeypatch):
    """save_pretrained stages the perspectives' files and replaces config.json last: a crash in
    the middle (here: writing the second head) leaves the saved folder loading exactly as before,
    with no staging left behind."""
    import shutil

    import reward.modeling as modeling

    folder = tmp_path / "kept"
    shutil.copytree(reward_dir, folder)
    before = RewardScorer.from_pretrained(folder)
    prompts = ["a red circle", "a blue square"]
    want = {p: before.score(prompts, images[:2], p) for p in before.model.perspectives}
    model = LlavaRewardModel.from_pretrained(folder)
    with torch.no_grad():
        for head in model.heads.values():
            for w in head.parameters():
                w.add_(1.0)
    real, calls = modeling.save_file, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling, "save_file", crash_on_second)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(folder)
    after = RewardScorer.from_pretrained(folder)
    for p, scores in want.items():
        torch.testing.assert_close(after.score(prompts, images[:2], p), scores, rtol=0, atol=0)
    assert not [f for f in folder.iterdir() if f.name.startswith(".")]
