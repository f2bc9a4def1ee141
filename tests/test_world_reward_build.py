"""The reward build's stage loop: a plateau that was never crossed is started again, then
refused; an interrupted build goes on after its last finished stage."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from alignment.world.reward_model import StageGateError, run_plan

_NEW = ("--overwrite_perspective", "true")
_MORE = ("--continue_perspective", "true")
PLAN = (
    ("alignment", "background", "pairs", 10, _NEW),
    ("alignment", "objects", "pairs", 20, _MORE),
    ("fidelity", "all", "pairs", 5, _NEW),
)


class FakeRecipe:
    """Stands in for ``subprocess.run`` of recipes/train_reward.py: writes the eval report a run
    would, with the held-out accuracy ``accuracy[(data set, seed)]`` (default 1.0)."""

    def __init__(
        self,
        accuracy: dict[tuple[str, int], float],
        crash_at: str | None = None,
        crash_after_save: bool = False,
        report: bool = True,
    ):
        self.accuracy, self.calls, self.crash_at = accuracy, [], crash_at
        self.crash_after_save, self.report = crash_after_save, report

    def __call__(self, cmd: list[str], check: bool) -> None:
        assert check
        arg = {k: v for k, v in zip(cmd, cmd[1:]) if k.startswith("--")}
        stage = Path(arg["--train_file"]).parent.name.removeprefix("train_")
        seed = int(arg.get("--seed", 0))
        fresh = "--overwrite_perspective" in cmd
        self.calls.append((stage, seed, fresh))
        out, perspective = Path(arg["--output_dir"]), arg["--perspective"]
        if stage == self.crash_at and not self.crash_after_save:  # dies while training
            raise subprocess.CalledProcessError(-9, cmd)
        # the perspective's "weights": how many stages trained them (a continued stage adds one)
        head = out / "heads" / f"{perspective}.safetensors"
        trained = 1 if fresh else int(head.read_text()) + 1
        head.parent.mkdir(exist_ok=True)
        head.write_text(str(trained))
        (out / "adapters" / perspective).mkdir(parents=True, exist_ok=True)
        (out / "adapters" / perspective / "adapter.txt").write_text(f"{stage} {seed} {trained}")
        if stage == self.crash_at:  # dies after its save, before its evaluation
            raise subprocess.CalledProcessError(-9, cmd)
        if self.report:
            report = {"accuracy": self.accuracy.get((stage, seed), 1.0)}
            (out / f"eval_report_{perspective}.json").write_text(json.dumps(report))


def test_a_gated_stage_below_its_gate_starts_again_with_the_next_seed(tmp_path):
    recipe = FakeRecipe({("background", 0): 0.516, ("objects", 0): 0.4})
    report = run_plan(tmp_path, tmp_path / "bb", tmp_path / "data", PLAN, runner=recipe)
    # stage 1 twice (seed 0 stayed on the plateau, seed 1 crossed it), then the rest once each; a
    # continued stage is never restarted, however low (restarting it would lose stage 1)
    assert recipe.calls == [
        ("background", 0, True),
        ("background", 1, True),
        ("objects", 0, False),
        ("all", 0, True),
    ]
    assert report["alignment"]["stages"] == [
        {"background": 1.0, "seed": 1, "starts": [0.516, 1.0]},
        {"objects": 0.4},
    ]
    assert report["alignment"]["steps"] == 30 and report["alignment"]["accuracy"] == 0.4
    assert report["fidelity"] == {
        "kind": "pairs",
        "steps": 5,
        "accuracy": 1.0,
        "stages": [{"all": 1.0}],
    }


def test_a_stage_that_never_crosses_its_gate_stops_the_build_with_its_numbers(tmp_path):
    recipe = FakeRecipe({("background", s): a for s, a in enumerate((0.5, 0.62, 0.875))})
    with pytest.raises(StageGateError) as err:
        run_plan(tmp_path, tmp_path / "bb", tmp_path / "data", PLAN, runner=recipe)
    message = str(err.value)
    assert "stage 1" in message and "'background'" in message and "0.9" in message
    assert "0.500, 0.620, 0.875" in message and "more steps" in message
    assert [c[:2] for c in recipe.calls] == [
        ("background", 0),
        ("background", 1),
        ("background", 2),
    ]


def test_gates_and_starts_are_the_callers_to_set(tmp_path):
    recipe = FakeRecipe({("all", 0): 0.7, ("all", 1): 0.8})
    report = run_plan(
        tmp_path,
        tmp_path / "bb",
        tmp_path / "data",
        PLAN[2:],
        gates={("fidelity", "all"): 0.75},
        tries=2,
        runner=recipe,
    )
    assert report["fidelity"]["stages"] == [{"all": 0.8, "seed": 1, "starts": [0.7, 0.8]}]
    (tmp_path / "one").mkdir()
    with pytest.raises(StageGateError, match=r"in 1 start\(s\)"):
        run_plan(
            tmp_path / "one",
            tmp_path,
            tmp_path,
            PLAN[2:],
            gates={("fidelity", "all"): 0.9},
            tries=1,
            runner=FakeRecipe({("all", 0): 0.7}),
        )


def test_an_interrupted_build_goes_on_after_its_last_finished_stage(tmp_path):
    accuracy = {("background", 0): 0.5, ("objects", 0): 0.8, ("all", 0): 0.95}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = run_plan(tmp_path / "a", tmp_path, tmp_path / "data", PLAN, runner=FakeRecipe(accuracy))
    first = FakeRecipe(accuracy, crash_at="objects")
    with pytest.raises(subprocess.CalledProcessError):
        run_plan(tmp_path / "b", tmp_path, tmp_path / "data", PLAN, runner=first)
    assert [c[:2] for c in first.calls] == [("background", 0), ("background", 1), ("objects", 0)]
    again = FakeRecipe(accuracy)
    resumed = run_plan(tmp_path / "b", tmp_path, tmp_path / "data", PLAN, runner=again)
    # stage 1 (and its second start) is not run again; stage 2, cut short, is
    assert [c[:2] for c in again.calls] == [("objects", 0), ("all", 0)]
    assert resumed == whole
    # a finished build run again trains nothing and gives the same report
    done = FakeRecipe(accuracy)
    assert run_plan(tmp_path / "b", tmp_path, tmp_path / "data", PLAN, runner=done) == whole
    assert done.calls == []


def test_a_folder_built_with_another_plan_is_refused_and_left_as_it_was(tmp_path):
    run_plan(tmp_path, tmp_path, tmp_path / "data", PLAN[:1], runner=FakeRecipe({}))
    progress = (tmp_path / "build_progress.json").read_text()
    other = FakeRecipe({})
    for plan, data, skipca in (
        (PLAN, tmp_path / "data", True),
        (PLAN[:1], tmp_path / "other", True),
        (PLAN[:1], tmp_path / "data", False),
    ):
        with pytest.raises(ValueError, match="another") as err:
            run_plan(tmp_path, tmp_path, data, plan, skipca, runner=other)
        assert "new folder" in str(err.value)
        named = [k for k in ("plan", "data", "skipca") if f"another {k}" in str(err.value)]
        assert len(named) == 1
    # the build's other settings (train_world_reward: data sizes, caption split) likewise
    (tmp_path / "sized").mkdir()
    sized = FakeRecipe({})
    run_plan(tmp_path / "sized", tmp_path, tmp_path, PLAN[:1], runner=sized, options={"pairs": 64})
    with pytest.raises(ValueError, match="another pairs .*pairs 64 there, 128 here"):
        run_plan(
            tmp_path / "sized", tmp_path, tmp_path, PLAN[:1], runner=other, options={"pairs": 128}
        )
    assert other.calls == [] and (tmp_path / "build_progress.json").read_text() == progress


def test_a_continued_stage_cut_short_after_its_save_is_not_trained_twice(tmp_path):
    whole = run_plan(tmp_path / "a", tmp_path, tmp_path / "data", PLAN, runner=FakeRecipe({}))
    (tmp_path / "b").mkdir()
    with pytest.raises(subprocess.CalledProcessError):
        run_plan(
            tmp_path / "b",
            tmp_path,
            tmp_path / "data",
            PLAN,
            runner=FakeRecipe({}, crash_at="objects", crash_after_save=True),
        )
    # the folder holds stage 2's save; the resumed build trains stage 2 again from stage 1's
    assert (tmp_path / "b" / "heads" / "alignment.safetensors").read_text() == "2"
    again = FakeRecipe({})
    assert run_plan(tmp_path / "b", tmp_path, tmp_path / "data", PLAN, runner=again) == whole
    assert [c[0] for c in again.calls] == ["objects", "all"]
    for name in ("a", "b"):  # two stages trained the alignment perspective, not three
        assert (tmp_path / name / "heads" / "alignment.safetensors").read_text() == "2"
    assert not (tmp_path / "b" / ".stage_start").exists()


def test_a_stage_that_writes_no_report_is_not_given_the_previous_stages_verdict(tmp_path):
    with pytest.raises(subprocess.CalledProcessError):
        run_plan(tmp_path, tmp_path, tmp_path / "data", PLAN, runner=FakeRecipe({}, "objects"))
    # a verdict left in the folder from before (an earlier stage's, another run's)
    (tmp_path / "eval_report_alignment.json").write_text(json.dumps({"accuracy": 0.95}))
    with pytest.raises(FileNotFoundError, match="stage 2 wrote no .*eval_report_alignment"):
        run_plan(tmp_path, tmp_path, tmp_path / "data", PLAN, runner=FakeRecipe({}, report=False))


def test_more_starts_go_on_with_the_next_seed_after_the_gate_stopped_a_build(tmp_path):
    accuracy = {("background", 0): 0.5, ("background", 1): 0.6, ("background", 2): 0.95}
    with pytest.raises(StageGateError, match="--tries 5.*goes on\\s+with seed 2"):
        run_plan(tmp_path, tmp_path, tmp_path / "data", PLAN, tries=2, runner=FakeRecipe(accuracy))
    recipe = FakeRecipe(accuracy)
    report = run_plan(tmp_path, tmp_path, tmp_path / "data", PLAN, tries=3, runner=recipe)
    assert [c[:2] for c in recipe.calls] == [("background", 2), ("objects", 0), ("all", 0)]
    assert report["alignment"]["stages"][0] == {
        "background": 0.95,
        "seed": 2,
        "starts": [0.5, 0.6, 0.95],
    }
    with pytest.raises(ValueError, match="tries=0"):
        run_plan(tmp_path / "x", tmp_path, tmp_path, PLAN, tries=0, runner=recipe)


def test_a_backbone_pre_training_cut_short_is_never_taken_for_a_finished_one(tmp_path, monkeypatch):
    import alignment.world.reward_model as build

    def pretrain(path, crash):
        path.mkdir(parents=True)
        (path / "config.json").write_text(
            "{}"
        )  # written before the weights, as save_pretrained does
        if crash:
            raise KeyboardInterrupt
        (path / "model.safetensors").write_text("weights")

    def plan(out, backbone, data, plan, skipca, tries, options):
        assert options == {"pairs": 2048, "unpaired": 512, "split_by": None}
        assert (backbone / "model.safetensors").is_file()
        (out / "config.json").write_text(json.dumps({"backbone": str(backbone)}))
        return {}

    monkeypatch.setattr(build, "write_world_data", lambda *a, **k: None)
    monkeypatch.setattr(build, "run_plan", plan)
    monkeypatch.setattr(build, "pretrain_world_backbone", lambda path: pretrain(path, True))
    with pytest.raises(KeyboardInterrupt):
        build.train_world_reward(tmp_path / "out")
    assert not (tmp_path / "out" / "tiny_backbone").exists()
    monkeypatch.setattr(build, "pretrain_world_backbone", lambda path: pretrain(path, False))
    build.train_world_reward(tmp_path / "out")
    assert (tmp_path / "out" / "tiny_backbone" / "model.safetensors").read_text() == "weights"
    assert not (tmp_path / "out" / ".tiny_backbone.partial").exists()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["backbone"] == "tiny_backbone"


def test_data_folder_is_reused_only_with_the_options_it_was_written_with(tmp_path):
    """A build pointed at an old data folder must not silently train on data sets of other
    sizes: the same options reuse the set untouched, other ones are refused by name, and a set
    written before manifests existed is judged by its pair counts."""
    from alignment.world.reward_model import DATA_MANIFEST, write_world_data

    data = tmp_path / "data"
    write_world_data(data, pairs=8, unpaired=4, names={"background"})
    train = data / "train_background" / "alignment_pairs.jsonl"
    manifest = data / "held_background" / DATA_MANIFEST
    spec = json.loads(manifest.read_text())
    assert (spec["train_pairs"], spec["held_pairs"], spec["split"]) == (4, 128, "pairs")
    assert len(train.read_text().splitlines()) == 4
    before = train.stat().st_mtime_ns

    write_world_data(data, pairs=8, unpaired=4, names={"background"})  # same options: reused
    assert train.stat().st_mtime_ns == before

    with pytest.raises(ValueError, match=r"'background'.*train_pairs 4 \(this build: 8\)"):
        write_world_data(data, pairs=16, unpaired=4, names={"background"})
    with pytest.raises(ValueError, match=r"split 'pairs' \(this build: 'renders'\)"):
        write_world_data(data, pairs=8, unpaired=4, split_by="renders", names={"background"})

    manifest.unlink()  # a folder from before manifests: its counts still tell the sizes apart
    write_world_data(data, pairs=8, unpaired=4, names={"background"})
    with pytest.raises(ValueError, match="delete .*train_background"):
        write_world_data(data, pairs=16, unpaired=4, names={"background"})
    assert train.stat().st_mtime_ns == before


def test_command_line_builds_every_perspective_or_the_ablation(tmp_path, monkeypatch, capsys):
    """`python -m alignment.world.reward_model`: the full plan with SkipCA, or with --no_skipca
    the alignment stages only without it; --tries and the data options reach the build."""
    import alignment.world.reward_model as rm

    calls = []

    def fake_build(out, pairs, unpaired, plan, skipca, split_by, tries, pretrain):
        calls.append((plan, skipca, pairs, unpaired, split_by, tries, pretrain))
        (Path(out) / "world_report.json").write_text("{}")
        return Path(out)

    monkeypatch.setattr(rm, "train_world_reward", fake_build)
    rm.main([str(tmp_path), "--tries", "5", "--pairs", "64"])
    rm.main([str(tmp_path), "--no_skipca", "--split_by", "renders"])
    rm.main(
        [str(tmp_path), "--tower", "resnet", "--captioner_policy_frac", "0.5", "--tower_steps", "9"]
    )
    (full, skip, *opts), (ablation, no_skip, *ab_opts), (*_, fast) = calls
    assert full == rm.PLAN and skip and opts == [64, 512, None, 5, {}]
    assert ablation == tuple(s for s in rm.PLAN if s[0] == "alignment") and len(ablation) == 6
    assert not no_skip and ab_opts == [2048, 512, "renders", rm.GATE_TRIES, {}]
    assert fast["backbone"] == {"tower": "resnet"} and fast["captioner"] == {
        "policy_frac": 0.5,
        "tower_steps": 9,
    }
    assert Path(fast["policy"]).name == "tiny-world-sd3"
    assert capsys.readouterr().out.count("{}") == 3
    with pytest.raises(SystemExit):
        rm.main([str(tmp_path), "--tries", "0"])
    with pytest.raises(SystemExit):
        rm.main([str(tmp_path), "--captioner_policy_frac", "1.5"])
