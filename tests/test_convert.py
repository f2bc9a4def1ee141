"""Import of the released LLaVA-Reward weights (``reward.convert``, ``llava-reward import-official``).

Tiny releases in the official layout and names (``tests/_releases.py``: ``reward_config.yaml``,
``lora/adapter_config.json`` + ``adapter_model.bin`` with transformers-4.50 module paths and no
``base_model.model.`` prefix, ``pytorch_model.bin`` with ``value_head``, SkipCA and projector keys)
for Phi-3.5-vision (SkipCA on, as the release), Qwen2.5-VL and LLaVA-NeXT. The imported model's
rewards are compared with a reference written out by hand in ``_releases.reference_rewards``:
the LoRA merged into a fresh backbone, the projector copied, the input ids built by the official
string rules (Qwen: no system turn; Phi: chunks with their own BOS; LLaVA-NeXT: the Vicuna turn cut
before ``ASSISTANT:``), SkipCA and the value head as torch ops. These references were not written by
the official code itself (README: "The paper's backbones and the released weights" says why).
"""

from __future__ import annotations

import pytest
import torch
import yaml
from _releases import image, reference_rewards, write_release

from reward import RewardScorer
from reward.cli import main
from reward.convert import ReleaseFormatError, import_official
from reward.testing import save_tiny_backbone

CAPTIONS = ["a red circle", "a dog on the left of the big tree"]
#: max |imported - reference| in fp32; measured 4.8e-7 (Phi), 6.6e-7 (Qwen), 1.0e-6 (LLaVA-NeXT).
TOL = 1e-4
KINDS = {
    "phi3_v": ("phi3_v", {}),
    "qwen2_5_vl": ("qwen2_vl", {"model_type": "qwen2_5_vl"}),
    "llava_next": ("llava_next", {}),
}


def _images():
    return [image(45, 37, 1), image(20, 70, 2)]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return {
        kind: save_tiny_backbone(builder, root / kind, **kwargs)
        for kind, (builder, kwargs) in KINDS.items()
    }


@pytest.mark.parametrize("kind", list(KINDS))
def test_imported_release_scores_what_the_release_scores(kind, backbones, tmp_path):
    backbone = backbones[kind]
    release = write_release(tmp_path / "release", backbone, kind, skipca=kind == "phi3_v")
    out = import_official(release, backbone, "alignment", tmp_path / "out")
    scorer = RewardScorer.from_pretrained(out)
    spec = scorer.model.config.perspectives["alignment"]
    assert spec["skipca"] is (kind == "phi3_v")
    assert spec["train_projector"] is True
    if kind == "phi3_v":
        assert scorer.processor.image_processor.num_crops == 16  # what the release saw
        assert spec["norm_eps"] == 1e-5
    images = _images()
    ours = scorer.score(CAPTIONS, images, "alignment", batch_size=2)  # batched, padded
    reference = reference_rewards(backbone, release, kind, scorer.processor, CAPTIONS, images)
    assert (ours - reference).abs().max().item() < TOL
    # the import is not vacuous: without the adapter the rewards move
    with scorer.model.backbone.disable_adapter():
        bare = scorer.score(CAPTIONS, images, "alignment")
    assert (bare - reference).abs().max().item() > 100 * TOL


def test_import_adds_a_perspective_to_an_existing_folder(backbones, tmp_path):
    backbone = backbones["qwen2_5_vl"]
    out = tmp_path / "out"
    first = write_release(tmp_path / "a", backbone, "qwen2_5_vl", seed=1)
    second = write_release(
        tmp_path / "b",
        backbone,
        "qwen2_5_vl",
        seed=2,
        safetensors_adapter=False,
        merger_short_names=True,  # "merger.0.*" as in some released files
    )
    import_official(first, backbone, "alignment", out)
    import_official(second, backbone, "fidelity", out)
    scorer = RewardScorer.from_pretrained(out)
    assert scorer.perspectives == ["alignment", "fidelity"]
    images = _images()
    for name, release in (("alignment", first), ("fidelity", second)):
        reference = reference_rewards(
            backbone, release, "qwen2_5_vl", scorer.processor, CAPTIONS, images
        )
        assert (scorer.score(CAPTIONS, images, name) - reference).abs().max().item() < TOL
    with pytest.raises(ReleaseFormatError, match="perspective 'alignment' already"):
        import_official(first, backbone, "alignment", out)
    with pytest.raises(ReleaseFormatError, match="mix backbones"):
        import_official(
            write_release(tmp_path / "c", backbones["llava_next"], "llava_next"),
            backbones["llava_next"],
            "safety",
            out,
        )


