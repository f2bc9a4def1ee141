"""Export a tuned policy as a diffusers pipeline folder (shared by every trainer).

``export_policy(policy, export_dir, state_dict=None, overrides=None)`` writes, for a
:class:`~alignment.policy.DiffusionPolicy` (SD 1.x / 2.x):

- ``export_dir/``: a complete ``StableDiffusionPipeline`` folder whose UNet is the tuned one (LoRA
  merged into the weights), so ``StableDiffusionPipeline.from_pretrained(export_dir)`` works;
- ``export_dir/unet``: that UNet on its own (``UNet2DConditionModel.from_pretrained``);
- ``export_dir/pytorch_lora_weights.safetensors`` (LoRA runs only): the adapter as peft writes it
  (``get_peft_model_state_dict``: ``unet.<module>.lora_A/lora_B.weight``) with its ``LoraConfig``
  (rank, ``lora_alpha``, targets) as diffusers' adapter metadata, written by
  ``StableDiffusionPipeline.save_lora_weights``; ``pipe.load_lora_weights(export_dir)`` on the base
  model restores every adapted module, whatever the targets (attention, ``conv_out``, resnet convs,
  ``proj_in/out``, the time embedding) and the scale ``lora_alpha / r``.

and the same for a :class:`~alignment.flow_policy.FlowPolicy` (SD 3.x, FLUX): a complete
``StableDiffusion3Pipeline`` / ``FluxPipeline`` folder with the tuned ``transformer/`` (LoRA
merged) and the adapter file (``transformer.<module>.lora_A/lora_B.weight``, written by the
pipeline's own ``save_lora_weights``), which that pipeline's ``load_lora_weights`` reads. Its frozen
parts (VAE, text encoders) are written as they are (a bf16 run writes bf16: no float32 copy of
T5-XXL), the merged transformer in the dtype of the policy's transformer.

The LoRA state dict is deliberately *not* passed through diffusers'
``convert_state_dict_to_diffusers``: its PEFT -> diffusers table renames only the attention
projections (``to_q.lora_A`` -> ``to_q.lora.down``), so a target list with any other module gave
a file of two key formats of which ``load_lora_weights`` kept only the unrenamed ones. The
loaders read peft's own keys (with the metadata's ``lora_alpha``) directly.

``overrides`` (parameter name -> tensor) replace entries of the state before the export: the GRPO
trainer passes its EMA weights. The folder is written to ``export_dir.tmp`` first and renamed into
place.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import torch


def _own_cpu_copy(t: torch.Tensor, live: set[int]) -> torch.Tensor:
    """``t`` on the CPU, never in the storage of the live model's tensors (data pointers
    ``live``): the export fuses the LoRA into it in place. A gathered state (ZeRO-3) or a move
    from the GPU is already a copy and is not cloned again."""
    out = t.detach().cpu()
    return out.clone() if out.data_ptr() in live else out


def build_tuned_module(
    policy: Any,
    state_dict: dict[str, torch.Tensor] | None = None,
    overrides: dict[str, torch.Tensor] | None = None,
) -> torch.nn.Module:
    """A fresh CPU copy of the policy's UNet or transformer (with its LoRA adapter, if any)
    carrying ``state_dict`` (default: the policy's current weights) with ``overrides`` replacing
    entries by name. The UNet comes in float32; the transformer in the state's own dtypes (its
    weights in the run's dtype, the LoRA in float32).

    Pass the full state dict gathered by the trainer (``accelerator.get_state_dict(module)``) when
    the live module is sharded (DeepSpeed ZeRO-3); keys may carry a ``module.`` prefix. The module
    is built without weights (``init_empty_weights``) and takes CPU copies of the state's tensors
    as its own (``assign=True``): a FLUX transformer (12 B parameters) costs one bf16 copy in host
    memory (24 GB), not two float32 ones (96 GB).
    """
    from accelerate import init_empty_weights

    live = policy.trained_model
    if state_dict is None:
        state_dict = live.state_dict()
    owned = {t.data_ptr() for t in live.state_dict().values() if t.numel()}
    state = {k.removeprefix("module."): _own_cpu_copy(v, owned) for k, v in state_dict.items()}
    unet = policy.trained_attr == "unet"
    for name, value in (overrides or {}).items():
        if name not in state:
            raise KeyError(f"Override {name!r} is not a weight of the {type(live).__name__}.")
        # (the UNet is exported in float32: an fp32 EMA is not rounded to a 16-bit state first)
        state[name] = value.detach().cpu().to(torch.float32 if unet else state[name].dtype)
    with init_empty_weights():
        module = type(live).from_config(live.config)
        if policy.lora_config is not None:
            module.add_adapter(copy.deepcopy(policy.lora_config))
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(
            f"The state does not match the policy's {type(live).__name__}: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}. Pass the full state dict (e.g. "
            "accelerator.get_state_dict(module), with stage3_gather_16bit_weights_on_model_save "
            "under ZeRO-3)."
        )
    if unet:
        module.float()
    return module.eval()


def _pipeline(policy: Any, tuned: torch.nn.Module) -> Any:
    """The export's pipeline: the policy's components with the tuned module."""
    if policy.trained_attr == "unet":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=copy.deepcopy(policy.vae).float().cpu(),
            text_encoder=copy.deepcopy(policy.text_encoder).float().cpu(),
            tokenizer=policy.tokenizer,
            unet=tuned,
            scheduler=policy.pipeline.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    components = dict(policy.pipeline.components)
    components["transformer"] = tuned.to(policy.transformer.dtype)
    return type(policy.pipeline)(**components)


def export_policy(
    policy: Any,
    export_dir: str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | None = None,
    overrides: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the tuned policy to ``export_dir`` (see the module docstring); returns the folder.

    Call on the main process only (gather ``state_dict`` on every process first).
    """
    from peft.utils import get_peft_model_state_dict

    export_dir = Path(export_dir)
    tmp = export_dir.with_name(export_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tuned = build_tuned_module(policy, state_dict, overrides)
    lora_layers = metadata = None
    if policy.lora_config is not None:
        lora_layers = get_peft_model_state_dict(tuned)
        metadata = tuned.peft_config["default"].to_dict()
        tuned.fuse_lora()
        tuned.unload_lora()
    pipe = _pipeline(policy, tuned)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if lora_layers is not None:
        prefix = policy.trained_attr  # "unet" / "transformer": the pipelines' LoRA prefixes
        type(pipe).save_lora_weights(
            tmp,
            safe_serialization=True,
            **{f"{prefix}_lora_layers": lora_layers, f"{prefix}_lora_adapter_metadata": metadata},
        )
    if export_dir.exists():
        shutil.rmtree(export_dir)
    os.replace(tmp, export_dir)
    return export_dir


def export_from_accelerator(
    accelerator: Any,
    module: Any,
    policy: Any,
    export_dir: str | os.PathLike,
    overrides: dict[str, torch.Tensor] | None = None,
) -> None:
    """Gather the (possibly DeepSpeed-wrapped) trained ``module`` on every process and export
    ``policy`` from the main one (:func:`export_policy`, ``overrides`` e.g. EMA weights); call
    on every process."""
    state = accelerator.get_state_dict(module)
    if accelerator.is_main_process:
        export_policy(policy, export_dir, state, overrides)
    accelerator.wait_for_everyone()
