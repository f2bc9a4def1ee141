"""LLaVA-Reward (arXiv 2507.21391): a reward read from a multimodal LLM's hidden state.

For a batch of (image, caption) sequences of length ``L`` with hidden size ``d``:

- ``e = last_hidden_state[b, last]``: the final layer's hidden state at the EOS token, the last
  non-pad position (``[B, d]``);
- SkipCA: keys/values are the visual token embeddings after the projector and before any LLM layer
  (the language model's ``inputs_embeds`` at ``input_ids == image_token_id``, ``[B, V, d]``):
  ``a = softmax(mask(W_q e (W_k v)^T / sqrt(d))) W_v v`` (single head, no bias, softmax over the
  visual tokens only, padded/absent visual positions masked out), ``h = RMSNorm(e + a)``;
- head: ``r = W_h h`` with ``W_h`` of shape ``[head_dim, d]`` (no bias): ``head_dim = 1`` for
  Bradley-Terry / classification rewards, ``2`` for the general-preference model (GPM).

Each perspective (``alignment``, ``fidelity``, ``safety``, ``overall`` or a user name) is a peft LoRA
adapter on the language model (plus, optionally, its own copy of the vision projector) with its own
SkipCA and head, on one frozen backbone in memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration import LlavaRewardConfig
from .families import family_for
from .files import atomic_write_text
from .processing import RewardProcessor

HEADS_DIR = "heads"
ADAPTERS_DIR = "adapters"
BACKBONE_DIR = "backbone"
PROCESSOR_DIR = "processor"

#: LoRA settings of the paper (rank 128, alpha 256, dropout 0.05).
PAPER_LORA = {"r": 128, "lora_alpha": 256, "lora_dropout": 0.05}


class UnknownPerspectiveError(KeyError):
    """A perspective name that the model does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def masked_skip_cross_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_mask: torch.Tensor,
) -> torch.Tensor:
    """Single-head attention of one query over masked keys.

    ``out[b] = sum_v softmax_v(q[b] . k[b, v] / sqrt(d) | key_mask[b, v]) * values[b, v]``

    Shapes: ``query [B, d]``, ``keys/values [B, V, d]``, ``key_mask [B, V]`` (True = a real visual
    token) -> ``[B, d]``. A row with no visual token attends to nothing and returns zeros.
    """
    d = query.shape[-1]
    scores = torch.einsum("bd,bvd->bv", query, keys) / math.sqrt(d)
    scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1) * key_mask.to(scores.dtype)
    return torch.einsum("bv,bvd->bd", weights, values)


class RewardHead(nn.Module):
    """SkipCA (optional) + RMSNorm + linear head for one perspective, kept in float32."""

    def __init__(
        self, hidden_size: int, head_dim: int = 1, skipca: bool = True, norm_eps: float = 1e-6
    ):
        super().__init__()
        self.skipca = skipca
        if skipca:
            self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
            self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
            self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
            # the official code: eps 1e-5 for Phi-3 and Llama backbones, 1e-6 for Qwen
            self.norm = nn.RMSNorm(hidden_size, eps=norm_eps)
        self.score = nn.Linear(hidden_size, head_dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal init with std ``1 / (d + 1)`` for the head and SkipCA's ``W_q, W_k, W_v`` (as
        the official code): small enough that a fresh model's Bradley-Terry loss at tau 0.1 starts
        near log 2 at d in the thousands (std ``1 / sqrt(d)`` gave 6.5 at d = 3584)."""
        std = 1.0 / (self.score.in_features + 1)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)

    def forward(
        self,
        eos_hidden: torch.Tensor,
        visual: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``eos_hidden [B, d]``, ``visual [B, V, d]``, ``visual_mask [B, V]`` -> (``r [B, head_dim]``, ``h [B, d]``)."""
        e = eos_hidden.float()
        if self.skipca:
            if visual is None or visual_mask is None:
                raise ValueError("SkipCA needs the visual token embeddings and their mask.")
            v = visual.float()
            attended = masked_skip_cross_attention(
                self.q_proj(e), self.k_proj(v), self.v_proj(v), visual_mask
            )
            h = self.norm(e + attended)
        else:
            h = e
        return self.score(h), h


@dataclass
class RewardModelOutput(ModelOutput):
    """``rewards``: ``[B]`` (head_dim 1) or ``[B, 2]`` (GPM); ``hidden``: the head's input ``[B, d]``."""

    rewards: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


