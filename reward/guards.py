"""Guards shared by every training loop: config ranges, non-finite steps, the process's device.

Reward training (:mod:`reward.training`) and the policy trainers of ``alignment`` (DDPO, DPO,
DRaFT/ReFL, and the online-RL base) use the same pieces; they live here, at the bottom of the
import graph, because ``reward`` never imports ``alignment``.

- **Config ranges** (:func:`check_ranges`, :func:`validate_config`): a numeric field whose wrong
  value would give NaN or silent nonsense (``eta = 0``: a zero std and a NaN loss; a negative clip
  range; ``lr = 0``) is refused when the config is built, with an error that names the field, the
  value and the allowed range. Rules are strings: ``"> 0"``, ``">= 1"``, ``"(0, 1]"``, ``"[0, 1)"``.
- **Non-finite steps** (:class:`StepGuard`): a non-finite loss or gradient skips the optimiser step
  (on every process: the flag is reduced), the skip is counted, and after ``max_consecutive_skips``
  skipped steps in a row the run stops with :class:`NonFiniteError` naming the step. Under
  DeepSpeed the engine steps inside ``backward``; :func:`poison_nonfinite` turns a non-finite loss
  into NaN gradients so that the engine's own overflow check (reduced across ranks) skips the step.
- **The process's device** (:func:`process_device`): ``cuda:{LOCAL_RANK}`` (or the current CUDA
  device) rather than a bare ``cuda``, which means GPU 0 in every process and every thread.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

# ----------------------------------------------------------------------------- config ranges

_BOUND = re.compile(r"^\s*(>=|<=|>|<)\s*(\S+)\s*$")
_INTERVAL = re.compile(r"^\s*([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])\s*$")


def _in_range(value: float, rule: str) -> bool:
    """Whether ``value`` satisfies ``rule`` (``"> 0"``, ``">= 1"``, ``"(0, 1]"``, ...); NaN never
    does."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return False
    if m := _BOUND.match(rule):
        op, bound = m.group(1), float(m.group(2))
        return {
            ">": value > bound,
            ">=": value >= bound,
            "<": value < bound,
            "<=": value <= bound,
        }[op]
    if m := _INTERVAL.match(rule):
        lo_br, lo, hi, hi_br = m.group(1), float(m.group(2)), float(m.group(3)), m.group(4)
        above = value >= lo if lo_br == "[" else value > lo
        below = value <= hi if hi_br == "]" else value < hi
        return above and below
    raise ValueError(f"unknown range rule {rule!r} (use '> 0', '>= 1', '(0, 1]', ...)")


def check_ranges(config: Any, rules: Mapping[str, str]) -> None:
    """Check ``getattr(config, name)`` against each rule; ``None`` values (optional fields) pass.

    Raises:
        ValueError: naming the field, the value and the allowed range, e.g.
            ``DDPOConfig.eta = 0.0 is out of range: it must be > 0.``
    """
    owner = type(config).__name__
    for name, rule in rules.items():
        value = getattr(config, name)
        if value is None:
            continue
        if not _in_range(value, rule):
            raise ValueError(
                f"{owner}.{name} = {value!r} is out of range: it must be {rule.strip()} "
                f"(set --{name} to a value in that range)."
            )


def validate_config(config: Any) -> None:
    """Check every rule in the ``RANGES`` class attributes of ``type(config)`` and its bases (a
    subclass adds rules or replaces a base's rule for the same field), after normalising the
    fields that hold several values (:func:`normalise_multi_values`)."""
    rules: dict[str, str] = {}
    lists: set[str] = set()
    commas: set[str] = set()
    for cls in reversed(type(config).__mro__):
        rules.update(cls.__dict__.get("RANGES", {}))
        lists.update(cls.__dict__.get("LIST_FIELDS", ()))
        commas.update(cls.__dict__.get("COMMA_FIELDS", ()))
    normalise_multi_values(config, lists, commas)
    check_ranges(config, rules)


def normalise_multi_values(config: Any, lists=(), commas=()) -> None:
    """Accept a YAML list or a single value for fields that hold several. ``lists`` fields
    become lists of strings: a lone string is one item (``train_file: toy`` is ``["toy"]``, not
    its characters; nothing is split, as a path may hold a comma); ``commas`` fields (one
    comma-separated string by design) take a YAML list too (``[to_q, to_k]`` is ``"to_q,to_k"``)."""
    for name in lists:
        value = getattr(config, name)
        if isinstance(value, str):
            setattr(config, name, [value])
        elif value is not None:
            setattr(config, name, [str(v) for v in value])
    for name in commas:
        value = getattr(config, name)
        if isinstance(value, (list, tuple)):
            setattr(config, name, ",".join(str(v).strip() for v in value))


# ----------------------------------------------------------------------------- non-finite steps


class NonFiniteError(RuntimeError):
    """Too many optimiser steps in a row had a non-finite loss or gradient, or the weights
    became non-finite: the run stops instead of training (or saving) NaN weights."""


def is_finite(*tensors: torch.Tensor | float | None) -> bool:
    """True when every element of every tensor (or number) is finite; ``None`` is skipped."""
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, torch.Tensor):
            if not bool(torch.isfinite(t.detach()).all()):
                return False
        elif not math.isfinite(float(t)):
            return False
    return True


