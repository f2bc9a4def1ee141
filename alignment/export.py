"""Export a tuned policy as a diffusers pipeline folder (shared by every trainer).

``export_policy(policy, export_dir, unet_state_dict=None)`` writes

- ``export_dir/``: a complete ``StableDiffusionPipeline`` folder whose UNet is the tuned one (LoRA
  merged into the weights), so ``StableDiffusionPipeline.from_pretrained(export_dir)`` works;
- ``export_dir/unet``: that UNet on its own (``UNet2DConditionModel.from_pretrained``);
- ``export_dir/pytorch_lora_weights.safetensors`` (LoRA runs only): the adapter as peft writes it
  (``get_peft_model_state_dict``: ``unet.<module>.lora_A/lora_B.weight``) with its ``LoraConfig``
  (rank, ``lora_alpha``, targets) as diffusers' adapter metadata, written by
  ``StableDiffusionPipeline.save_lora_weights``; ``pipe.load_lora_weights(export_dir)`` on the base
  model restores every adapted module, whatever the targets (attention, ``conv_out``, resnet convs,
  ``proj_in/out``, the time embedding) and the scale ``lora_alpha / r``.

The LoRA state dict is deliberately *not* passed through diffusers'
``convert_state_dict_to_diffusers``: its PEFT -> diffusers table renames only the attention
projections (``to_q.lora_A`` -> ``to_q.lora.down``), so a target list with any other module gave
a file of two key formats of which ``load_lora_weights`` kept only the unrenamed ones. The
loaders read peft's own keys (with the metadata's ``lora_alpha``) directly.

The folder is written to ``export_dir.tmp`` first and renamed into place.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import torch


def build_tuned_unet(policy: Any, unet_state_dict: dict[str, torch.Tensor] | None = None):
    """A fresh float32 CPU copy of the policy's UNet (with its LoRA adapter, if any) carrying
    ``unet_state_dict`` (default: the policy's current weights).

    Pass the full state dict gathered by the trainer (``accelerator.get_state_dict(unet)``) when
    the live UNet is sharded (DeepSpeed ZeRO-3); keys may carry a ``module.`` prefix.
    """
    from diffusers import UNet2DConditionModel

    if unet_state_dict is None:
        unet_state_dict = policy.unet.state_dict()
    state = {
        k.removeprefix("module."): v.detach().float().cpu() for k, v in unet_state_dict.items()
    }
    unet = UNet2DConditionModel.from_config(policy.unet.config)
    if policy.lora_config is not None:
        unet.add_adapter(copy.deepcopy(policy.lora_config))
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"The UNet state does not match the policy's UNet: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}. Pass the full state dict (e.g. "
            "accelerator.get_state_dict(unet), with stage3_gather_16bit_weights_on_model_save "
            "under ZeRO-3)."
        )
    return unet.eval()


def export_policy(
    policy: Any,
    export_dir: str | os.PathLike,
    unet_state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the tuned policy to ``export_dir`` (see the module docstring); returns the folder.

    Call on the main process only (gather ``unet_state_dict`` on every process first).
    """
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    export_dir = Path(export_dir)
    tmp = export_dir.with_name(export_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    unet = build_tuned_unet(policy, unet_state_dict)
    lora_layers = metadata = None
    if policy.lora_config is not None:
        lora_layers = get_peft_model_state_dict(unet)
        metadata = unet.peft_config["default"].to_dict()
        unet.fuse_lora()
        unet.unload_lora()
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(policy.vae).float().cpu(),
        text_encoder=copy.deepcopy(policy.text_encoder).float().cpu(),
        tokenizer=policy.tokenizer,
        unet=unet,
        scheduler=policy.pipeline.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    if lora_layers is not None:
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=lora_layers,
            safe_serialization=True,
            unet_lora_adapter_metadata=metadata,
        )
    if export_dir.exists():
        shutil.rmtree(export_dir)
    os.replace(tmp, export_dir)
    return export_dir


def export_from_accelerator(
    accelerator: Any, unet: Any, policy: Any, export_dir: str | os.PathLike
) -> None:
    """Gather the (possibly DeepSpeed-wrapped) ``unet`` on every process and export ``policy``
    from the main one (:func:`export_policy`); call on every process."""
    state = accelerator.get_state_dict(unet)
    if accelerator.is_main_process:
        export_policy(policy, export_dir, state)
    accelerator.wait_for_everyone()
