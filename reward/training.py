"""Training LLaVA-Reward perspectives on transformers' ``Trainer`` machinery.

Why ``transformers.Trainer`` and not trl's ``RewardTrainer`` (trl 1.16): ``RewardTrainer.__init__``
only carries text models. It requires ``model.config.num_labels == 1`` (a sequence-classification
model), always runs ``_prepare_dataset``, which appends an EOS *string* to ``chosen`` /
``rejected`` and tokenizes them as text (our ``chosen`` / ``rejected`` are images), sets the
tokenizer's pad token on the model config, tags the model and writes a model card on every
checkpoint; its ``compute_loss`` reads ``outputs.logits`` and has no temperature, no GPM head and
no unpaired rows. Subclassing it would mean bypassing its constructor and replacing every method it
adds, so we subclass ``transformers.Trainer`` directly and keep what the library does well:
DeepSpeed (ZeRO-2/3 through accelerate), gradient accumulation, mixed precision, checkpoints and
``resume_from_checkpoint``, LR schedules, logging integrations (tensorboard, wandb) and progress
bars. What is ours:

* :class:`RewardCollator`: a batch of paired rows ``{prompt, chosen, rejected}`` and/or unpaired
  rows ``{prompt, image, label}`` becomes ONE model batch of ``2P + U`` sequences ordered
  ``[chosen_1..P, rejected_1..P, image_1..U]`` plus ``n_pairs = P``, ``reward_labels [U]`` and
  ``example_order`` (which lets evaluation leave out the padding of its last batch);
* :func:`reward_loss` (pure): the pair loss (``bt`` / ``paired_bce`` / ``gpm``, from
  :mod:`reward.losses`) and the unpaired BCE, averaged over the examples of the batch;
* :class:`RewardTrainer`: trains one perspective (``model.set_trainable``); checkpoints hold that
  perspective's adapter, projector copy, SkipCA and head (``LlavaRewardModel.save_pretrained``
  format, not one big state dict) in ``OUTPUT_DIR/checkpoints/<perspective>/checkpoint-N``,
  written to a staging folder and renamed into place; resuming loads them back with
  ``LlavaRewardModel.load_perspective_weights``. Under DeepSpeed the engine's own checkpoint
  (optimizer partitions) leaves the frozen backbone out (``exclude_frozen_parameters``).
  Under bf16 DeepSpeed (which casts every weight, the float32 heads included) the forward runs
  under autocast.
* :class:`RewardTrainingArguments`: the paper's optimisation defaults (AdamW betas (0.9, 0.95),
  weight decay 0, lr 2e-4, cosine schedule with 3 % warm-up, clip 1.0), bf16 and gradient
  checkpointing switched on automatically when a CUDA GPU is present.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .data import ON_ERROR_HELP, load_image_ref, load_reward_data, write_skipped
from .distributed import cpu_deepspeed_backend
from .guards import (
    NonFiniteError,
    StepGuard,
    any_process,
    enabled_scaler,
    grads_finite,
    params_finite,
    poison_gradients,
    poison_nonfinite,
    validate_config,
)
from .losses import bradley_terry_loss, gpm_loss, paired_bce_loss, unpaired_bce_loss
from .modeling import LlavaRewardModel, check_backbone, finish_interrupted_save

logger = logging.getLogger(__name__)

LOSS_TYPES = ("bt", "paired_bce", "gpm")
TRAINING_ARGS_FILE = "training_args.json"
#: The non-finite guard's counters in a checkpoint (``skipped`` is the run's total, ``consecutive``
#: the current streak), so that a resumed run goes on counting where it stopped.
GUARD_STATE_FILE = "guard_state.json"


def _cuda() -> bool:
    return torch.cuda.is_available()


def default_report_to() -> list[str]:
    """tensorboard, plus wandb when it is installed (``report_to="auto"``)."""
    import importlib.util

    found = [n for n in ("tensorboard", "wandb") if importlib.util.find_spec(n) is not None]
    return found or ["none"]


@dataclass
class RewardTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the LLaVA-Reward paper's defaults and the reward options."""

    perspective: str = field(
        default="overall",
        metadata={"help": "The perspective to train (alignment, fidelity, safety, overall, ...)."},
    )
    loss_type: str = field(
        default="bt",
        metadata={
            "help": "Pair loss: 'bt' (Bradley-Terry, -log sigmoid((rc - rr) / tau)), 'paired_bce' "
            "(chosen = 1, rejected = 0) or 'gpm' (2-d heads). Unpaired rows always use BCE."
        },
    )
    tau: float | None = field(
        default=None,
        metadata={"help": "Temperature of the BT / GPM losses (default: the model's, 0.1)."},
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate (paper)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (paper: 0.95)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (paper: 0)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "LR schedule."})
    warmup_steps: float = field(
        default=0.03, metadata={"help": "Warm-up: steps (int) or a fraction of all steps (< 1)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep the image columns (the collator builds the model inputs)."},
    )
    report_to: None | str | list[str] = field(
        default="auto",
        metadata={
            "help": "'auto' = tensorboard (+ wandb when installed), 'none', one integration, or "
            "several: a YAML list or comma-separated ('tensorboard,wandb')."
        },
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision (default: on when a CUDA GPU with bf16 exists)."},
    )
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Gradient checkpointing of the backbone (default: on with a GPU)."},
    )
    max_consecutive_skips: int = field(
        default=3,
        metadata={
            "help": "Stop with an error after this many optimiser steps in a row were skipped "
            "for a non-finite loss or gradient (each skip is counted in train/skipped_steps)."
        },
    )

    RANGES: ClassVar[dict[str, str]] = {
        "tau": "> 0",
        "learning_rate": "> 0",
        "adam_beta1": "[0, 1)",
        "adam_beta2": "[0, 1)",
        "adam_epsilon": "> 0",
        "weight_decay": ">= 0",
        "max_grad_norm": ">= 0",
        "warmup_steps": ">= 0",
        "num_train_epochs": "> 0",
        "per_device_train_batch_size": ">= 1",
        "per_device_eval_batch_size": ">= 1",
        "gradient_accumulation_steps": ">= 1",
        "max_consecutive_skips": ">= 1",
    }

    def __post_init__(self):
        validate_config(self)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}.")
        if not _cuda():  # pinned host memory only helps copies to a GPU (and warns without one)
            self.dataloader_pin_memory = False
        if isinstance(self.report_to, str) and "," in self.report_to:
            # the command line takes one value here (transformers' parser): several go comma-
            # separated (no integration's name holds a comma)
            names = [name.strip() for name in self.report_to.split(",") if name.strip()]
            if not names:
                raise ValueError(
                    f"report_to={self.report_to!r} names no logger: give one or several "
                    "('tensorboard,wandb'), 'auto' or 'none'."
                )
            self.report_to = names
        if self.report_to == "auto":
            self.report_to = default_report_to()
        elif isinstance(self.report_to, list) and "auto" in self.report_to:
            auto = default_report_to()
            self.report_to = auto + [n for n in self.report_to if n not in auto and n != "auto"]
        if self.bf16 is None:  # bf16 by default where the GPU has it, unless fp16 was asked for
            self.bf16 = (
                bool(_cuda() and torch.cuda.is_bf16_supported())
                and not self.use_cpu
                and not self.fp16
            )
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = _cuda() and not self.use_cpu
        if self.ddp_backend is None:  # gloo for DeepSpeed on CPUs (reward.distributed)
            self.ddp_backend = cpu_deepspeed_backend()
        super().__post_init__()


