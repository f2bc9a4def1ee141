"""The non-finite guard in every loop (DDPO, Diffusion-DPO, DRaFT, reward training): a NaN reward
is dropped from the statistics and counted, a non-finite loss or gradient skips the optimiser step
(counted), K skipped steps in a row stop the run naming the step, and no checkpoint is ever written
of non-finite weights. Each test injects the fault (a ``module:function`` reward, a patched loss,
a gradient hook) into a tiny run of a few seconds."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_sd import saved_tiny_pipeline, tiny_ddpo_config

import alignment.dpo_trainer as dpo_trainer
import alignment.online_trainer as online_trainer
from alignment.checkpointing import list_checkpoints
from alignment.ddpo_trainer import DDPOConfig, DDPOTrainer
from reward.guards import NonFiniteError, StepGuard, poison_nonfinite

PROMPTS = ["a cat", "a dog", "a red circle"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# ----------------------------------------------------------------------------- rewards (module:fn)

_CALLS = {"n": 0}


def brightness_one_nan(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean brightness, but NaN for the first image of the run's first reward call."""
    r = images.float().mean(dim=(1, 2, 3))
    _CALLS["n"] += 1
    if _CALLS["n"] == 1:
        r[0] = float("nan")
    return r


def differentiable_one_nan(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean brightness (differentiable) with NaN for the first image of every call."""
    r = images.float().mean(dim=(1, 2, 3))
    first = torch.arange(len(r), device=r.device) == 0
    return torch.where(first, torch.full_like(r, float("nan")), r)


def differentiable_all_nan(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.float().mean(dim=(1, 2, 3)) * float("nan")


def _lora(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.policy.unet.named_parameters() if "lora" in n}


def _all_finite(trainer) -> bool:
    return all(torch.isfinite(p).all() for p in trainer.policy.trainable_parameters())


def _ddpo(out: Path, **kw) -> DDPOConfig:
    return tiny_ddpo_config(out, **kw)


# ----------------------------------------------------------------------------- the pieces


def test_step_guard_counts_resets_and_stops_naming_the_step():
    guard = StepGuard(max_consecutive=2)
    assert guard.observe(torch.tensor(1.0)) and not guard.pending
    assert not guard.observe(torch.tensor(float("inf"))) and guard.pending
    guard.record(True, step=4)
    assert (guard.skipped, guard.consecutive, guard.pending) == (1, 1, False)
    guard.record(False, step=5)  # a finite step ends the streak, not the count
    assert (guard.skipped, guard.consecutive) == (1, 0)
    guard.record(True, step=6)
    with pytest.raises(NonFiniteError, match=r"2 consecutive .*the last at step 7"):
        guard.record(True, step=7)
    restored = StepGuard(2)
    restored.load_state_dict(guard.state_dict())
    assert (restored.skipped, restored.consecutive) == (3, 2)


def test_poison_makes_the_gradient_norm_nan_where_the_nan_loss_gave_finite_gradients():
    w = torch.ones(3, requires_grad=True)
    r = w * 2.0
    r = torch.where(torch.arange(3) == 0, torch.full_like(r, float("nan")), r)
    loss = r.mean()  # NaN, yet d loss / d w = [0, 2/3, 2/3]: finite
    loss.backward(retain_graph=True)
    assert torch.isfinite(w.grad).all()
    w.grad = None
    poison_nonfinite(loss).backward()
    assert w.grad[0] == 0 and torch.isnan(w.grad[1:]).all()  # the masked path stays 0
    assert torch.isnan(torch.linalg.vector_norm(w.grad))  # DeepSpeed's overflow check fires
    finite = torch.tensor(2.0)
    assert poison_nonfinite(finite) is finite


# ----------------------------------------------------------------------------- DDPO


def test_ddpo_nan_reward_for_one_sample_finishes_finite_counted_and_logged(tmp_path):
    """The issue's acceptance: a DDPO run whose reward returns NaN for one sample finishes with
    finite weights and a counted, logged non-finite sample; the NaN never reaches the tracker."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _CALLS["n"] = 0
    cfg = _ddpo(
        tmp_path,
        reward="test_loop_safety:brightness_one_nan",
        log_with="tensorboard",
        stat_buffer_size=32,
    )
    trainer = DDPOTrainer(cfg, prompts=PROMPTS)
    before = _lora(trainer)
    history = trainer.train()
    assert [h["rewards/nonfinite"] for h in history] == [1.0, 0.0]
    assert [h["train/skipped_steps"] for h in history] == [0.0, 0.0]
    assert all(math.isfinite(h[k]) for h in history for k in ("reward_mean", "loss"))
    assert _all_finite(trainer)
    after = _lora(trainer)
    assert any(not torch.equal(before[n], after[n]) for n in before)  # it trained
    # the tracker holds the 3 + 4 finite rewards, no NaN
    buffers = trainer.stat_tracker.stats.values()
    assert sum(len(b) for b in buffers) == 7
    assert all(np.isfinite(list(b)).all() for b in buffers)
    logs = EventAccumulator(str(next((tmp_path / "logs").rglob("events.*")).parent))
    logs.Reload()
    assert [(e.step, e.value) for e in logs.Scalars("rewards/nonfinite")] == [(0, 1.0), (1, 0.0)]


def test_nonfinite_reward_gets_advantage_zero_and_stays_out_of_the_statistics(tmp_path):
    trainer = DDPOTrainer(_ddpo(tmp_path, stat_min_count=100), prompts=PROMPTS)
    rewards = torch.tensor([1.0, float("nan"), 3.0, float("-inf")])
    adv, gathered = trainer.compute_advantages(["a cat"] * 4, rewards)
    # batch statistics of the finite rewards (1, 3): mean 2, population std 1
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0]), rtol=0, atol=1e-5)
    assert np.isnan(gathered[1]) and list(trainer.stat_tracker.stats["a cat"]) == [1.0, 3.0]
    off = DDPOTrainer(_ddpo(tmp_path / "b", per_prompt_stat_tracking=False), prompts=PROMPTS)
    adv, _ = off.compute_advantages(["a cat"] * 4, rewards)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0]), rtol=0, atol=1e-5)


