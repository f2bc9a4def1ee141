"""Evaluation of reward models: pure metrics, scoring a dataset, and JSON / markdown reports.

Pairwise metrics (:func:`pairwise_accuracy`), for pairs in the paired schema of ``reward.data``:

* a pair is *correct* when the model prefers the chosen image strictly:
  ``preference_logit(r_chosen, r_rejected) > 0`` (scalar heads: ``r_chosen > r_rejected``; GPM
  heads: ``c0*r1 - c1*r0 > 0``, the convention of ``reward.losses``);
* **model ties**: when the two rewards are exactly equal (logit exactly 0) the model expressed no
  preference, and the pair counts as *wrong* (a constant reward model scores 0, not 50 %). Their
  number is reported as ``n_model_ties``;
* ``accuracy`` = ``accuracy_with_ties``: over *all* pairs; a pair that the annotators marked as a
  tie (``tie=True``) always counts as wrong, as in the SPEC (a scalar reward cannot be credited
  for "neither");
* ``accuracy_without_ties``: over the pairs that are not annotator ties only;
* with categories (e.g. MJ-Bench subsets), the same numbers per category under ``per_category``.

Unpaired metrics (:func:`binary_metrics`), for single images with labels in ``[0, 1]``: the
prediction is positive when ``sigmoid(r) >= threshold`` (0.5, i.e. ``r >= 0``); a label is
positive when ``>= 0.5``. Accuracy, precision, recall, F1 and specificity of the positive class
(label 1, e.g. safe), with 0.0 where a ratio's denominator is empty.

Metrics are plain JSON-serialisable dicts; :func:`write_report` writes ``<name>.json`` and
``<name>.md`` (atomically). :func:`evaluate_scorer` scores a dataset with any object that has
``score(prompts, images, perspective=..., batch_size=...) -> Tensor[N]`` (``RewardScorer``).

:func:`evaluate_reward_folder` (``recipes/eval_reward.py``) scores data files with a saved reward
folder, each file under the perspective it is for (:func:`assign_perspectives`: named, or inferred
from the records' ``perspective`` field or the data's kind; an error when ambiguous).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from reward.data import ON_ERROR_HELP, load_image_ref
from reward.files import atomic_write_text
from reward.guards import validate_config
from reward.losses import preference_logit

logger = logging.getLogger(__name__)


class SupportsScore(Protocol):
    def score(
        self, prompts: list[str], images: list, perspective: str, batch_size: int
    ) -> torch.Tensor: ...


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else float(num) / float(den)


def _safe(num: float, den: float) -> float:
    return 0.0 if den == 0 else float(num) / float(den)


def _as_bool(x: Sequence[bool] | torch.Tensor | None, n: int, name: str) -> torch.Tensor:
    if x is None:
        return torch.zeros(n, dtype=torch.bool)
    t = torch.as_tensor(list(x) if not isinstance(x, torch.Tensor) else x).bool().reshape(-1)
    if t.numel() != n:
        raise ValueError(f"{name}: expected {n} values, got {t.numel()}.")
    return t


def _groups(categories: Sequence[str | None] | None, n: int) -> dict[str, torch.Tensor]:
    if categories is None:
        return {}
    categories = list(categories)
    if len(categories) != n:
        raise ValueError(f"categories: expected {n} values, got {len(categories)}.")
    out: dict[str, torch.Tensor] = {}
    for name in sorted({c for c in categories if c is not None}):
        out[name] = torch.tensor([c == name for c in categories], dtype=torch.bool)
    return out


def _pairwise(correct: torch.Tensor, tie: torch.Tensor, model_tie: torch.Tensor) -> dict:
    n = int(correct.numel())
    n_ties = int(tie.sum())
    n_correct = int(correct.sum())
    with_ties = _ratio(n_correct, n)
    return {
        "accuracy": with_ties,
        "accuracy_with_ties": with_ties,
        "accuracy_without_ties": _ratio(n_correct, n - n_ties),
        "n_pairs": n,
        "n_ties": n_ties,
        "n_model_ties": int((model_tie & ~tie).sum()),
        "n_correct": n_correct,
    }


def pairwise_accuracy(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    tie: Sequence[bool] | torch.Tensor | None = None,
    categories: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """Pairwise accuracy with and without annotator ties (see the module docstring).

    ``r_chosen, r_rejected: Tensor[N]`` (scalar heads) or ``Tensor[N, 2]`` (GPM heads);
    ``tie: bool[N]`` marks annotator ties (their ``chosen`` / ``rejected`` order is arbitrary);
    ``categories: [N]`` strings or None.

    ``accuracy = accuracy_with_ties = #{not tie and logit > 0} / N``;
    ``accuracy_without_ties = #{not tie and logit > 0} / #{not tie}``, with
    ``logit = preference_logit(r_chosen, r_rejected)``. Ratios over no pairs are None.
    """
    logit = preference_logit(r_chosen.detach().cpu(), r_rejected.detach().cpu(), tau=1.0)
    n = int(logit.numel())
    tie_t = _as_bool(tie, n, "tie")
    model_tie = logit == 0
    correct = (logit > 0) & ~tie_t
    out = _pairwise(correct, tie_t, model_tie)
    groups = _groups(categories, n)
    if groups:
        out["per_category"] = {
            name: _pairwise(correct[m], tie_t[m], model_tie[m]) for name, m in groups.items()
        }
    return out


def _binary(pred: torch.Tensor, pos: torch.Tensor) -> dict:
    tp = int((pred & pos).sum())
    fp = int((pred & ~pos).sum())
    tn = int((~pred & ~pos).sum())
    fn = int((~pred & pos).sum())
    precision = _safe(tp, tp + fp)
    recall = _safe(tp, tp + fn)
    n = tp + fp + tn + fn
    return {
        "accuracy": _ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _safe(2 * precision * recall, precision + recall),
        "specificity": _safe(tn, tn + fp),
        "n": n,
        "n_positive": tp + fn,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def binary_metrics(
    r: torch.Tensor,
    labels: Sequence[float] | torch.Tensor,
    threshold: float = 0.5,
    categories: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """Accuracy / precision / recall / F1 / specificity of single-image rewards.

    ``r: Tensor[N]`` (logits, as trained by ``unpaired_bce_loss``), ``labels: [N]`` in ``[0, 1]``.
    ``pred_i = sigmoid(r_i) >= threshold``, ``pos_i = labels_i >= 0.5``;
    ``precision = tp / (tp + fp)``, ``recall = tp / (tp + fn)``,
    ``f1 = 2 P R / (P + R)``, ``specificity = tn / (tn + fp)`` (0.0 when a denominator is 0).
    """
    r = r.detach().cpu().float()
    if r.ndim == 2 and r.shape[-1] == 1:
        r = r.squeeze(-1)
    if r.ndim != 1:
        raise ValueError(
            f"binary_metrics: expected scalar rewards [N], got {tuple(r.shape)} "
            "(a 2-d GPM head has no single-image probability)."
        )
    y = torch.as_tensor(labels).float().reshape(-1)
    if y.numel() != r.numel():
        raise ValueError(f"labels: expected {r.numel()} values, got {y.numel()}.")
    pred = torch.sigmoid(r) >= threshold
    pos = y >= 0.5
    out = _binary(pred, pos)
    out["threshold"] = threshold
    groups = _groups(categories, r.numel())
    if groups:
        out["per_category"] = {name: _binary(pred[m], pos[m]) for name, m in groups.items()}
    return out


# ----------------------------------------------------------------------------- scoring


def _columns(dataset: Any) -> list[str]:
    if hasattr(dataset, "column_names"):
        return list(dataset.column_names)
    if len(dataset) == 0:
        return []
    return list(dataset[0].keys())


def _rows(dataset: Any, start: int, stop: int) -> list[dict]:
    if hasattr(dataset, "column_names"):  # datasets.Dataset: a slice is a dict of lists
        batch = dataset[start:stop]
        keys = list(batch)
        return [dict(zip(keys, vals)) for vals in zip(*(batch[k] for k in keys))]
    return [dict(r) for r in dataset[start:stop]]


def score_dataset(
    scorer: SupportsScore,
    dataset: Any,
    perspective: str = "overall",
    batch_size: int = 16,
    *,
    chunk_size: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score every example of a dataset in the common schema (``reward.data``).

    ``dataset``: a ``datasets.Dataset`` (decoded or raw refs) or a list of dicts. Paired data
    returns ``{"chosen": Tensor, "rejected": Tensor, "tie": [bool], "category": [str|None]}``;
    unpaired data ``{"image": Tensor, "label": [float], "category": [...]}``. Images are decoded
    ``chunk_size`` examples at a time (default ``8 * batch_size``); each chunk is one
    ``scorer.score`` call (paired: chosen and rejected images together).
    """
    cols = _columns(dataset)
    paired = "chosen" in cols and "rejected" in cols
    if not paired and "image" not in cols:
        raise ValueError(
            f"dataset columns {cols} match neither the paired schema (prompt, chosen, rejected) "
            "nor the unpaired one (prompt, image, label); read it with reward.data."
        )
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty: nothing to evaluate.")
    chunk = chunk_size or 8 * batch_size
    starts = range(0, n, chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"scoring ({perspective})", unit="chunk")
    out: dict[str, list] = {"category": []}
    out.update({"chosen": [], "rejected": [], "tie": []} if paired else {"image": [], "label": []})
    for start in starts:
        rows = _rows(dataset, start, min(start + chunk, n))
        prompts = [str(r["prompt"]) for r in rows]
        k = len(rows)

        image_cols = ("chosen", "rejected") if paired else ("image",)
        images = [
            load_image_ref(r[col], name=f"{col} of example {start + i}")
            for col in image_cols
            for i, r in enumerate(rows)
        ]
        rewards = scorer.score(
            prompts * len(image_cols), images, perspective=perspective, batch_size=batch_size
        )
        rewards = torch.as_tensor(rewards).detach().float().cpu()
        if rewards.shape[0] != len(images):
            raise ValueError(
                f"scorer returned {rewards.shape[0]} rewards for {len(images)} images."
            )
        if paired:
            out["chosen"].append(rewards[:k])
            out["rejected"].append(rewards[k:])
            out["tie"] += [bool(r.get("tie", False)) for r in rows]
        else:
            out["image"].append(rewards)
            out["label"] += [float(r["label"]) for r in rows]
        out["category"] += [r.get("category") for r in rows]
    for key in ("chosen", "rejected", "image"):
        if key in out:
            out[key] = torch.cat(out[key])
    return out