# ----------------------------------------------------------------------------- data


def _is_set(value: Any) -> bool:
    return value is not None


def _to_pil(value: Any, name: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB") if value.mode != "RGB" else value
    return load_image_ref(value, name=name)


@dataclass
class RewardCollator:
    """Rows of the common schemas (:mod:`reward.data`) -> one model batch.

    Paired rows (``prompt, chosen, rejected``) and unpaired rows (``prompt, image, label``) may be
    mixed. With ``P`` pairs and ``U`` single images the batch holds ``2P + U`` sequences in the
    order ``[chosen_1..P, rejected_1..P, image_1..U]`` (``input_ids``, ``attention_mask`` and the
    family's pixel inputs), plus ``n_pairs`` (0-d long tensor, ``P``) and ``reward_labels``
    (``[U]`` float) and ``example_order`` (``[P + U]`` long: the position in ``examples`` of
    pair 1..P, then of single 1..U; evaluation uses it to leave out the rows that pad the last
    batch). Images may be PIL images or raw refs (paths, bytes, ``{"bytes", "path"}``).
    """

    processor: Any

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        pairs, singles, pair_at, single_at = [], [], [], []
        for i, ex in enumerate(examples):
            if _is_set(ex.get("chosen")) and _is_set(ex.get("rejected")):
                if ex.get("tie"):
                    raise ValueError(
                        f"example id={ex.get('id', i)} is a tie: ties cannot be trained on; read "
                        "the training data with keep_ties=False (prepare_training_data does)."
                    )
                pairs.append(ex)
                pair_at.append(i)
            elif _is_set(ex.get("image")) and _is_set(ex.get("label")):
                singles.append(ex)
                single_at.append(i)
            else:
                raise ValueError(
                    f"example id={ex.get('id', i)} has neither (chosen, rejected) nor "
                    f"(image, label); its fields are {sorted(ex)}. Read data with reward.data."
                )
        prompts = [str(e["prompt"]) for e in pairs] * 2 + [str(e["prompt"]) for e in singles]
        images = (
            [_to_pil(e["chosen"], f"chosen of {e.get('id')}") for e in pairs]
            + [_to_pil(e["rejected"], f"rejected of {e.get('id')}") for e in pairs]
            + [_to_pil(e["image"], f"image of {e.get('id')}") for e in singles]
        )
        batch = dict(self.processor(prompts, images))
        batch["n_pairs"] = torch.tensor(len(pairs), dtype=torch.long)
        batch["reward_labels"] = torch.tensor([float(e["label"]) for e in singles])
        batch["example_order"] = torch.tensor(pair_at + single_at, dtype=torch.long)
        return batch


_UNION_COLUMNS = ("prompt", "chosen", "rejected", "tie", "image", "label", "category", "id")


def mix_datasets(datasets_: Sequence[Any]) -> Any:
    """Concatenate paired and unpaired ``datasets.Dataset`` s into one (union of the columns).

    Missing columns are None; image columns stay raw refs (the collator decodes them), so the
    result has no decoding transform. A single dataset is returned unchanged.
    """
    import datasets

    if len(datasets_) == 1:
        return datasets_[0]
    features = datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "chosen": datasets.Image(decode=False),
            "rejected": datasets.Image(decode=False),
            "tie": datasets.Value("bool"),
            "image": datasets.Image(decode=False),
            "label": datasets.Value("float32"),
            "category": datasets.Value("string"),
            "id": datasets.Value("string"),
        }
    )
    parts = []
    for ds in datasets_:
        raw = ds.with_format(None)
        for col in _UNION_COLUMNS:
            if col not in raw.column_names:
                raw = raw.add_column(col, [None] * len(raw))
        parts.append(raw.select_columns(list(_UNION_COLUMNS)).cast(features))
    return datasets.concatenate_datasets(parts)


