"""GPU-only paths the CPU suite can only imitate, run for real on one CUDA GPU (``bench/gpu.sh 0``).

1. DDPO on one GPU without DeepSpeed, ``mixed_precision="fp16"`` (a real native-amp GradScaler),
   the asynchronous reward thread on (accelerate's device is the index-less ``cuda``): a NaN
   loss in epoch 0 must be skipped through the scaler (scale halved, LR schedule held) and
   epoch 1 must train. Before the fixes the reward thread's pool broke on ``set_device("cuda")``
   and the step after a skip raised ``unscale_() has already been called``.
2. Reward training with ``fp16=True`` on a bf16-capable GPU (it was refused: "At most one of
   fp16 and bf16"), a NaN loss at the first step: skipped through the scaler, LR held, the
   weights finite and trained by step 2.

Writes ``OUT/gpu_checks.json`` (``OUT``: argv[1]); exits non-zero when a check fails.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def ddpo_fp16_async(tmp: Path) -> dict:
    from _tiny_sd import tiny_ddpo_config  # the tests' few-second DDPO run

    import alignment.online_trainer as online_trainer
    from alignment.ddpo_trainer import DDPOTrainer

    cfg = tiny_ddpo_config(tmp / "ddpo", mixed_precision="fp16", async_reward=True)
    trainer = DDPOTrainer(cfg)
    acc = trainer.accelerator
    real = online_trainer.ppo_clip_loss

    def loss(*args, **kw):
        out = real(*args, **kw)
        return out * float("nan") if trainer.epoch == 0 else out

    online_trainer.ppo_clip_loss = loss
    try:
        scale0 = acc.scaler.get_scale()
        trainer.train()
    finally:
        online_trainer.ppo_clip_loss = real
    out = {
        "device": str(acc.device),
        "scaler": type(acc.scaler).__name__,
        "scale_before": scale0,
        "scale_after": acc.scaler.get_scale(),
        "skipped_steps": [h["train/skipped_steps"] for h in trainer.history],
        "global_step": trainer.global_step,
        "lr_scheduler_last_epoch": trainer.lr_scheduler.last_epoch,
        "weights_finite": all(torch.isfinite(p).all().item() for p in trainer.trainable),
    }
    out["ok"] = (
        out["skipped_steps"] == [1.0, 1.0]
        and out["scale_after"] < out["scale_before"]
        and out["lr_scheduler_last_epoch"] < out["global_step"]
        and out["weights_finite"]
    )
    return out


def reward_fp16(tmp: Path) -> dict:
    import reward.training as training
    from reward.modeling import LlavaRewardModel
    from reward.testing import save_tiny_backbone
    from reward.toy_data import write_toy_data
    from reward.training import RewardTrainer, RewardTrainingArguments, read_reward_files

    backbone = save_tiny_backbone("llava", tmp / "llava")
    train, _ = read_reward_files(write_toy_data(tmp, "alignment", 32, 8, seed=0)[0])
    torch.manual_seed(0)
    model = LlavaRewardModel.from_backbone(
        backbone, perspectives=("alignment",), lora_config={"r": 4, "lora_alpha": 8}
    )
    real, calls = training.reward_loss, {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        value, stats = real(*args, **kwargs)
        return (value * float("nan"), stats) if calls["n"] == 1 else (value, stats)

    training.reward_loss = loss
    try:
        args = RewardTrainingArguments(
            output_dir=str(tmp / "reward"),
            perspective="alignment",
            per_device_train_batch_size=8,
            learning_rate=2e-3,
            max_steps=2,
            logging_steps=1,
            report_to="none",
            seed=0,
            disable_tqdm=True,
            fp16=True,
            lr_scheduler_type="linear",
            warmup_steps=0,
            save_strategy="no",
        )
        trainer = RewardTrainer(model, args, train_dataset=train)
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        trainer.train()
    finally:
        training.reward_loss = real
    scaler = trainer.accelerator.scaler
    now = {n: p for n, p in model.named_parameters() if p.requires_grad}
    logs = [e for e in trainer.state.log_history if "loss" in e]
    out = {
        "bf16": args.bf16,
        "fp16": args.fp16,
        "scaler": type(scaler).__name__ if scaler is not None else None,
        "scale_after": scaler.get_scale() if scaler is not None else None,
        "skipped_steps": [e["train/skipped_steps"] for e in logs],
        "learning_rates": [e["learning_rate"] for e in logs],
        "lr_scheduler_last_epoch": trainer.lr_scheduler.last_epoch,
        "weights_finite": all(torch.isfinite(p).all().item() for p in now.values()),
        "trained": any(not torch.equal(start[n], now[n]) for n in start),
    }
    out["ok"] = (
        out["fp16"]
        and not out["bf16"]
        and out["scaler"] is not None
        and out["skipped_steps"] == [1, 1]
        and out["learning_rates"] == [2e-3, 2e-3]
        and out["weights_finite"]
        and out["trained"]
    )
    return out


def main() -> int:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/gpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, check in (("ddpo_fp16_async_reward", ddpo_fp16_async), ("reward_fp16", reward_fp16)):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                results[name] = check(Path(tmp))
            except Exception as err:  # noqa: BLE001 - reported, the other check still runs
                results[name] = {"ok": False, "error": repr(err), "trace": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(name, json.dumps(results[name], default=str)[:2000], flush=True)
    (out_dir / "gpu_checks.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0 if all(r.get("ok") for k, r in results.items() if isinstance(r, dict)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
