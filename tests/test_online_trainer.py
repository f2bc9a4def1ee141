"""The online-RL base (DDPO on it): an active PPO clip checked against the surrogate by hand, the
sampling streams, metrics reduced over processes, the reward on the process's device (and the
worker thread's), config ranges for every config, and the recipes' help, logs and outputs."""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_sd import saved_tiny_pipeline, tiny_ddpo_config

import alignment.online_trainer as online_trainer
from alignment.ddpo_trainer import DDPOConfig, DDPOTrainer
from alignment.rewards import get_reward_fn, register_reward
from alignment.seeding import stream_generator
from alignment.trainer_utils import reduce_metrics

PROMPTS = ["a cat", "a dog", "a red circle"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _config(out: Path, **kw) -> DDPOConfig:
    """One optimiser step per train batch, all 3 timesteps in one call, one epoch."""
    base = dict(
        gradient_accumulation_steps=1,
        timesteps_per_call=3,
        learning_rate=3e-2,
        clip_range=1e-4,
        num_epochs=1,
    )
    return tiny_ddpo_config(out, **{**base, **kw})


# ----------------------------------------------------------------------------- PPO clip


def test_ppo_clip_is_active_and_the_logged_loss_is_the_clipped_surrogate(tmp_path, monkeypatch):
    """Two inner epochs x two optimiser steps per epoch: from the second step on the policy has
    moved, the ratios leave [1 - eps, 1 + eps] and the clip changes the loss. The logged loss and
    clipfrac equal the clipped surrogate and the clipped fraction recomputed by hand (numpy) from
    the recorded log-probs, old log-probs and advantages of every update."""
    calls = []
    real = online_trainer.ppo_clip_loss

    def recording(adv, log_prob, old_log_prob, clip_range, weights=None):
        calls.append(
            (adv.detach().double(), log_prob.detach().double(), old_log_prob.double(), weights)
        )
        return real(adv, log_prob, old_log_prob, clip_range, weights)

    monkeypatch.setattr(online_trainer, "ppo_clip_loss", recording)
    trainer = DDPOTrainer(_config(tmp_path, num_inner_epochs=2), prompts=PROMPTS)
    samples, _ = trainer.sample_epoch()
    adv, _ = trainer.compute_advantages(samples["prompts"], samples["rewards"])
    info = trainer.train_on_samples(samples, adv)
    assert trainer.global_step == 4 and len(calls) == 4  # 2 inner epochs x 2 batches
    eps = trainer.config.clip_range
    losses, unclipped, fracs = [], [], []
    for a, lp, old, w in calls:
        assert w is None or torch.equal(w, torch.ones_like(w))  # temporal_discount 1
        a, lp, old = a.numpy(), lp.numpy(), old.numpy()
        ratio = np.exp(lp - old)
        losses.append(np.mean(np.maximum(-a * ratio, -a * np.clip(ratio, 1 - eps, 1 + eps))))
        unclipped.append(np.mean(-a * ratio))
        fracs.append(np.mean(np.abs(ratio - 1) > eps))
    assert fracs[0] == 0.0  # the first update: ratio exactly 1
    assert info["clipfrac"] == pytest.approx(np.mean(fracs), abs=1e-12) and info["clipfrac"] > 0.2
    assert info["loss"] == pytest.approx(np.mean(losses), rel=1e-5, abs=1e-9)
    assert abs(np.mean(losses) - np.mean(unclipped)) > 1e-4  # the clip changed the loss
    assert info["approx_kl"] > 0


# ----------------------------------------------------------------------------- streams


def test_sampling_noise_and_prompts_come_from_the_epoch_streams(tmp_path):
    trainer = DDPOTrainer(_config(tmp_path, images_per_prompt=2), prompts=PROMPTS)
    first, _ = trainer.sample_epoch()
    trainer.epoch = 1
    second, _ = trainer.sample_epoch()
    assert not torch.equal(first["latents"][:, 0], second["latents"][:, 0])
    # epoch 1, batch 1 (process 0 of 1): prompt stream key 1, images 2 and 3 of the epoch
    g = stream_generator(trainer.config.seed, "prompts", 1, 1)
    want = PROMPTS[int(torch.randint(len(PROMPTS), (1,), generator=g))]
    assert second["prompts"][2:] == [want, want]
    gens = [stream_generator(trainer.config.seed, "sample", 1, i) for i in (2, 3)]
    with torch.no_grad():
        again = trainer.policy.sample([want, want], 3, 1.0, 2.0, generator=gens)
    torch.testing.assert_close(second["latents"][2:, 0], again.latents[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(second["log_probs"][2:], again.log_probs, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- metrics reduction


class _TwoRanks:
    """Two fake processes whose ``reduce(sum)`` is a real all-reduce across two threads."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2)
        self.parts: dict[int, torch.Tensor] = {}

    def rank(self, index: int):
        outer = self

        class Acc:
            num_processes, process_index, device = 2, index, torch.device("cpu")

            def reduce(self, t, reduction="sum"):
                assert reduction == "sum"
                outer.parts[index] = t.clone()
                outer.barrier.wait()
                total = outer.parts[0] + outer.parts[1]
                outer.barrier.wait()
                return total

        return Acc()


def test_reduce_metrics_weighted_mean_and_summed_counts_over_two_ranks():
    ranks, out = _TwoRanks(), {}
    local = {
        0: ({"loss": 1.0, "rewards/nonfinite": 1.0}, 1.0),
        1: ({"loss": 4.0, "rewards/nonfinite": 2.0}, 3.0),
    }

    def run(i):
        metrics, weight = local[i]
        out[i] = reduce_metrics(ranks.rank(i), metrics, weight, sum_keys=["rewards/nonfinite"])

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    # (1 * 1 + 4 * 3) / (1 + 3) = 3.25; counts: 1 + 2
    assert out[0] == out[1] == {"loss": 3.25, "rewards/nonfinite": 3.0}


def test_ddpo_logs_the_metrics_reduced_over_processes(tmp_path, monkeypatch):
    seen = []

    def fake_reduce(acc, metrics, weight=1.0, sum_keys=()):
        seen.append(dict(metrics))
        return {k: v + 1000.0 for k, v in metrics.items()}  # what "the other ranks" added

    monkeypatch.setattr(online_trainer, "reduce_metrics", fake_reduce)
    trainer = DDPOTrainer(_config(tmp_path), prompts=PROMPTS)
    history = trainer.train()
    assert set(seen[0]) == {"loss", "approx_kl", "clipfrac"}
    for key in seen[0]:
        assert history[0][key] == seen[0][key] + 1000.0


# ----------------------------------------------------------------------------- devices


def test_process_device_is_indexed_and_the_thread_setter_sets_cuda_only(monkeypatch):
    from reward import guards

    assert guards.process_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert guards.process_device() == torch.device("cuda", 2)
    monkeypatch.setenv("LOCAL_RANK", "7")  # one visible GPU per process: its current device
    assert guards.process_device() == torch.device("cuda", 3)
    monkeypatch.delenv("LOCAL_RANK")
    assert guards.process_device() == torch.device("cuda", 3)
    from reward.scorer import default_device_dtype

    assert default_device_dtype(None, None) == (torch.device("cuda", 3), torch.bfloat16)

    set_to = []

    def set_device(device):  # as torch's: an index-less "cuda" is refused
        if torch.device(device).index is None:
            raise ValueError(f"Expected a torch.device with a specified index, got {device}")
        set_to.append(device)

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    guards.set_thread_device("cpu")
    guards.set_thread_device(torch.device("cuda", 1))
    # accelerate's device for one process without DeepSpeed: the current device, resolved
    guards.set_thread_device(torch.device("cuda"))
    assert set_to == [torch.device("cuda", 1), torch.device("cuda", 3)]
    assert guards.indexed_device("cuda") == torch.device("cuda", 3)
    assert guards.indexed_device("cpu") == torch.device("cpu")


_RECEIVED: list = []


@register_reward("test_device_recorder")
def _device_recorder(device=None):
    _RECEIVED.append(device)
    return lambda images, prompts: images.float().mean(dim=(1, 2, 3))


def test_trainers_build_the_reward_on_the_accelerator_device(tmp_path, monkeypatch):
    from alignment.dpo_trainer import DPOConfig, DPOTrainer
    from alignment.draft_trainer import DraftConfig, DraftTrainer

    _RECEIVED.clear()
    ddpo = DDPOTrainer(_config(tmp_path / "a", reward="test_device_recorder"), prompts=PROMPTS)
    common = dict(
        pretrained_model=str(saved_tiny_pipeline()),
        reward="test_device_recorder",
        num_steps=2,
        log_with="none",
        progress_bar=False,
    )
    dpo = DPOTrainer(DPOConfig(data="online", output_dir=str(tmp_path / "b"), **common))
    draft = DraftTrainer(DraftConfig(output_dir=str(tmp_path / "c"), **common))
    devices = [t.accelerator.device for t in (ddpo, dpo, draft)]
    assert devices == _RECEIVED and all(isinstance(d, torch.device) for d in _RECEIVED)
    # a device in the user's reward_kwargs wins; rewards without a device argument get none
    mine = DDPOTrainer(
        _config(
            tmp_path / "d", reward="test_device_recorder", reward_kwargs='{"device": "cuda:7"}'
        ),
        prompts=PROMPTS,
    )
    assert _RECEIVED[-1] == "cuda:7" and mine.accelerator.device == torch.device("cpu")
    assert get_reward_fn("brightness", device="cuda:1") is not None

    # llava_reward hands the device to the scorer
    import reward.scorer

    got = {}

    def fake_from_pretrained(path, device=None, dtype=None, **kw):
        got["device"] = device

        class Scorer:
            def as_reward_fn(self, *a, **k):
                return "fn"

        return Scorer()

    monkeypatch.setattr(reward.scorer.RewardScorer, "from_pretrained", fake_from_pretrained)
    assert get_reward_fn("llava_reward", device=torch.device("cuda", 1), path="x") == "fn"
    assert got["device"] == torch.device("cuda", 1)


def test_every_trainer_builds_and_prepares_its_policy_through_the_shared_base(tmp_path):
    """One build/prepare path (PolicyTrainerBase) for every trainer: the policy kind follows
    ``pretrained_model`` (SD 1.x folder: DiffusionPolicy and its UNet; SD3: FlowPolicy and its
    transformer), each with its own LoRA alpha default, and the forward runs through the prepared
    module. DDPO and DRaFT (SD 1.x/2.x only) refuse an SD3 pipeline, by name before loading it,
    or passed in."""
    from alignment.dpo_trainer import DPOConfig, DPOTrainer
    from alignment.draft_trainer import DraftConfig, DraftTrainer
    from alignment.flow_policy import FlowPolicy
    from alignment.policy import DiffusionPolicy
    from alignment.trainer_utils import LORA_ALPHA_HELP

    common = dict(data="online", reward="brightness", lora_rank=4, log_with="none")
    for name, kind, model, alpha in [
        (str(saved_tiny_pipeline()), DiffusionPolicy, "unet", 4),  # rank: scale 1
        ("tiny-sd3", FlowPolicy, "transformer", 8),  # 2 x rank: Flow-GRPO's 32 / 64
    ]:
        cfg = DPOConfig(pretrained_model=name, output_dir=str(tmp_path / model), **common)
        trainer = DPOTrainer(cfg, prompts=PROMPTS)
        policy = trainer.policy
        assert type(policy) is kind and trainer.is_flow == (kind is FlowPolicy)
        assert policy.trained_model is getattr(policy, model) and cfg.lora_alpha is None
        assert policy.lora_config.lora_alpha == alpha
        assert policy.forward_model() is trainer.unet  # the prepared module
        assert trainer.trainable == [
            p for p in getattr(policy, model).parameters() if p.requires_grad
        ]
    assert "the rank for SD 1.x/2.x" in LORA_ALPHA_HELP and "2 x the rank" in LORA_ALPHA_HELP

    with pytest.raises(ValueError, match="DDPOTrainer trains SD 1.x/2.x.*'tiny-sd3'.*GRPOTrainer"):
        DDPOTrainer(_config(tmp_path / "ddpo", pretrained_model="tiny-sd3"), prompts=PROMPTS)
    refl = DraftConfig(
        pretrained_model="tiny-sd3",
        output_dir=str(tmp_path / "refl"),
        log_with="none",
        method="refl",
        num_steps=4,
    )
    with pytest.raises(ValueError, match="method='refl'.*SD 3.x / FLUX.*method='draft'"):
        DraftTrainer(refl, prompts=PROMPTS)


def test_async_reward_worker_thread_sets_the_device_before_scoring(tmp_path, monkeypatch):
    events = []

    def record(device):
        events.append(("set", threading.get_ident(), device))

    def reward(images, prompts):
        events.append(("score", threading.get_ident(), None))
        return images.float().mean(dim=(1, 2, 3))

    monkeypatch.setattr(online_trainer, "set_thread_device", record)
    trainer = DDPOTrainer(_config(tmp_path, async_reward=True), reward_fn=reward, prompts=PROMPTS)
    trainer.sample_epoch()
    trainer._pool.shutdown(wait=True)
    worker = events[0][1]
    assert worker != threading.get_ident()
    assert events == [
        ("set", worker, trainer.accelerator.device),
        ("score", worker, None),
        ("score", worker, None),
    ]


# ----------------------------------------------------------------------------- config ranges


def _grpo(**kw):
    from alignment.grpo_trainer import GRPOConfig

    return GRPOConfig(**kw)


def _scaling(**kw):
    from alignment.scaling import ScalingConfig

    return ScalingConfig(**kw)


def _dpo(**kw):
    from alignment.dpo_trainer import DPOConfig

    return DPOConfig(**kw)


def _draft(**kw):
    from alignment.draft_trainer import DraftConfig

    return DraftConfig(**kw)


def _reward_args(**kw):
    from reward.training import RewardTrainingArguments

    return RewardTrainingArguments(output_dir="unused", use_cpu=True, report_to="none", **kw)


def _reward_script(**kw):
    from reward.training import RewardScriptArguments

    return RewardScriptArguments(**kw)


def _eval_script(**kw):
    from reward.evaluate import EvalScriptArguments

    return EvalScriptArguments(model_dir="m", data_file=["d.json"], **kw)


BAD = [
    # the examples: NaN loss or silent nonsense, accepted before
    (DDPOConfig, "eta", 0.0, "> 0"),
    (DDPOConfig, "eta", -1.0, "> 0"),
    (DDPOConfig, "adv_clip_max", -5.0, "> 0"),
    (DDPOConfig, "clip_range", -1.0, "> 0"),
    (DDPOConfig, "clip_range", 0.0, "> 0"),
    (DDPOConfig, "learning_rate", 0.0, "> 0"),
    (DDPOConfig, "learning_rate", float("nan"), "> 0"),
    (DDPOConfig, "num_steps", 0, ">= 1"),
    (DDPOConfig, "timestep_fraction", 0.0, "(0, 1]"),
    (DDPOConfig, "timestep_fraction", 1.5, "(0, 1]"),
    (DDPOConfig, "temporal_discount", 0.0, "(0, 1]"),
    (DDPOConfig, "adam_beta2", 1.0, "[0, 1)"),
    (DDPOConfig, "max_grad_norm", 0.0, "> 0"),
    (DDPOConfig, "kl_coef", -0.1, ">= 0"),
    (DDPOConfig, "max_consecutive_skips", 0, ">= 1"),
    (_dpo, "beta", 0.0, "> 0"),
    (_dpo, "max_steps", 0, ">= 1"),
    (_dpo, "images_per_prompt", 1, ">= 2"),
    (_dpo, "eta", -1.0, ">= 0"),
    (_dpo, "lr_warmup_steps", -1, ">= 0"),
    (_draft, "reward_scale", 0.0, "> 0"),
    (_draft, "learning_rate", -1e-4, "> 0"),
    (_draft, "max_grad_norm", -1.0, "> 0"),
    (_grpo, "noise_level", 0.0, "> 0"),
    (_grpo, "images_per_prompt", 1, ">= 2"),
    (_grpo, "ema_decay", 1.0, "[0, 1)"),
    (_grpo, "sde_window_size", -1, ">= 0"),
    (_grpo, "eval_num_steps", 0, ">= 1"),
    (_grpo, "kl_coef", -0.04, ">= 0"),
    (_scaling, "n", 0, ">= 1"),
    (_scaling, "ess_threshold", 0.0, "(0, 1]"),
    (_scaling, "resample_start", 1.5, "[0, 1]"),
    (_reward_args, "tau", 0.0, "> 0"),
    (_reward_args, "learning_rate", 0.0, "> 0"),
    (_reward_args, "max_consecutive_skips", 0, ">= 1"),
    (_reward_script, "lora_dropout", 1.0, "[0, 1)"),
    (_reward_script, "eval_split", 1.0, "[0, 1)"),
    (_reward_script, "lora_r", 0, ">= 1"),
    (_eval_script, "batch_size", 0, ">= 1"),
]


@pytest.mark.parametrize(
    ("make", "name", "value", "rule"), BAD, ids=[f"{b[1]}={b[2]}" for b in BAD]
)
def test_config_refuses_values_out_of_range_naming_field_value_and_range(make, name, value, rule):
    with pytest.raises(ValueError) as err:
        make(**{name: value})
    message = str(err.value)
    assert f".{name} = {value!r} is out of range: it must be {rule}" in message


def test_configs_accept_their_defaults_and_the_edges_of_each_range():
    DDPOConfig(eta=1e-6, timestep_fraction=1.0, temporal_discount=1.0, kl_coef=0.0)
    _dpo(eta=0.0, images_per_prompt=2)
    _draft(eta=0.0)
    _scaling(ess_threshold=1.0, resample_start=0.0, method="best_of_n", eta=0.0)
    _reward_script(lora_dropout=0.0, eval_split=0.0)


@pytest.mark.parametrize(
    "name",
    [
        "ddpo_tiny",
        "ddpo_sd15_llava_reward",
        "dpo_tiny",
        "dpo_sd15_pickapic",
        "dpo_sd15_online_llava_reward",
        "draft_tiny",
        "draft_sd15_llava_reward",
        "grpo_tiny",
        "grpo_sd35m_llava_reward",
        "grpo_sd35m_pickscore_style",
        "grpo_flux_llava_reward",
    ],
)
def test_every_shipped_policy_config_passes_the_range_checks(name):
    from alignment.dpo_trainer import DPOConfig
    from alignment.draft_trainer import DraftConfig
    from alignment.grpo_trainer import GRPOConfig
    from alignment.recipe_utils import RecipeParser

    kinds = {"ddpo": DDPOConfig, "dpo": DPOConfig, "draft": DraftConfig, "grpo": GRPOConfig}
    cls = kinds[name.split("_")[0]]
    path = Path(__file__).resolve().parents[1] / "recipes" / "configs" / f"{name}.yaml"
    (cfg,) = RecipeParser(cls).parse_args_and_config(["--config", str(path)])
    assert cfg.max_consecutive_skips == 3 and cfg.learning_rate > 0
    if cls is GRPOConfig:  # complete groups on one process (and so on any count)
        assert (cfg.sample_batch_size * cfg.num_batches_per_epoch) % cfg.images_per_prompt == 0


def test_recipe_refuses_a_bad_value_from_the_command_line():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    from ddpo_sd15 import main

    with pytest.raises(ValueError, match=r"DDPOConfig\.eta = 0\.0 is out of range"):
        main(["--pretrained_model", "tiny", "--eta", "0"])


# ----------------------------------------------------------------------------- recipe frictions


def test_recipe_help_lists_config_says_what_no_flags_do_and_states_defaults_once():
    from alignment.recipe_utils import RecipeParser
    from reward.evaluate import EvalScriptArguments

    text = " ".join(RecipeParser(DDPOConfig).format_help().split())
    assert "--config FILE.yaml YAML file of option values" in text
    assert "--no_progress_bar, --no-progress-bar Turn --progress_bar off (set it to false)." in text
    assert "Show tqdm progress bars. (default: True)" in text
    assert "Turn --progress_bar off (set it to false). (default" not in text
    help_eval = " ".join(RecipeParser(EvalScriptArguments).format_help().split())
    assert "(default: cuda)" not in help_eval and "). (default: None)" in help_eval
    assert "(default: bf16 on a GPU). (default" not in help_eval


def test_recipes_read_config_equals_file_refuse_abbreviations_and_take_lists_either_way(tmp_path):
    """``--config=FILE`` reads the YAML (it was silently ignored: the recipe crashed unpacking);
    an abbreviated option is refused by name; the policy's comma fields take a YAML list too, and
    the reward's list fields a single value (a lone YAML string was split into characters)."""
    from alignment.dpo_trainer import DPOConfig
    from alignment.recipe_utils import RecipeParser
    from reward.training import RewardScriptArguments

    path = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "ddpo_tiny.yaml"
    (cfg,) = RecipeParser(DDPOConfig).parse_args_and_config([f"--config={path}"])
    assert (cfg.pretrained_model, cfg.num_epochs) == ("tiny", 8)
    with pytest.raises(ValueError, match="not used by the HfArgumentParser: \\['--conf'"):
        RecipeParser(DDPOConfig).parse_args_and_config(["--conf", str(path)])

    yaml = tmp_path / "lists.yaml"
    yaml.write_text("lora_target_modules: [to_q, to_k]\ndata: [a.jsonl, b.jsonl]\n")
    (dpo,) = RecipeParser(DPOConfig).parse_args_and_config(["--config", str(yaml)])
    assert dpo.lora_target_modules == "to_q,to_k" and dpo.target_modules() == ["to_q", "to_k"]
    assert dpo.data == "a.jsonl,b.jsonl" and not dpo.online
    yaml.write_text("train_file: toy\nlora_target_modules: [q_proj, v_proj]\n")
    (script,) = RecipeParser(RewardScriptArguments).parse_args_and_config(["--config", str(yaml)])
    assert script.train_file == ["toy"] and script.lora_target_modules == ["q_proj", "v_proj"]
    argv = ["--train_file", "a.jsonl", "data/b,c.jsonl", "--eval_file", "d.jsonl"]
    (script,) = RecipeParser(RewardScriptArguments).parse_args_and_config(argv)
    assert script.train_file == ["a.jsonl", "data/b,c.jsonl"]  # a path may hold a comma
    assert script.eval_file == ["d.jsonl"]

    # the reward's loggers: transformers' parser takes one value for report_to (it refused
    # "--report_to tensorboard wandb" and kept "a,b" as one unknown integration name)
    from reward.training import RewardTrainingArguments

    def report_to(value: str) -> list[str]:
        out = str(tmp_path / "rt")
        argv = ["--output_dir", out, "--report_to", value]
        (args,) = RecipeParser(RewardTrainingArguments).parse_args_and_config(argv)
        return args.report_to

    assert report_to("tensorboard, codecarbon") == ["tensorboard", "codecarbon"]
    assert report_to("tensorboard") == ["tensorboard"] and report_to("none") == []
    assert report_to("auto, codecarbon")[-1] == "codecarbon" and "auto" not in report_to("auto,a")
    with pytest.raises(ValueError, match="names no logger"):
        report_to(" , ")


def test_quiet_logs_drops_the_torchvision_fallback_and_names_the_ds_accelerator(monkeypatch):
    from alignment.recipe_utils import quiet_logs

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    quiet_logs()
    assert torch.cuda.is_available() or os.environ["DS_ACCELERATOR"] == "cpu"
    logger = logging.getLogger("transformers.utils.import_utils")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert seen == ["something else"]


def test_best_of_n_recipe_reports_progress_and_where_it_wrote(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    from best_of_n import main

    out = tmp_path / "bon"
    report = main(
        [
            "--pretrained_model", str(saved_tiny_pipeline()), "--n", "2", "--num_steps", "2",
            "--reward", "brightness", "--max_prompts", "2", "--output_dir", str(out),
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert "best_of_n: 2 prompts x 2 images, 2 steps, reward 'brightness'" in captured.out
    assert f"scores.json to {out.resolve()}" in captured.out
    assert "best-of-N batches" in captured.err  # the progress bar
    assert (out / "p0001.png").is_file() and math.isfinite(report["mean_best_score"])


def test_dpo_built_pairs_go_under_output_dir(tmp_path, monkeypatch):
    from alignment.dpo_trainer import DPOConfig, DPOTrainer

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = DPOConfig(
        pretrained_model=str(saved_tiny_pipeline()),
        data="pairs/pairs.jsonl",
        build_data=True,
        reward="brightness",
        images_per_prompt=2,
        num_steps=2,
        output_dir=str(tmp_path / "run"),
        log_with="none",
        progress_bar=False,
    )
    trainer = DPOTrainer(cfg, prompts=PROMPTS)
    assert trainer.data_path == str(tmp_path / "run" / "pairs" / "pairs.jsonl")
    assert Path(trainer.data_path).is_file() and not (elsewhere / "pairs").exists()
    assert len(trainer.dataset) == 3


@pytest.mark.parametrize("kind", ["ddpo", "dpo", "draft"])
def test_a_bad_reward_or_prompt_source_fails_before_any_model_is_loaded(
    kind, monkeypatch, tmp_path
):
    """The reward's name and the prompt source are checked before ``setup`` loads and prepares
    the policy (an SD 3.5 or FLUX load takes minutes before a typo surfaced)."""
    from alignment.dpo_trainer import DPOConfig, DPOTrainer
    from alignment.draft_trainer import DraftConfig, DraftTrainer
    from alignment.trainer_utils import PolicyTrainerBase

    def no_setup(self, *args, **kwargs):
        raise AssertionError("setup reached: the model would have been loaded")

    monkeypatch.setattr(PolicyTrainerBase, "setup", no_setup)
    cls, config_cls = {
        "ddpo": (DDPOTrainer, DDPOConfig),
        "dpo": (DPOTrainer, DPOConfig),
        "draft": (DraftTrainer, DraftConfig),
    }[kind]
    out = str(tmp_path)
    with pytest.raises(KeyError, match="Unknown reward 'no_such_reward'"):
        cls(config_cls(output_dir=out, reward="no_such_reward"))
    with pytest.raises(FileNotFoundError):
        cls(config_cls(output_dir=out, reward="brightness", prompts=str(tmp_path / "none.txt")))


def test_every_default_model_is_a_bundled_local_folder():
    """No default path downloads: a trainer or best-of-N run without a model named runs on the
    bundled tiny-world pipelines (a hub id is only used when the user gives one)."""
    from alignment.dpo_trainer import DPOConfig
    from alignment.draft_trainer import DraftConfig
    from alignment.grpo_trainer import GRPOConfig
    from alignment.scaling import ScalingConfig

    for cls in (DDPOConfig, DPOConfig, DraftConfig, GRPOConfig, ScalingConfig):
        folder = Path(cls.__dataclass_fields__["pretrained_model"].default)
        assert (folder / "model_index.json").is_file(), (cls.__name__, folder)
    assert (
        Path(GRPOConfig.__dataclass_fields__["pretrained_model"].default).name == "tiny-world-sd3"
    )


def test_mixed_precision_from_yaml_is_checked_and_a_clash_with_the_launcher_is_said(
    tmp_path, monkeypatch, caplog
):
    """An unquoted YAML ``mixed_precision: no`` (a boolean) means 'no'; a bad value is refused by
    name; a config value that overrides ``accelerate launch --mixed_precision`` is logged."""
    from alignment.recipe_utils import RecipeParser

    yaml = tmp_path / "mp.yaml"
    yaml.write_text("mixed_precision: no\n")
    (cfg,) = RecipeParser(DDPOConfig).parse_args_and_config(["--config", str(yaml)])
    assert cfg.mixed_precision == "no"
    with pytest.raises(ValueError, match="mixed_precision = 'fp8': use 'no', 'fp16' or 'bf16'"):
        tiny_ddpo_config(tmp_path, mixed_precision="fp8")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with caplog.at_level(logging.WARNING, logger="alignment.trainer_utils"):
        DDPOTrainer(tiny_ddpo_config(tmp_path, mixed_precision="no", num_epochs=1))
    assert "overrides accelerate launch's 'bf16'" in caplog.text