def read_reward_files(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    keep_ties: bool = False,
    skipped_file: str | os.PathLike | None = None,
    **kwargs: Any,
) -> tuple[Any, list[dict]]:
    """Read data files of any supported format (auto-detected per file) into one dataset.

    Ties are dropped unless ``keep_ties`` (training: drop; evaluation: keep). Paired and unpaired
    files are mixed with :func:`mix_datasets`. ``kwargs`` go to the readers (``on_error``,
    ``image_root``, ...); ``skipped_file``: where the skipped records of all files are written
    (``reward.data.write_skipped``). Returns ``(dataset, [read report dicts])``.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    parts, reports = [], []
    for path in paths:
        ds, report = load_reward_data(path, keep_ties=keep_ties, **kwargs)
        parts.append(ds)
        reports.append(report)
    if not parts:
        raise ValueError("no data files given.")
    if skipped_file is not None:
        write_skipped(skipped_file, reports)
    return mix_datasets(parts), [r.as_dict(max_skipped=20) for r in reports]


def split_kinds(dataset: Any) -> dict[str, Any]:
    """``{"paired": ds, "unpaired": ds}`` (only the kinds present) of a possibly mixed dataset."""
    cols = dataset.column_names
    if "image" not in cols:
        return {"paired": dataset}
    if "chosen" not in cols:
        return {"unpaired": dataset}
    raw = dataset.with_format(None)
    paired_idx = [i for i, c in enumerate(raw["chosen"]) if c is not None]
    paired_set = set(paired_idx)
    unpaired_idx = [i for i in range(len(raw)) if i not in paired_set]
    out = {}
    if paired_idx:
        out["paired"] = raw.select(paired_idx).remove_columns(["image", "label"])
    if unpaired_idx:
        out["unpaired"] = raw.select(unpaired_idx).remove_columns(["chosen", "rejected", "tie"])
    return out


def drop_ties(dataset: Any, name: str = "data") -> Any:
    """``dataset`` without annotator-tie pairs (a tie has no preferred image to train or take a
    loss on; evaluation reports count them through ``reward.evaluate`` instead). Rows are returned
    as raw image refs when some were dropped; unpaired rows (``tie`` None) are kept."""
    if dataset is None or "tie" not in getattr(dataset, "column_names", ()):
        return dataset
    raw = dataset.with_format(None)
    keep = [i for i, tie in enumerate(raw["tie"]) if not tie]
    if len(keep) == len(raw):
        return dataset
    logger.info("%s: %d tie pairs left out of the loss", name, len(raw) - len(keep))
    return raw.select(keep)


# ----------------------------------------------------------------------------- loss


def reward_loss(
    rewards: torch.Tensor,
    n_pairs: int,
    labels: torch.Tensor | None = None,
    loss_type: str = "bt",
    tau: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one collated batch (see :class:`RewardCollator` for the row order).

    ``rewards``: ``Tensor[2P + U]`` (scalar heads) or ``Tensor[2P + U, 2]`` (GPM heads), rows
    ``[chosen_1..P, rejected_1..P, single_1..U]``; ``labels``: ``Tensor[U]`` in ``[0, 1]``.

    ``L_pair`` = mean over pairs of ``bt``: ``-log sigmoid((rc - rr) / tau)``, ``paired_bce``:
    ``(softplus(-rc) + softplus(rr)) / 2`` or ``gpm``: ``-log sigmoid((c0 r1 - c1 r0) / tau)``;
    ``L_single`` = mean BCE-with-logits of ``r_u`` against ``labels``;
    ``loss = (P * L_pair + U * L_single) / (P + U)`` (each example weighs the same).

    Returns ``(loss, stats)`` with ``stats`` holding ``accuracy`` (pairs ranked right),
    ``margin`` (mean ``rc - rr``, scalar heads) and ``unpaired_accuracy`` when present.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")
    n_single = rewards.shape[0] - 2 * n_pairs
    if n_pairs < 0 or n_single < 0:
        raise ValueError(f"{rewards.shape[0]} rewards cannot hold {n_pairs} pairs.")
    labels = labels if labels is not None else rewards.new_zeros(0)
    if labels.numel() != n_single:
        raise ValueError(f"got {labels.numel()} labels for {n_single} single images.")
    gpm = rewards.ndim == 2 and rewards.shape[-1] == 2
    if gpm != (loss_type == "gpm"):
        raise ValueError(
            f"loss_type {loss_type!r} does not fit rewards of shape {tuple(rewards.shape)}: 'gpm' "
            "needs a 2-d head (head_dim=2), 'bt' / 'paired_bce' a scalar head (head_dim=1)."
        )
    stats: dict[str, float] = {}
    terms = []
    if n_pairs:
        rc, rr = rewards[:n_pairs], rewards[n_pairs : 2 * n_pairs]
        if loss_type == "bt":
            pair = bradley_terry_loss(rc, rr, tau)
        elif loss_type == "paired_bce":
            pair = paired_bce_loss(rc, rr)
        else:
            pair = gpm_loss(rc, rr, tau)
        terms.append(pair * n_pairs)
        with torch.no_grad():
            from .losses import preference_logit

            logit = preference_logit(rc.detach(), rr.detach(), tau)
            stats["accuracy"] = float((logit > 0).float().mean())
            if not gpm:
                stats["margin"] = float((rc - rr).detach().float().mean())
    if n_single:
        if gpm:
            raise ValueError(
                "unpaired rows need a scalar head: a 2-d GPM head has no single-image "
                "probability. Train the perspective with head_dim=1 and loss_type 'bt'."
            )
        single = rewards[2 * n_pairs :]
        terms.append(unpaired_bce_loss(single, labels.to(single.device)) * n_single)
        with torch.no_grad():
            pred = (single.detach().float() > 0).float()
            stats["unpaired_accuracy"] = float((pred == (labels >= 0.5).float()).float().mean())
    loss = torch.stack(terms).sum() / (n_pairs + n_single)
    return loss, stats


# ----------------------------------------------------------------------------- scoring


def _autocast_for(model: torch.nn.Module) -> Any:
    """Autocast to the backbone's dtype when its weights are bf16 / fp16 (DeepSpeed casts every
    weight, the float32 reward heads included; autocast lets their float32 inputs meet them);
    a no-op for float32 weights (there ``Trainer`` adds its own autocast for ``--bf16``)."""
    inner = getattr(model, "module", model)
    p = next(iter(inner.backbone.parameters()))
    if p.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(p.device.type, dtype=p.dtype)
    return contextlib.nullcontext()


class ModelScorer:
    """Score with an in-memory :class:`LlavaRewardModel` without changing it (no dtype/device
    moves, train/eval mode restored); satisfies :class:`reward.evaluate.SupportsScore`.

    Works on a model wrapped by DeepSpeed ZeRO-3 too (its forward hooks gather the weights).
    """

    def __init__(self, model: torch.nn.Module, processor: Any | None = None):
        self.model = model
        inner = getattr(model, "module", model)
        self.processor = processor or inner.processor

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        inner = getattr(self.model, "module", self.model)
        p = next(iter(inner.backbone.parameters()))
        return p.device, p.dtype

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[str],
        images: Sequence[Any],
        perspective: str = "overall",
        batch_size: int = 16,
    ) -> torch.Tensor:
        """Rewards ``Tensor[N]`` (``[N, 2]`` for GPM) of PIL images / refs under ``perspective``."""
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        device, dtype = self._device_dtype()
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            for s in range(0, len(images), batch_size):
                pil = [
                    _to_pil(im, f"image {s + i}") for i, im in enumerate(images[s : s + batch_size])
                ]
                inputs = self.processor(prompts[s : s + batch_size], pil)
                inputs = {
                    k: v.to(device, dtype=dtype if v.is_floating_point() else None)
                    for k, v in inputs.items()
                }
                with _autocast_for(self.model):
                    rewards = self.model(**inputs, perspective=perspective).rewards
                out.append(rewards.float().cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(out)


# ----------------------------------------------------------------------------- trainer


class _NonFiniteStepGuard(TrainerCallback):
    """Hands the optimiser-step events of ``Trainer``'s loop to :class:`RewardTrainer`'s guard
    (whether to skip is decided earlier, in :meth:`RewardTrainer.training_step`)."""

    def __init__(self, trainer: RewardTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._drop_skipped_gradients()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._guard_after_step(state.global_step + 1)


#: The statistics of :func:`reward_loss` that ``RewardTrainer.log`` reduces over the processes,
#: example-weighted (``loss``: evaluation only, where it replaces ``Trainer``'s, which counts
#: each of a batch's ``2P + U`` rows and the last batch's padding).
_STAT_KEYS = ("accuracy", "margin", "unpaired_accuracy", "loss")


def real_rows_of_last_batch(remainder: int, process_index: int, batch_rows: int) -> int:
    """How many of this process's ``batch_rows`` examples in the last evaluation batch are real.

    accelerate pads the last global batch (``even_batches``) with examples from the start of the
    split so that every process runs the same number of equal batches. Process ``r`` holds rows
    ``[r * b, (r + 1) * b)`` of that global batch, and its first ``remainder`` rows are real
    (``remainder = len(split) % (b * processes)``; 0 when nothing is padded), so the count is
    ``clamp(remainder - r * b, 0, b)``. Example: 11 pairs, ``b`` = 3, two processes: remainder
    5, process 0 keeps 3 and process 1 keeps 2 of its 3 (the third repeats pair 0).
    """
    if remainder <= 0:
        return batch_rows
    return max(0, min(batch_rows, remainder - process_index * batch_rows))


def select_examples(
    rewards: torch.Tensor, n_pairs: int, labels: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The rows of one collated batch whose examples ``keep`` marks (``Tensor[P + U]`` bool,
    pairs first, in :class:`RewardCollator`'s order): ``(rewards [2P' + U'], P', labels [U'])``,
    the same layout, ready for :func:`reward_loss`."""
    keep_pairs, keep_singles = keep[:n_pairs], keep[n_pairs:]
    chosen, rejected = rewards[:n_pairs], rewards[n_pairs : 2 * n_pairs]
    singles = rewards[2 * n_pairs :]
    kept = torch.cat([chosen[keep_pairs], rejected[keep_pairs], singles[keep_singles]])
    return kept, int(keep_pairs.sum()), labels[keep_singles]