def evaluate_scorer(
    scorer: SupportsScore,
    dataset: Any,
    perspective: str = "overall",
    batch_size: int = 16,
    *,
    threshold: float = 0.5,
    chunk_size: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score ``dataset`` with ``scorer`` under ``perspective`` and return its metrics.

    Paired data: :func:`pairwise_accuracy` (with ties / without ties, per category when the
    dataset has categories); unpaired data: :func:`binary_metrics` at ``threshold``. The result
    also holds ``perspective``, ``kind`` ("paired" / "unpaired") and ``n_examples``.
    """
    s = score_dataset(
        scorer, dataset, perspective, batch_size, chunk_size=chunk_size, progress=progress
    )
    cats = s["category"] if any(c is not None for c in s["category"]) else None
    if "chosen" in s:
        metrics = pairwise_accuracy(s["chosen"], s["rejected"], s["tie"], cats)
        kind = "paired"
    else:
        metrics = binary_metrics(s["image"], s["label"], threshold, cats)
        kind = "unpaired"
    return {"perspective": perspective, "kind": kind, "n_examples": len(s["category"]), **metrics}


# ----------------------------------------------------------------------------- reports


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def _scalar_items(m: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in m.items() if not isinstance(v, (Mapping, list, tuple))]


def _section_md(m: Mapping[str, Any], heading: str | None) -> list[str]:
    lines = [f"## {heading}", ""] if heading else []
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in _scalar_items(m)]
    per = m.get("per_category")
    if isinstance(per, Mapping) and per:
        keys = [k for k, _ in _scalar_items(next(iter(per.values())))]
        lines += ["", "| category | " + " | ".join(keys) + " |"]
        lines += ["|---|" + "---|" * len(keys)]
        for name, cm in per.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(cm.get(k)) for k in keys) + " |")
    return lines + [""]


def format_markdown(metrics: Mapping[str, Any], title: str = "Reward model evaluation") -> str:
    """A markdown report: a metric/value table, then a per-category table when present.

    ``metrics`` is one metrics dict, or ``{section_name: metrics dict}`` for several datasets.
    """
    lines = [f"# {title}", ""]
    sections = {k: v for k, v in metrics.items() if isinstance(v, Mapping) and k != "per_category"}
    if _scalar_items(metrics) or not sections:
        lines += _section_md(metrics, None)
    else:
        for name, m in sections.items():
            lines += _section_md(m, name)
    return "\n".join(lines)


def write_report(
    metrics: Mapping[str, Any],
    output_dir: str | os.PathLike,
    name: str = "eval_report",
    title: str = "Reward model evaluation",
) -> tuple[Path, Path]:
    """Write ``metrics`` to ``output_dir/<name>.json`` and ``output_dir/<name>.md`` (each file
    written to a temporary name and renamed into place). Returns both paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    atomic_write_text(json_path, json.dumps(metrics, indent=2, sort_keys=False) + "\n")
    atomic_write_text(md_path, format_markdown(metrics, title))
    return json_path, md_path


# ----------------------------------------------------------------------------- a reward folder on data

#: Perspectives that score single images (the paper trains safety on UnsafeBench, safe = 1); the
#: others score pairs. Used to tell which perspective a data file without a ``perspective`` field
#: is for.
UNPAIRED_PERSPECTIVES = ("safety",)


def assign_perspectives(
    reports: Sequence[Any], available: Sequence[str], requested: Sequence[str] = ()
) -> dict[str, list[int]]:
    """Which perspective scores which data file: ``{perspective: [file indices]}``.

    ``reports``: one ``reward.data.ReadReport`` (``source``, ``kind``, ``perspectives``) per file;
    ``available``: the model's perspectives; ``requested``: names given by the user (``["all"]``:
    every perspective on every file). Without names each file gets the perspective its data is
    for: the one its records' ``perspective`` field names; else the model's only perspective;
    else the one perspective of the file's kind (single images: :data:`UNPAIRED_PERSPECTIVES`,
    pairs: the others). Anything else (several candidates, none, a name the model lacks) raises a
    ``ValueError`` that lists the model's perspectives and the fix: perspectives are never all
    scored on data meant for one.
    """
    from reward.modeling import UnknownPerspectiveError

    available = list(available)
    if not available:
        raise ValueError("the model holds no perspective to evaluate.")
    held = ", ".join(available)
    requested = [p for p in requested if p]
    if "all" in requested:
        return {p: list(range(len(reports))) for p in available}
    for p in requested:
        if p not in available:
            raise UnknownPerspectiveError(
                f"unknown perspective {p!r}; the model holds {held} ('all' scores every one)."
            )
    if requested:
        for r in reports:
            if r.perspectives and not set(requested) <= set(r.perspectives):
                logger.warning(
                    "%s names perspective(s) %s but is scored under %s as asked",
                    r.source,
                    ", ".join(r.perspectives),
                    ", ".join(requested),
                )
        return {p: list(range(len(reports))) for p in requested}
    plan: dict[str, list[int]] = {}
    fix = "pass --perspective NAME, or add a 'perspective' field to the records"
    for i, r in enumerate(reports):
        if len(r.perspectives) > 1:
            raise ValueError(
                f"{r.source} names several perspectives ({', '.join(r.perspectives)}) in its "
                "records' 'perspective' field: split it into one file per perspective, or pass "
                "--perspective NAME."
            )
        if r.perspectives:
            name = r.perspectives[0]
            if name not in available:
                raise ValueError(
                    f"{r.source} is for perspective {name!r} (its records' 'perspective' field), "
                    f"which the model does not hold (it holds {held}); pass --perspective NAME to "
                    "score it under another."
                )
        elif len(available) == 1:
            name = available[0]
        else:
            same_kind = [
                p for p in available if (p in UNPAIRED_PERSPECTIVES) == (r.kind == "unpaired")
            ]
            if len(same_kind) != 1:
                which = f" ({', '.join(same_kind)} take {r.kind} data)" if same_kind else ""
                raise ValueError(
                    f"cannot tell which perspective {r.source} ({r.kind} data) is for: the model "
                    f"holds {held}{which}; {fix}."
                )
            name = same_kind[0]
        plan.setdefault(name, []).append(i)
    return plan


@dataclass
class EvalScriptArguments:
    """What ``recipes/eval_reward.py`` evaluates: a reward folder on data files."""

    model_dir: str = field(metadata={"help": "A LLaVA-Reward folder (save_pretrained / recipe)."})
    data_file: list[str] = field(
        metadata={"help": "Data files of any supported format (detected per file; ties kept)."}
    )
    perspective: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Perspective(s) to score the data under ('all': every one the folder holds). "
            "Default: per file, the perspective its data is for: its records' 'perspective' "
            "field, else the folder's only perspective, else the one of the data's kind (safety "
            "for single images, the other one for pairs); an error when that is ambiguous."
        },
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Where reports go (default: MODEL_DIR/eval)."}
    )
    report_name: str = field(
        default="eval_report", metadata={"help": "Reports are <name>_<perspective>.json / .md."}
    )
    image_root: str | None = field(
        default=None, metadata={"help": "Folder for relative image paths (default: the file's)."}
    )
    on_error: str = field(
        default="skip", metadata={"help": ON_ERROR_HELP.format(skipped="skipped_eval.jsonl")}
    )
    batch_size: int = field(default=16, metadata={"help": "Scoring batch size."})
    device: str | None = field(
        default=None,
        metadata={"help": "cpu, cuda, cuda:1 ... (None: this process's GPU when there is one)."},
    )
    dtype: str | None = field(
        default=None, metadata={"help": "float32, bfloat16 ... (default: bf16 on a GPU)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow the backbone's own code (Phi-3.5-vision)."}
    )

    RANGES: ClassVar[dict[str, str]] = {"batch_size": ">= 1"}

    def __post_init__(self) -> None:
        validate_config(self)


