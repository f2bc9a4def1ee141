"""Two processes on the CPU: plain DDP (gloo) and DeepSpeed ZeRO-2 / ZeRO-3 (gloo with the real
world size, :mod:`reward.distributed`) for DDPO, Flow-GRPO (groups spanning the ranks),
Diffusion-DPO (``build_data`` then offline, and online), DRaFT-1, ReFL and reward training; and
resuming on another number of processes.

Process start-up is most of the cost, so one ``torchrun`` launch per backend runs every scenario
in sequence through the recipes' ``main`` (``tests/_multiprocess_scenarios.py``); module fixtures
hold the launches' records and the tests read them. For every scenario: both ranks ran and
accelerate counted two processes, they drew different prompts / noise / pairs / batches, their
trained weights (gathered whole) are identical and trained, and one export was written. ZeRO-3
uses ``ds_configs/zero3_partition_all.json`` (persistence threshold 0), so each rank holds half of
the tiny UNet; ZeRO-3 is where ReFL's stop step and DPO's ``build_data`` used to break (the ranks
made different numbers of UNet calls, or only one of them sampled).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _launch import free_port, launch_env
from _multiprocess_scenarios import ROOT, SCENARIOS, run_scenario, weights_sha
from _tiny_sd import saved_tiny_pipeline
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed"),
]

DRIVER = ROOT / "tests" / "_multiprocess_scenarios.py"
ALL = list(SCENARIOS)  # ddpo, dpo_build, dpo_online, draft, refl, grpo, reward
ZERO = {"zero2": "zero2.json", "zero3": "zero3_partition_all.json"}


def _launch(world: dict, records: str, specs: list[str], nproc: int = 2) -> dict:
    """torchrun the scenario driver; returns ``{record: [rank 0, rank 1, ...]}``."""
    out = world["root"]
    env = launch_env(
        pythonpath=True,
        drop_accelerate=True,
        ACCELERATE_DEEPSPEED_ZERO3_INIT="false",
        ACCELERATE_MIXED_PRECISION="no",
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(DRIVER), "--out", str(out), "--records", str(out / records),
        "--tiny", world["tiny"], "--prompts", world["prompts"], *specs,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    found: dict[str, list[dict]] = {}
    for path in sorted((out / records).glob("*.rank*.json")):
        found.setdefault(path.name.split(".rank")[0], []).append(json.loads(path.read_text()))
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """All the runs, in this order:

    1. one process (in this process): DDPO, DPO and DRaFT runs that two ranks must reproduce
       (two accumulated micro-batches = two ranks of one) and that the 1 -> 2 resumes continue;
    2. one two-process launch: every scenario under DDP (``ddp_<scenario>``) plus the 1 -> 2
       resumes, then under ZeRO-2 (``zero2_<scenario>``) and ZeRO-3 (``zero3_<scenario>``);
    3. one process (in this process): the 2 -> 1 resumes of the DDP runs, then a weights-only
       resume of the DDPO one;
    4. one one-process launch under ZeRO-2: a plain resume of a 2-rank ZeRO-2 checkpoint (an
       error) and weights-only resumes of it and of a 2-rank ZeRO-3 checkpoint.
    """
    root = tmp_path_factory.mktemp("multiprocess")
    prompts = root / "prompts.txt"  # 3 prompts: build_data shares them 2 + 1 (padded)
    prompts.write_text("a cat\na red circle\na boat on the water\n", encoding="utf-8")
    world = {"root": root, "tiny": str(saved_tiny_pipeline()), "prompts": str(prompts)}
    args = (world["tiny"], world["prompts"])
    one = {
        "ddpo": run_scenario("ddpo", root / "one_ddpo", *args),
        "dpo_build": run_scenario(
            "dpo_build", root / "one_dpo_build", *args, gradient_accumulation_steps=2
        ),
        "draft": run_scenario("draft", root / "one_draft", *args, gradient_accumulation_steps=2),
        # the 8 images two ranks sample in 2 batches of 2 each: one process, 4 batches of 2
        "grpo": run_scenario(
            "grpo", root / "one_grpo", *args, num_batches_per_epoch=4, gradient_accumulation_steps=4
        ),
    }
    specs = [f"{n}:ddp=1,label=ddp_{n}" for n in ALL]
    specs += [  # 1 -> 2
        f"ddpo:ddp=1,label=one_ddpo,record=ddpo_1to2,resume_from=latest,num_epochs=2,"
        f"export_dir={root}/one_ddpo/export2",
        f"dpo_build:ddp=1,label=one_dpo_build,record=dpo_1to2,resume_from=latest,max_steps=2,"
        f"export_dir={root}/one_dpo_build/export2",
    ]
    specs += [f"{n}:ds_config={cfg},label={z}_{n}" for z, cfg in ZERO.items() for n in ALL]
    two = _launch(world, "records", specs)
    back = {  # 2 -> 1
        "ddpo": run_scenario("ddpo", root / "ddp_ddpo", *args, resume_from="latest", num_epochs=2),
        "dpo_build": run_scenario(
            "dpo_build", root / "ddp_dpo_build", *args, resume_from="latest", max_steps=2
        ),
    }
    back["ddpo_weights_only"] = run_scenario(  # from accelerate's model.safetensors
        "ddpo", root / "ddp_ddpo", *args, resume_from="latest", num_epochs=3, keep_last=2,
        resume_weights_only="true",
    )  # fmt: skip
    resume = "resume_from=latest,ds_config=zero2.json,keep_last=2"
    specs = [
        f"ddpo:label=zero2_ddpo,record=ddpo_plain,num_epochs=2,expect_error=1,{resume}",
        f"ddpo:label=zero2_ddpo,record=ddpo_weights_only,num_epochs=2,{resume},"
        "resume_weights_only=true",
        f"dpo_build:label=zero3_dpo_build,record=dpo_from_zero3,max_steps=2,{resume},"
        "resume_weights_only=true",
    ]
    one_ds = _launch(world, "records_one", specs, nproc=1)
    return {"out": root, "one": one, "two": two, "back": back, "one_ds": one_ds}


# ----------------------------------------------------------------------------- checks


def _calls(record: dict, key: str) -> list:
    return [d[key] for d in record["draws"] if key in d]


def _check_two_ranks(records: dict, name: str, scenario: str, folder: Path, deepspeed: bool):
    r0, r1 = records[name]
    assert (r0["rank"], r1["rank"], r0["world"], r1["world"]) == (0, 1, 2, 2)
    assert r0["num_processes"] == r1["num_processes"] == 2  # accelerate counted both
    assert r0["distributed_type"] == ("DEEPSPEED" if deepspeed else "MULTI_CPU")
    # the ranks drew different things
    if scenario == "ddpo":
        assert _calls(r0, "noise") != _calls(r1, "noise")
    elif scenario == "grpo":  # different noise, the same groups (each spans both ranks)
        assert _calls(r0, "noise") != _calls(r1, "noise")
        (p0,), (p1,) = _calls(r0, "group_prompts"), _calls(r1, "group_prompts")
        assert p0[:2] == p1[:2] and p0[2:] == p1[2:] and p0[0] == p0[1]
    elif scenario.startswith("dpo"):
        ids0, ids1 = _calls(r0, "ids"), _calls(r1, "ids")
        assert ids0 == [[0]] and ids1 == [[1]]  # consecutive slices of one pair stream
        assert _calls(r0, "lat") != _calls(r1, "lat")
        sampled = _calls(r0, "sampled_prompt_ids") + _calls(r1, "sampled_prompt_ids")
        if scenario == "dpo_build":  # 3 prompts shared 2 + 1 (padded to equal UNet calls)
            assert sampled == [[0, 2], [1, 1]]
        else:
            assert sampled == [[0], [1]]
    elif scenario in ("draft", "refl"):
        seeds0, seeds1 = _calls(r0, "noise_seeds"), _calls(r1, "noise_seeds")
        assert seeds0 and not set(sum(seeds0, [])) & set(sum(seeds1, []))
        assert _calls(r0, "reward") != _calls(r1, "reward")
        if scenario == "refl":  # the same stop step on both ranks, micro-batch by micro-batch
            assert _calls(r0, "stop") == _calls(r1, "stop") and len(_calls(r0, "stop")) == 2
    else:
        assert _calls(r0, "pixels") and _calls(r0, "pixels") != _calls(r1, "pixels")
    # the ranks end with the same trained weights
    assert r0["weights"]["sha"] == r1["weights"]["sha"]
    assert r0["weights"]["lora_b_abs"] > 0
    # one export
    if scenario == "reward":
        assert (folder / "adapters" / "alignment" / "adapter_model.safetensors").is_file()
        assert (folder / "eval_report_alignment.json").is_file()
    else:
        export = folder / "export"
        assert (export / "model_index.json").is_file()
        assert (export / "pytorch_lora_weights.safetensors").is_file()
        assert not export.with_name("export.tmp").exists()


@pytest.mark.parametrize("backend", ["ddp", *ZERO])
@pytest.mark.parametrize("scenario", ALL)
def test_two_ranks(runs, backend, scenario):
    name = f"{backend}_{scenario}"
    deepspeed = backend != "ddp"
    _check_two_ranks(runs["two"], name, scenario, runs["out"] / name, deepspeed=deepspeed)
    if backend == "zero3":  # really partitioned: each rank holds half of every parameter
        for r in runs["two"][name]:
            w = r["weights"]
            assert w["persistent"] == 0, w  # nothing kept whole for good
            if scenario != "reward":  # (the reward's final evaluation leaves a few fetched)
                assert w["held_whole"] == 0, w  # every UNet tensor released to its shard
            assert w["local_elements"] < 0.51 * w["total_elements"], w
            local, whole = w["largest"]
            assert 2 * local == whole, w


@pytest.mark.parametrize("backend", ["ddp", *ZERO])
def test_reward_eval_accuracy_is_over_every_shard_and_the_same_on_each_rank(runs, backend):
    """Each rank evaluates its shard of the eval pairs (6 and 5 of 11); the pair accuracy
    ``evaluate`` returns (which the best-checkpoint choice reads) is reduced over both: the same
    on each rank (one all-reduce in ``log``, reached by every rank under DDP and ZeRO), and equal
    to the full eval split's accuracy that the end-of-run report computes with the same final
    weights. The last batch of rank 1 is padded with a repeat of pair 0, which must not count:
    with it, k right of 11 would read (k + 0 or 1) / 12, never k / 11 for 0 < k < 11. (The
    weighting itself is checked by hand in ``tests/test_reward_training.py``.)"""
    name = f"{backend}_reward"
    r0, r1 = runs["two"][name]
    (m0,), (m1,) = _calls(r0, "eval_metrics"), _calls(r1, "eval_metrics")
    assert m0 == m1
    report = json.loads((runs["out"] / name / "eval_report_alignment.json").read_text())
    assert report["n_pairs"] == 11 and 0 < report["accuracy"] < 1, report
    assert m0["eval_accuracy"] == pytest.approx(report["accuracy"], abs=1e-6)


@pytest.mark.parametrize("scenario", ALL)
def test_the_backends_train_the_same_weights(runs, scenario):
    """Same streams, same global batch: DDP, ZeRO-2 and ZeRO-3 end with the same weights (up to
    the order of float reductions; measured relative differences <= 2e-6). Reward training
    included: its new adapter and head are seeded after the backbone is loaded (ZeRO-3's
    ``zero.Init`` load draws random numbers; seeded before it, ZeRO-3 started from other
    weights, ``|lora_B|`` 5.86 against DDP's 5.09 after two steps)."""
    ref = runs["two"][f"ddp_{scenario}"][0]["weights"]["lora_b_abs"]
    for zero in ZERO:
        got = runs["two"][f"{zero}_{scenario}"][0]["weights"]["lora_b_abs"]
        assert got == pytest.approx(ref, rel=2e-5), zero


def _pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("scenario", ["dpo_build", "draft"])
def test_one_process_and_two_draw_the_same_samples(runs, scenario):
    """The data position and the noise are keyed by the global sample: one process with two
    accumulated micro-batches trains on the samples two ranks of one sample train on, and ends
    with the same weights; build_data writes the same pairs."""
    one, two = runs["one"][scenario], runs["two"][f"ddp_{scenario}"]
    if scenario == "dpo_build":
        assert _calls(one, "ids") == [[0], [1]]
        assert _calls(one, "lat") == _calls(two[0], "lat") + _calls(two[1], "lat")
        out = runs["out"]
        manifest = _pairs(out / "ddp_dpo_build/pairs/pairs.jsonl")
        got = _pairs(out / "one_dpo_build/pairs/pairs.jsonl")
        # ids, prompts and image files exactly; the scores to float32 rounding: one process and
        # two ranks run the reward with other thread counts, and CPU kernels may then sum in
        # another order (CI saw the last bit of a score differ)
        strip = [{k: v for k, v in r.items() if not k.startswith("reward")} for r in got]
        assert strip == [
            {k: v for k, v in r.items() if not k.startswith("reward")} for r in manifest
        ]
        for g, w in zip(got, manifest):
            for k in ("reward_chosen", "reward_rejected"):
                assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-7)
    else:
        assert _calls(one, "noise_seeds") == _calls(two[0], "noise_seeds") + _calls(
            two[1], "noise_seeds"
        )
        assert _calls(one, "prompts") == _calls(two[0], "prompts") + _calls(two[1], "prompts")
    got, want = one["weights"]["lora_b_abs"], two[0]["weights"]["lora_b_abs"]
    assert got == pytest.approx(want, rel=2e-5)


