"""Pieces shared by the policy trainers (DDPO and the online-RL base, Diffusion-DPO, DRaFT/ReFL):
config base, accelerator, policy, optimizer and DeepSpeed preparation, the guarded optimiser step,
metrics reduced over processes, trackers, curves and sample grids, checkpoints, export.

Checkpoints and export go through :mod:`alignment.checkpointing` and :mod:`alignment.export`:
:meth:`PolicyTrainerBase.save_checkpoint`, :meth:`maybe_resume` and :meth:`export` only wire them
to a trainer's state. Only the trained UNet goes through ``accelerator.prepare`` (DeepSpeed
ZeRO-2/3 included); the text encoder, the VAE, a frozen reference UNet and the reward stay outside
the engine. The non-finite guard and config ranges are :mod:`reward.guards`'.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from alignment.flow_policy import is_flow_policy
from alignment.world import BUNDLED_WEIGHTS
from reward.files import atomic_write_text
from reward.guards import (
    NonFiniteError,
    StepGuard,
    any_process,
    enabled_scaler,
    is_finite,
    params_finite,
    poison_gradients,
    poison_nonfinite,
    validate_config,
)

#: help of ``lora_alpha`` (every trainer config): what None means for each policy
LORA_ALPHA_HELP = (
    "LoRA alpha; None: the policy's default, the rank for SD 1.x/2.x UNets (scale 1, as DDPO) "
    "and 2 x the rank for SD 3.x / FLUX transformers (Flow-GRPO's rank 32 / alpha 64)."
)


logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings every policy trainer shares (model, LoRA, optimiser, output, logging).

    Numeric fields are checked at construction against ``RANGES`` (and the subclasses' own), see
    :func:`reward.guards.validate_config`.
    """

    # --- model
    pretrained_model: str = field(
        default=str(BUNDLED_WEIGHTS / "tiny-world-sd"),
        metadata={
            "help": "Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), local diffusers "
            "folder, or 'tiny' (a tiny random pipeline). Default: the bundled tiny-world SD 1.5-"
            "architecture model (offline; nothing is downloaded unless you name a hub id)."
        },
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the model."})
    use_lora: bool = field(
        default=True,
        metadata={
            "help": "Train a LoRA adapter (reference = adapter off); else the full UNet or "
            "transformer."
        },
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float | None = field(default=None, metadata={"help": LORA_ALPHA_HELP})
    lora_target_modules: str = field(
        default="to_q,to_k,to_v,to_out.0",
        metadata={"help": "Comma-separated UNet (or transformer) module names that get LoRA."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "UNet / transformer gradient checkpointing (less memory, slower)."},
    )
    # --- optimiser
    train_batch_size: int = field(
        default=4, metadata={"help": "Micro-batch per process (pairs for DPO, prompts for DRaFT)."}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimiser step."}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    lr_warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    use_8bit_adam: bool = field(
        default=False, metadata={"help": "bitsandbytes' 8-bit AdamW (needs bitsandbytes + GPU)."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    max_consecutive_skips: int = field(
        default=3,
        metadata={
            "help": "Stop with an error after this many optimiser steps in a row were skipped "
            "for a non-finite loss or gradient (each skip is counted in train/skipped_steps)."
        },
    )
    mixed_precision: str | None = field(
        default=None,
        metadata={"help": "'no', 'fp16' or 'bf16'; None takes accelerate's launch setting."},
    )
    allow_tf32: bool = field(default=True, metadata={"help": "TF32 matmuls on Ampere+ GPUs."})
    seed: int = field(default=42, metadata={"help": "Random seed (per process offset)."})
    # --- output, logging, checkpoints
    output_dir: str = field(default="outputs/run", metadata={"help": "Run folder."})
    keep_last: int = field(
        default=2, metadata={"help": "Checkpoints to keep (0: all); the newest is always finite."}
    )
    resume_from: str | None = field(
        default=None,
        metadata={"help": "'latest' (newest checkpoint in output_dir, if any) or a checkpoint."},
    )
    resume_weights_only: bool = field(
        default=False,
        metadata={
            "help": "With resume_from: restore only the trained weights and the trainer state "
            "(step, statistics, history) with a fresh optimiser; resumes a DeepSpeed checkpoint "
            "on another number of processes or ZeRO stage."
        },
    )
    export_dir: str | None = field(
        default=None, metadata={"help": "Write the tuned pipeline (LoRA merged + LoRA file) here."}
    )
    log_with: str = field(
        default="tensorboard",
        metadata={"help": "accelerate trackers: 'tensorboard', 'wandb', 'all' or 'none'."},
    )
    tracker_project: str = field(default="alignment", metadata={"help": "Tracker project name."})
    progress_bar: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})

    RANGES: ClassVar[dict[str, str]] = {
        "lora_rank": ">= 1",
        "lora_alpha": "> 0",
        "train_batch_size": ">= 1",
        "gradient_accumulation_steps": ">= 1",
        "learning_rate": "> 0",
        "lr_warmup_steps": ">= 0",
        "adam_beta1": "[0, 1)",
        "adam_beta2": "[0, 1)",
        "adam_weight_decay": ">= 0",
        "adam_epsilon": "> 0",
        "max_grad_norm": "> 0",
        "max_consecutive_skips": ">= 1",
        "keep_last": ">= 0",
    }

    #: one comma-separated string, also from a YAML list (reward.guards.normalise_multi_values)
    COMMA_FIELDS: ClassVar[tuple[str, ...]] = ("lora_target_modules",)

    def __post_init__(self) -> None:
        if self.mixed_precision is False:  # an unquoted YAML 'no' is a boolean
            self.mixed_precision = "no"
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(
                f"mixed_precision = {self.mixed_precision!r}: use 'no', 'fp16' or 'bf16' (or "
                "leave it unset to take accelerate launch's --mixed_precision)."
            )
        validate_config(self)

    def target_modules(self) -> list[str]:
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]


@dataclass
class PolicyTrainConfig(TrainConfig):
    """Settings of the step-based policy trainers (Diffusion-DPO, DRaFT/ReFL)."""

    max_steps: int = field(default=1000, metadata={"help": "Optimiser steps."})
    save_every: int = field(
        default=500,
        metadata={"help": "Checkpoint every N optimiser steps (and at the end); 0: never."},
    )
    log_every: int = field(default=1, metadata={"help": "Log metrics every N optimiser steps."})
    log_images_every: int = field(
        default=100,
        metadata={
            "help": "Every N optimiser steps, sample num_log_images images on fixed prompts and "
            "seeds and log them as a captioned grid (0: never)."
        },
    )
    num_log_images: int = field(default=4, metadata={"help": "Images in the logged grid."})

    RANGES: ClassVar[dict[str, str]] = {
        "max_steps": ">= 1",
        "save_every": ">= 0",
        "log_every": ">= 1",
        "log_images_every": ">= 0",
        "num_log_images": ">= 1",
    }


@dataclass
class FlowPolicyOptions(TrainConfig):
    """Settings of the trainers that take SD 3.x / FLUX policies (Diffusion-DPO, GRPO): image
    size, T5 length and the memory options (prompts encoded once, then the text encoders off the
    accelerator). :class:`PolicyTrainerBase` reads them when it builds and prepares a
    :class:`~alignment.flow_policy.FlowPolicy`; a trainer whose config lacks them takes SD 1.x/2.x
    policies only."""

    resolution: int | None = field(
        default=None,
        metadata={"help": "Image size in pixels (None: the model's; 512 for SD 1.5 and SD3.5-M)."},
    )
    max_sequence_length: int | None = field(
        default=None,
        metadata={
            "help": "Flow policies: T5 tokens per prompt (None: 256 SD3 / 512 FLUX; 128 in "
            "Flow-GRPO)."
        },
    )
    cache_prompts: bool = field(
        default=True,
        metadata={
            "help": "Flow policies: encode every prompt of the prompt set (training and "
            "evaluation) once before training (~2.7 MB of CPU memory per SD3 prompt in bf16 at "
            "256 tokens)."
        },
    )
    offload_text_encoders: bool = field(
        default=True,
        metadata={
            "help": "Flow policies: move the text encoders to the CPU after caching (frees ~10 GB "
            "for SD3); prompts not cached (an offline pair set's) are then encoded there."
        },
    )
    max_cached_prompts: int | None = field(
        default=None,
        metadata={
            "help": "Flow policies: keep at most this many prompt embeddings, the least recently "
            "used leave first (None: all; bound it for large offline pair sets)."
        },
    )

    RANGES: ClassVar[dict[str, str]] = {
        "resolution": ">= 8",
        "max_sequence_length": ">= 1",
        "max_cached_prompts": ">= 1",
    }


def parse_json_kwargs(value: Any, name: str) -> dict[str, Any]:
    """A mapping from YAML, a JSON string, or None -> dict (clear error on bad JSON)."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        out = json.loads(value)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name} must be JSON (or a mapping in YAML): {err}") from err
    if not isinstance(out, dict):
        raise ValueError(f"{name} must be a JSON object, got {type(out).__name__}.")
    return out


@contextlib.contextmanager
def frozen_models_outside_zero3(accelerator: Any) -> Iterator[None]:
    """Build models here to keep them whole under DeepSpeed ZeRO-3.

    With a ZeRO-3 config, accelerate registers it with transformers, whose ``from_pretrained``
    then partitions every model it loads (``zero.Init``), the text encoder and the reward model
    included, though they never enter the DeepSpeed engine. Inside this context that registration
    is lifted (and restored on exit).
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.dschf = None
        plugin.set_deepspeed_weakref()


def reduce_metrics(
    accelerator: Any,
    metrics: Mapping[str, float],
    weight: float = 1.0,
    sum_keys: Sequence[str] = (),
) -> dict[str, float]:
    """Metrics of every process combined in one all-reduce, before logging.

    ``out[k] = sum_p w_p * m_p[k] / sum_p w_p`` (the weighted mean; ``w_p = weight`` of process
    ``p``, e.g. how many samples its values average over; equal weights give the plain mean),
    except for ``sum_keys`` (counts), which are summed: ``out[k] = sum_p m_p[k]``. Every process
    must pass the same keys. A single process gets its values back unchanged (as floats).
    """
    keys = list(metrics)
    if accelerator.num_processes == 1:
        return {k: float(metrics[k]) for k in keys}
    w = float(weight)
    values = [float(metrics[k]) * (1.0 if k in sum_keys else w) for k in keys] + [w]
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(t, reduction="sum").cpu().tolist()
    w_sum = total[-1]
    return {
        k: total[i] if k in sum_keys else (total[i] / w_sum if w_sum else float("nan"))
        for i, k in enumerate(keys)
    }


class PolicyTrainerBase:
    """Accelerator + policy + optimizer set-up and the shared step/checkpoint/export/logging wiring.

    Subclasses call :meth:`setup` in their ``__init__`` and extend :meth:`trainer_state` /
    :meth:`load_trainer_state` for what their checkpoints carry beyond the counters.

    Every trainer builds and prepares its policy here, of either kind: a
    :class:`~alignment.policy.DiffusionPolicy` (SD 1.x/2.x, its ``unet`` trained) or, when the
    config carries :class:`FlowPolicyOptions` (DPO, GRPO), a
    :class:`~alignment.flow_policy.FlowPolicy` (SD 3.x / FLUX, its ``transformer``), chosen by the
    pipeline class of ``pretrained_model`` (:meth:`build_policy`). ``self.is_flow`` says which;
    :meth:`cache_prompts` applies the flow policies' memory options.
    """

    config: TrainConfig
    #: the record key that is the tracker's x axis (and the history's)
    step_key: ClassVar[str] = "step"

    def load_prompts_and_check_reward(
        self, config: Any, prompts: Sequence[str] | None, reward: str | None
    ) -> None:
        """Before any model is loaded, so that a typo fails in seconds: resolve the reward's name
        ``reward`` (None: nothing to check, e.g. a reward function was passed) and read
        ``config.prompts`` into ``self.prompts`` (``prompts`` given: those)."""
        from alignment.prompts import load_prompts
        from alignment.rewards import check_reward

        if reward:
            check_reward(reward)
        self.prompts = (
            list(prompts)
            if prompts is not None
            else load_prompts(config.prompts, config.prompt_category)
        )

    def setup(
        self,
        config: TrainConfig,
        policy: Any = None,
        keep_reference: bool = False,
        micro_batch_size: int | None = None,
        accumulation_steps: int | None = None,
    ) -> None:
        """Build the accelerator, the policy (unless given), the optimizer and LR schedule, and
        prepare the UNet (DeepSpeed's ``auto`` micro-batch and clipping filled from the config).

        ``accumulation_steps``: backward calls per optimiser step (default
        ``config.gradient_accumulation_steps``; DDPO's timestep chunks multiply it)."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

        from reward.distributed import process_group_kwargs

        self.config = cfg = config
        self.output_dir = Path(cfg.output_dir)
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
        if cfg.mixed_precision and launched not in (None, "no", cfg.mixed_precision):
            logger.warning(
                "mixed_precision=%r from the recipe's config overrides accelerate launch's %r; "
                "pass --mixed_precision %s to the recipe (or remove it from the config) to use "
                "the launcher's.",
                cfg.mixed_precision,
                launched,
                launched,
            )
        log_with = None if cfg.log_with == "none" else cfg.log_with
        if log_with in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
            log_with = "tensorboard"
        self.accelerator = acc = Accelerator(
            mixed_precision=cfg.mixed_precision,
            log_with=log_with,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
            gradient_accumulation_steps=accumulation_steps or cfg.gradient_accumulation_steps,
            kwargs_handlers=process_group_kwargs(),  # gloo for DeepSpeed on CPUs
        )
        self.is_deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        set_seed(cfg.seed, device_specific=True)
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            acc.mixed_precision, torch.float32
        )
        with self.frozen_outside_zero3():
            if policy is None:
                policy = self.build_policy(keep_reference)
        self.policy = policy
        #: a flow-matching policy (SD 3.x / FLUX) rather than an SD 1.x/2.x one
        self.is_flow = is_flow_policy(policy)
        self.check_policy_kind(self.is_flow, f"the {type(policy).__name__} passed in")
        policy.to(acc.device)
        if not policy.use_lora and self.weight_dtype != torch.float32:
            policy.vae.to(dtype=self.weight_dtype)
            for encoder in getattr(policy, "text_encoders", None) or [policy.text_encoder]:
                encoder.to(dtype=self.weight_dtype)
        self.trainable = policy.trainable_parameters()
        optimizer = self._make_optimizer(self.trainable)
        warm = max(0, cfg.lr_warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
        )
        if self.is_deepspeed:
            ds = acc.state.deepspeed_plugin.deepspeed_config
            if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                ds["train_micro_batch_size_per_gpu"] = micro_batch_size or cfg.train_batch_size
            if ds.get("gradient_clipping", "auto") == "auto":
                ds["gradient_clipping"] = cfg.max_grad_norm
        self.unet, self.optimizer = acc.prepare(self.trained_module(policy), optimizer)
        # stepped by hand once per optimiser step (a prepared scheduler steps once per process)
        # its state goes into trainer_state.json (numbers), not through accelerate's custom
        # objects: those are pickles, read back with weights_only=False (code on resume)
        self.lr_scheduler = scheduler
        self.use_prepared_module(policy, self.unet)
        self.global_step = 0
        self.samples_seen = 0  # samples drawn so far by all processes together
        self.history: list[dict[str, float]] = []
        self.guard = StepGuard(cfg.max_consecutive_skips)

    # ------------------------------------------------------------------------------ policy hooks
    def check_policy_kind(self, flow: bool, what: str) -> None:
        """Refuse a flow policy (SD 3.x / FLUX; ``what`` names it) in a trainer whose config
        lacks :class:`FlowPolicyOptions` (DDPO, DRaFT/ReFL train SD 1.x/2.x UNets)."""
        if flow and not isinstance(self.config, FlowPolicyOptions):
            raise ValueError(
                f"{type(self).__name__} trains SD 1.x/2.x pipelines; {what} is an SD 3.x / FLUX "
                "pipeline (a flow policy). Train it with GRPOTrainer (recipes/grpo_sd3.py) or "
                "DPOTrainer (recipes/dpo_sd15.py)."
            )

    def build_policy(self, keep_reference: bool) -> Any:
        """The policy to train, built from the config: a
        :class:`~alignment.flow_policy.FlowPolicy` for an SD 3.x / FLUX pipeline (its
        ``model_index.json``, or ``tiny-sd3`` / ``tiny-flux``), else a
        :class:`~alignment.policy.DiffusionPolicy`."""
        from alignment.flow_policy import FlowPolicy, pipeline_kind
        from alignment.policy import DiffusionPolicy

        cfg = self.config
        flow = pipeline_kind(cfg.pretrained_model) is not None
        self.check_policy_kind(flow, repr(cfg.pretrained_model))
        kwargs = self.policy_kwargs(keep_reference)
        if not flow:
            return DiffusionPolicy.from_pretrained(cfg.pretrained_model, **kwargs)
        return FlowPolicy.from_pretrained(
            cfg.pretrained_model,
            **kwargs,
            max_sequence_length=cfg.max_sequence_length,
            resolution=cfg.resolution,
            max_cached_prompts=cfg.max_cached_prompts,
        )

    def policy_kwargs(self, keep_reference: bool) -> dict[str, Any]:
        """The config's keyword arguments for a policy's ``from_pretrained`` (revision, LoRA,
        reference copy, frozen-weight dtype, gradient checkpointing)."""
        cfg = self.config
        return dict(
            revision=cfg.revision,
            use_lora=cfg.use_lora,
            lora_rank=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_target_modules=cfg.target_modules(),
            keep_reference=keep_reference and not cfg.use_lora,
            weight_dtype=self.weight_dtype if cfg.use_lora else torch.float32,
            gradient_checkpointing=cfg.gradient_checkpointing,
        )

    def trained_module(self, policy: Any) -> torch.nn.Module:
        """The module that goes through ``accelerator.prepare``: the policy's trained model
        (``unet`` / ``transformer``)."""
        return policy.trained_model

    def use_prepared_module(self, policy: Any, module: Any) -> None:
        """Make the policy run its forward through the prepared (wrapped) module."""
        policy.set_forward_model(module)

    def cache_prompts(self, prompts: Sequence[str]) -> None:
        """The flow policies' memory options: with ``cache_prompts``, encode ``prompts`` (and
        the empty prompt of CFG) once now, then with ``offload_text_encoders`` keep the text
        encoders on the CPU (SD3's T5-XXL alone is 4.7B parameters). A no-op for SD 1.x/2.x
        policies. Call on every process once the prompt set is known."""
        cfg = self.config
        if not self.is_flow or not cfg.cache_prompts:
            return
        self.policy.cache_prompts([*prompts, ""])
        if cfg.offload_text_encoders:
            self.policy.offload_text_encoders("cpu")

    def frozen_outside_zero3(self) -> Any:
        """Context in which models are built whole under ZeRO-3 (frozen VAE, text encoder,
        reference and reward models never enter the engine); see
        :func:`frozen_models_outside_zero3`."""
        return frozen_models_outside_zero3(self.accelerator)

    def _make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError as err:
                raise ImportError(
                    "use_8bit_adam needs bitsandbytes: `pip install bitsandbytes` (CUDA), or set "
                    "use_8bit_adam=false."
                ) from err
            opt_cls: Callable = bnb.optim.AdamW8bit
        else:
            opt_cls = torch.optim.AdamW
        return opt_cls(
            params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )

    def reward_device(self) -> torch.device:
        """Where this process's reward model lives: the accelerator's device."""
        return self.accelerator.device

    def reward_kwargs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The reward factory's keyword arguments: the user's, with ``device`` set to
        :meth:`reward_device` unless they name one (the registry passes it on only to factories
        that take a ``device``)."""
        out = dict(kwargs)
        if out.get("device") is None:
            out["device"] = self.reward_device()
        return out

    # ------------------------------------------------------------------------------ the step
    def backward_and_step(self, loss: torch.Tensor) -> bool | None:
        """``accelerator.backward(loss)``, then, when gradients sync, clip and step the optimizer
        and the LR schedule, unless a loss of the accumulation window or the gradient is not
        finite on any process: then every process skips the step (counted in
        ``guard.skipped``; :class:`~reward.guards.NonFiniteError` after
        ``max_consecutive_skips`` in a row). Call inside ``accelerator.accumulate``.

        Under DeepSpeed the engine steps inside ``backward``: a non-finite loss is turned into
        NaN gradients (:func:`~reward.guards.poison_nonfinite`) so that the engine's overflow
        check skips the step on every rank, and the skip is read back from the engine. With a
        dynamic fp16 loss scale a gradient overflow is the scaler's to skip (it recalibrates);
        only a non-finite loss counts then. The LR schedule holds on every step not taken.

        Returns True (stepped), False (skipped) or None (not the window's last micro-batch).
        """
        acc, cfg = self.accelerator, self.config
        self.guard.observe(loss)
        if self.is_deepspeed:
            loss = poison_nonfinite(loss)
        acc.backward(loss)
        if not acc.sync_gradients:
            return None
        loss_bad = any_process(acc, self.guard.pending)
        held = False  # the step was not taken: the LR schedule holds too
        if self.is_deepspeed:
            engine = acc.deepspeed_engine_wrapped.engine
            skipped = held = not engine.was_step_applied()
            if skipped and not loss_bad and engine.fp16_enabled():
                skipped = False  # the loss scaler's own overflow skip
        elif enabled_scaler(acc) is not None:
            # The scaler has to see every step: the clip below unscales (fp16) and only its
            # ``step`` + ``update`` reset that, or the next clip raises. A skipped step hands it
            # NaN gradients, so it skips and lowers its scale; it lowers the scale exactly when it
            # skips (a fused AdamW is always called and skips inside its kernel).
            scale = acc.scaler.get_scale()
            if loss_bad:
                poison_gradients(self.trainable)
            acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
            self.optimizer.step()
            skipped = loss_bad
            held = acc.scaler.get_scale() < scale
        else:
            norm = acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
            skipped = held = loss_bad or any_process(acc, not is_finite(norm))
            if not skipped:
                self.optimizer.step()
        if not held:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.record(skipped, step=self.global_step + 1)
        return not skipped

    # ------------------------------------------------------------------------------ logging
    def pbar(self, iterable: Any = None, **kw: Any) -> Any:
        from tqdm.auto import tqdm

        disable = not (self.config.progress_bar and self.accelerator.is_local_main_process)
        return tqdm(iterable, disable=disable, dynamic_ncols=True, **kw)

    def init_trackers(self) -> None:
        acc, cfg = self.accelerator, self.config
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if acc.log_with:
            flat = {
                k: (v if isinstance(v, int | float | str | bool) else str(v))
                for k, v in asdict(cfg).items()
            }
            acc.init_trackers(cfg.tracker_project, config=flat)

    def log(self, record: dict[str, float]) -> None:
        """Append ``record`` to the history and send it to the trackers (x axis: its
        ``step_key``)."""
        self.history.append(record)
        if self.accelerator.log_with:
            key = self.step_key
            self.accelerator.log({k: v for k, v in record.items() if k != key}, step=record[key])

    #: metrics that are counts: summed over micro-batches and processes (others are averaged)
    count_keys: ClassVar[tuple[str, ...]] = ("rewards/nonfinite",)

    def step_record(self, infos: Sequence[Mapping[str, float]]) -> dict[str, float]:
        """The record of the optimiser step just taken from its micro-batches' ``infos``: each
        metric averaged over the micro-batches and then over every process (counts summed), plus
        the learning rate and ``train/skipped_steps``."""
        local = {
            k: float((np.sum if k in self.count_keys else np.mean)([i[k] for i in infos]))
            for k in infos[0]
        }
        record: dict[str, float] = {"step": self.global_step}
        record.update(reduce_metrics(self.accelerator, local, sum_keys=self.count_keys))
        record["lr"] = float(self.lr_scheduler.get_last_lr()[0])
        record.update(self.guard_metrics())
        return record

    def log_policy_samples(
        self, prompts: Sequence[str], num_steps: int, eta: float, guidance_scale: float
    ) -> None:
        """Sample ``num_log_images`` images of the current policy on the first prompts with fixed
        seeds (0, 1, ...), score them with ``self.reward_fn`` when there is one, and log the
        captioned grid. Every process samples (a ZeRO-3 UNet needs every rank in its forward);
        the main one logs."""
        acc, n = self.accelerator, self.config.num_log_images
        chosen = [prompts[i % len(prompts)] for i in range(n)]
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        self.unet.eval()
        with torch.no_grad(), acc.autocast():
            out = self.policy.sample(chosen, num_steps, eta, guidance_scale, generator=gens)
            images = out.images.float()
            reward_fn = getattr(self, "reward_fn", None)
            rewards = None if reward_fn is None else reward_fn(images, chosen)
        if rewards is not None:
            rewards = torch.as_tensor(rewards).float().reshape(-1).tolist()
        self.log_sample_grid(images, chosen, rewards, self.global_step)

    def guard_metrics(self) -> dict[str, float]:
        """``train/skipped_steps``: optimiser steps skipped so far for a non-finite loss or
        gradient (the run's total)."""
        return {"train/skipped_steps": float(self.guard.skipped)}

    def log_sample_grid(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        rewards: Sequence[float] | None,
        step: int,
    ) -> None:
        """A captioned grid (prompt and reward under each image) to the trackers and
        ``output_dir/samples``; main process only."""
        from alignment.logging_utils import log_image_grid

        if self.accelerator.is_main_process:
            log_image_grid(
                self.accelerator,
                "samples",
                images,
                prompts,
                rewards,
                step,
                save_dir=self.output_dir / "samples",
            )

    def plot_curves(self) -> None:
        """The run's curves as a PNG in ``output_dir`` (main process): loss and reward against
        the step (override for another layout)."""
        from alignment.logging_utils import plot_history

        plot_history(self.history, self.output_dir / "training_curves.png", x=self.step_key)

    def write_history(self) -> None:
        if self.accelerator.is_main_process and self.history:
            atomic_write_text(self.output_dir / "history.json", json.dumps(self.history, indent=1))
            self.plot_curves()

    # ------------------------------------------------------------------------------ state
    def checkpoint_index(self) -> int:
        """The number naming the next checkpoint (``checkpoint-{N:06d}``): the optimiser step."""
        return self.global_step

    def progress_text(self) -> str:
        return f"step {self.global_step}"

    def trainer_state(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "samples_seen": self.samples_seen,
            "history": self.history,
            "guard": self.guard.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "config": asdict(self.config),
        }

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self.history = list(state.get("history", []))
        self.guard.load_state_dict(state.get("guard", {}))
        if "lr_scheduler" in state and not self.config.resume_weights_only:
            # (a weights-only resume starts a fresh schedule: e.g. a new learning rate)
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        cfg, acc = self.config, self.accelerator
        # checkpoints from before the counter: the position this launch's batch size implies
        per_step = cfg.gradient_accumulation_steps * cfg.train_batch_size * acc.num_processes
        self.samples_seen = int(state.get("samples_seen", self.global_step * per_step))

    def next_sample_ids(self) -> list[int]:
        """The global sample indices of this process's next micro-batch (``train_batch_size``).

        The processes take consecutive slices of one global stream (``samples_seen + rank * B``,
        ...) and ``samples_seen`` advances by ``num_processes * B``: the position is counted in
        samples, so a run resumed on another number of processes continues at the same sample.
        Trainers key their data order and noise by these indices (:mod:`alignment.seeding`).
        Call on every process once per micro-batch.
        """
        acc, b = self.accelerator, self.config.train_batch_size
        start = self.samples_seen + acc.process_index * b
        self.samples_seen += acc.num_processes * b
        return list(range(start, start + b))

    def save_checkpoint(self) -> Path:
        """Write a checkpoint (every process). Weights that are not finite are never written, so
        ``keep_last`` rotation can never drop the newest finite checkpoint.

        Raises:
            NonFiniteError: the trainable weights are not finite on some process.
        """
        from alignment.checkpointing import latest_checkpoint, save_checkpoint

        if any_process(self.accelerator, not params_finite(self.trainable)):
            raise NonFiniteError(
                f"The trainable weights at {self.progress_text()} are not finite: no checkpoint "
                f"written (the newest finite one, {latest_checkpoint(self.output_dir)}, is kept)."
            )
        tensors, metadata = self.process_state()
        return save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.checkpoint_index(),
            self.trainer_state(),
            keep_last=self.config.keep_last,
            process_tensors=tensors,
            process_metadata={**metadata, "num_processes": str(self.accelerator.num_processes)},
        )

    def process_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """This process's own state for the checkpoint beyond what accelerate saves: tensors and
        string metadata (none by default; online DPO: its pair buffer)."""
        return {}, {}

    def load_process_state(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
        """Restore :meth:`process_state` on resume (called only for a checkpoint of a launch
        with as many processes as this one)."""

    def maybe_resume(self) -> bool:
        """Resume from ``config.resume_from`` if set (``"latest"`` without a checkpoint starts
        fresh). Returns whether a checkpoint was loaded."""
        from alignment.checkpointing import resume_if_requested

        loaded = resume_if_requested(
            self.accelerator,
            self.output_dir,
            self.config.resume_from,
            weights_only=self.config.resume_weights_only,
        )
        if loaded is None:
            return False
        path, state = loaded
        self.load_trainer_state(state)
        from alignment.checkpointing import load_process_tensors

        own = load_process_tensors(self.accelerator, path)
        if own is not None and own[1].get("num_processes") == str(self.accelerator.num_processes):
            self.load_process_state(*own)
        self.accelerator.print(f"Resumed from {path} at {self.progress_text()}.")
        return True

    def should_save(self) -> bool:
        cfg = self.config
        return bool(cfg.save_every) and (
            self.global_step % cfg.save_every == 0 or self.global_step == cfg.max_steps
        )

    def export(self, export_dir: str) -> None:
        """Export the tuned pipeline (see :mod:`alignment.export`); call on every process."""
        from alignment.export import export_from_accelerator

        export_from_accelerator(self.accelerator, self.unet, self.policy, export_dir)

    def finish(self) -> None:
        self.write_history()
        if self.config.export_dir:
            self.export(self.config.export_dir)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


__all__ = [
    "LORA_ALPHA_HELP",
    "FlowPolicyOptions",
    "PolicyTrainConfig",
    "PolicyTrainerBase",
    "TrainConfig",
    "frozen_models_outside_zero3",
    "parse_json_kwargs",
    "reduce_metrics",
]