class RewardTrainer(Trainer):
    """``transformers.Trainer`` for one perspective of a :class:`LlavaRewardModel`.

    ``train_dataset`` / ``eval_dataset``: ``datasets.Dataset`` s in the common schemas (paired,
    unpaired, or mixed with :func:`mix_datasets`). Everything but the perspective's LoRA, projector
    copy, SkipCA and head is frozen. Logs ``loss``, pair ``accuracy`` / ``margin`` and
    ``unpaired_accuracy`` (train and eval) and ``train/skipped_steps``.

    Non-finite guard (:mod:`reward.guards`): an optimiser step whose loss (any micro-batch) or
    gradient is not finite on any process is skipped (its gradients are dropped, so AdamW leaves
    the weights and its moments as they are, and the LR schedule where it is) and counted; after
    ``max_consecutive_skips`` in a row training stops with :class:`~reward.guards.NonFiniteError`.
    Under DeepSpeed a non-finite loss becomes NaN gradients, which the engine's overflow check
    skips on every rank. A checkpoint is never written of non-finite weights; each one holds the
    guard's counters (:data:`GUARD_STATE_FILE`), which a resumed run goes on from.
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

    def __init__(
        self,
        model: LlavaRewardModel,
        args: RewardTrainingArguments,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        data_collator: Any = None,
        callbacks: list | None = None,
        **kwargs: Any,
    ):
        if not isinstance(args, RewardTrainingArguments):
            raise TypeError("args must be RewardTrainingArguments (perspective, loss_type, tau).")
        self.perspective = args.perspective
        if self.perspective not in model.perspectives:
            raise ValueError(
                f"the model has no perspective {self.perspective!r} (it has "
                f"{model.perspectives}); add it with model.add_perspective() first."
            )
        head_dim = model.config.perspectives[self.perspective].get("head_dim", 1)
        if (head_dim == 2) != (args.loss_type == "gpm"):
            raise ValueError(
                f"perspective {self.perspective!r} has head_dim={head_dim} but loss_type is "
                f"{args.loss_type!r}: use loss_type 'gpm' with head_dim 2, 'bt' / 'paired_bce' "
                "with head_dim 1."
            )
        self.tau = float(args.tau if args.tau is not None else model.config.tau)
        model.set_trainable(self.perspective)
        if args.activation_checkpointing:
            # The model enables checkpointing on its backbone itself; Trainer's generic call passes
            # arguments our override does not take, so do it here and switch the flag off.
            model.gradient_checkpointing_enable(
                dict(args.activation_checkpointing_kwargs or {"use_reentrant": False})
            )
            args = copy.copy(args)
            args.activation_checkpointing = args.gradient_checkpointing = False
        if args.remove_unused_columns:
            logger.warning("remove_unused_columns=True would drop the image columns; using False.")
            args = copy.copy(args)
            args.remove_unused_columns = False
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator or RewardCollator(model.processor),
            train_dataset=drop_ties(train_dataset, "train"),
            eval_dataset=drop_ties(eval_dataset, "eval"),
            callbacks=callbacks,
            **kwargs,
        )
        self._metrics: dict[str, dict[str, list[tuple[float, int]]]] = {  # (sum, count)
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self.guard = StepGuard(args.max_consecutive_skips)
        self._skip_step = False
        self._scale_before: float | None = None  # the loss scale before the step (fp16 only)
        self.add_callback(_NonFiniteStepGuard(self))

    # ---------------------------------------------------------------- loss
    def _cast_inputs(self, model: torch.nn.Module, inputs: dict) -> dict:
        """Pixel inputs in the backbone's dtype (DeepSpeed bf16 casts the weights, not inputs)."""
        inner = self.accelerator.unwrap_model(model)
        dtype = next(iter(inner.backbone.parameters())).dtype
        return {
            k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in inputs.items()
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        n_pairs = int(inputs.pop("n_pairs"))
        labels = inputs.pop("reward_labels")
        order = inputs.pop("example_order", None)
        with _autocast_for(self.accelerator.unwrap_model(model)):
            outputs = model(**self._cast_inputs(model, inputs), perspective=self.perspective)
        loss, stats = reward_loss(outputs.rewards, n_pairs, labels, self.args.loss_type, self.tau)
        if model.training:
            self.guard.observe(loss)
            if self.is_deepspeed_enabled:
                loss = poison_nonfinite(loss)
        mode = "train" if model.training else "eval"
        if mode == "eval":
            stats, n_pairs, n_single = self._stats_of_real_examples(
                {**stats, "loss": float(loss.detach())}, outputs.rewards, n_pairs, labels, order
            )
        else:
            n_single = labels.numel()
        counts = {
            "accuracy": n_pairs,
            "margin": n_pairs,
            "unpaired_accuracy": n_single,
            "loss": n_pairs + n_single,  # the loss is a mean over the batch's examples
        }
        for k, v in stats.items():
            self._metrics[mode][k].append((v * counts[k], counts[k]))
        return (loss, outputs) if return_outputs else loss

    def _stats_of_real_examples(
        self, stats: dict, rewards: torch.Tensor, n_pairs: int, labels: torch.Tensor, order
    ) -> tuple[dict[str, float], int, int]:
        """An evaluation batch's statistics (and loss) over its real examples only: the last
        batch of a split that does not divide among the processes is padded with repeats, which
        would otherwise count twice (:func:`real_rows_of_last_batch`). Without accelerate's
        ``even_batches`` nothing is padded."""
        state = self.accelerator.gradient_state
        n_rows = n_pairs + labels.numel()
        padded = state.end_of_dataloader and self.accelerator.even_batches
        remainder = state.remainder if padded else 0
        n_real = real_rows_of_last_batch(remainder, self.accelerator.process_index, n_rows)
        if n_real == n_rows:
            return stats, n_pairs, labels.numel()
        if n_real == 0:
            return {}, 0, 0
        if order is None:  # a collator of one's own: its rows are taken as in order
            order = torch.arange(n_rows)
        keep = order.to(rewards.device) < n_real
        rewards, n_pairs, labels = select_examples(rewards.detach(), n_pairs, labels, keep)
        loss, stats = reward_loss(rewards, n_pairs, labels, self.args.loss_type, self.tau)
        return {**stats, "loss": float(loss)}, n_pairs, labels.numel()

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            # the window's last backward: decide now, before ``Trainer`` clips (under fp16 the
            # clip unscales, and that is when the scaler records whether it will skip)
            self._guard_before_step()
        return loss

    def _guard_before_step(self) -> None:
        """After the accumulation window's last backward (not under DeepSpeed, whose engine
        steps in backward): skip the step when a loss of the window or the gradient is
        non-finite on any process. With a dynamic fp16 loss scale a gradient overflow is the
        scaler's to skip, and a skipped step hands it NaN gradients now, before the clip
        unscales (the scaler refuses a step without gradients; NaN ones make it skip and lower
        its scale). Without one the gradients are dropped after the clip
        (:meth:`_drop_skipped_gradients`), so the logged norm shows what was skipped."""
        if self.is_deepspeed_enabled:
            return
        scaler = enabled_scaler(self.accelerator)
        self._scale_before = scaler.get_scale() if scaler is not None else None
        grad_bad = scaler is None and not grads_finite(self._trainable())
        self._skip_step = any_process(self.accelerator, self.guard.pending or grad_bad)
        if self._skip_step and scaler is not None:
            poison_gradients(self._trainable())

    def _drop_skipped_gradients(self) -> None:
        """Just before the optimiser steps: a skipped step without a loss scaler steps on no
        gradients (AdamW leaves the weights and its moments as they are)."""
        if (
            self._skip_step
            and enabled_scaler(self.accelerator) is None
            and not self.is_deepspeed_enabled
        ):
            self.optimizer.zero_grad(set_to_none=True)

    def _guard_after_step(self, step: int) -> None:
        if self.is_deepspeed_enabled:
            engine = self.accelerator.deepspeed_engine_wrapped.engine
            loss_bad = any_process(self.accelerator, self.guard.pending)
            skipped = not engine.was_step_applied()
            if skipped and not loss_bad and engine.fp16_enabled():
                skipped = False  # the loss scaler's own overflow skip
        else:
            skipped = self._skip_step
            scaler = enabled_scaler(self.accelerator)
            # ``Trainer`` holds the learning-rate schedule when the accelerated optimiser says its
            # step was skipped. Without a scaler it never says so itself; with one it says so only
            # when the scaler did not call ``optimizer.step``, but a fused optimiser (the Trainer's
            # default AdamW) is always called and skips inside its kernel. The scaler lowers its
            # scale exactly when it skips (an overflow, or the guard's NaN gradients).
            self.optimizer._is_overflow = skipped or (
                scaler is not None and scaler.get_scale() < self._scale_before
            )
        self._skip_step = False
        self.guard.record(skipped, step)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, eval_dataset: Any = None, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``Trainer.evaluate`` (eval loss, pair accuracy, unpaired accuracy); ties left out."""
        if eval_dataset is not None and not isinstance(eval_dataset, (str, dict)):
            eval_dataset = drop_ties(eval_dataset, "eval")
        return super().evaluate(eval_dataset, *args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the pair / unpaired statistics since the last log, example-weighted over every
        process (each holds its shard; ``evaluate`` returns these logs, and the best-checkpoint
        choice reads them, so every process must see the same numbers). One all-reduce of a
        fixed-size tensor: ``Trainer`` calls this on every process at the same points."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        sums = torch.tensor(
            [
                [sum(v for v, _ in self._metrics[mode].get(k, ())) for k in _STAT_KEYS],
                [sum(n for _, n in self._metrics[mode].get(k, ())) for k in _STAT_KEYS],
            ],
            dtype=torch.float64,
        )
        self._metrics[mode].clear()
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums.to(self.accelerator.device), "sum").cpu()
        for k, total, n in zip(_STAT_KEYS, sums[0].tolist(), sums[1].tolist()):
            if n > 0:
                logs[f"{prefix}{k}"] = total / n
        if mode == "train":
            logs["train/skipped_steps"] = self.guard.skipped
        super().log(logs, start_time)

    # ---------------------------------------------------------------- saving / loading
    def _zero3(self) -> bool:
        if not self.is_deepspeed_enabled:
            return False
        return self.accelerator.state.deepspeed_plugin.zero_stage == 3

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the perspective (adapter, projector copy, SkipCA, head) in the reward-folder
        format; under ZeRO-3 its partitioned weights are gathered first (all processes)."""
        output_dir = output_dir or self.args.output_dir
        if self._zero3():
            import deepspeed

            inner = self.accelerator.unwrap_model(self.model)
            params = [p for p in inner.parameters() if p.requires_grad]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                self._save(output_dir)
        else:
            self._save(output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        inner = self.accelerator.unwrap_model(self.model)
        inner.save_pretrained(output_dir, perspectives=[self.perspective])
        Path(output_dir, TRAINING_ARGS_FILE).write_text(self.args.to_json_string())

    def checkpoint_dir(self, trial: Any = None) -> str:
        """Where this perspective's checkpoints go: ``OUTPUT_DIR/checkpoints/<perspective>``
        (so perspectives trained into one folder never rotate or resume each other's)."""
        return os.path.join(self._get_output_dir(trial=trial), "checkpoints", self.perspective)

    def last_checkpoint(self) -> str | None:
        """The newest complete checkpoint of this perspective, or None."""
        from transformers.trainer_utils import get_last_checkpoint

        folder = self.checkpoint_dir()
        return get_last_checkpoint(folder) if os.path.isdir(folder) else None

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """``Trainer.train``; ``resume_from_checkpoint`` True or ``"latest"`` picks
        :meth:`last_checkpoint` (and starts afresh when there is none)."""
        if resume_from_checkpoint is True or resume_from_checkpoint in ("latest", "true", "True"):
            resume_from_checkpoint = self.last_checkpoint()
            logger.info("resuming from %s", resume_from_checkpoint or "nothing: no checkpoint yet")
        elif resume_from_checkpoint in (False, "false", "False", ""):
            resume_from_checkpoint = None
        guard_state = Path(resume_from_checkpoint or "", GUARD_STATE_FILE)
        if resume_from_checkpoint and guard_state.is_file():
            self.guard.load_state_dict(json.loads(guard_state.read_text()))
        if not (self.is_deepspeed_enabled and resume_from_checkpoint):
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        # DeepSpeed checkpoints hold the trainable weights only (see _save_optimizer_and_scheduler):
        # load them non-strictly (the library loads strictly unless the model is a PeftModel),
        # then put the perspective's weights back from the checkpoint's own reward-folder copy.
        import transformers.trainer as hf_trainer

        library_load = hf_trainer.deepspeed_load_checkpoint

        def load(engine: Any, path: str, load_module_strict: bool = True) -> None:
            library_load(engine, path, load_module_strict=False)
            if not self._zero3():
                self._load_from_checkpoint(path)

        hf_trainer.deepspeed_load_checkpoint = load
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            hf_trainer.deepspeed_load_checkpoint = library_load

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Under DeepSpeed, the engine's checkpoint without the frozen backbone (a LoRA
        checkpoint of a 7B model is megabytes plus optimizer state, not 15 GB of frozen weights);
        otherwise the library's."""
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import DeepSpeedSchedulerWrapper
        from transformers.trainer import SCHEDULER_NAME

        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        custom = not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper)
        if self.args.should_save and custom:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _save_checkpoint(self, model, trial) -> None:
        """The library's checkpoint, written under a staging folder and renamed into place;
        never of non-finite weights (so rotation keeps the newest finite checkpoint)."""
        if any_process(self.accelerator, not params_finite(self._trainable())):
            raise NonFiniteError(
                f"The {self.perspective!r} weights at step {self.state.global_step} are not "
                f"finite: no checkpoint written (the newest finite one, "
                f"{self.last_checkpoint()}, is kept)."
            )
        run_dir = self.checkpoint_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, ".staging")
        if self.args.should_save and os.path.isdir(os.path.join(staging, name)):
            shutil.rmtree(os.path.join(staging, name))  # left over by an interrupted save
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: staging  # type: ignore[method-assign]
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        # the library saw the staging folder as the run's: a best checkpoint it found there is
        # the renamed one (on every process: each one may load it at the end)
        best = self.state.best_model_checkpoint
        if best and os.path.dirname(os.path.normpath(best)) == os.path.normpath(staging):
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
        if self.args.should_save:
            Path(staging, name, GUARD_STATE_FILE).write_text(json.dumps(self.guard.state_dict()))
            state_file = Path(staging, name, TRAINER_STATE_NAME)
            if best and state_file.is_file():  # and so does the state saved in the checkpoint
                saved = json.loads(state_file.read_text())
                saved["best_model_checkpoint"] = self.state.best_model_checkpoint
                state_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        inner = self.accelerator.unwrap_model(model if model is not None else self.model)
        inner.load_perspective_weights(resume_from_checkpoint, self.perspective)
        logger.info("loaded perspective %r from %s", self.perspective, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled:
            return super()._load_best_model()
        self._load_from_checkpoint(self.state.best_model_checkpoint)


# ----------------------------------------------------------------------------- helpers


def evaluate_model(
    model: torch.nn.Module,
    dataset: Any,
    perspective: str,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Metrics of an in-memory model on a (possibly mixed) dataset via :mod:`reward.evaluate`.

    One kind: the :func:`reward.evaluate.evaluate_scorer` metrics (key ``accuracy``). Mixed:
    ``{"paired": ..., "unpaired": ..., "accuracy": example-weighted mean}``.
    """
    return evaluate_dataset(ModelScorer(model), dataset, perspective, batch_size)


def evaluate_dataset(
    scorer: Any, dataset: Any, perspective: str, batch_size: int = 16
) -> dict[str, Any]:
    """:func:`evaluate_model` for any scorer (``reward.evaluate.SupportsScore``, e.g. a
    ``RewardScorer``) on a paired, unpaired or mixed dataset."""
    from .evaluate import evaluate_scorer

    parts = split_kinds(dataset)
    metrics = {
        kind: evaluate_scorer(scorer, ds, perspective, batch_size) for kind, ds in parts.items()
    }
    if len(metrics) == 1:
        return next(iter(metrics.values()))
    n = {k: m["n_examples"] for k, m in metrics.items()}
    metrics["accuracy"] = sum(metrics[k]["accuracy"] * n[k] for k in n) / sum(n.values())
    metrics["n_examples"] = sum(n.values())
    metrics["perspective"] = perspective
    return metrics


def write_reward_report(
    metrics: dict[str, Any], output_dir: str | os.PathLike, name: str, title: str
) -> None:
    """``reward.evaluate.write_report``; for mixed data the markdown gets one table per kind
    under a line with the example-weighted ``accuracy``."""
    from .evaluate import format_markdown, write_report
    from .files import atomic_write_text

    _, md_path = write_report(metrics, output_dir, name=name, title=title)
    kinds = {k: metrics[k] for k in ("paired", "unpaired") if isinstance(metrics.get(k), dict)}
    if len(kinds) > 1:
        text = format_markdown(kinds, title)
        head = f"accuracy over all {metrics['n_examples']} examples: {metrics['accuracy']:.4f}"
        atomic_write_text(md_path, text.replace("\n", f"\n{head}\n", 1))


def fixed_example_scores(
    model: torch.nn.Module, dataset: Any, perspective: str, n: int = 4
) -> dict[str, Any]:
    """Rewards of the first ``n`` examples' images (chosen / rejected / image), as JSON lists."""
    rows = split_kinds(dataset)
    out: dict[str, Any] = {"perspective": perspective}
    scorer = ModelScorer(model)
    for kind, ds in rows.items():
        sub = ds.with_format(None).select(range(min(n, len(ds))))
        cols = ("chosen", "rejected") if kind == "paired" else ("image",)
        prompts = [r["prompt"] for r in sub for _ in cols]
        images = [r[c] for r in sub for c in cols]
        out[kind] = {
            "prompts": prompts,
            "images": [i.get("path") if isinstance(i, dict) else None for i in images],
            "rewards": scorer.score(prompts, images, perspective).tolist(),
        }
    return out


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (temporary file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- recipe pieces

TINY_BACKBONE = "tiny-llava"
TINY_BACKBONE_DIR = "tiny_backbone"


@dataclass
class RewardScriptArguments:
    """What ``recipes/train_reward.py`` builds: backbone, perspective head / LoRA, data."""

    backbone: str | None = field(
        default=None,
        metadata={
            "help": "Backbone: a hub id, a local folder, or 'tiny-llava' (a tiny random LLaVA "
            "built in code and saved into OUTPUT_DIR/tiny_backbone; for tests and demos). "
            "Default: the backbone of the reward model in OUTPUT_DIR, else tiny-llava. Naming "
            "another backbone than the one OUTPUT_DIR's model is built on is an error."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Allow the backbone's own code (Phi-3.5-vision needs it). Off unless set."
        },
    )
    torch_dtype: str = field(
        default="auto",
        metadata={
            "help": "Backbone weights dtype: auto (bf16 with bf16 training, else fp32), "
            "bfloat16, float16 or float32."
        },
    )
    train_file: list[str] = field(
        default_factory=lambda: ["toy"],
        metadata={
            "help": "Training data files (JSON/JSONL/parquet manifests, ImageReward, Pick-a-Pic, "
            "MJ-Bench, GenAI-Bench; format detected per file; paired and unpaired may be mixed), "
            "or 'toy' for the built-in synthetic task of the perspective (reward.toy_data)."
        },
    )
    eval_file: list[str] | None = field(
        default=None,
        metadata={"help": "Evaluation files (ties kept); default: a split of the training data."},
    )
    eval_split: float = field(
        default=0.1,
        metadata={"help": "Fraction of the training data held out for evaluation (no eval_file)."},
    )
    image_root: str | None = field(
        default=None, metadata={"help": "Folder for relative image paths (default: the file's)."}
    )
    on_error: str = field(
        default="skip",
        metadata={"help": ON_ERROR_HELP.format(skipped="skipped_<train|eval>.jsonl")},
    )
    lora_r: int = field(default=128, metadata={"help": "LoRA rank (paper: 128)."})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA alpha (paper: 256)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (paper: 0.05)."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "LoRA target module names; default: every linear of the language model."},
    )
    train_projector: bool = field(
        default=True, metadata={"help": "Train a per-perspective copy of the vision projector."}
    )
    skipca: bool = field(default=True, metadata={"help": "Use SkipCA (skip cross-attention)."})
    head_dim: int = field(
        default=1, metadata={"help": "Head width: 1 (bt / paired_bce / unpaired) or 2 (gpm)."}
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Token budget per sequence; longer captions are cut from their end "
            "(default: the backbone's context)."
        },
    )
    min_pixels: int | None = field(
        default=None,
        metadata={"help": "Qwen2/2.5/3-VL: smallest image area (default: the processor's own)."},
    )
    max_pixels: int | None = field(
        default=None,
        metadata={
            "help": "Qwen2/2.5/3-VL: largest image area, the visual-token budget (default: the "
            "processor's own)."
        },
    )
    overwrite_perspective: bool = field(
        default=False,
        metadata={"help": "Retrain a perspective that OUTPUT_DIR already holds (else an error)."},
    )
    continue_perspective: bool = field(
        default=False,
        metadata={
            "help": "Train the perspective that OUTPUT_DIR already holds further, from its "
            "saved adapter and head (a second curriculum stage, or new data), instead of from "
            "fresh ones. Its LoRA / SkipCA / head settings are the saved ones."
        },
    )
    toy_n_train: int = field(default=128, metadata={"help": "Toy data: training examples."})
    toy_n_eval: int = field(default=32, metadata={"help": "Toy data: held-out examples."})
    n_fixed_scores: int = field(
        default=4,
        metadata={"help": "Eval examples whose in-memory rewards go to fixed_scores_<p>.json."},
    )

    RANGES: ClassVar[dict[str, str]] = {
        "eval_split": "[0, 1)",
        "lora_r": ">= 1",
        "lora_alpha": "> 0",
        "lora_dropout": "[0, 1)",
        "head_dim": "[1, 2]",
        "max_length": ">= 1",
        "min_pixels": ">= 1",
        "max_pixels": ">= 1",
        "toy_n_train": ">= 1",
        "toy_n_eval": ">= 1",
        "n_fixed_scores": ">= 0",
    }
    #: several values: a YAML list, or one (reward.guards.normalise_multi_values; not split on
    #: commas, as a path may hold one)
    LIST_FIELDS: ClassVar[tuple[str, ...]] = ("train_file", "eval_file", "lora_target_modules")

    def __post_init__(self) -> None:
        validate_config(self)


@contextlib.contextmanager
def _no_zero3_init() -> Any:
    """Build a model as plain tensors even while a ZeRO-3 config is active (transformers would
    otherwise partition it at construction, and ``save_pretrained`` would write empty tensors)."""
    from transformers.integrations import deepspeed as hf_ds

    ref = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    active = ref() if ref is not None else None
    if active is None:
        yield
        return
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds.set_hf_deepspeed_config(active)


def _dtype(name: str, args: RewardTrainingArguments) -> torch.dtype | None:
    if name == "auto":
        return torch.bfloat16 if args.bf16 else None
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
            name
        ]
    except KeyError:
        raise ValueError(
            f"torch_dtype must be auto, bfloat16, float16 or float32, got {name!r}."
        ) from None