@pytest.mark.parametrize("backend", ["ddp", *ZERO])
def test_groups_spanning_ranks_get_the_advantages_one_process_computes(runs, backend):
    """GRPO's groups of 4 over two ranks of 2 images per batch: every group holds two images of
    each rank. The rewards are gathered before the group statistics, so the two ranks'
    advantages are those one process computes on the same 8 images (rank 0 holds images 0, 1,
    4, 5 of the epoch, rank 1 images 2, 3, 6, 7), and those are the group formula by hand."""
    from alignment.flow import group_advantages

    one = runs["one"]["grpo"]
    r0, r1 = runs["two"][f"{backend}_grpo"]
    (a,), (b,) = _calls(r0, "advantages"), _calls(r1, "advantages")
    (whole,) = _calls(one, "advantages")
    assert [a[0], a[1], b[0], b[1], a[2], a[3], b[2], b[3]] == pytest.approx(whole, abs=2e-6)
    (g0,), (g1,) = _calls(r0, "gathered_rewards"), _calls(r1, "gathered_rewards")
    assert g0 == g1  # both ranks normalised the same gathered rewards
    (rewards,), (prompts,) = _calls(one, "gathered_rewards"), _calls(one, "group_prompts")
    assert [g0[i] for i in (0, 1, 4, 5, 2, 3, 6, 7)] == pytest.approx(rewards, abs=1e-7)
    by_hand = group_advantages(torch.tensor(rewards), prompts, global_std=True)
    assert whole == pytest.approx(by_hand.tolist(), abs=2e-6)
    assert len(set(prompts)) == 2 and max(abs(x) for x in whole) > 0.5
    # the base policy's held-out evaluation (3 prompts shared 2 + 1) equals one process's
    assert _calls(r0, "eval")[0] == _calls(r1, "eval")[0]
    assert _calls(r0, "eval")[0] == pytest.approx(_calls(one, "eval")[0], abs=1e-6)


