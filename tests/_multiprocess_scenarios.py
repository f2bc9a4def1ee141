"""Short training scenarios for ``tests/test_multiprocess.py``, run through the recipes' ``main``.

One launch runs many scenarios in sequence (process start-up is most of the cost), each under
plain DDP (``ddp=1``: ``ACCELERATE_USE_CPU=1``) or DeepSpeed (``ds_config=FILE``), e.g.

    torchrun --nproc_per_node 2 tests/_multiprocess_scenarios.py --out OUT --records OUT/records \
        --tiny TINY_PIPELINE --prompts PROMPTS.txt ddpo:ddp=1 dpo_build:ddp=1 \
        ddpo:ds_config=zero2.json,label=zero2_ddpo ddpo:ds_config=zero3_partition_all.json,...

(DDP first: DeepSpeed's ZeRO-3 leaves its own hooks in torch behind, which shifts later runs by
float rounding.)

Each scenario calls a recipe's ``main(argv)`` (``recipes/*.py`` with the tiny YAML config and
overrides for 1-2 steps), records what this process drew (prompts, noise, sample indices, ReFL
stop steps, reward-model batches) through wrappers of the trainers' methods, and after training
the trained weights gathered whole (their SHA-256), the trainer's counters and, under ZeRO-3, how
much of the model this process holds. The record goes to ``RECORDS/<record>.rank<r>.json``; the
tests compare the ranks' records. The same :func:`run_scenario` runs in the test process for
one-process runs.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import hashlib
import json
import os
import runpy
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # torchrun runs this file as a script
    sys.path.insert(0, str(ROOT))

#: scenario -> (recipe, tiny config, overrides); ``{out}``, ``{tiny}``, ``{prompts}`` are filled in
POLICY = {"log_with": "none", "progress_bar": "false", "save_every": "1", "keep_last": "1"}
SCENARIOS: dict[str, tuple[str, str, dict[str, str]]] = {
    "ddpo": (
        "ddpo_sd15",
        "ddpo_tiny.yaml",
        {
            **POLICY,
            "num_steps": "2",
            "sample_batch_size": "2",
            "num_batches_per_epoch": "1",
            "train_batch_size": "2",
            "gradient_accumulation_steps": "1",
            "timesteps_per_call": "2",
            "num_epochs": "1",
            "log_images_every": "0",
        },
    ),
    "dpo_build": (  # build_data: every process samples its share of 3 prompts, then offline DPO
        "dpo_sd15",
        "dpo_tiny.yaml",
        {
            **POLICY,
            "data": "{out}/pairs/pairs.jsonl",
            "build_data": "true",
            "images_per_prompt": "2",
            "num_steps": "2",
            "sample_batch_size": "4",
            "max_steps": "1",
            "train_batch_size": "1",
            "gradient_accumulation_steps": "1",
            "eval_every": "0",
        },
    ),
    "dpo_online": (
        "dpo_sd15",
        "dpo_tiny.yaml",
        {
            **POLICY,
            "save_every": "0",
            "data": "online",
            "build_data": "false",
            "images_per_prompt": "2",
            "prompts_per_refresh": "1",
            "refresh_every": "4",
            "num_steps": "2",
            "max_steps": "1",
            "train_batch_size": "1",
            "gradient_accumulation_steps": "1",
            "eval_every": "0",
        },
    ),
    "draft": (
        "draft_sd15",
        "draft_tiny.yaml",
        {
            **POLICY,
            "save_every": "0",
            "num_steps": "2",
            "max_steps": "1",
            "train_batch_size": "1",
            "eval_every": "0",
        },
    ),
    "refl": (  # a wide stop window: the stop step changes between micro-batches
        "draft_sd15",
        "draft_tiny.yaml",
        {
            **POLICY,
            "save_every": "0",
            "method": "refl",
            "loss_type": "relu",
            "num_steps": "4",
            "refl_min_step": "0",
            "refl_max_step": "4",
            "max_steps": "1",
            "train_batch_size": "1",
            "gradient_accumulation_steps": "2",
            "eval_every": "0",
        },
    ),
    "grpo": (  # groups of 4 over 2 ranks x 2 images: each group spans both ranks
        "grpo_sd3",
        "grpo_tiny.yaml",
        {
            **POLICY,
            "pretrained_model": "tiny-sd3",
            "num_steps": "2",
            "eval_num_steps": "2",
            "sample_batch_size": "2",
            "num_batches_per_epoch": "2",
            "images_per_prompt": "4",
            "train_batch_size": "2",
            "gradient_accumulation_steps": "2",
            "timesteps_per_call": "2",
            "num_epochs": "1",
            "eval_every": "1",
            "num_eval_images": "3",  # shared 2 + 1 (padded to equal transformer calls)
            "log_images_every": "0",
        },
    ),
    "reward": (
        "train_reward",
        "reward_tiny.yaml",
        {
            "toy_n_train": "16",
            # 11 = 6 + 5: the eval statistics must be over both shards, and the last batch (3
            # rows per rank) is padded with a repeat of pair 0 that must not count twice
            "toy_n_eval": "11",
            "eval_strategy": "steps",
            "eval_steps": "2",
            "max_steps": "2",
            "per_device_train_batch_size": "2",
            "per_device_eval_batch_size": "3",
            "save_steps": "2",
            "logging_steps": "1",
            "report_to": "none",
            "n_fixed_scores": "2",
        },
    ),
}


def scenario_argv(
    name: str, folder: Path, tiny: str, prompts: str, **extra: Any
) -> tuple[str, list[str]]:
    """The recipe and its command line for scenario ``name`` writing under ``folder``
    (``extra``: further overrides, e.g. ``resume_from="latest"``)."""
    recipe, config, overrides = SCENARIOS[name]
    values = {**overrides, **{k: str(v) for k, v in extra.items()}}
    if recipe != "train_reward":
        values.setdefault("pretrained_model", tiny)
        values.setdefault("prompts", prompts)
        values.setdefault("export_dir", str(folder / "export"))
    values.setdefault("output_dir", str(folder))
    fill = {"out": str(folder), "tiny": tiny, "prompts": prompts}
    argv = ["--config", str(ROOT / "recipes" / "configs" / config)]
    for key, value in values.items():
        argv += [f"--{key}", value.format(**fill)]
    return recipe, argv


# ----------------------------------------------------------------------------- instrumentation


def _wrap(owner: Any, attr: str, record: Any, draws: list, patches: list) -> None:
    """Replace ``owner.attr`` by a wrapper that appends ``record(args, kwargs, result)`` to
    ``draws``; ``patches`` gets what :func:`_restore` needs."""
    original = getattr(owner, attr)
    own = attr in vars(owner)  # else inherited: restoring deletes the wrapper

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        draws.append(record(args, kwargs, result))
        return result

    patches.append((owner, attr, original if own else None))
    setattr(owner, attr, wrapper)


def _restore(patches: list) -> None:
    for owner, attr, original in reversed(patches):
        if original is None:
            delattr(owner, attr)
        else:
            setattr(owner, attr, original)


def _floats(t: Any) -> list[float]:
    return [round(float(v), 6) for v in t.detach().float().flatten(1).sum(1).cpu()]


@contextlib.contextmanager
def recording() -> Iterator[tuple[list, list]]:
    """Record what the trainers draw; yields ``(draws, trainers)`` (trainers: every trainer
    whose ``train`` ran)."""
    import alignment.checkpointing as checkpointing
    import alignment.dpo_trainer as dpo
    from alignment.ddpo_trainer import DDPOTrainer
    from alignment.draft_trainer import DraftTrainer
    from alignment.grpo_trainer import GRPOTrainer
    from reward.training import RewardTrainer

    draws: list[dict[str, Any]] = []
    trainers: list[Any] = []
    patches: list = []

    def ddpo_epoch(args, kwargs, result):
        samples, _ = result
        return {"prompts": samples["prompts"], "noise": _floats(samples["latents"][:, 0])}

    def dpo_loss(args, kwargs, result):
        _, prompts, lat_w, _lat_l = args[:4]
        return {
            "prompts": prompts,
            "ids": list(kwargs.get("sample_ids") or []),
            "lat": _floats(lat_w),
        }

    def dpo_sampled(args, kwargs, result):
        return {"sampled_prompt_ids": list(kwargs.get("prompt_ids") or [])}

    def draft_loss(args, kwargs, result):
        _, prompts, gens, stop = (*args, None, None)[:4]
        return {
            "prompts": prompts,
            "noise_seeds": [g.initial_seed() for g in gens or []],
            "stop": stop,
            "reward": round(result[1]["reward_mean"], 6),
        }

    def reward_loss(args, kwargs, result):
        inputs = args[2] if len(args) > 2 else kwargs["inputs"]
        return {
            "input_ids": int(inputs["input_ids"].sum()),
            "pixels": round(float(inputs["pixel_values"].float().sum()), 3),
        }

    def grpo_advantages(args, kwargs, result):
        _, prompts, rewards = args[:3]
        adv, gathered = result
        return {
            "group_prompts": list(prompts),
            "advantages": [round(float(a), 6) for a in adv.cpu()],
            "gathered_rewards": [float(r) for r in gathered],
        }

    def reward_eval(args, kwargs, result):
        return {"eval_metrics": {k: v for k, v in result.items() if "accuracy" in k}}

    def grpo_eval(args, kwargs, result):
        return {"eval": round(result["eval/reward_mean"], 6)}

    def capture(args, kwargs, result):
        trainers.append(args[0])
        return {"trained": type(args[0]).__name__}

    _wrap(DDPOTrainer, "sample_epoch", ddpo_epoch, draws, patches)
    _wrap(GRPOTrainer, "sample_epoch", ddpo_epoch, draws, patches)
    _wrap(GRPOTrainer, "compute_advantages", grpo_advantages, draws, patches)
    _wrap(GRPOTrainer, "evaluate", grpo_eval, draws, patches)
    _wrap(dpo.DPOTrainer, "compute_loss", dpo_loss, draws, patches)
    _wrap(dpo, "sample_ranked", dpo_sampled, draws, patches)
    _wrap(DraftTrainer, "compute_loss", draft_loss, draws, patches)
    _wrap(RewardTrainer, "compute_loss", reward_loss, draws, patches)
    _wrap(RewardTrainer, "evaluate", reward_eval, draws, patches)
    for cls in (DDPOTrainer, GRPOTrainer, dpo.DPOTrainer, DraftTrainer, RewardTrainer):
        _wrap(cls, "train", capture, draws, patches)

    def loaded(args, kwargs, result):
        accelerator, path = args[:2]
        return {"weights_loaded": weights_record(accelerator._models[0]), "from": str(path)}

    _wrap(checkpointing, "load_trainable_weights", loaded, draws, patches)
    # ``end_training`` destroys the process group; the next scenario of this launch would
    # re-create it through a rendezvous store that still holds the first one's keys: keep it
    from accelerate.state import PartialState

    patches.append((PartialState, "destroy_process_group", PartialState.destroy_process_group))
    PartialState.destroy_process_group = lambda self, group=None: None
    try:
        yield draws, trainers
    finally:
        _restore(patches)


def _model_of(trainer: Any) -> Any:
    model = trainer.unet if hasattr(trainer, "unet") else trainer.model_wrapped
    return getattr(model, "module", model)


def weights_sha(named: dict[str, Any]) -> str:
    """SHA-256 of named tensors as float32, in name order (the same for a live model's
    parameters and a ``trainable.safetensors`` file of them)."""
    digest = hashlib.sha256()
    for name in sorted(named):
        data = named[name].detach().float().cpu().contiguous()
        digest.update(name.encode() + data.numpy().tobytes())
    return digest.hexdigest()


def weights_record(model: Any) -> dict[str, Any]:
    """The trainable weights of ``model`` gathered whole (call on every process): their
    :func:`weights_sha`, count and sum of ``|lora_B|`` (LoRA B starts at zero: > 0 once trained).
    Under ZeRO-3 also how it is partitioned: the number of persistent parameters (kept whole),
    the elements held whole right now (0 when every parameter is released), this process's
    shard elements against the model's total, and those of its largest parameter."""
    import deepspeed

    model = getattr(model, "module", model)
    out: dict[str, Any] = {}
    params = list(model.parameters())
    if params and all(hasattr(p, "ds_tensor") for p in params):  # ZeRO-3, between forwards
        out["persistent"] = sum(bool(getattr(p, "ds_persist", False)) for p in params)
        out["held_whole"] = int(sum(p.data.numel() for p in params))  # 0: all released
        out["local_elements"] = int(sum(p.ds_tensor.numel() for p in params))
        out["total_elements"] = int(sum(p.ds_numel for p in params))
        big = max(params, key=lambda p: p.ds_numel)
        out["largest"] = [int(big.ds_tensor.numel()), int(big.ds_numel)]
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=None):
        out["sha"] = weights_sha(named)
        out["lora_b_abs"] = sum(
            float(p.detach().abs().sum()) for n, p in named.items() if "lora_B" in n
        )
    out["n"] = len(named)
    return out