_HALF = (torch.bfloat16, torch.float16)


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with its floating tensors (also inside tuples / lists) cast to ``dtype``."""
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


def _first_float_dtype(values: Any) -> torch.dtype | None:
    for v in values:
        if torch.is_tensor(v) and v.is_floating_point():
            return v.dtype
    return None


def keep_master_weights_fp32(module: nn.Module) -> None:
    """Keep a trainable module (a perspective's projector copy) in float32 inside a half-precision
    backbone: its weights become float32 (AdamW then updates float32 master weights, as DeepSpeed's
    would; bf16 weights round away updates below ~0.4 % of a weight), its floating inputs are cast
    to its weights' dtype and its output back to the dtype it was given, so the frozen bf16 layers
    around it see bf16. Under autocast the matmuls still run in the autocast dtype. Idempotent;
    the casts follow the weights' dtype, so a later ``model.to(bf16)`` for inference still works.
    """
    module.float()
    if getattr(module, "_reward_fp32_hooks", False):
        return
    state: dict[str, torch.dtype | None] = {}

    def cast_in(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        state["dtype"] = _first_float_dtype([*args, *kwargs.values()])
        dtype = next(mod.parameters()).dtype
        return _cast_floats(args, dtype), {k: _cast_floats(v, dtype) for k, v in kwargs.items()}

    def cast_out(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        dtype = state.pop("dtype", None)
        return output if dtype is None else _cast_floats(output, dtype)

    module.register_forward_pre_hook(cast_in, with_kwargs=True)
    module.register_forward_hook(cast_out, with_kwargs=True)
    module._reward_fp32_hooks = True


def _drop_lm_head(model: torch.nn.Module) -> torch.nn.Module:
    """The base (no LM head) of an image-text-to-text model: ``XForConditionalGeneration.model``."""
    if hasattr(model, "get_decoder") and hasattr(model, "model") and hasattr(model, "lm_head"):
        return model.model
    return model


def _is_local(path: str) -> bool:
    return os.path.isdir(path)


class BackboneMismatchError(ValueError):
    """A backbone that contradicts the one an existing reward folder was built on."""


def _backbone_key(reference: str, folder: Path) -> str:
    """A backbone reference in comparable form: the resolved folder for a local path (as
    ``from_pretrained`` finds it: as written, then relative to the reward folder), else the id."""
    for candidate in (Path(reference).expanduser(), folder / reference):
        if candidate.is_dir():
            return str(candidate.resolve())
    return reference


def check_backbone(folder: str | os.PathLike, backbone: str | os.PathLike | None) -> None:
    """Raise :class:`BackboneMismatchError` when the reward folder ``folder`` exists and its
    config names a backbone other than ``backbone`` (all perspectives of a folder share one
    frozen backbone, so a second one would silently be ignored or mixed in)."""
    path = Path(folder)
    if backbone is None or not (path / "config.json").is_file():
        return
    stored = json.loads((path / "config.json").read_text()).get("backbone")
    if not stored or _backbone_key(str(backbone), path) == _backbone_key(stored, path):
        return
    raise BackboneMismatchError(
        f"{path} holds a reward model on the backbone {stored!r}, and {str(backbone)!r} is "
        "another one (all perspectives of a folder share one frozen backbone). To add to this "
        f"folder use its backbone (leave --backbone out of recipes/train_reward.py); to build on "
        f"{str(backbone)!r}, choose a new output folder."
    )


def load_backbone(
    backbone: str | os.PathLike,
    torch_dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load an image-text-to-text backbone (hub id or folder) and return its base model.

    ``trust_remote_code`` stays False unless the user asks for it (Phi-3.5-vision needs it).
    """
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    config = AutoConfig.from_pretrained(str(backbone), trust_remote_code=trust_remote_code)
    base_only = any(not a.endswith("ForConditionalGeneration") for a in config.architectures or [])
    try:
        if base_only:  # a backbone saved by `save_pretrained(..., save_backbone=True)`
            raise ValueError
        model = AutoModelForImageTextToText.from_pretrained(str(backbone), **kwargs)
    except ValueError:
        model = AutoModel.from_pretrained(str(backbone), **kwargs)
    return _drop_lm_head(model)


def _replace(src: Path, dst: Path) -> None:
    """Move ``src`` (a file or folder) to ``dst``, replacing what is there: a file in one rename;
    a folder renamed aside, the new one renamed in, then the old one deleted."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir() and dst.exists():
        old = dst.with_name(f".old-{dst.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


#: Written into a save's staging folder once every file is there: from then on the save is
#: committed, and :func:`finish_interrupted_save` completes it if the process died while moving
#: the files into place. Lists the moves (paths relative to the folder), ``config.json`` last.
_COMMIT_FILE = "COMMIT.json"
_STAGING_PREFIX = ".staging-"


def _check_move(rel: str, out: Path) -> Path:
    """``rel`` as a move of a save into ``out``: only ``processor``, ``config.json``,
    ``heads/<name>.safetensors`` or ``adapters/<name>``, and inside ``out`` (a folder from
    elsewhere must not move files out of it)."""
    path = Path(rel)
    parts = path.parts
    allowed = (
        parts in ((PROCESSOR_DIR,), ("config.json",))
        or (len(parts) == 2 and parts[0] == HEADS_DIR and parts[1].endswith(".safetensors"))
        or (len(parts) == 2 and parts[0] == ADAPTERS_DIR)
    )
    inside = (out / path).resolve().is_relative_to(out.resolve())
    if path.is_absolute() or ".." in parts or not allowed or not inside:
        raise ValueError(
            f"{out}: an interrupted save lists the move {rel!r}, which is not a file of a reward "
            "folder; the folder was not written by save_pretrained. Delete its .staging-* "
            "folders (or get a clean copy) before loading it."
        )
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX ``flock``; none where that is missing):
    processes that complete or make the same save take turns."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _commit(stage: Path, out: Path, moves: list[Path]) -> bool:
    """Move ``stage/rel`` to ``out/rel`` for every ``rel`` of ``moves`` still in the staging
    folder (idempotent: the ones a previous attempt moved are skipped), then drop the folder.
    Holds the lock of the commit file, so that a reader completing the same save waits.
    Returns False when another process completed it while this one waited."""
    with _locked(stage / _COMMIT_FILE):
        if not (stage / _COMMIT_FILE).is_file():
            return False
        for rel in moves:
            if (stage / rel).exists():
                _replace(stage / rel, out / rel)
        for leftover in [*out.glob(".old-*"), *out.glob(f"{ADAPTERS_DIR}/.old-*")]:
            shutil.rmtree(leftover, ignore_errors=True)  # a folder renamed aside by _replace
        (stage / _COMMIT_FILE).unlink()
    shutil.rmtree(stage, ignore_errors=True)
    return True


def finish_interrupted_save(folder: str | os.PathLike) -> list[str]:
    """Complete a :meth:`LlavaRewardModel.save_pretrained` into ``folder`` that was interrupted
    after it committed (every new file written) but before every file was moved into place.

    Without this, a crash between two moves would leave a perspective with its new head and its
    old adapter, loading without an error. Called by ``from_pretrained``, ``save_pretrained``,
    ``load_perspective_weights`` and the reward trainer before it reads a folder; returns the
    staging folders it completed (empty when the folder is consistent). Processes that call it
    at once take turns (a lock on the commit file). A staging folder without a commit file is a
    save that died while writing: nothing of it was moved, and the folder is as it was
    (``save_pretrained`` deletes it). Raises ``ValueError`` for a commit file that lists
    anything but a reward folder's own files, and a clear ``PermissionError`` for a read-only
    folder that needs completing.
    """
    out = Path(folder)
    done = []
    for stage in sorted(out.glob(f"{_STAGING_PREFIX}*")):
        commit = stage / _COMMIT_FILE
        if not commit.is_file():
            continue
        try:
            listed = json.loads(commit.read_text())["moves"]
        except FileNotFoundError:
            continue  # completed by another process just now
        moves = [_check_move(rel, out) for rel in listed]
        try:
            completed = _commit(stage, out, moves)
        except PermissionError as err:
            raise PermissionError(
                f"{out} holds a save that was interrupted while moving its files ({stage.name}); "
                "completing it needs write access: open the folder once where it is writable "
                "(or copy it), then load it."
            ) from err
        except FileNotFoundError:
            if commit.exists():
                raise
            continue  # completed by another process just now
        if completed:
            done.append(stage.name)
    return done


class LlavaRewardModel(PreTrainedModel):
    """The LLaVA-Reward model. Build it with :meth:`from_backbone`, reload with :meth:`from_pretrained`."""

    config_class = LlavaRewardConfig
    base_model_prefix = "reward"
    supports_gradient_checkpointing = True
    _no_split_modules: list[str] = []

    def __init__(
        self,
        config: LlavaRewardConfig,
        backbone: PreTrainedModel,
        processor: RewardProcessor | None = None,
    ):
        super().__init__(config)
        backbone.requires_grad_(False)
        self.backbone: PreTrainedModel | PeftModel = backbone
        self.heads = nn.ModuleDict()
        self.processor = processor
        self.family = family_for(self._base.config.model_type)
        self._captured: dict[str, torch.Tensor] = {}
        self._hook = self._decoder.register_forward_pre_hook(self._capture_embeds, with_kwargs=True)
        self._all_linear = self._lora_targets()
        self._trainable: str | None = None
        for name, spec in dict(config.perspectives).items():
            self._build_perspective(name, spec)
        self.post_init()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbone(
        cls,
        backbone: str | os.PathLike | PreTrainedModel,
        processor: RewardProcessor | Any | None = None,
        perspectives: Sequence[str] = ("overall",),
        skipca: bool = True,
        lora_config: LoraConfig | dict | None = None,
        head_dim: int = 1,
        train_projector: bool = True,
        tau: float = 0.1,
        max_length: int | None = None,
        padding_side: str = "left",
        torch_dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> LlavaRewardModel:
        """A fresh reward model on ``backbone`` (hub id, folder, or loaded model).

        ``lora_config``: a peft ``LoraConfig`` or dict (default: the paper's rank 128 / alpha 256 /
        dropout 0.05 on every linear layer of the language model); ``target_modules`` defaults to
        all linear layers of the language model. The processor is loaded from the same place when
        not given and travels with the model. ``max_length``: the token budget of a sequence
        (None: the backbone's context; captions are cut from their end). ``min_pixels`` /
        ``max_pixels``: the image area range of a dynamic-resolution backbone (Qwen2/2.5/3-VL;
        None: its processor's own).
        """
        if isinstance(backbone, (str, os.PathLike)):
            reference = str(backbone)
            model = load_backbone(reference, torch_dtype, trust_remote_code)
        else:
            model = _drop_lm_head(backbone)
            reference = getattr(backbone, "name_or_path", None) or getattr(
                model, "name_or_path", None
            )
        cfg = model.config
        if (
            getattr(cfg, "image_token_id", None) is None
            and getattr(cfg, "image_token_index", None) is None
        ):
            raise ValueError(
                f"the backbone {reference or type(model).__name__} ({cfg.model_type}) has no image "
                "token (`image_token_id` in its config): LLaVA-Reward needs an image-text-to-text "
                "model (LLaVA, Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM, ...), not a text-only LM."
            )
        text_config = cfg.get_text_config()
        family = family_for(cfg.model_type)
        budget = {"min_pixels": min_pixels, "max_pixels": max_pixels}
        if isinstance(processor, RewardProcessor):
            proc = processor
            proc.family.set_pixel_budget(min_pixels, max_pixels)
        elif processor is not None:  # an official processor object
            proc = RewardProcessor(
                processor.tokenizer,
                processor.image_processor,
                model.config,
                chat_template=getattr(processor, "chat_template", None),
                max_length=max_length,
                padding_side=padding_side,
                **budget,
            )
        elif reference:
            proc = RewardProcessor.from_pretrained(
                reference,
                model.config,
                trust_remote_code=trust_remote_code,
                max_length=max_length,
                padding_side=padding_side,
                **budget,
            )
        else:
            raise ValueError(
                "the backbone was passed as a model without a `name_or_path`: pass `processor=` too."
            )
        lora = _lora_dict(lora_config)
        spec = {
            "skipca": skipca,
            "head_dim": head_dim,
            "lora": lora,
            "train_projector": train_projector and bool(family.projector),
        }
        config = LlavaRewardConfig(
            backbone=reference,
            backbone_model_type=model.config.model_type,
            hidden_size=text_config.hidden_size,
            image_token_id=family(None, None, model.config).image_token_id,
            perspectives={},
            tau=tau,
            max_length=proc.max_length,
            padding_side=proc.padding_side,
            trust_remote_code=trust_remote_code,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )
        reward = cls(config, model, proc)
        for name in perspectives:
            reward.add_perspective(name, **spec)
        return reward

    @property
    def _base(self) -> PreTrainedModel:
        """The raw backbone base model (peft wrapper removed)."""
        bb = self.backbone
        return bb.get_base_model() if isinstance(bb, PeftModel) else bb

    @property
    def _decoder(self) -> nn.Module:
        return self._base.get_decoder()

    def _lora_targets(self) -> str:
        """A regex matching every linear layer of the language model (peft ``target_modules``).

        Computed once on the raw backbone, before any adapter wraps its layers."""
        base = self._base
        decoder = self._decoder
        prefix = next(name for name, module in base.named_modules() if module is decoder)
        leaves = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in decoder.named_modules()
                if isinstance(module, nn.Linear)
            }
        )
        return rf"^{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, leaves))})$"

    def _peft_config(self, spec: dict[str, Any]) -> LoraConfig | None:
        lora = spec.get("lora")
        if lora is None:
            return None
        lora = dict(lora)
        if not lora.get("target_modules") or lora.get("target_modules") in (
            "all-linear",
            ["all-linear"],
        ):
            lora["target_modules"] = self._all_linear
        if spec.get("train_projector"):
            lora["modules_to_save"] = [self.family.projector]
        lora.pop("task_type", None)
        return LoraConfig(**lora)

    def _build_perspective(self, name: str, spec: dict[str, Any]) -> None:
        peft_config = self._peft_config(spec)
        if peft_config is not None:
            if isinstance(self.backbone, PeftModel):
                self.backbone.add_adapter(name, peft_config)
            else:
                self.backbone = get_peft_model(self.backbone, peft_config, adapter_name=name)
        head = RewardHead(
            self.config.hidden_size,
            spec.get("head_dim", 1),
            spec.get("skipca", True),
            spec.get("norm_eps", 1e-6),
        )
        self.heads[name] = head.to(next(iter(self._base.parameters())).device)
        self._keep_trainable_fp32(name)

    def _projector_copies(self, name: str) -> list[nn.Module]:
        """Perspective ``name``'s copy of the vision projector (peft ``modules_to_save``)."""
        suffix = (
            f"{self.family.projector}.modules_to_save.{name}" if self.family.projector else None
        )
        if suffix is None:
            return []
        return [m for n, m in self.backbone.named_modules() if n.endswith(suffix)]

    def _keep_trainable_fp32(self, name: str) -> None:
        """Perspective ``name``'s trainable weights in float32 however the backbone is stored: the
        projector copy (:func:`keep_master_weights_fp32`), the LoRA weights (peft runs them in
        their own dtype and casts back) and SkipCA + head (they compute in float32)."""
        for module in self._projector_copies(name):
            keep_master_weights_fp32(module)
        for pname, p in self.backbone.named_parameters():
            if f".{name}." in pname and "lora_" in pname and p.dtype in _HALF:
                p.data = p.data.float()
        self.heads[name].float()

    def add_perspective(
        self,
        name: str,
        skipca: bool = True,
        head_dim: int = 1,
        lora: dict | LoraConfig | None = None,
        train_projector: bool = True,
        norm_eps: float = 1e-6,
        **lora_kwargs: Any,
    ) -> None:
        """Add a perspective: a LoRA adapter (+ projector copy), its SkipCA and its head.

        ``norm_eps``: SkipCA's RMSNorm epsilon (1e-6; the official Phi-3 / Llama heads use 1e-5)."""
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name) or name == "default":
            raise ValueError(
                f"perspective name {name!r} must be letters, digits, '_' or '-' (and not 'default')."
            )
        if name in self.config.perspectives:
            raise ValueError(f"perspective {name!r} exists already; pick another name.")
        if lora is None and lora_kwargs:
            lora = lora_kwargs
        if head_dim not in (1, 2):
            raise ValueError(
                f"head_dim must be 1 (BT / classification) or 2 (GPM), got {head_dim}."
            )
        spec = {
            "skipca": skipca,
            "head_dim": head_dim,
            "lora": _lora_dict(lora),
            "train_projector": bool(train_projector and self.family.projector),
        }
        if norm_eps != 1e-6:
            spec["norm_eps"] = norm_eps
        self._build_perspective(name, spec)
        perspectives = dict(self.config.perspectives)
        perspectives[name] = spec
        self.config.perspectives = perspectives

    @property
    def perspectives(self) -> list[str]:
        return list(self.config.perspectives)

    def _check_perspective(self, name: str) -> None:
        if name not in self.config.perspectives:
            raise UnknownPerspectiveError(
                f"unknown perspective {name!r}; this model has: {', '.join(self.perspectives) or 'none'}. "
                "Train it with recipes/train_reward.py or add it with add_perspective()."
            )

    @contextlib.contextmanager
    def _adapter(self, name: str) -> Iterator[None]:
        """Activate perspective ``name``'s adapter (or none, for a perspective without LoRA)."""
        self._check_perspective(name)
        bb = self.backbone
        if not isinstance(bb, PeftModel):
            yield
            return
        if self.config.perspectives[name].get("lora") is None:
            with bb.disable_adapter():
                yield
            return
        if bb.active_adapter != name:
            # peft freezes the adapters it deactivates; only the perspective being trained (see
            # set_trainable) is made trainable again when it becomes active.
            bb.set_adapter(name, inference_mode=name != self._trainable)
            if self._trainable is not None and self._trainable != name:
                bb.set_requires_grad(self._trainable, requires_grad=True)
        yield

    def set_trainable(
        self, perspective: str, train_projector: bool | None = None
    ) -> list[nn.Parameter]:
        """Freeze everything except ``perspective``'s LoRA, projector copy, SkipCA and head; return those."""
        self._check_perspective(perspective)
        self.requires_grad_(False)
        self._trainable = perspective
        if isinstance(self.backbone, PeftModel) and self.config.perspectives[perspective].get(
            "lora"
        ):
            self.backbone.set_adapter(perspective, inference_mode=False)
        params: list[nn.Parameter] = []
        for pname, p in self.backbone.named_parameters():
            owned = f".{perspective}." in pname and ("lora_" in pname or "modules_to_save" in pname)
            if owned and (train_projector is not False or "lora_" in pname):
                p.requires_grad_(True)
                params.append(p)
        for p in self.heads[perspective].parameters():
            p.requires_grad_(True)
            params.append(p)
        self._keep_trainable_fp32(perspective)
        return params

    # ------------------------------------------------------------------ forward
    def _capture_embeds(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        embeds = kwargs.get("inputs_embeds")
        if (
            embeds is None
            and len(args) > 0
            and torch.is_tensor(args[0])
            and args[0].is_floating_point()
        ):
            embeds = args[0]
        if embeds is not None:
            self._captured["inputs_embeds"] = embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        perspective: str | None = None,
        **pixel_inputs: torch.Tensor,
    ) -> RewardModelOutput:
        """Rewards of a batch for one perspective (default: the only one, else ``overall``).

        ``input_ids``/``attention_mask`` ``[B, L]`` (left or right padded); pixel inputs as the
        family's processor produces them. Returns ``rewards [B]`` (or ``[B, 2]`` for GPM heads).
        """
        name = perspective or self._default_perspective()
        with self._adapter(name):
            self._captured.clear()
            out = self.backbone(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                return_dict=True,
                **pixel_inputs,
            )
            embeds = self._captured.pop("inputs_embeds", None)
        rewards, h = self._head(out.last_hidden_state, embeds, input_ids, attention_mask, name)
        return RewardModelOutput(rewards=rewards, hidden=h)

    def _head(
        self,
        hidden: torch.Tensor,
        embeds: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        name: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Readout at the last token + SkipCA + head of perspective ``name``: ``hidden [B, L, d]``
        -> (``rewards [B]`` or ``[B, 2]``, ``h [B, d]``)."""
        last = _last_token_index(attention_mask)
        eos_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        head = self.heads[name]
        visual, visual_mask = None, None
        if head.skipca:
            if embeds is None:
                raise RuntimeError(
                    "could not capture the visual embeddings from the language model."
                )
            visual, visual_mask = gather_visual_tokens(
                embeds, input_ids, attention_mask, self.config.image_token_id
            )
        rewards, h = head(eos_hidden, visual, visual_mask)
        if rewards.shape[-1] == 1:
            rewards = rewards.squeeze(-1)
        return rewards, h

    def forward_perspectives(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        perspectives: Sequence[str],
        mixed: bool = True,
        **pixel_inputs: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Rewards of one batch under several perspectives: ``{name: rewards [B]}``.

        ``mixed=True`` runs one forward of ``P * B`` rows with peft's mixed-adapter batch (each
        row routed through its perspective's adapter); ``mixed=False`` switches adapters and runs
        ``P`` forwards of ``B`` rows. Both give the same rewards; ``bench/score.py`` measures which
        is faster. peft routes mixed batches through LoRA layers but not through a per-perspective
        projector copy (``modules_to_save`` of a non-linear module), so perspectives that train
        their projector, or have no LoRA, take the switching path.
        """
        names = list(perspectives)
        for name in names:
            self._check_perspective(name)
        lora = [
            n
            for n in names
            if self.config.perspectives[n].get("lora") is not None
            and not self.config.perspectives[n].get("train_projector")
        ]
        out: dict[str, torch.Tensor] = {}
        if mixed and len(lora) > 1 and isinstance(self.backbone, PeftModel):
            p, b = len(lora), input_ids.shape[0]
            self._captured.clear()
            hidden = self.backbone(
                input_ids=input_ids.repeat(p, 1),
                attention_mask=attention_mask.repeat(p, 1),
                use_cache=False,
                return_dict=True,
                adapter_names=[name for name in lora for _ in range(b)],
                **{k: torch.cat([v] * p, dim=0) for k, v in pixel_inputs.items()},
            ).last_hidden_state
            embeds = self._captured.pop("inputs_embeds", None)
            for i, name in enumerate(lora):
                rows = slice(i * b, (i + 1) * b)
                rows_embeds = None if embeds is None else embeds[rows]
                out[name], _ = self._head(
                    hidden[rows], rows_embeds, input_ids, attention_mask, name
                )
        for name in names:
            if name not in out:
                out[name] = self(
                    input_ids, attention_mask, perspective=name, **pixel_inputs
                ).rewards
        return {name: out[name] for name in names}

    def _default_perspective(self) -> str:
        names = self.perspectives
        if len(names) == 1:
            return names[0]
        if "overall" in names:
            return "overall"
        raise ValueError(f"pass perspective= (one of {', '.join(names)}).")

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None
    ) -> None:
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        self._base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        save_backbone: bool = False,
        perspectives: Sequence[str] | None = None,
        **_: Any,
    ) -> None:
        """Write ``config.json``, ``processor/``, ``adapters/<name>/`` (peft), ``heads/<name>.safetensors``.

        The frozen backbone is referenced by ``config.backbone`` and not copied unless
        ``save_backbone=True`` (then it goes to ``backbone/`` and the reference points there).
        Nothing is pickled. Existing perspectives in the folder that this model does not hold are
        kept, so training one perspective at a time fills one folder.

        Crash-safe: the perspectives' files and the processor are written to a staging folder
        beside them; once all are there a commit file lists the moves, and they are renamed into
        place, ``config.json`` (which lists the perspectives) last. A save interrupted while
        writing leaves the folder as it was (except ``backbone/``, written in place with
        ``save_backbone=True``); one interrupted while moving is completed the next
        time the folder is opened (:func:`finish_interrupted_save`), so a perspective never loads
        with a new head and an old adapter. One writer per folder.
        """
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        finish_interrupted_save(out)
        for stale in out.glob(f"{_STAGING_PREFIX}*"):  # uncommitted: a save that died writing
            shutil.rmtree(stale, ignore_errors=True)
        names = list(perspectives or self.perspectives)
        config = self.config.to_dict()
        existing = {}
        if (out / "config.json").is_file():
            existing = json.loads((out / "config.json").read_text()).get("perspectives", {}) or {}
            if not save_backbone and set(existing) - set(names):  # perspectives stay beside ours
                check_backbone(out, self.config.backbone)
        merged = dict(existing)
        merged.update({n: self.config.perspectives[n] for n in names})
        config["perspectives"] = merged
        if save_backbone:
            self._base.save_pretrained(out / BACKBONE_DIR, state_dict=self._backbone_state_dict())
            config["backbone"] = BACKBONE_DIR
        stage = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=out))
        committed = False
        try:
            if self.processor is not None:
                self.processor.save_pretrained(stage / PROCESSOR_DIR)
            (stage / HEADS_DIR).mkdir()
            for name in names:
                state = {
                    k: v.detach().cpu().contiguous()
                    for k, v in self.heads[name].state_dict().items()
                }
                save_file(state, str(stage / HEADS_DIR / f"{name}.safetensors"))
            with_lora = [n for n in names if self.config.perspectives[n].get("lora") is not None]
            if with_lora and isinstance(self.backbone, PeftModel):
                self.backbone.save_pretrained(
                    str(stage / ADAPTERS_DIR), selected_adapters=with_lora
                )
            LlavaRewardConfig.from_dict(config).save_pretrained(stage)
            # into place: every file first, the config that lists them last
            moves = [Path(PROCESSOR_DIR)] if self.processor is not None else []
            moves += [Path(HEADS_DIR) / f"{n}.safetensors" for n in names]
            moves += [Path(ADAPTERS_DIR) / n for n in names if (stage / ADAPTERS_DIR / n).exists()]
            moves.append(Path("config.json"))
            atomic_write_text(
                stage / _COMMIT_FILE, json.dumps({"moves": [str(rel) for rel in moves]})
            )
            committed = True
            _commit(stage, out, moves)
        finally:
            if not committed:  # nothing moved yet: the folder is as it was
                shutil.rmtree(stage, ignore_errors=True)

    def load_perspective_weights(self, directory: str | os.PathLike, name: str) -> None:
        """Load ``name``'s trained weights from a folder written by :meth:`save_pretrained`.

        Copies ``heads/<name>.safetensors`` into the head and ``adapters/<name>/`` (LoRA + projector
        copy) into the adapter of this model's existing perspective ``name``, in place (devices,
        dtypes and ``requires_grad`` are kept). Used to resume training from a checkpoint. Raises
        when a file is missing or the stored tensors do not cover the perspective's weights.
        """
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        self._check_perspective(name)
        path = Path(directory)
        finish_interrupted_save(path)
        head_file = path / HEADS_DIR / f"{name}.safetensors"
        if not head_file.is_file():
            raise FileNotFoundError(
                f"{head_file} is missing: {path} holds no weights for perspective {name!r} "
                "(write them with save_pretrained(perspectives=[...]))."
            )
        self.heads[name].load_state_dict(load_file(str(head_file)))
        if self.config.perspectives[name].get("lora") is None:
            return
        adapter_dir = path / ADAPTERS_DIR / name
        if not adapter_dir.is_dir() or not isinstance(self.backbone, PeftModel):
            raise FileNotFoundError(
                f"{adapter_dir} is missing: {path} holds no LoRA adapter for perspective {name!r}."
            )
        weights = load_peft_weights(str(adapter_dir), device="cpu")
        result = set_peft_model_state_dict(self.backbone, weights, adapter_name=name)
        owned = [
            k
            for k in result.missing_keys
            if f".{name}." in k and ("lora_" in k or "modules_to_save" in k)
        ]
        if owned or result.unexpected_keys:
            raise ValueError(
                f"{adapter_dir} does not match perspective {name!r} of this model (missing "
                f"{owned[:3]}, unexpected {list(result.unexpected_keys)[:3]}): was it trained with "
                "other LoRA settings?"
            )

    def _backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen backbone's own weights, without any adapter or projector copy."""
        state = {}
        for key, value in self._base.state_dict().items():
            if "lora_" in key or ".modules_to_save." in key:
                continue
            key = key.replace(".base_layer.", ".").replace(".original_module.", ".")
            state[key] = value
        return state

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        backbone: str | os.PathLike | PreTrainedModel | None = None,
        torch_dtype: torch.dtype | None = None,
        trust_remote_code: bool | None = None,
        perspectives: Sequence[str] | None = None,
        is_trainable: bool = False,
        max_length: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        **_: Any,
    ) -> LlavaRewardModel:
        """Load a saved reward folder. ``backbone`` overrides the stored reference (e.g. a local copy).

        ``trust_remote_code``: only the caller turns it on. A folder saved with it on (its
        backbone runs code of its own) is refused unless the caller passes True: a downloaded
        folder's ``config.json`` must not decide to run code.

        ``max_length``, ``min_pixels``, ``max_pixels`` override the saved token budget and Qwen
        image area range (None: the saved ones)."""
        path = Path(pretrained_model_name_or_path)
        finish_interrupted_save(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a LLaVA-Reward folder (no config.json); save one with save_pretrained()."
            )
        config = LlavaRewardConfig.from_pretrained(path)
        if config.trust_remote_code and trust_remote_code is None:
            raise ValueError(
                f"{path} was saved with remote code trusted: its backbone "
                f"({config.backbone!r}) runs code that ships with it. Load it with "
                "trust_remote_code set to true (--trust_remote_code) if you trust that code."
            )
        remote = config.trust_remote_code = bool(trust_remote_code)  # what this load did
        if backbone is None:
            backbone = config.backbone
            if backbone and not _is_local(backbone) and _is_local(str(path / backbone)):
                backbone = str(path / backbone)
        if backbone is None:
            raise ValueError(
                "the folder names no backbone; pass backbone= (hub id, folder or model)."
            )
        base = (
            load_backbone(backbone, torch_dtype, remote)
            if isinstance(backbone, (str, os.PathLike))
            else _drop_lm_head(backbone)
        )
        processor = RewardProcessor.from_pretrained(
            path / PROCESSOR_DIR,
            base.config,
            max_length=max_length,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )
        config.max_length = processor.max_length
        if min_pixels is not None or max_pixels is not None:
            config.min_pixels, config.max_pixels = processor.family.pixel_budget()
        names = list(perspectives or config.perspectives)
        for name in names:
            if name not in config.perspectives:
                raise UnknownPerspectiveError(
                    f"unknown perspective {name!r}; {path} has: {', '.join(config.perspectives)}."
                )
        stored = dict(config.perspectives)
        config.perspectives = {}
        model = cls(config, base, processor)
        for name in names:
            spec = stored[name]
            adapter_dir = path / ADAPTERS_DIR / name
            if spec.get("lora") is not None:
                if isinstance(model.backbone, PeftModel):
                    model.backbone.load_adapter(
                        str(adapter_dir), adapter_name=name, is_trainable=is_trainable
                    )
                else:
                    model.backbone = PeftModel.from_pretrained(
                        model.backbone,
                        str(adapter_dir),
                        adapter_name=name,
                        is_trainable=is_trainable,
                    )
            head = RewardHead(
                config.hidden_size,
                spec.get("head_dim", 1),
                spec.get("skipca", True),
                spec.get("norm_eps", 1e-6),
            )
            head.load_state_dict(load_file(str(path / HEADS_DIR / f"{name}.safetensors")))
            model.heads[name] = head.to(next(iter(base.parameters())).device)
            model.config.perspectives = {**model.config.perspectives, name: spec}
            if is_trainable:
                model._keep_trainable_fp32(name)
        if not is_trainable:
            model.requires_grad_(False)
        return model.eval()