def test_ddp_runs_resume_on_another_number_of_processes(runs):
    one, two, back = runs["one"], runs["two"], runs["back"]
    # DDPO 1 -> 2 and 2 -> 1: the epoch counter, history and statistics carry over
    for resumed in (two["ddpo_1to2"], [back["ddpo"]]):
        for r in resumed:
            assert r["counters"]["epoch"] == 2 and [h["epoch"] for h in r["history"]] == [0, 1]
        assert len({r["weights"]["sha"] for r in resumed}) == 1
    assert two["ddpo_1to2"][0]["history"][0] == one["ddpo"]["history"][0]
    assert back["ddpo"]["history"][0] == two["ddp_ddpo"][0]["history"][0]
    # DPO: the pair stream continues at the same global sample on the other count
    r0, r1 = two["dpo_1to2"]  # one process drew samples 0, 1; two ranks go on with 2 and 3
    assert (_calls(r0, "ids"), _calls(r1, "ids")) == ([[2]], [[3]])
    assert r0["counters"] == {"global_step": 2, "samples_seen": 4}
    b = back["dpo_build"]  # two ranks drew 0, 1; one process goes on with 2
    assert _calls(b, "ids") == [[2]] and b["counters"] == {"global_step": 2, "samples_seen": 3}
    # the same pair at position 2 either way (the manifests are equal, see above)
    assert _calls(b, "prompts") == _calls(r0, "prompts")
    # weights-only works without DeepSpeed too (accelerate's trainable-only model.safetensors)
    w = back["ddpo_weights_only"]
    (loaded,) = _calls(w, "weights_loaded")
    ckpt = runs["out"] / "ddp_ddpo" / "checkpoints" / "checkpoint-000002"
    assert loaded["sha"] == weights_sha(load_file(ckpt / "model.safetensors"))
    assert loaded["sha"] == back["ddpo"]["weights"]["sha"] and w["counters"]["epoch"] == 3