def _counters(trainer: Any) -> dict[str, Any]:
    keys = ("epoch", "global_step", "samples_seen")
    found = {k: getattr(trainer, k) for k in keys if isinstance(getattr(trainer, k, None), int)}
    if hasattr(trainer, "state") and hasattr(trainer.state, "global_step"):
        found["global_step"] = trainer.state.global_step
    return found


def reset_accelerate() -> None:
    """Forget accelerate's (and transformers' DeepSpeed) state between scenarios; the process
    group stays."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations import unset_hf_deepspeed_config

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    unset_hf_deepspeed_config()


def run_scenario(
    name: str,
    folder: Path,
    tiny: str,
    prompts: str,
    expect_error: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """Run scenario ``name`` (see :data:`SCENARIOS`) writing under ``folder`` in this process
    and return its record (``expect_error``: a ``ValueError`` is expected; its message is
    recorded)."""
    recipe, argv = scenario_argv(name, folder, tiny, prompts, **extra)
    main = runpy.run_path(str(ROOT / "recipes" / f"{recipe}.py"), run_name=f"recipe_{recipe}")
    record: dict[str, Any] = {
        "rank": int(os.environ.get("RANK", "0")),
        "world": int(os.environ.get("WORLD_SIZE", "1")),
        "argv": argv,
    }
    t0 = time.perf_counter()
    with recording() as (draws, trainers):
        try:
            main["main"](argv)
        except ValueError as err:
            if not expect_error:
                raise
            record["error"] = str(err)
        record["draws"] = [d for d in draws if "trained" not in d]
        if trainers and "error" not in record:
            trainer = trainers[-1]
            record["weights"] = weights_record(_model_of(trainer))
            record["counters"] = _counters(trainer)
            history = getattr(trainer, "history", None)
            record["history"] = history if history is not None else trainer.state.log_history
            acc = getattr(trainer, "accelerator", None)
            record["distributed_type"] = str(acc.distributed_type.value) if acc else None
            record["num_processes"] = acc.num_processes if acc else None
    reset_accelerate()
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="Scenario NAME writes under OUT/LABEL.")
    parser.add_argument(
        "--records", required=True, help="Records go to RECORDS/RECORD.rank<r>.json"
    )
    parser.add_argument("--tiny", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument(
        "--hang_timeout",
        type=float,
        default=180.0,
        help="Seconds a scenario may take before every thread's stack is dumped and the process "
        "exits (a collective that never completes would otherwise hang until the test's timeout).",
    )
    parser.add_argument(
        "scenarios",
        nargs="+",
        help="NAME, or NAME:key=value,...: overrides of the recipe's options, and label= (the "
        "folder under OUT; default NAME), record= (default LABEL), ds_config= (a file in "
        "ds_configs/ for this scenario), expect_error=1 (a ValueError is expected)",
    )
    args = parser.parse_args(argv)
    out, records = Path(args.out), Path(args.records)
    rank = int(os.environ.get("RANK", "0"))
    records.mkdir(parents=True, exist_ok=True)
    for spec in args.scenarios:
        name, _, rest = spec.partition(":")
        extra = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
        expect_error = extra.pop("expect_error", "0") == "1"
        label = extra.pop("label", name)
        record_name = extra.pop("record", label)
        if "ds_config" in extra:  # DeepSpeed with this config
            os.environ.pop("ACCELERATE_USE_CPU", None)
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            ds_config = str(ROOT / "ds_configs" / extra.pop("ds_config"))
            os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = ds_config
        elif extra.pop("ddp", "0") == "1":  # plain DDP on the CPU
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
            os.environ["ACCELERATE_USE_CPU"] = "1"
        folder = out / label
        faulthandler.dump_traceback_later(args.hang_timeout, exit=True)
        try:
            record = run_scenario(name, folder, args.tiny, args.prompts, expect_error, **extra)
            faulthandler.cancel_dump_traceback_later()
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)  # torchrun stops the other ranks
        path = records / f"{record_name}.rank{rank}.json"
        path.write_text(json.dumps(record, indent=1), encoding="utf-8")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