def _lora_dict(lora: LoraConfig | dict | None) -> dict | None:
    """A JSON-able dict of LoRA settings (None = no adapter). Default targets: all LM linears."""
    if lora is None:
        return dict(PAPER_LORA)
    if isinstance(lora, LoraConfig):
        d = lora.to_dict()
        keep = (
            "r",
            "lora_alpha",
            "lora_dropout",
            "target_modules",
            "use_rslora",
            "use_dora",
            "bias",
        )
        out = {k: d[k] for k in keep if k in d and d[k] is not None}
        if isinstance(out.get("target_modules"), set):
            out["target_modules"] = sorted(out["target_modules"])
        return out
    if lora is False or lora == "none":
        return None
    return dict(lora)


def _last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token per row, for left or right padding: ``[B, L] -> [B]``."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.bool()).amax(dim=1)


def gather_visual_tokens(
    embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The visual token embeddings of each row, left-aligned and padded.

    ``embeds [B, L, d]``, ``input_ids/attention_mask [B, L]`` -> ``(visual [B, V, d], mask [B, V])``
    with ``V`` the largest count of image tokens in a row; ``mask`` is False at padding.
    """
    is_visual = (input_ids == image_token_id) & attention_mask.bool()
    counts = is_visual.sum(dim=1)
    v_max = max(int(counts.max().item()), 1)
    # rank of each visual token within its row -> its slot in [0, V)
    slot = torch.cumsum(is_visual.long(), dim=1) - 1
    b_idx, l_idx = is_visual.nonzero(as_tuple=True)
    visual = embeds.new_zeros((embeds.shape[0], v_max, embeds.shape[-1]))
    visual = visual.index_put((b_idx, slot[b_idx, l_idx]), embeds[b_idx, l_idx])
    mask = torch.arange(v_max, device=counts.device)[None, :] < counts[:, None]
    return visual, mask