def _nan(loss: torch.Tensor, finite_gradients: bool = False) -> torch.Tensor:
    """``loss`` made NaN; its gradients NaN too, or (``finite_gradients``) left as they were."""
    return loss + float("nan") * loss.detach() if finite_gradients else loss * float("nan")


def _nan_loss_in_epochs(monkeypatch, trainer, epochs: set[int], finite_gradients=False) -> None:
    """Make DDPO's PPO loss NaN in the given epochs (one micro-batch is enough)."""
    real = online_trainer.ppo_clip_loss

    def loss(*args, **kw):
        out = real(*args, **kw)
        return _nan(out, finite_gradients) if trainer.epoch in epochs else out

    monkeypatch.setattr(online_trainer, "ppo_clip_loss", loss)


def test_ddpo_nonfinite_loss_skips_the_step_and_the_next_epoch_trains(tmp_path, monkeypatch):
    trainer = DDPOTrainer(_ddpo(tmp_path, num_epochs=1), prompts=PROMPTS)
    _nan_loss_in_epochs(monkeypatch, trainer, {0})
    before = _lora(trainer)
    trainer.train()
    assert trainer.history[0]["train/skipped_steps"] == 1.0
    after = _lora(trainer)
    assert all(torch.equal(before[n], after[n]) for n in before)  # the step was not taken
    assert trainer.guard.consecutive == 1

    monkeypatch.undo()
    again = DDPOTrainer(_ddpo(tmp_path / "b", num_epochs=2), prompts=PROMPTS)
    _nan_loss_in_epochs(monkeypatch, again, {0})
    again.train()
    assert [h["train/skipped_steps"] for h in again.history] == [1.0, 1.0]  # the run's total
    assert again.guard.consecutive == 0 and _all_finite(again)
    assert any(not torch.equal(before[n], p) for n, p in _lora(again).items())