def build_reward_model(
    script: RewardScriptArguments, args: RewardTrainingArguments
) -> LlavaRewardModel:
    """The model to train: the reward folder in ``args.output_dir`` (its other perspectives
    loaded frozen) or a fresh one on ``script.backbone``, with ``args.perspective`` added."""
    from .configuration import LlavaRewardConfig

    out = Path(args.output_dir)
    name = args.perspective
    dtype = _dtype(script.torch_dtype, args)
    lora = (
        None
        if script.lora_r <= 0
        else {
            "r": script.lora_r,
            "lora_alpha": script.lora_alpha,
            "lora_dropout": script.lora_dropout,
            "target_modules": script.lora_target_modules,
        }
    )
    spec = {
        "skipca": script.skipca,
        "head_dim": script.head_dim,
        "lora": lora if lora is not None else False,
        "train_projector": script.train_projector,
    }
    others: list[str] = []
    finish_interrupted_save(out)  # a save that died while moving its files, before reading it
    if script.continue_perspective and not (out / "config.json").is_file():
        raise ValueError(
            f"--continue_perspective: {out} holds no reward model yet; train the perspective "
            "there first (without the flag)."
        )
    if (out / "config.json").is_file():
        stored = LlavaRewardConfig.from_pretrained(out)
        if stored.model_type != LlavaRewardConfig.model_type:
            raise ValueError(f"{out} holds a {stored.model_type} model, not a reward model.")
        given = script.backbone
        check_backbone(out, out / TINY_BACKBONE_DIR if given == TINY_BACKBONE else given)
        resuming = args.resume_from_checkpoint not in (None, False, "", "false", "False")
        if script.continue_perspective:
            if name not in stored.perspectives:
                raise ValueError(
                    f"--continue_perspective: {out} holds no perspective {name!r} to continue "
                    f"(it has {', '.join(stored.perspectives)}); drop the flag to train a new one."
                )
            logger.info("continuing perspective %r of %s from its saved weights", name, out)
            return LlavaRewardModel.from_pretrained(
                out,
                torch_dtype=dtype,
                trust_remote_code=script.trust_remote_code,
                is_trainable=True,
            )
        if name in stored.perspectives and not (script.overwrite_perspective or resuming):
            raise ValueError(
                f"{out} already holds perspective {name!r}; pass --overwrite_perspective true to "
                "retrain it (or --resume_from_checkpoint latest to continue its run), or pick "
                "another --output_dir / --perspective."
            )
        others = [n for n in stored.perspectives if n != name]
    if others:
        logger.info("adding perspective %r to %s (keeps %s)", name, out, others)
        model = LlavaRewardModel.from_pretrained(
            out, perspectives=others, torch_dtype=dtype, trust_remote_code=script.trust_remote_code
        )
        model.add_perspective(name, **spec)
        return model
    backbone = script.backbone or TINY_BACKBONE
    tiny = backbone == TINY_BACKBONE
    if tiny:
        from .testing import save_tiny_backbone

        local = out / TINY_BACKBONE_DIR
        with args.main_process_first(desc="tiny backbone"):
            if not (local / "config.json").is_file():
                with _no_zero3_init():  # ZeRO-3 would partition it before it is saved
                    save_tiny_backbone("llava", local)
        backbone = str(local)
    model = LlavaRewardModel.from_backbone(
        backbone,
        perspectives=(),
        max_length=script.max_length,
        min_pixels=script.min_pixels,
        max_pixels=script.max_pixels,
        torch_dtype=dtype,
        trust_remote_code=script.trust_remote_code,
    )
    # the new adapter and head are drawn from the seed alone: seeded after the backbone is
    # loaded, which under ZeRO-3 (deepspeed.zero.Init) draws random numbers that DDP's load does not
    torch.manual_seed(args.seed)
    model.add_perspective(name, **spec)
    if tiny:
        model.config.backbone = TINY_BACKBONE_DIR  # relative to the reward folder
    return model


