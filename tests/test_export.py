"""The export's LoRA file: ``StableDiffusionPipeline.from_pretrained(base).load_lora_weights(export)``
restores every adapted module (no key dropped, no loader warning) and generates what the merged
export generates, for every LoRA target list the shipped configs use and a list covering attention,
``conv_out``, the resnet convs, ``proj_in/out`` and the time embedding."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch
from _tiny_sd import saved_tiny_pipeline
from diffusers import StableDiffusionPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from alignment.export import export_policy
from alignment.policy import DiffusionPolicy

ROOT = Path(__file__).resolve().parents[1]
LORA_FILE = "pytorch_lora_weights.safetensors"
#: beyond the shipped lists: every kind of layer a user may adapt in an SD UNet
BROAD = (
    "to_q,to_k,to_v,to_out.0,add_k_proj,conv_in,conv_out,conv1,conv2,conv_shortcut,proj_in,"
    "proj_out,ff.net.0.proj,ff.net.2,time_embedding.linear_1,time_embedding.linear_2,time_emb_proj"
)


def _shipped_target_lists() -> list[str]:
    """Every ``lora_target_modules`` value in the recipes' configs, the demo and the benchmarks,
    plus the trainers' defaults (what the SD 1.5 configs and the benchmarks that set none use)."""
    from alignment.ddpo_trainer import DDPOConfig
    from alignment.trainer_utils import PolicyTrainConfig

    found = {DDPOConfig.lora_target_modules, PolicyTrainConfig.lora_target_modules}
    files = [*ROOT.glob("recipes/configs/*.yaml"), ROOT / "alignment/demo.py"]
    files += ROOT.glob("bench/*.py")
    pattern = re.compile(r"lora_target_modules\s*[:=]\s*[\"']?([\w.,]+)")
    for f in files:  # a literal list only (the demo joins the SD 3 transformer's list in code)
        found.update(v for v in pattern.findall(f.read_text(encoding="utf-8")) if all(v.split(",")))
    return sorted(found)


SHIPPED = _shipped_target_lists()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_the_shipped_lists_are_found():
    assert "to_q,to_k,to_v,to_out.0" in SHIPPED  # SD 1.5 configs, trainers' default
    assert "to_q,to_k,to_v,to_out.0,conv_out" in SHIPPED  # tiny configs, demo


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _load_lora_quietly(base: StableDiffusionPipeline, export: Path) -> list[str]:
    """``base.load_lora_weights(export)``; returns every warning diffusers or peft raised."""
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            base.load_lora_weights(export)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    return handler.messages + [str(w.message) for w in caught]


def _image(pipe: StableDiffusionPipeline) -> torch.Tensor:
    kw = dict(num_inference_steps=3, guidance_scale=2.0, output_type="pt")
    return pipe("a red circle", generator=torch.Generator().manual_seed(5), **kw).images


def assert_lora_file_reproduces_merged(export: Path, base_dir: Path | None) -> float:
    """The acceptance check: the base + the export's LoRA file loads every key of the file,
    without a key warning, and generates the merged export's image (max abs diff < 1e-3).
    Returns the max abs difference. ``base_dir=None``: the in-code tiny pipeline (seed 0)."""
    merged = _image(StableDiffusionPipeline.from_pretrained(export))
    if base_dir is None:
        from alignment.tiny import tiny_sd_pipeline

        base = tiny_sd_pipeline()
    else:
        base = StableDiffusionPipeline.from_pretrained(base_dir)
    before = _image(base)
    messages = _load_lora_quietly(base, export)
    assert not [m for m in messages if re.search(r"(unexpected|missing) keys", m, re.I)], messages
    saved = load_file(export / LORA_FILE)
    assert saved and all(k.startswith("unet.") for k in saved)
    (adapter,) = base.unet.peft_config  # one adapter, named by diffusers ("default_0")
    loaded = get_peft_model_state_dict(base.unet, adapter_name=adapter)
    assert set(loaded) == {k.removeprefix("unet.") for k in saved}  # every pair, nothing else
    for k, v in saved.items():
        torch.testing.assert_close(loaded[k.removeprefix("unet.")], v, rtol=0, atol=0)
    got = _image(base)
    diff = (got - merged).abs().max().item()
    assert diff < 1e-3, diff  # measured 2e-6 to 4e-6
    assert (before - merged).abs().max().item() > 1e-2  # the adapter changes the images
    return diff


@pytest.mark.parametrize("targets", [*SHIPPED, BROAD])
def test_lora_file_loads_completely_for_every_target_list(tmp_path, targets):
    base_dir = saved_tiny_pipeline()
    policy = DiffusionPolicy.from_pretrained(
        str(base_dir), lora_rank=4, lora_alpha=8, lora_target_modules=targets.split(",")
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter (lora_B starts at zero)
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    n_pairs = sum("lora_A" in n for n, _ in policy.unet.named_parameters())
    export = export_policy(policy, tmp_path / "export")
    with safe_open(export / LORA_FILE, "pt") as f:
        assert len(list(f.keys())) == 2 * n_pairs
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 8 and meta["unet.r"] == 4  # scale 2 travels with the file
    assert_lora_file_reproduces_merged(export, base_dir)


def test_ddpo_tiny_recipe_export_loads_with_load_lora_weights(tmp_path):
    """Acceptance: one epoch of ``recipes/configs/ddpo_tiny.yaml`` (attention + conv_out) through
    the recipe; ``load_lora_weights`` on its export reproduces the merged export."""
    spec = importlib.util.spec_from_file_location("ddpo_recipe", ROOT / "recipes/ddpo_sd15.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = tmp_path / "run"
    history = recipe.main(
        [
            "--config", str(ROOT / "recipes/configs/ddpo_tiny.yaml"),
            "--output_dir", str(out), "--export_dir", str(out / "export"),
            "--num_epochs", "1", "--num_steps", "4", "--timesteps_per_call", "4",
            "--num_batches_per_epoch", "1", "--gradient_accumulation_steps", "1",
            "--save_every", "0", "--log_with", "none", "--log_images_every", "0",
            "--progress_bar", "false",
        ]
    )  # fmt: skip
    assert len(history) == 1
    assert_lora_file_reproduces_merged(out / "export", None)


def test_a_16_bit_gathered_state_keeps_float32_overrides_in_the_float32_unet_export():
    """Under DeepSpeed bf16 the gathered UNet state is 16-bit; an EMA override in float32 goes
    into the (float32) exported UNet as it is, not rounded to bf16 first; the live UNet is
    never written into."""
    from alignment.export import build_tuned_module

    policy = DiffusionPolicy.from_pretrained(str(saved_tiny_pipeline()), lora_rank=4)
    live = {k: v.clone() for k, v in policy.unet.state_dict().items()}
    gathered = {k: v.to(torch.bfloat16) for k, v in policy.unet.state_dict().items()}
    name = next(k for k in gathered if "lora_B" in k)
    ema = torch.full_like(live[name], 1.0 + 2.0**-12)  # not representable in bf16
    tuned = build_tuned_module(policy, gathered, {name: ema})
    assert all(p.dtype == torch.float32 for p in tuned.parameters())
    assert torch.equal(tuned.state_dict()[name], ema)
    assert all(torch.equal(v, policy.unet.state_dict()[k]) for k, v in live.items())