def test_ddpo_stops_after_k_skipped_steps_and_keeps_the_finite_checkpoint(tmp_path, monkeypatch):
    cfg = _ddpo(tmp_path, num_epochs=5, save_every=1, keep_last=1, max_consecutive_skips=2)
    trainer = DDPOTrainer(cfg, prompts=PROMPTS)
    _nan_loss_in_epochs(monkeypatch, trainer, {1, 2, 3, 4})
    with pytest.raises(NonFiniteError, match=r"2 consecutive optimiser steps skipped .* step 3"):
        trainer.train()
    # epoch 0 trained and was saved; epoch 1's skipped step was saved too (its weights are the
    # finite ones of epoch 0); the run stopped in epoch 2 before writing anything
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000002"]
    # weights made non-finite by hand are never written: the newest finite checkpoint stays
    with torch.no_grad():
        trainer.trainable[0].view(-1)[0] = float("nan")
    trainer.epoch = 7
    with pytest.raises(NonFiniteError, match="not finite: no checkpoint written"):
        trainer.save_checkpoint()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000002"]


def test_nonfinite_gradient_with_a_finite_loss_skips_the_step(tmp_path):
    trainer = DDPOTrainer(_ddpo(tmp_path, num_epochs=1), prompts=PROMPTS)
    param = next(p for n, p in trainer.policy.unet.named_parameters() if "lora_B" in n)
    param.register_hook(lambda g: g * float("inf"))
    before = _lora(trainer)
    trainer.train()
    assert trainer.history[0]["train/skipped_steps"] == 1.0
    assert math.isfinite(trainer.history[0]["loss"])
    assert all(torch.equal(before[n], p) for n, p in _lora(trainer).items())