def load_reward_datasets(
    script: RewardScriptArguments, args: RewardTrainingArguments
) -> tuple[Any, Any, list[dict]]:
    """``(train, eval, read reports)`` from the script's files (``toy``: built once into
    ``OUTPUT_DIR/toy_data/<task>-n<N>-e<M>-s<seed>``). Without ``eval_file`` the eval set is a seeded split of train."""
    files, eval_files = list(script.train_file), script.eval_file
    if files == ["toy"]:
        from .toy_data import toy_task_for, write_toy_data

        task = toy_task_for(args.perspective)
        n, n_eval = script.toy_n_train, script.toy_n_eval
        folder = Path(args.output_dir) / "toy_data" / f"{task}-n{n}-e{n_eval}-s{args.seed}"
        train_path, eval_path = folder / f"{task}_train.jsonl", folder / f"{task}_eval.jsonl"
        with args.main_process_first(desc="toy data"):
            if not (train_path.is_file() and eval_path.is_file()):
                write_toy_data(folder, task, n, n_eval, seed=args.seed)
        files, eval_files = [str(train_path)], eval_files or [str(eval_path)]
    kwargs: dict[str, Any] = {"on_error": script.on_error}
    if script.image_root:
        kwargs["image_root"] = script.image_root
    out = Path(args.output_dir)
    saving = args.should_save  # the skipped records are written once, by the main process
    train, reports = read_reward_files(
        files, False, out / "skipped_train.jsonl" if saving else None, **kwargs
    )
    if eval_files:
        evald, more = read_reward_files(
            eval_files, True, out / "skipped_eval.jsonl" if saving else None, **kwargs
        )
        reports += more
    else:
        if saving:  # no eval files read: drop a stale list from an earlier run
            write_skipped(out / "skipped_eval.jsonl", [])
        evald = None
        if script.eval_split > 0:
            split = train.train_test_split(test_size=script.eval_split, seed=args.seed)
            train, evald = split["train"], split["test"]
    return train, evald, reports


