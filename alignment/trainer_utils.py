"""Pieces shared by the policy trainers (Diffusion-DPO, DRaFT/ReFL): config base, accelerator,
policy, optimizer and DeepSpeed preparation, trackers, checkpoints, export.

Checkpoints and export go through :mod:`alignment.checkpointing` and :mod:`alignment.export`
(the same code as DDPO): :meth:`PolicyTrainerBase.save_checkpoint`, :meth:`maybe_resume` and
:meth:`export` only wire them to a trainer's state. Only the trained UNet goes through
``accelerator.prepare`` (DeepSpeed ZeRO-2/3 included); the text encoder, the VAE, a frozen
reference UNet and the reward stay outside the engine.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class PolicyTrainConfig:
    """Settings every policy trainer shares (model, LoRA, optimiser, output, logging)."""

    # --- model
    pretrained_model: str = field(
        default="runwayml/stable-diffusion-v1-5",
        metadata={"help": "Hub id, local diffusers folder, or 'tiny' (a tiny random pipeline)."},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the model."})
    use_lora: bool = field(
        default=True,
        metadata={"help": "Train a LoRA adapter (reference = adapter off); else the full UNet."},
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA alpha (default: equal to the rank, scale 1)."}
    )
    lora_target_modules: str = field(
        default="to_q,to_k,to_v,to_out.0",
        metadata={"help": "Comma-separated UNet module names that get LoRA."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "UNet gradient checkpointing (less memory, slower)."}
    )
    # --- optimiser
    max_steps: int = field(default=1000, metadata={"help": "Optimiser steps."})
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
    mixed_precision: str | None = field(
        default=None,
        metadata={"help": "'no', 'fp16' or 'bf16'; None takes accelerate's launch setting."},
    )
    allow_tf32: bool = field(default=True, metadata={"help": "TF32 matmuls on Ampere+ GPUs."})
    seed: int = field(default=42, metadata={"help": "Random seed (per process offset)."})
    # --- output, logging, checkpoints
    output_dir: str = field(default="outputs/run", metadata={"help": "Run folder."})
    save_every: int = field(
        default=500,
        metadata={"help": "Checkpoint every N optimiser steps (and at the end); 0: never."},
    )
    keep_last: int = field(default=2, metadata={"help": "Checkpoints to keep."})
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
    log_every: int = field(default=1, metadata={"help": "Log metrics every N optimiser steps."})
    progress_bar: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})

    def target_modules(self) -> list[str]:
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]


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


class PolicyTrainerBase:
    """Accelerator + policy + optimizer set-up and the shared checkpoint/export/logging wiring.

    Subclasses call :meth:`setup` in their ``__init__`` and implement :meth:`trainer_state` /
    :meth:`load_trainer_state` for what their checkpoints carry beyond the step counter.
    """

    config: PolicyTrainConfig

    def setup(
        self,
        config: PolicyTrainConfig,
        policy: Any = None,
        keep_reference: bool = False,
        micro_batch_size: int | None = None,
    ) -> None:
        """Build the accelerator, the policy (unless given), the optimizer and LR schedule, and
        prepare the UNet (DeepSpeed's ``auto`` micro-batch and clipping filled from the config)."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

        from alignment.policy import DiffusionPolicy
        from reward.distributed import process_group_kwargs

        self.config = cfg = config
        self.output_dir = Path(cfg.output_dir)
        log_with = None if cfg.log_with == "none" else cfg.log_with
        if log_with in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
            log_with = "tensorboard"
        self.accelerator = acc = Accelerator(
            mixed_precision=cfg.mixed_precision,
            log_with=log_with,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
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
                policy = DiffusionPolicy.from_pretrained(
                    cfg.pretrained_model,
                    revision=cfg.revision,
                    use_lora=cfg.use_lora,
                    lora_rank=cfg.lora_rank,
                    lora_alpha=cfg.lora_alpha,
                    lora_target_modules=cfg.target_modules(),
                    keep_reference=keep_reference and not cfg.use_lora,
                    weight_dtype=self.weight_dtype if cfg.use_lora else torch.float32,
                    gradient_checkpointing=cfg.gradient_checkpointing,
                )
        self.policy = policy
        policy.to(acc.device)
        if not policy.use_lora and self.weight_dtype != torch.float32:
            policy.vae.to(dtype=self.weight_dtype)
            policy.text_encoder.to(dtype=self.weight_dtype)
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
        self.unet, self.optimizer = acc.prepare(policy.unet, optimizer)
        # stepped by hand once per optimiser step (a prepared scheduler steps once per process)
        self.lr_scheduler = scheduler
        acc.register_for_checkpointing(scheduler)
        policy.set_forward_unet(self.unet)
        self.global_step = 0
        self.samples_seen = 0  # samples drawn so far by all processes together
        self.history: list[dict[str, float]] = []

    def frozen_outside_zero3(self) -> Any:
        """Context in which models are built whole under ZeRO-3 (frozen VAE, text encoder,
        reference and reward models never enter the engine); see
        :func:`alignment.ddpo_trainer.frozen_models_outside_zero3`."""
        from alignment.ddpo_trainer import frozen_models_outside_zero3

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
        self.history.append(record)
        if self.accelerator.log_with:
            self.accelerator.log(
                {k: v for k, v in record.items() if k != "step"}, step=record["step"]
            )

    def write_history(self) -> None:
        if self.accelerator.is_main_process and self.history:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "history.json", "w", encoding="utf-8") as f:
                json.dump(self.history, f, indent=1)

    # ------------------------------------------------------------------------------ state
    def trainer_state(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "samples_seen": self.samples_seen,
            "history": self.history,
            "config": asdict(self.config),
        }

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self.history = list(state.get("history", []))
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
        from alignment.checkpointing import save_checkpoint

        return save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.global_step,
            self.trainer_state(),
            keep_last=self.config.keep_last,
        )

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
        self.accelerator.print(f"Resumed from {path} at step {self.global_step}.")
        return True

    def should_save(self) -> bool:
        cfg = self.config
        return bool(cfg.save_every) and (
            self.global_step % cfg.save_every == 0 or self.global_step == cfg.max_steps
        )

    def optimizer_step(self) -> None:
        """Clip (when gradients sync), step the optimizer and LR schedule, zero the gradients.
        Call inside ``accelerator.accumulate`` after ``accelerator.backward``."""
        acc = self.accelerator
        if acc.sync_gradients and not self.is_deepspeed:
            acc.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        self.optimizer.step()
        if acc.sync_gradients:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

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


__all__ = ["PolicyTrainConfig", "PolicyTrainerBase", "parse_json_kwargs"]
