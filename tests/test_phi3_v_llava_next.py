"""The Phi-3.5-vision (native port, ``phi3_v``) and LLaVA-NeXT (``llava_next``) families on tiny
backbones built in code, saved to a folder and loaded through the real ``from_pretrained``.

- the ids equal the official rule's: Phi-3.5-vision's tokenizer helper (template cut after the
  caption + EOS, chunks around ``<|image_1|>`` each with its BOS, the image run between them) and
  ``LlavaNextProcessor`` on the official ``USER: <image>\\n{caption}</s>`` text;
- the torch (differentiable) preprocessing equals the PIL image processor (exact with 8-bit
  emulation), also with other processor options (anyres grid, ``do_pad``);
- rewards: differentiable == frozen, batch == one by one, left == right padding, save == load;
- Phi-3.5-vision: the official checkpoint names and flat config load through the key map; the HD
  sizes and the image-feature layout (2x2 merge, ``sub_GN`` per row, ``glb_GN``) by hand.
"""

from __future__ import annotations

import copy
import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from reward import LlavaRewardModel, RewardScorer
from reward.families.phi3_v import Phi3VConfig
from reward.modeling import load_backbone
from reward.processing import RewardProcessor
from reward.testing import save_tiny_backbone, tiny_phi3_v

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
FAMILIES = ["phi3_v", "llava_next"]
CAPTION = "a red circle on the left of the big tree"
PROMPTS = ["a red circle", "a blue square on the left of the big tree", "dog"]
#: (height, width): portrait, square, wide (Phi: 4, 4 and 3 sub-crops; LLaVA-NeXT: 2, 4, 2 tiles)
SIZES = [(45, 37), (64, 64), (20, 70)]
#: emulate_8bit=True: max |torch - PIL| of pixel_values, measured 0.0 for both families.
EXACT_PIXEL_TOL = 1e-6
#: emulate_8bit=False on noise images (45x37, 64x64, 20x70): measured phi3_v 0.0150 (bilinear,
#: then the bicubic global view), llava_next 0.0151 (bicubic); one grey level is about 0.015.
FLOAT_PIXEL_TOL = 0.02
#: differentiable vs frozen reward, measured 0.0 (same pixel values, same ids).
REWARD_TOL = 1e-5