def evaluate_reward_folder(script: EvalScriptArguments) -> dict[str, dict[str, Any]]:
    """Score each of ``script.data_file`` under the perspective it is for
    (:func:`assign_perspectives`) and write ``<report_name>_<perspective>.json`` / ``.md`` per
    perspective (and the skipped records to ``skipped_eval.jsonl``) into the output folder.
    The data is read and the perspectives chosen before the model is loaded. Returns
    ``{perspective: metrics}``."""
    from reward.configuration import LlavaRewardConfig
    from reward.data import load_reward_data, write_skipped
    from reward.modeling import finish_interrupted_save
    from reward.scorer import RewardScorer
    from reward.training import evaluate_dataset, mix_datasets, write_reward_report

    out = Path(script.output_dir or Path(script.model_dir) / "eval")
    kwargs: dict[str, Any] = {"on_error": script.on_error, "keep_ties": True}
    if script.image_root:
        kwargs["image_root"] = script.image_root
    reads = [load_reward_data(f, **kwargs) for f in script.data_file]
    reports = [r.report for r in reads]
    write_skipped(out / "skipped_eval.jsonl", reports)
    finish_interrupted_save(script.model_dir)  # before its perspectives are read
    config = LlavaRewardConfig.from_pretrained(script.model_dir)
    plan = assign_perspectives(reports, list(config.perspectives), script.perspective)
    scorer = RewardScorer.from_pretrained(
        script.model_dir,
        device=script.device,
        dtype=script.dtype,
        trust_remote_code=script.trust_remote_code,
    )
    results = {}
    for name, files in plan.items():
        dataset = mix_datasets([reads[i].dataset for i in files])
        metrics = evaluate_dataset(scorer, dataset, name, script.batch_size)
        metrics["data_files"] = [str(script.data_file[i]) for i in files]
        metrics["n_skipped_records"] = sum(reports[i].n_skipped for i in files)
        write_reward_report(metrics, out, f"{script.report_name}_{name}", name)
        results[name] = metrics
    return results


__all__ = [
    "EvalScriptArguments",
    "UNPAIRED_PERSPECTIVES",
    "assign_perspectives",
    "evaluate_reward_folder",
    "SupportsScore",
    "binary_metrics",
    "evaluate_scorer",
    "format_markdown",
    "pairwise_accuracy",
    "score_dataset",
    "write_report",
]
