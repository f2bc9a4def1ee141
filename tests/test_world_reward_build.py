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

    def __init__(self, accuracy: dict[tuple[str, int], float], crash_at: str | None = None):
        self.accuracy, self.calls, self.crash_at = accuracy, [], crash_at

    def __call__(self, cmd: list[str], check: bool) -> None:
        assert check
        arg = {k: v for k, v in zip(cmd, cmd[1:]) if k.startswith("--")}
        stage = Path(arg["--train_file"]).parent.name.removeprefix("train_")
        seed = int(arg.get("--seed", 0))
        self.calls.append((stage, seed, "--overwrite_perspective" in cmd))
        if stage == self.crash_at:  # the recipe dies before it writes its report
            raise subprocess.CalledProcessError(-9, cmd)
        report = {"accuracy": self.accuracy.get((stage, seed), 1.0)}
        out = Path(arg["--output_dir"]) / f"eval_report_{arg['--perspective']}.json"
        out.write_text(json.dumps(report))


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
        with pytest.raises(ValueError, match="another plan, data folder or SkipCA") as err:
            run_plan(tmp_path, tmp_path, data, plan, skipca, runner=other)
        assert "new folder" in str(err.value)
    assert other.calls == [] and (tmp_path / "build_progress.json").read_text() == progress