def _image(height: int, width: int, seed: int, smooth: bool = True) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    if smooth:
        coarse = torch.rand(1, 3, 6, 5, generator=g)
        x = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")[0]
    else:
        x = torch.rand(3, height, width, generator=g)
    return Image.fromarray((x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def _tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack(
        [torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in images]
    )


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory):
    family = request.param
    backbone = save_tiny_backbone(family, tmp_path_factory.mktemp(family))
    torch.manual_seed(0)
    model = LlavaRewardModel.from_backbone(
        backbone, perspectives=("overall", "safety"), lora_config=LORA
    )
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    reward_dir = tmp_path_factory.mktemp(f"{family}-reward")
    model.save_pretrained(reward_dir)
    return SimpleNamespace(
        family=family,
        backbone=backbone,
        model=model,
        scorer=RewardScorer.from_pretrained(reward_dir),
    )


def _official_ids(proc: RewardProcessor, family: str, caption: str, image: Image.Image):
    tok = copy.deepcopy(proc.tokenizer)
    if family == "phi3_v":  # the official tokenizer helper, written out
        message = {"role": "user", "content": f"<|image_1|>\n{caption}"}
        prompt = tok.apply_chat_template([message], tokenize=False, add_generation_prompt=True)
        prompt = prompt[:-22] + tok.eos_token
        sizes = proc.image_processor(images=[image])["image_sizes"][0]
        h, w = int(sizes[0]), int(sizes[1])
        s = proc.image_processor.crop_size
        vision = proc.model_config.vision_config
        g = vision.image_size // vision.patch_size // 2
        n = (h // s * w // s + 1) * g * g + 1 + (h // s + 1) * g
        chunks = [tok(c)["input_ids"] for c in re.split(r"<\|image_\d+\|>", prompt)]
        return chunks[0] + [proc.model_config.image_token_id] * n + chunks[1]
    from transformers import LlavaNextProcessor

    official = LlavaNextProcessor(
        image_processor=proc.image_processor,
        tokenizer=tok,
        patch_size=proc.model_config.vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    message = [{"role": "user", "content": [{"type": "text", "text": caption}, {"type": "image"}]}]
    text = tok.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
    text = text[: -len(" ASSISTANT:")] + tok.eos_token
    return official(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_ids_equal_the_official_rule(setup, size):
    proc = setup.scorer.processor
    image = _image(*size, seed=3)
    ours = proc([CAPTION], [image])["input_ids"][0].tolist()
    assert ours == _official_ids(proc, setup.family, CAPTION, image)
    assert ours[-1] == proc.tokenizer.eos_token_id
    bos = proc.tokenizer.bos_token_id
    # Phi: each chunk carries its own BOS, so a second <s> follows the image run
    assert ours.count(bos) == (2 if setup.family == "phi3_v" else 1)


def test_truncation_cuts_the_caption_from_its_end(setup):
    proc = setup.scorer.processor
    image = _image(45, 37, seed=3)
    full = proc([CAPTION], [image])["input_ids"][0].tolist()
    cut = copy.copy(proc)
    cut.max_length = len(full) - 2
    ids = cut([CAPTION], [image])["input_ids"][0].tolist()
    assert len(ids) == len(full) - 2
    # the last two caption tokens are gone; EOS, after the caption in both families, is kept
    assert ids == full[:-3] + full[-1:]
    cut.max_length = 5
    with pytest.raises(ValueError, match="too small"):
        cut([CAPTION], [image])


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("emulate_8bit", [True, False], ids=["exact", "float"])
def test_torch_preprocessing_equals_the_image_processor(setup, size, emulate_8bit):
    family = copy.copy(setup.scorer.processor.family)
    family.emulate_8bit = emulate_8bit
    image = _image(*size, seed=4, smooth=False)
    official = family.pixel_inputs([image])
    ours = family.pixel_inputs_torch(_tensor([image]))
    assert torch.equal(ours["image_sizes"], official["image_sizes"])
    assert ours["pixel_values"].shape == official["pixel_values"].shape
    diff = (ours["pixel_values"] - official["pixel_values"]).abs().max().item()
    assert diff <= (EXACT_PIXEL_TOL if emulate_8bit else FLOAT_PIXEL_TOL), diff
    assert family.image_token_ids(ours, 0) == family.image_token_ids(official, 0)


def test_differentiable_reward_agrees_with_frozen(setup):
    scorer = setup.scorer
    images = _tensor([_image(45, 37, seed=5), _image(45, 37, seed=6)])
    x = images.clone().requires_grad_(True)
    r = scorer.as_reward_fn("overall", differentiable=True)(x, PROMPTS[:2])
    r.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad.flatten(1).abs().sum(1) > 0).all()
    assert (r.detach() - scorer.score(PROMPTS[:2], images, "overall")).abs().max() < REWARD_TOL


def test_batch_padding_and_reload(setup):
    scorer = setup.scorer
    images = [_image(h, w, seed=10 + i) for i, (h, w) in enumerate(SIZES)]
    batch = scorer.score(PROMPTS, images, "safety", batch_size=3)
    single = torch.stack([scorer.score([p], [im], "safety")[0] for p, im in zip(PROMPTS, images)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)
    model = scorer.model
    right = copy.copy(model.processor)
    right.padding_side = "right"
    with torch.no_grad():
        r_right = model(**right(PROMPTS, images), perspective="safety").rewards
    torch.testing.assert_close(r_right, batch, atol=1e-5, rtol=0)
    in_memory = RewardScorer(setup.model).score(PROMPTS, images, "overall")
    torch.testing.assert_close(scorer.score(PROMPTS, images, "overall"), in_memory, atol=0, rtol=0)
    assert not torch.allclose(batch, scorer.score(PROMPTS, images, "overall"))


# ------------------------------------------------------------------------------ LLaVA-NeXT options


@pytest.fixture(scope="module")
def llava_next_family(tmp_path_factory):
    backbone = save_tiny_backbone("llava_next", tmp_path_factory.mktemp("ln"))
    base = load_backbone(str(backbone))
    return RewardProcessor.from_pretrained(backbone, base.config).family


@pytest.mark.parametrize(
    "changes",
    [
        {"do_pad": False},
        {"image_grid_pinpoints": [[28, 28], [28, 84], [84, 28]]},  # another anyres grid
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 28, "width": 28}},
    ],
    ids=["no-pad", "grid", "resize-crop"],
)
def test_llava_next_torch_path_honours_processor_options(llava_next_family, changes):
    family = copy.copy(llava_next_family)
    family.image_processor = copy.deepcopy(family.image_processor)
    for key, value in changes.items():
        setattr(family.image_processor, key, value)
    for size in SIZES:
        image = _image(*size, seed=7, smooth=False)
        official = family.pixel_inputs([image])
        ours = family.pixel_inputs_torch(_tensor([image]))
        assert ours["pixel_values"].shape == official["pixel_values"].shape
        assert (ours["pixel_values"] - official["pixel_values"]).abs().max() <= EXACT_PIXEL_TOL
        assert family.image_token_ids(ours, 0) == family.image_token_ids(official, 0)


def test_llava_next_torch_path_refuses_an_option_it_does_not_reproduce(llava_next_family):
    family = copy.copy(llava_next_family)
    family.image_processor = copy.deepcopy(family.image_processor)
    family.image_processor.do_reduce_labels = True
    with pytest.raises(ValueError, match="do_reduce_labels"):
        family.pixel_inputs_torch(_tensor([_image(45, 37, seed=1)]))


# ------------------------------------------------------------------------------ Phi-3.5-vision port


def _official_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This port's weights under the names of the official Phi-3.5-vision checkpoint."""
    out = {}
    for key, value in state.items():
        for ours, theirs in (
            ("model.vision_tower.", "model.vision_embed_tokens.img_processor."),
            ("model.multi_modal_projector.", "model.vision_embed_tokens."),
            ("model.language_model.", "model."),
        ):
            if key.startswith(ours):
                key = theirs + key[len(ours) :]
                break
        out[key] = value.contiguous()
    return out


def test_official_checkpoint_names_and_flat_config_load(tmp_path):
    model, _, _ = tiny_phi3_v(seed=3)
    state = model.state_dict()
    official = _official_names(state)
    assert "model.vision_embed_tokens.glb_GN" in official
    assert "model.vision_embed_tokens.img_projection.2.bias" in official
    assert "model.layers.1.self_attn.qkv_proj.weight" in official
    save_file(official, str(tmp_path / "model.safetensors"))
    text = model.config.text_config.to_dict()
    flat = {k: v for k, v in text.items() if k not in ("model_type", "architectures")}
    flat.update(
        model_type="phi3_v",
        architectures=["Phi3VForCausalLM"],
        auto_map={"AutoConfig": "configuration_phi3_v.Phi3VConfig"},
        img_processor={"name": "clip_vision_model", "image_dim_out": 16, "num_img_tokens": 4},
        embd_layer={"embedding_cls": "image", "projection_cls": "mlp", "use_hd_transform": True},
        vision_config=model.config.vision_config.to_dict(),  # the real one names CLIP-L instead
        image_token_id=model.config.image_token_id,
    )
    (tmp_path / "config.json").write_text(json.dumps(flat))
    base = load_backbone(str(tmp_path))  # trust_remote_code stays off
    assert type(base).__name__ == "Phi3VModel"
    loaded = {f"model.{k}": v for k, v in base.state_dict().items()}
    for key, value in state.items():
        if key != "lm_head.weight":
            assert torch.equal(loaded[key], value), key


def test_official_flat_config_gives_clip_l_336():
    config = Phi3VConfig(
        model_type="phi3_v",
        architectures=["Phi3VForCausalLM"],
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32064,
        rms_norm_eps=1e-5,
        img_processor={"model_name": "openai/clip-vit-large-patch14-336", "image_dim_out": 1024},
    )
    assert config.architectures == ["Phi3VForConditionalGeneration"]
    assert config.text_config.hidden_size == 3072 and config.text_config.vocab_size == 32064
    assert config.vision_config.hidden_size == 1024 and config.vision_config.image_size == 336
    assert config.vision_config.patch_size == 14 and config.vision_config.num_hidden_layers == 24
    assert config.vision_feature_layer == -2 and config.image_token_id == 32063


def test_hd_sizes_and_token_counts_by_hand():
    _, tok, ip = tiny_phi3_v()  # crops of 28 px, up to 4 sub-crops, 2x2 merged cells per crop
    # 45x37 portrait: transposed to 45 wide, ratio 45/37; scale 2 (2 * ceil(2 / 1.22) = 4 <= 4);
    # 56 x int(56 / 1.216) = 46 -> padded to 56 -> 56 x 56 (2 x 2 crops)
    # 20x70: ratio 3.5; scale 3 (4 * ceil(4 / 3.5) = 8 > 4); 84 x 24 -> padded to 28 -> 28 x 84
    # 64x64: scale 2 -> 56 x 56
    for (h, w), expected in zip(SIZES, [(56, 56), (56, 56), (28, 84)]):
        sizes = ip(images=[_image(h, w, seed=1)])["image_sizes"][0].tolist()
        assert tuple(sizes) == expected
    # tokens: rows g (cols g + 1) + 1 + g (g + 1) with g = 2: 2x2 crops -> 4*5 + 1 + 6 = 27
    cfg = Phi3VConfig(
        text_config={"hidden_size": 8, "num_attention_heads": 2, "vocab_size": 10},
        vision_config={
            "image_size": 28,
            "patch_size": 7,
            "hidden_size": 4,
            "num_attention_heads": 2,
        },
    )
    from reward.families.phi3_v import Phi3VFamily

    fam = Phi3VFamily(ip, tok, cfg)
    assert len(fam.image_token_ids({"image_sizes": torch.tensor([[56, 56]])}, 0)) == 27
    assert len(fam.image_token_ids({"image_sizes": torch.tensor([[28, 84]])}, 0)) == 2 * 7 + 1 + 6


def test_image_features_layout_by_hand():
    model, _, ip = tiny_phi3_v(seed=1)
    base = model.model
    pix = ip(images=[_image(20, 70, seed=2)])  # 1 x 3 sub-crops
    with torch.no_grad():
        got = base.get_image_features(pix["pixel_values"], pix["image_sizes"])[0]
        crops = pix["pixel_values"][0, :4]
        hidden = base.vision_tower(crops, output_hidden_states=True).hidden_states[-2][:, 1:]
        p = int(math.isqrt(hidden.shape[1]))  # 4 x 4 patches per crop
        proj = base.multi_modal_projector
        glb_sep, row_sep = proj.glb_GN.reshape(-1), proj.sub_GN.reshape(-1)

        def cell(crop: int, i: int, j: int) -> torch.Tensor:  # the 2x2 block at (i, j)
            f = hidden[crop].reshape(p, p, -1)
            return torch.cat(
                [f[2 * i, 2 * j], f[2 * i, 2 * j + 1], f[2 * i + 1, 2 * j], f[2 * i + 1, 2 * j + 1]]
            )

        rows = []
        for i in range(p // 2):  # sub-crops 1..3 side by side, then the row separator
            rows += [cell(1 + c, i, j) for c in range(3) for j in range(p // 2)] + [row_sep]
        rows.append(glb_sep)
        for i in range(p // 2):  # the global view (crop 0)
            rows += [cell(0, i, j) for j in range(p // 2)] + [row_sep]
        expected = proj.img_projection(torch.stack(rows))
    assert got.shape == expected.shape == (2 * 7 + 1 + 6, model.config.text_config.hidden_size)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