def test_deepspeed_checkpoint_on_another_count_refuses_then_resumes_weights_only(runs):
    out, one, two = runs["out"], runs["one_ds"], runs["two"]
    (plain,) = one["ddpo_plain"]
    message = plain["error"]
    assert "written by 2 processes (DeepSpeed ZeRO-2)" in message
    assert "this run has 1 process (DeepSpeed ZeRO-2)" in message
    assert "--resume_weights_only" in message and "fresh optimiser" in message

    (ddpo,) = one["ddpo_weights_only"]
    ckpt = out / "zero2_ddpo" / "checkpoints" / "checkpoint-000001"
    (loaded,) = _calls(ddpo, "weights_loaded")
    assert loaded["sha"] == weights_sha(load_file(ckpt / "trainable.safetensors"))
    assert loaded["sha"] == two["zero2_ddpo"][0]["weights"]["sha"]  # the 2-rank run's weights
    assert (
        ddpo["counters"]["epoch"] == 2 and ddpo["history"][0] == two["zero2_ddpo"][0]["history"][0]
    )
    assert ddpo["weights"]["sha"] != loaded["sha"]  # and it trained on from there

    (dpo,) = one["dpo_from_zero3"]  # a ZeRO-3 checkpoint of 2 ranks -> 1 process of ZeRO-2
    (loaded,) = _calls(dpo, "weights_loaded")
    ckpt = out / "zero3_dpo_build" / "checkpoints" / "checkpoint-000001"
    assert loaded["sha"] == weights_sha(load_file(ckpt / "trainable.safetensors"))  # gathered
    assert loaded["sha"] == two["zero3_dpo_build"][0]["weights"]["sha"]
    assert _calls(dpo, "ids") == [[2]] and dpo["counters"]["samples_seen"] == 3


def test_cpu_deepspeed_backend_only_where_accelerate_would_pick_none(monkeypatch):
    from reward.distributed import cpu_deepspeed_backend, process_group_kwargs

    for key in ("ACCELERATE_USE_DEEPSPEED", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert cpu_deepspeed_backend() is None and process_group_kwargs() == []
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert cpu_deepspeed_backend() is None  # not launched by a multi-process launcher
    monkeypatch.setenv("LOCAL_RANK", "0")
    want = None if torch.cuda.is_available() else "gloo"
    assert cpu_deepspeed_backend() == want
    if want:
        (handler,) = process_group_kwargs()
        assert handler.to_kwargs()["backend"] == "gloo"