def grads_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    """True when every existing ``.grad`` of ``params`` is finite (one reduction, no host sync per
    parameter)."""
    flags = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    return bool(torch.stack(flags).all()) if flags else True


def params_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    """True when every parameter is finite. Under DeepSpeed ZeRO-3 the parameter outside a forward
    is an empty placeholder: its local partition (``ds_tensor``) is checked instead (reduce the
    result over processes with :func:`any_process`)."""
    flags = []
    for p in params:
        data = getattr(p, "ds_tensor", None)
        data = p.data if data is None else data
        if data.numel():
            flags.append(torch.isfinite(data).all())
    return bool(torch.stack(flags).all()) if flags else True


def any_process(accelerator: Any, flag: bool) -> bool:
    """``flag`` OR-ed over every process (one all-reduce; no collective on a single process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return bool(flag)
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def enabled_scaler(accelerator: Any) -> Any:
    """The accelerator's dynamic fp16 loss scaler (``torch.amp.GradScaler``), or None when there
    is none or it is disabled."""
    scaler = getattr(accelerator, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def poison_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Fill every existing ``.grad`` of ``params`` with NaN: how a step is skipped through a loss
    scaler, which refuses a step without gradients but skips (and lowers its scale) on
    non-finite ones."""
    for p in params:
        if p.grad is not None:
            p.grad.fill_(float("nan"))


def poison_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """``loss * NaN`` when ``loss`` is not finite (else ``loss`` unchanged).

    A NaN loss need not give NaN gradients (a NaN written into one reward by index gets a zero
    gradient). Under DeepSpeed the engine steps inside ``backward``, and only its overflow check
    (a non-finite gradient norm, reduced over ranks) can skip the step: multiplying by NaN makes
    the gradient of every path that is not masked out NaN, hence the norm, so that check fires
    on every rank.
    """
    if is_finite(loss):
        return loss
    return loss * float("nan")


class StepGuard:
    """Counts optimiser steps skipped for a non-finite loss or gradient and stops the run after
    ``max_consecutive`` of them in a row.

    Use: :meth:`observe` every micro-batch loss of an accumulation window; at the window's end
    decide whether to skip (``pending`` OR a non-finite gradient, reduced over processes) and call
    :meth:`record`. ``skipped`` is the run's total (logged as ``train/skipped_steps``); it and the
    current streak travel in checkpoints (:meth:`state_dict`).
    """

    def __init__(self, max_consecutive: int = 3) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}.")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self.pending = False

    def observe(self, loss: torch.Tensor | float) -> bool:
        """Note a micro-batch loss; returns whether it is finite (a non-finite one marks the
        current window for skipping)."""
        ok = is_finite(loss)
        self.pending = self.pending or not ok
        return ok

    def record(self, skipped: bool, step: int, where: str = "optimiser step") -> None:
        """Close an accumulation window (``step``: the step it would have been, 1-based).

        Raises:
            NonFiniteError: after ``max_consecutive`` skipped steps in a row.
        """
        self.pending = False
        if not skipped:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} consecutive {where}s skipped for a non-finite loss or "
                f"gradient (the last at step {step}; {self.skipped} skipped in all). The weights "
                "are those of the last finite step and the newest checkpoint is finite. Lower the "
                "learning rate, check the reward for NaN/inf, or raise max_consecutive_skips."
            )

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))


# ----------------------------------------------------------------------------- devices


def process_device() -> torch.device:
    """This process's device: ``cuda:{LOCAL_RANK}`` when launched with one process per GPU (else
    the current CUDA device), ``cpu`` without CUDA. Never the index-less ``cuda``, which is GPU 0 in
    every process and in every thread that did not set its own device."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = os.environ.get("LOCAL_RANK", "")
    if local.isdigit() and int(local) < torch.cuda.device_count():
        return torch.device("cuda", int(local))
    return torch.device("cuda", torch.cuda.current_device())


def indexed_device(device: str | torch.device) -> torch.device:
    """``device`` with its index: the index-less ``cuda`` (accelerate's device for a single
    process without DeepSpeed) is the calling thread's current CUDA device; others unchanged."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def set_thread_device(device: str | torch.device) -> None:
    """Make ``device`` the current CUDA device of the calling thread (a no-op for other devices).

    CUDA's current device is per thread: a worker thread (e.g. an asynchronous reward) starts on
    GPU 0 whatever its process uses, so it must call this before it touches a GPU. Pass it an
    indexed device resolved in the parent thread (:func:`indexed_device`); ``torch.cuda.set_device``
    refuses the index-less ``cuda``, which here means the calling thread's current device."""
    device = indexed_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)


__all__ = [
    "NonFiniteError",
    "StepGuard",
    "any_process",
    "check_ranges",
    "enabled_scaler",
    "grads_finite",
    "indexed_device",
    "normalise_multi_values",
    "is_finite",
    "params_finite",
    "poison_gradients",
    "poison_nonfinite",
    "process_device",
    "set_thread_device",
    "validate_config",
]