def finish_reward_training(
    trainer: RewardTrainer, eval_dataset: Any, n_fixed: int = 4
) -> dict[str, Any] | None:
    """After ``train()``: record in-memory rewards of a few eval examples
    (``fixed_scores_<p>.json``), save the perspective into ``output_dir`` (added to what the
    folder holds) and write ``eval_report_<p>.json`` / ``.md`` for the eval split."""
    out, name = Path(trainer.args.output_dir), trainer.perspective
    model = trainer.model
    fixed = fixed_example_scores(model, eval_dataset, name, n_fixed) if eval_dataset else None
    trainer.save_model(str(out))
    metrics = evaluate_model(model, eval_dataset, name) if eval_dataset else None
    if trainer.args.should_save:
        if fixed is not None:
            write_json(out / f"fixed_scores_{name}.json", fixed)
        if metrics is not None:
            write_reward_report(metrics, out, f"eval_report_{name}", f"{name}: eval split")
    return metrics


__all__ = [
    "evaluate_dataset",
    "RewardScriptArguments",
    "build_reward_model",
    "finish_reward_training",
    "load_reward_datasets",
    "LOSS_TYPES",
    "ModelScorer",
    "RewardCollator",
    "RewardTrainer",
    "RewardTrainingArguments",
    "default_report_to",
    "drop_ties",
    "evaluate_model",
    "fixed_example_scores",
    "mix_datasets",
    "read_reward_files",
    "reward_loss",
    "split_kinds",
    "write_json",
]