def _fp16_like(accelerator_cls, enabled: bool = True):
    """``accelerator_cls`` (accelerate's ``Accelerator``) with a real ``torch.amp.GradScaler`` on
    the CPU that unscales in ``clip_grad_norm_``, as under native fp16 on a GPU (on a CPU
    accelerate gives no scaler); ``enabled=False`` as ``GradScalerKwargs(enabled=False)``."""

    class Scaled(accelerator_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler(
                "cpu", init_scale=2.0**10, growth_interval=1000, enabled=enabled
            )

        def unscale_gradients(self, optimizer=None):
            for opt in self._optimizers:
                self.scaler.unscale_(opt.optimizer)

    return Scaled


@pytest.mark.parametrize("finite_gradients", [False, True], ids=["nan-grads", "finite-grads"])
def test_ddpo_under_a_loss_scaler_skips_a_nan_loss_step_and_holds_the_schedule(
    tmp_path, monkeypatch, finite_gradients
):
    """fp16's loss scaler (a GPU run): a NaN-loss step reaches the scaler as NaN gradients (also
    when the loss's gradients were finite), so it skips the update, lowers its scale and resets,
    and the next step trains (before, the skipped step left the scaler's unscale pending and the
    next clip raised); the LR schedule holds."""
    import accelerate

    monkeypatch.setattr(accelerate, "Accelerator", _fp16_like(accelerate.Accelerator))
    trainer = DDPOTrainer(_ddpo(tmp_path, num_epochs=2), prompts=PROMPTS)
    scaler = trainer.accelerator.scaler
    _nan_loss_in_epochs(monkeypatch, trainer, {0}, finite_gradients)
    before = _lora(trainer)
    after_first = {}
    real_step = trainer.backward_and_step

    def backward_and_step(loss):
        stepped = real_step(loss)
        if stepped is not None and not after_first:
            after_first.update(_lora(trainer))
        return stepped

    trainer.backward_and_step = backward_and_step
    trainer.train()
    assert [h["train/skipped_steps"] for h in trainer.history] == [1.0, 1.0]
    assert scaler.get_scale() == 2.0**9  # one skip, one backoff
    assert (trainer.global_step, trainer.lr_scheduler.last_epoch) == (2, 1)  # held once
    assert _all_finite(trainer)
    assert all(torch.equal(before[n], after_first[n]) for n in before)  # step 1 not taken
    assert any(not torch.equal(before[n], p) for n, p in _lora(trainer).items())


def test_a_disabled_loss_scaler_is_no_scaler_to_the_guard(tmp_path, monkeypatch):
    """``GradScalerKwargs(enabled=False)``: the scaler never skips, so a NaN-loss step must be
    dropped by the guard itself (stepping with NaN gradients would write NaN weights)."""
    import accelerate

    monkeypatch.setattr(accelerate, "Accelerator", _fp16_like(accelerate.Accelerator, False))
    trainer = DDPOTrainer(_ddpo(tmp_path, num_epochs=1), prompts=PROMPTS)
    _nan_loss_in_epochs(monkeypatch, trainer, {0}, finite_gradients=True)
    before = _lora(trainer)
    trainer.train()
    assert trainer.history[0]["train/skipped_steps"] == 1.0
    assert trainer.lr_scheduler.last_epoch == 0
    assert all(torch.equal(before[n], p) for n, p in _lora(trainer).items())


# ----------------------------------------------------------------------------- DPO


def test_dpo_nonfinite_loss_skips_and_nan_rewards_never_pair(tmp_path, monkeypatch):
    from alignment.dpo_trainer import DPOConfig, DPOTrainer, select_pairs

    r = torch.tensor([[0.1, float("nan"), 0.3], [float("nan")] * 3, [0.2, float("inf"), 0.0]])
    assert select_pairs(r, "best_worst") == [(0, 2, 0), (2, 0, 2)]
    assert select_pairs(r, "margin") == [(0, 2, 0), (2, 0, 2)]

    cfg = DPOConfig(
        pretrained_model=str(saved_tiny_pipeline()),
        data="online",
        reward="test_loop_safety:differentiable_one_nan",
        images_per_prompt=3,
        prompts_per_refresh=2,
        refresh_every=10,
        num_steps=3,
        guidance_scale=2.0,
        max_steps=3,
        train_batch_size=2,
        lora_rank=4,
        learning_rate=1e-2,
        save_every=0,
        output_dir=str(tmp_path),
        log_with="none",
        log_images_every=3,
        num_log_images=2,
        progress_bar=False,
        seed=3,
        max_consecutive_skips=2,
    )
    trainer = DPOTrainer(cfg, prompts=PROMPTS)
    real = dpo_trainer.diffusion_dpo_loss
    calls = {"n": 0}

    def loss(*args, **kw):
        calls["n"] += 1
        out, acc = real(*args, **kw)
        return (out * float("nan"), acc) if calls["n"] == 2 else (out, acc)

    monkeypatch.setattr(dpo_trainer, "diffusion_dpo_loss", loss)
    before = _lora(trainer)
    history = trainer.train()
    assert [h["train/skipped_steps"] for h in history] == [0.0, 1.0, 1.0]
    # the first image of each sampling call (one per refresh here) scored NaN: counted, unpaired
    assert history[0]["rewards/nonfinite"] == 1.0 and history[0]["online/num_pairs"] == 2.0
    assert math.isfinite(history[0]["online/reward_mean"]) and _all_finite(trainer)
    assert any(not torch.equal(before[n], p) for n, p in _lora(trainer).items())
    assert (tmp_path / "training_curves.png").stat().st_size > 1000
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1
    # every reward NaN at the first refresh: no pair to train on; a clear stop (decided on every
    # process together: one raising alone left the others in the next collective)
    out = str(tmp_path / "none")
    reward = "test_loop_safety:differentiable_all_nan"
    none = DPOTrainer(dataclasses.replace(cfg, reward=reward, output_dir=out), prompts=PROMPTS)
    with pytest.raises(NonFiniteError, match="No online pair on this process.* at step 0"):
        none.train()


# ----------------------------------------------------------------------------- DRaFT / ReFL


def _draft(out: Path, reward: str, **kw):
    from alignment.draft_trainer import DraftConfig

    base = dict(
        pretrained_model=str(saved_tiny_pipeline()),
        reward=reward,
        num_steps=3,
        guidance_scale=2.0,
        max_steps=2,
        train_batch_size=2,
        lora_rank=4,
        learning_rate=1e-2,
        save_every=0,
        output_dir=str(out),
        log_with="none",
        log_images_every=1,
        num_log_images=2,
        progress_bar=False,
        seed=0,
    )
    base.update(kw)
    return DraftConfig(**base)


def test_draft_nan_reward_sample_is_dropped_and_counted(tmp_path):
    from alignment.draft_trainer import DraftTrainer

    trainer = DraftTrainer(_draft(tmp_path, "test_loop_safety:differentiable_one_nan"))
    before = _lora(trainer)
    history = trainer.train()
    assert [h["rewards/nonfinite"] for h in history] == [1.0, 1.0]
    assert [h["train/skipped_steps"] for h in history] == [0.0, 0.0]
    assert all(math.isfinite(h["loss"]) for h in history) and _all_finite(trainer)
    assert any(not torch.equal(before[n], p) for n, p in _lora(trainer).items())
    assert (tmp_path / "training_curves.png").stat().st_size > 1000
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2  # one grid per step


def test_refl_all_nan_rewards_stop_after_k_skips(tmp_path):
    from alignment.draft_trainer import DraftTrainer

    cfg = _draft(
        tmp_path,
        "test_loop_safety:differentiable_all_nan",
        method="refl",
        loss_type="relu",
        max_steps=5,
        max_consecutive_skips=2,
        log_images_every=0,
    )
    trainer = DraftTrainer(cfg)
    before = _lora(trainer)
    with pytest.raises(NonFiniteError, match="at step 2"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in _lora(trainer).items())


# ----------------------------------------------------------------------------- reward training


def _trainable(model) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _nan_reward_trainer(
    tmp_path, monkeypatch, nan_calls, steps, k=3, out=None, finite_gradients=False, **kw
):
    """A tiny reward run (LLaVA backbone, toy pairs, lr 2e-3) whose loss is NaN on the calls in
    ``nan_calls`` (:func:`_nan`): ``(trainer, model, trainable weights at the start)``."""
    import reward.training as training
    from reward.modeling import LlavaRewardModel
    from reward.testing import save_tiny_backbone
    from reward.toy_data import write_toy_data
    from reward.training import RewardTrainer, RewardTrainingArguments, read_reward_files

    backbone = tmp_path / "llava"
    if not (backbone / "config.json").is_file():
        save_tiny_backbone("llava", backbone)
    train, _ = read_reward_files(write_toy_data(tmp_path, "alignment", 32, 8, seed=0)[0])
    real = training.reward_loss
    torch.manual_seed(0)
    model = LlavaRewardModel.from_backbone(
        backbone,
        perspectives=("alignment",),
        lora_config={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
    )
    calls = {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        out, stats = real(*args, **kwargs)
        return (_nan(out, finite_gradients), stats) if calls["n"] in nan_calls else (out, stats)

    monkeypatch.setattr(training, "reward_loss", loss)
    args = RewardTrainingArguments(
        output_dir=str(out or tmp_path / f"out{len(nan_calls)}"),
        perspective="alignment",
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        max_steps=steps,
        logging_steps=1,
        report_to="none",
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
        max_consecutive_skips=k,
        **kw,
    )
    trainer = RewardTrainer(model, args, train_dataset=train)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return trainer, model, trainable


def test_reward_training_skips_a_nan_loss_step_and_stops_after_k(tmp_path, monkeypatch):
    def run(nan_calls, steps, k=3, out=None, **kw):
        return _nan_reward_trainer(tmp_path, monkeypatch, nan_calls, steps, k, out, **kw)

    trainer, model, start = run(
        {1},
        steps=2,
        save_strategy="steps",
        save_steps=1,
        lr_scheduler_type="linear",
        warmup_steps=0,
    )
    trainer.train()
    skipped = [e["train/skipped_steps"] for e in trainer.state.log_history if "loss" in e]
    assert skipped == [1, 1]
    now = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.isfinite(p).all() for p in now.values())
    assert any(not torch.equal(start[n], now[n]) for n in start)  # step 2 trained
    # the skipped step left the schedule where it was: step 2 trained at the first step's rate
    # (linear decay over 2 steps would have halved it) and the schedule stepped once
    rates = [e["learning_rate"] for e in trainer.state.log_history if "loss" in e]
    assert rates == [2e-3, 2e-3]
    assert trainer.lr_scheduler.last_epoch == 1
    ckpt = tmp_path / "out1" / "checkpoints" / "alignment"
    assert (ckpt / "checkpoint-2").is_dir()
    # the counters travel in the checkpoint: resumed from step 1, the run still counts its skip
    assert json.loads((ckpt / "checkpoint-1" / "guard_state.json").read_text()) == {
        "skipped": 1,
        "consecutive": 1,
    }
    trainer, _, _ = run(set(), 3, out=tmp_path / "out1", lr_scheduler_type="linear", warmup_steps=0)
    trainer.train(resume_from_checkpoint=str(ckpt / "checkpoint-1"))
    # steps 1 (the checkpoint's log), 2 and 3: the total stays 1 (a fresh count would read 0)
    assert [e["train/skipped_steps"] for e in trainer.state.log_history if "loss" in e] == [1, 1, 1]
    assert trainer.guard.consecutive == 0

    trainer, model, start = run({1, 2, 3}, steps=5, k=2)
    with pytest.raises(NonFiniteError, match="at step 2"):
        trainer.train()
    assert all(torch.equal(start[n], p) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("finite_gradients", [False, True], ids=["nan-grads", "finite-grads"])
def test_reward_training_under_a_loss_scaler_skips_a_nan_loss_step_through_the_scaler(
    tmp_path, monkeypatch, finite_gradients
):
    """fp16 with a dynamic loss scale (a GPU run): ``Trainer`` unscales in its clip, before the
    optimiser step, and that is when the scaler decides to skip; the guard hands it NaN
    gradients before that, so it skips the step (also when the NaN loss had finite gradients),
    lowers its scale, and the schedule holds (accelerate misses the skip of a fused AdamW)."""
    import transformers.trainer

    monkeypatch.setattr(
        transformers.trainer, "Accelerator", _fp16_like(transformers.trainer.Accelerator)
    )
    trainer, model, start = _nan_reward_trainer(
        tmp_path,
        monkeypatch,
        {1},
        steps=2,
        finite_gradients=finite_gradients,
        lr_scheduler_type="linear",
        warmup_steps=0,
    )
    scaler = trainer.accelerator.scaler
    after_first = {}

    class Snapshot(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                after_first.update({n: p.detach().clone() for n, p in _trainable(model)})

    trainer.add_callback(Snapshot())
    trainer.train()
    assert scaler.get_scale() == 2.0**9  # the scaler skipped step 1 and halved its scale
    assert [e["train/skipped_steps"] for e in trainer.state.log_history if "loss" in e] == [1, 1]
    assert [e["learning_rate"] for e in trainer.state.log_history if "loss" in e] == [2e-3, 2e-3]
    assert trainer.lr_scheduler.last_epoch == 1
    assert all(torch.equal(start[n], after_first[n]) for n in start)  # step 1 not taken
    now = dict(_trainable(model))
    assert all(torch.isfinite(p).all() for p in now.values())
    assert any(not torch.equal(start[n], now[n]) for n in start)  # step 2 trained


def test_reports_are_written_atomically(tmp_path):
    """history.json, the demo's summary, best-of-N's scores and the reward reports go through
    atomic_write_text: a write that fails midway leaves the previous file whole and no temporary
    file behind."""
    from reward.files import atomic_write_text

    path = atomic_write_text(tmp_path / "runs" / "history.json", '[{"step": 1}]')
    assert json.loads(path.read_text()) == [{"step": 1}]
    with pytest.raises(TypeError):
        atomic_write_text(path, None)  # type: ignore[arg-type]  # fails inside the write
    assert json.loads(path.read_text()) == [{"step": 1}]
    assert [p.name for p in path.parent.iterdir()] == ["history.json"]