def test_safetensors_adapter_and_gpm_head(backbones, tmp_path):
    backbone = backbones["llava_next"]
    release = write_release(
        tmp_path / "r", backbone, "llava_next", gpm=True, safetensors_adapter=True
    )
    assert not (release / "lora" / "adapter_model.bin").exists()
    out = import_official(release, backbone, "overall", tmp_path / "out")
    scorer = RewardScorer.from_pretrained(out)
    assert scorer.model.config.perspectives["overall"]["head_dim"] == 2
    images = _images()
    reference = reference_rewards(
        backbone, release, "llava_next", scorer.processor, CAPTIONS, images
    )
    assert reference.shape == (2, 2)
    assert (scorer.score(CAPTIONS, images, "overall") - reference).abs().max().item() < TOL


def test_llava_next_release_with_skipca_is_scored_without_it(backbones, tmp_path):
    # the official LLaVA-NeXT forward has no SkipCA branch: saved W_q/W_k/W_v go unused
    backbone = backbones["llava_next"]
    release = write_release(tmp_path / "r", backbone, "llava_next", skipca=True)
    scorer = RewardScorer.from_pretrained(import_official(release, backbone, "x", tmp_path / "o"))
    assert scorer.model.config.perspectives["x"]["skipca"] is False
    images = _images()
    reference = reference_rewards(
        backbone, release, "llava_next", scorer.processor, CAPTIONS, images
    )
    assert (scorer.score(CAPTIONS, images, "x") - reference).abs().max().item() < TOL


def test_refusals_name_the_problem(backbones, tmp_path):
    backbone = backbones["qwen2_5_vl"]
    # an adapter key on the vision tower maps to no layer of the language model
    release = write_release(tmp_path / "r", backbone, "qwen2_5_vl")
    lora = torch.load(release / "lora" / "adapter_model.bin", weights_only=True)
    lora["visual.blocks.0.attn.qkv.lora_A.weight"] = torch.zeros(4, 32)
    torch.save(lora, release / "lora" / "adapter_model.bin")
    with pytest.raises(ReleaseFormatError, match=r"visual\.blocks\.0\.attn\.qkv\.lora_A\.weight"):
        import_official(release, backbone, "a", tmp_path / "o1")
    # an unknown key in pytorch_model.bin
    release = write_release(tmp_path / "r2", backbone, "qwen2_5_vl")
    heads = torch.load(release / "pytorch_model.bin", weights_only=True)
    heads["prompt_head.weight"] = torch.zeros(1, 32)
    torch.save(heads, release / "pytorch_model.bin")
    with pytest.raises(ReleaseFormatError, match="prompt_head.weight"):
        import_official(release, backbone, "a", tmp_path / "o2")
    # a pickle that is not plain weights is refused by weights_only=True
    release = write_release(tmp_path / "r3", backbone, "qwen2_5_vl")
    torch.save(
        {"value_head.weight": torch.zeros(1, 32), "x": ReleaseFormatError("x")},
        release / "pytorch_model.bin",
    )
    with pytest.raises(ReleaseFormatError, match="weights_only=True"):
        import_official(release, backbone, "a", tmp_path / "o3")
    # Qwen with SkipCA: the official Qwen SkipCA attends to the padding token, not the image
    release = write_release(tmp_path / "r4", backbone, "qwen2_5_vl")
    config = yaml.safe_load((release / "reward_config.yaml").read_text())
    (release / "reward_config.yaml").write_text(
        yaml.safe_dump({**config, "add_cross_attention": True})
    )
    with pytest.raises(ReleaseFormatError, match="151643"):
        import_official(release, backbone, "a", tmp_path / "o4")
    with pytest.raises(ReleaseFormatError, match="reward_config.yaml is missing"):
        import_official(tmp_path, backbone, "a", tmp_path / "o5")


def test_cli_import_official(backbones, tmp_path, capsys):
    backbone = backbones["phi3_v"]
    release = write_release(tmp_path / "r", backbone, "phi3_v", skipca=True)
    args = ["import-official", str(release), "--backbone", str(backbone)]
    assert main([*args, "--perspective", "alignment", "--output", str(tmp_path / "out")]) == 0
    assert "imported" in capsys.readouterr().out
    assert RewardScorer.from_pretrained(tmp_path / "out").perspectives == ["alignment"]
    assert main([*args, "--perspective", "alignment", "--output", str(tmp_path / "out")]) == 2
    assert "already" in capsys.readouterr().err
