"""Reward training: collator, batch loss, checkpoint weights, learning, resume and the recipe.

Everything runs on the CPU with a tiny random LLaVA backbone (reward.testing) and synthetic data
rendered in the test (reward.toy_data); all seeded.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _launch import free_port, launch_env

from reward.modeling import LlavaRewardModel
from reward.testing import save_tiny_backbone
from reward.toy_data import render_solid, render_symbol_image, write_toy_data
from reward.training import (
    RewardCollator,
    RewardTrainer,
    RewardTrainingArguments,
    evaluate_model,
    mix_datasets,
    read_reward_files,
    real_rows_of_last_batch,
    reward_loss,
    select_examples,
)

REPO = Path(__file__).resolve().parents[1]
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and the CI machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    return save_tiny_backbone("llava", tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return {
        "alignment": write_toy_data(root, "alignment", n_train=128, n_eval=32, seed=0),
        "safety": write_toy_data(root, "safety", n_train=64, n_eval=32, seed=0),
    }


def _model(backbone_dir, perspective, seed=0, lora=LORA, head_dim=1):
    torch.manual_seed(seed)
    return LlavaRewardModel.from_backbone(
        backbone_dir, perspectives=(perspective,), lora_config=dict(lora), head_dim=head_dim
    )


def _args(tmp_path, perspective, **kw):
    base = dict(
        output_dir=str(tmp_path),
        perspective=perspective,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
    )
    base.update(kw)
    return RewardTrainingArguments(**base)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- pure pieces


def test_reward_loss_mixed_batch_hand_computed():
    # rows: chosen 1.0, rejected 0.0 (one pair), single 2.0 with label 1 and -1.0 with label 0
    r = torch.tensor([1.0, 0.0, 2.0, -1.0])
    labels = torch.tensor([1.0, 0.0])
    loss, stats = reward_loss(r, n_pairs=1, labels=labels, loss_type="bt", tau=0.1)
    pair = math.log1p(math.exp(-10.0))  # -log sigmoid((1 - 0) / 0.1)
    single = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))) / 2
    assert loss.item() == pytest.approx((1 * pair + 2 * single) / 3, rel=1e-6)
    assert stats == {"accuracy": 1.0, "margin": 1.0, "unpaired_accuracy": 1.0}

    loss, _ = reward_loss(r[:2], 1, None, "paired_bce")
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1.0)) + math.log(2)) / 2, rel=1e-6)

    g = torch.tensor([[1.0, 2.0], [3.0, -1.0]])  # chosen c = (1, 2), rejected r = (3, -1)
    loss, stats = reward_loss(g, 1, None, "gpm", tau=0.5)
    logit = (1.0 * -1.0 - 2.0 * 3.0) / 0.5  # (c0 r1 - c1 r0) / tau
    assert loss.item() == pytest.approx(math.log1p(math.exp(-logit)), rel=1e-6)
    assert stats["accuracy"] == 0.0

    with pytest.raises(ValueError, match="2-d head"):
        reward_loss(r, 1, labels, "gpm")
    with pytest.raises(ValueError, match="labels"):
        reward_loss(r, 1, labels[:1], "bt")


def test_collator_mixes_pairs_and_singles_in_one_batch(backbone_dir, toy):
    model = _model(backbone_dir, "overall")
    pairs, _ = read_reward_files(toy["alignment"][0])
    singles, _ = read_reward_files(toy["safety"][0])
    mixed = mix_datasets([pairs.select(range(3)), singles.select(range(2))])
    rows = [mixed[i] for i in (3, 0, 4, 1, 2)]  # singles and pairs interleaved, raw image refs
    batch = RewardCollator(model.processor)(rows)
    assert int(batch["n_pairs"]) == 3
    assert batch["input_ids"].shape[0] == batch["pixel_values"].shape[0] == 2 * 3 + 2
    assert batch["reward_labels"].tolist() == [rows[0]["label"], rows[2]["label"]]
    assert batch["example_order"].tolist() == [1, 3, 4, 0, 2]  # pairs' positions, then singles'
    # row order: chosen of the pairs, rejected of the pairs, then the single images
    from reward.data import load_image_ref

    expected = [rows[1]["chosen"], rows[3]["chosen"], rows[4]["chosen"]]
    expected += [rows[1]["rejected"], rows[3]["rejected"], rows[4]["rejected"]]
    expected += [rows[0]["image"], rows[2]["image"]]
    prompts = [rows[i]["prompt"] for i in (1, 3, 4)] * 2 + [rows[0]["prompt"], rows[2]["prompt"]]
    one_by_one = model.processor(prompts, [load_image_ref(x) for x in expected])
    assert torch.equal(batch["pixel_values"], one_by_one["pixel_values"])
    assert torch.equal(batch["input_ids"], one_by_one["input_ids"])
    with pytest.raises(ValueError, match="tie"):
        RewardCollator(model.processor)([{**pairs[0], "tie": True}])


def test_load_perspective_weights_round_trip(backbone_dir, tmp_path):
    model = _model(backbone_dir, "alignment")
    params = model.set_trainable("alignment")
    with torch.no_grad():
        for p in params:
            p.normal_()
    saved = _trainable(model)
    model.save_pretrained(tmp_path, perspectives=["alignment"])
    with torch.no_grad():
        for p in params:
            p.zero_()
    model.load_perspective_weights(tmp_path, "alignment")
    after = _trainable(model)
    assert saved.keys() == after.keys() and len(saved) > 4
    assert all(torch.equal(saved[k], after[k]) for k in saved)
    with pytest.raises(FileNotFoundError, match="safety"):
        other = _model(backbone_dir, "safety")
        other.load_perspective_weights(tmp_path, "safety")


# ----------------------------------------------------------------------------- learning


def _learn(backbone_dir, toy, task, steps, tmp_path, record_property):
    train, _ = read_reward_files(toy[task][0])
    held_out, _ = read_reward_files(toy[task][1], keep_ties=True)
    model = _model(backbone_dir, task)
    before = evaluate_model(model, held_out, task)["accuracy"]
    start = time.perf_counter()
    trainer = RewardTrainer(model, _args(tmp_path, task, max_steps=steps), train_dataset=train)
    trainer.train()
    seconds = time.perf_counter() - start
    after = evaluate_model(model, held_out, task)["accuracy"]
    result = {"before": before, "after": after, "steps": steps, "train_seconds": seconds}
    print(f"\n{task} held-out accuracy: {json.dumps(result)}")
    record_property(f"{task}_learning", json.dumps(result))
    return before, after


def test_alignment_learning_colour_pairs(backbone_dir, toy, tmp_path, record_property):
    """Pairs (caption naming a colour, image of that colour vs of another colour)."""
    before, after = _learn(backbone_dir, toy, "alignment", 160, tmp_path, record_property)
    assert 0.25 <= before <= 0.75, before  # about chance before training
    assert after >= 0.9, after


def test_safety_learning_marked_symbol(backbone_dir, toy, tmp_path, record_property):
    """Unpaired: images carrying the marked symbol are unsafe (label 0), others safe (1)."""
    before, after = _learn(backbone_dir, toy, "safety", 40, tmp_path, record_property)
    assert before <= 0.75, before
    assert after >= 0.9, after


def test_toy_images_differ_by_what_is_asked():
    a, b = render_solid("red"), render_solid("blue")
    assert a.getpixel((5, 5))[0] > 150 and b.getpixel((5, 5))[2] > 150
    marked = render_symbol_image("green", True)
    clean = render_symbol_image("green", False)
    dark = lambda im: sum(1 for p in im.getdata() if max(p) < 40)  # noqa: E731
    assert dark(marked) > 50 and dark(clean) == 0


def test_continue_perspective_starts_from_the_saved_adapter_and_head(backbone_dir, toy, tmp_path):
    """A second curriculum stage (``--continue_perspective``) trains the saved perspective further
    instead of a fresh one; a folder without that perspective is refused by name."""
    from reward.training import RewardScriptArguments, build_reward_model

    train, _ = read_reward_files(toy["alignment"][0])
    first = _model(backbone_dir, "alignment")
    RewardTrainer(first, _args(tmp_path, "alignment", max_steps=3), train_dataset=train).train()
    first.save_pretrained(tmp_path)
    saved = _trainable(first)

    script = RewardScriptArguments(backbone=str(backbone_dir), continue_perspective=True)
    resumed = build_reward_model(script, _args(tmp_path, "alignment"))
    resumed.set_trainable("alignment")
    loaded = _trainable(resumed)
    assert loaded.keys() == saved.keys() and len(saved) > 4
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)  # not a fresh initialisation
    fresh = _trainable(_model(backbone_dir, "alignment", seed=1))
    assert not all(torch.equal(saved[k], fresh[k]) for k in saved)

    with pytest.raises(ValueError, match="no perspective 'safety'"):
        build_reward_model(script, _args(tmp_path, "safety"))
    with pytest.raises(ValueError, match="holds no reward model"):
        build_reward_model(script, _args(tmp_path / "empty", "alignment"))


# ----------------------------------------------------------------------------- resume


class _StopAt:
    """Stop training after step ``k`` (as if the job had been killed after its checkpoint)."""

    def __init__(self, k):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= k:
                    control.should_training_stop = True
                    control.should_save = True
                return control

        self.callback = Stop()


def test_resume_from_checkpoint_matches_uninterrupted_run(backbone_dir, toy, tmp_path):
    """Mixed paired + unpaired data, LoRA dropout on (the RNG state must be restored too)."""
    pairs, _ = read_reward_files(toy["alignment"][0])
    singles, _ = read_reward_files(toy["safety"][0])
    data = mix_datasets([pairs.select(range(24)), singles.select(range(24))])
    lora = {**LORA, "lora_dropout": 0.1}
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3, per_device_train_batch_size=8)

    full = _model(backbone_dir, "overall", lora=lora)
    RewardTrainer(full, _args(tmp_path / "full", "overall", **kw), train_dataset=data).train()
    expected = _trainable(full)

    stopped = _model(backbone_dir, "overall", lora=lora)
    args = _args(tmp_path / "split", "overall", **kw)
    trainer = RewardTrainer(stopped, args, train_dataset=data, callbacks=[_StopAt(3).callback])
    trainer.train()
    assert trainer.state.global_step == 3
    ckpt_root = tmp_path / "split" / "checkpoints" / "overall"
    assert sorted(os.listdir(ckpt_root)) == ["checkpoint-3"]  # renamed into place, no staging
    ckpt = ckpt_root / "checkpoint-3"
    for name in ("heads/overall.safetensors", "adapters/overall", "optimizer.pt", "scheduler.pt"):
        assert (ckpt / name).exists(), name

    resumed = _model(backbone_dir, "overall", lora=lora, seed=123)  # other init: must be loaded
    trainer = RewardTrainer(resumed, args, train_dataset=data)
    assert trainer.last_checkpoint() == str(ckpt)
    trainer.train(resume_from_checkpoint="latest")
    assert trainer.state.global_step == 6
    got = _trainable(resumed)
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-5, msg=k)
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"accuracy", "unpaired_accuracy"} <= logged  # both kinds were trained on together


# ----------------------------------------------------------------------------- recipe


def _launch(zero: int, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        f"recipes/accelerate/zero{zero}.yaml",
        "--main_process_port",
        str(free_port()),
        "--num_cpu_threads_per_process",
        "1",
        "recipes/train_reward.py",
        "--config",
        "recipes/configs/reward_tiny.yaml",
        "--output_dir",
        str(out),
        "--toy_n_train",
        "48",
        "--toy_n_eval",
        "8",
        *extra,
    ]
    env = launch_env(pythonpath=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_recipe_zero3_then_zero2_second_perspective_same_folder(tmp_path):
    """A fresh folder under ZeRO-3 (the tiny backbone is built there too), then a second
    perspective added under ZeRO-2; the saved folder scores like the in-memory models did; a
    DeepSpeed run resumed from its step-5 checkpoint ends with the same weights."""
    for name in ("zero2", "zero3"):
        if not (REPO / "recipes/accelerate" / f"{name}.yaml").is_file():
            pytest.skip(f"recipes/accelerate/{name}.yaml is not there yet")
    out = tmp_path / "reward"
    _launch(3, out, "--max_steps", "20", "--save_steps", "10")
    _launch(2, out, "--perspective", "safety", "--max_steps", "10", "--save_steps", "5")

    # resume under DeepSpeed from the step-5 checkpoint (which holds no frozen weights)
    import shutil

    from safetensors.torch import load_file

    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints/safety/checkpoint-10")
    module_states = next((resumed / "checkpoints/safety/checkpoint-5").rglob("*model_states.pt"))
    states = torch.load(module_states, map_location="cpu", weights_only=False)["module"]
    assert states and all("vision_tower" not in k and "base_layer" not in k for k in states)
    args = ["--perspective", "safety", "--max_steps", "10", "--save_steps", "5"]
    _launch(2, resumed, *args, "--resume_from_checkpoint", "latest")
    for f in ("heads/safety.safetensors", "adapters/safety/adapter_model.safetensors"):
        a, b = load_file(out / f), load_file(resumed / f)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=f"{f}: {k}")

    from reward.scorer import RewardScorer

    scorer = RewardScorer.from_pretrained(out)
    assert sorted(scorer.perspectives) == ["alignment", "safety"]
    for perspective, kind in (("alignment", "paired"), ("safety", "unpaired")):
        report = json.loads((out / f"eval_report_{perspective}.json").read_text())
        assert 0.0 <= report["accuracy"] <= 1.0 and report["kind"] == kind
        assert (out / f"eval_report_{perspective}.md").is_file()
        fixed = json.loads((out / f"fixed_scores_{perspective}.json").read_text())[kind]
        assert len(fixed["rewards"]) >= 4
        got = scorer.score(fixed["prompts"], fixed["images"], perspective=perspective)
        torch.testing.assert_close(got, torch.tensor(fixed["rewards"]), rtol=1e-4, atol=1e-5)
    assert (out / "checkpoints/alignment/checkpoint-20").is_dir()
    assert (out / "checkpoints/safety/checkpoint-10").is_dir()  # rotation kept 5 and 10
    assert any((out / "runs").rglob("events.out.tfevents.*"))  # tensorboard logging


def test_eval_recipe_writes_reports_that_match_in_memory_scores(backbone_dir, toy, tmp_path):
    import runpy

    model = _model(backbone_dir, "alignment")
    model.save_pretrained(tmp_path / "model")
    held_out, _ = read_reward_files(toy["alignment"][1], keep_ties=True)
    expected = evaluate_model(model, held_out, "alignment")
    main = runpy.run_path(str(REPO / "recipes/eval_reward.py"), run_name="eval_reward")["main"]
    argv = ["--model_dir", str(tmp_path / "model"), "--data_file", str(toy["alignment"][1])]
    results = main([*argv, "--output_dir", str(tmp_path / "eval")])
    report = json.loads((tmp_path / "eval/eval_report_alignment.json").read_text())
    assert report["accuracy"] == results["alignment"]["accuracy"] == expected["accuracy"]
    assert report["n_examples"] == 32 and report["kind"] == "paired"
    assert (tmp_path / "eval/eval_report_alignment.md").read_text().startswith("# alignment")


@pytest.mark.parametrize(
    "name",
    ["reward_qwen2_5_vl_7b", "reward_phi3_5_vision", "reward_llava_next_vicuna_13b", "reward_tiny"],
)
def test_configs_parse_with_the_paper_optimiser(name, tmp_path):
    from trl import TrlParser

    from reward.training import RewardScriptArguments

    parser = TrlParser((RewardScriptArguments, RewardTrainingArguments))
    argv = ["--config", f"recipes/configs/{name}.yaml", "--output_dir", str(tmp_path)]
    script, args = parser.parse_args_and_config(
        args=[*argv, "--use_cpu", "true", "--bf16", "false"]
    )
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay) == (0.9, 0.95, 0.0)
    assert args.lr_scheduler_type == "cosine" and args.warmup_steps == 0.03
    assert args.max_grad_norm == 1.0 and args.loss_type == "bt" and args.tau == 0.1
    if name != "reward_tiny":  # the paper's LoRA and learning rate
        assert (script.lora_r, script.lora_alpha, script.lora_dropout) == (128, 256, 0.05)
        assert args.learning_rate == 2e-4 and args.activation_checkpointing
        assert script.trust_remote_code is False  # the user turns it on, never the project


def test_gradient_accumulation_equals_the_full_batch(backbone_dir, toy, tmp_path):
    """One optimiser step on 16 pairs = the same step as 2 accumulated micro-batches of 8."""
    pairs, _ = read_reward_files(toy["alignment"][0])
    data = pairs.select(range(16))
    weights = []
    for bs, ga in ((16, 1), (8, 2)):
        model = _model(backbone_dir, "alignment")
        kw = dict(max_steps=1, per_device_train_batch_size=bs, gradient_accumulation_steps=ga)
        kw.update(warmup_steps=0, lr_scheduler_type="constant")
        RewardTrainer(
            model, _args(tmp_path / str(bs), "alignment", **kw), train_dataset=data
        ).train()
        weights.append(_trainable(model))
    full, accumulated = weights
    init = _trainable(_model(backbone_dir, "alignment"))
    assert any(not torch.equal(full[k], init[k]) for k in full)  # the step moved the weights
    for k in full:
        torch.testing.assert_close(accumulated[k], full[k], rtol=1e-4, atol=1e-6, msg=k)


def test_evaluate_leaves_annotator_ties_out_of_the_loss(backbone_dir, toy, tmp_path):
    import datasets

    held_out, _ = read_reward_files(toy["alignment"][1], keep_ties=True)
    raw = held_out.with_format(None)
    ties = raw.select(range(4)).map(lambda r: {"tie": True})
    data = datasets.concatenate_datasets([ties, raw.select(range(4, 12))])
    model = _model(backbone_dir, "alignment")
    args = _args(tmp_path, "alignment", per_device_eval_batch_size=4)
    trainer = RewardTrainer(model, args, train_dataset=raw, eval_dataset=data)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert trainer.evaluate(data)["eval_loss"] == pytest.approx(metrics["eval_loss"])
    with pytest.raises(ValueError, match="tie"):  # the collator itself refuses ties
        trainer.data_collator([data[0]])


def test_gpm_head_trains_with_the_gpm_loss_and_mismatches_are_refused(backbone_dir, toy, tmp_path):
    pairs, _ = read_reward_files(toy["alignment"][0])
    data = pairs.select(range(16))
    model = _model(backbone_dir, "alignment", head_dim=2)
    before = _trainable(model)
    args = _args(tmp_path, "alignment", loss_type="gpm", max_steps=2, logging_steps=1)
    trainer = RewardTrainer(model, args, train_dataset=data)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(before[k], p) for k, p in _trainable(model).items())
    assert evaluate_model(model, data, "alignment")["n_pairs"] == 16  # 2-d rewards evaluate
    with pytest.raises(ValueError, match="head_dim"):
        RewardTrainer(model, _args(tmp_path, "alignment", loss_type="bt"), train_dataset=data)


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_other_backbone_families_train_on_mixed_batches(family, toy, tmp_path):
    """Qwen2-VL (flattened patches + grid) and Idefics3 (image splitting) through the same
    collator and trainer; the checkpoint reloads into a fresh model."""
    backbone = save_tiny_backbone(family, tmp_path / family)
    pairs, _ = read_reward_files(toy["alignment"][0])
    singles, _ = read_reward_files(toy["safety"][0])
    data = mix_datasets([pairs.select(range(4)), singles.select(range(4))])
    model = _model(backbone, "overall")
    kw = dict(max_steps=2, per_device_train_batch_size=4, save_strategy="steps", save_steps=2)
    trainer = RewardTrainer(model, _args(tmp_path / "out", "overall", **kw), train_dataset=data)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    fresh = _model(backbone, "overall", seed=7)
    fresh.load_perspective_weights(trainer.last_checkpoint(), "overall")
    trained, loaded = _trainable(model), _trainable(fresh)
    assert trained.keys() == loaded.keys()
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)


def test_bf16_is_the_gpu_default_unless_fp16_is_asked_for(monkeypatch, tmp_path):
    """On a bf16-capable GPU ``bf16`` defaults on; ``--fp16`` must turn that default off (both on
    is refused by transformers: 'At most one of fp16 and bf16 can be True')."""
    import transformers.training_args

    import reward.training as training

    monkeypatch.setattr(training, "_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)

    def args(**kw):
        return training.RewardTrainingArguments(
            output_dir=str(tmp_path), perspective="alignment", report_to="none", **kw
        )

    assert args().bf16 and not args().fp16
    fp16 = args(fp16=True)
    assert fp16.fp16 and not fp16.bf16
    assert not args(use_cpu=True).bf16


def test_the_best_checkpoint_is_the_renamed_one_in_memory_in_its_state_and_on_resume(
    backbone_dir, toy, tmp_path
):
    """Checkpoints are written under ``.staging`` and renamed into place; with
    ``load_best_model_at_end`` the library records the best one where it saw it. The run, and the
    state saved in every checkpoint, must name the renamed folder, or a resume forgets the best
    model (and other processes fail to load it at the end)."""
    train, _ = read_reward_files(toy["alignment"][0])
    held_out, _ = read_reward_files(toy["alignment"][1])
    kw = dict(
        max_steps=2,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        per_device_eval_batch_size=16,
    )
    trainer = RewardTrainer(
        _model(backbone_dir, "alignment"),
        _args(tmp_path, "alignment", **kw),
        train_dataset=train,
        eval_dataset=held_out.select(range(16)),
    )
    trainer.train()
    run = tmp_path / "checkpoints" / "alignment"
    best = Path(trainer.state.best_model_checkpoint)
    assert best.parent == run and best.is_dir()
    for ckpt in ("checkpoint-1", "checkpoint-2"):
        saved = json.loads((run / ckpt / "trainer_state.json").read_text())
        assert ".staging" not in saved["best_model_checkpoint"]
        assert Path(saved["best_model_checkpoint"]).is_dir()
    resumed = RewardTrainer(
        _model(backbone_dir, "alignment"),
        _args(tmp_path, "alignment", **{**kw, "max_steps": 3}),
        train_dataset=train,
        eval_dataset=held_out.select(range(16)),
    )
    resumed.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    assert resumed.state.best_model_checkpoint is not None
    assert Path(resumed.state.best_model_checkpoint).parent == run


def test_logged_statistics_are_example_weighted_over_every_process(
    backbone_dir, toy, tmp_path, monkeypatch
):
    """``log`` reduces (sum, count) of each statistic over the processes. By hand, with a second
    process faked through ``accelerator.reduce``: this rank saw batches of 4 and 2 pairs with
    accuracies 0.75 and 0.5 (4 right of 6), the other rank 3 right of 10 pairs and 1 of 2
    unpaired: accuracy (4 + 3) / 16, unpaired accuracy 1 / 2 (this rank had none)."""
    import accelerate

    train, _ = read_reward_files(toy["alignment"][0])
    trainer = RewardTrainer(_model(backbone_dir, "alignment"), _args(tmp_path, "alignment"), train)
    other = torch.tensor(  # sums; counts (accuracy, margin, unpaired accuracy, loss)
        [[3.0, 0.0, 1.0, 5.0], [10.0, 10.0, 2.0, 12.0]], dtype=torch.float64
    )
    monkeypatch.setattr(accelerate.Accelerator, "num_processes", property(lambda self: 2))
    monkeypatch.setattr(trainer.accelerator, "reduce", lambda t, reduction: t + other)
    trainer._metrics["eval"]["accuracy"] += [(0.75 * 4, 4), (0.5 * 2, 2)]
    trainer._metrics["eval"]["margin"] += [(1.0 * 4, 4), (-2.0 * 2, 2)]
    trainer._metrics["eval"]["loss"] += [(0.4 * 4, 4), (0.7 * 2, 2)]
    logs = {"eval_loss": 0.5}  # Trainer's (row-weighted, padding included) is replaced
    trainer.log(logs)
    assert logs["eval_loss"] == pytest.approx((1.6 + 1.4 + 5.0) / (6 + 12))
    assert logs["eval_accuracy"] == pytest.approx(7 / 16)
    assert logs["eval_margin"] == pytest.approx(0.0 / 16)  # (4 - 4 + 0) / 16
    assert logs["eval_unpaired_accuracy"] == pytest.approx(0.5)
    assert not trainer._metrics["eval"]  # cleared for the next window


def test_padding_of_the_last_eval_batch_is_found_and_left_out_by_hand():
    """accelerate pads the last global evaluation batch with repeats of the split's first
    examples. 11 pairs, 3 per process, 2 processes: global batches of 6, remainder 11 % 6 = 5,
    so in the last batch process 0 keeps its 3 rows and process 1 keeps 2 of its 3; with 3
    processes (remainder 11 % 9 = 2) process 0 keeps 2, processes 1 and 2 none. No remainder
    (a split that divides, or not the last batch): every row is real."""
    assert real_rows_of_last_batch(5, 0, 3) == 3
    assert real_rows_of_last_batch(5, 1, 3) == 2
    assert [real_rows_of_last_batch(2, r, 3) for r in range(3)] == [2, 0, 0]
    assert real_rows_of_last_batch(0, 1, 3) == 3 and real_rows_of_last_batch(-1, 1, 3) == 3

    # a batch of examples [single, pair, pair, single] (collated: pairs first, then singles) of
    # which the first two are real: the first pair and the first single stay
    rewards = torch.tensor([1.0, 2.0, 0.0, 5.0, 0.5, -0.5])  # chosen x2, rejected x2, single x2
    labels = torch.tensor([1.0, 0.0])
    order = torch.tensor([1, 2, 0, 3])
    kept, n_pairs, kept_labels = select_examples(rewards, 2, labels, order < 2)
    assert kept.tolist() == [1.0, 0.0, 0.5] and n_pairs == 1 and kept_labels.tolist() == [1.0]
    _, stats = reward_loss(kept, n_pairs, kept_labels)
    # pair 1 ranked right (margin 1), its repeat of pair 2 (ranked wrong) left out; single right
    assert stats == {"accuracy": 1.0, "margin": 1.0, "unpaired_accuracy": 1.0}


def test_trainer_leaves_out_padding_only_where_accelerate_pads(
    backbone_dir, toy, tmp_path, monkeypatch
):
    """The trainer's wiring of the above: rank 1 of 2 in the last batch of 11 pairs (3 per
    rank, remainder 5) keeps 2 of its 3 pairs, and the loss over those two; with
    ``even_batches`` off accelerate pads nothing, so all 3 count; before the last batch too."""
    import accelerate
    from accelerate.state import GradientState

    train, _ = read_reward_files(toy["alignment"][0])
    trainer = RewardTrainer(_model(backbone_dir, "alignment"), _args(tmp_path, "alignment"), train)
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 5.0, 1.0])  # pairs right, wrong, right
    labels, order = torch.zeros(0), torch.tensor([0, 1, 2])
    loss, stats = reward_loss(rewards, 3, labels, "bt", trainer.tau)
    monkeypatch.setattr(accelerate.Accelerator, "process_index", property(lambda self: 1))
    monkeypatch.setattr(GradientState, "remainder", property(lambda self: 5))
    end = {"value": True}
    monkeypatch.setattr(GradientState, "end_of_dataloader", property(lambda self: end["value"]))
    full = {**stats, "loss": float(loss)}

    kept, n_pairs, n_single = trainer._stats_of_real_examples(full, rewards, 3, labels, order)
    two_loss, two = reward_loss(torch.tensor([1.0, 2.0, 0.0, 5.0]), 2, labels, "bt", trainer.tau)
    assert (n_pairs, n_single) == (2, 0) and kept["accuracy"] == two["accuracy"] == 0.5
    assert kept["loss"] == pytest.approx(float(two_loss))
    trainer.accelerator.even_batches = False
    assert trainer._stats_of_real_examples(full, rewards, 3, labels, order) == (full, 3, 0)
    trainer.accelerator.even_batches, end["value"] = True, False
    assert trainer._stats_of_real_examples(full, rewards, 3, labels, order) == (full, 3, 0)
