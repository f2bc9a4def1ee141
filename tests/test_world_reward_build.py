"""The reward build's stage gates: a plateau that was never crossed is started again, then refused."""

from __future__ import annotations

import json
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

    def __init__(self, accuracy: dict[tuple[str, int], float]):
        self.accuracy, self.calls = accuracy, []

    def __call__(self, cmd: list[str], check: bool) -> None:
        assert check
        arg = {k: v for k, v in zip(cmd, cmd[1:]) if k.startswith("--")}
        stage = Path(arg["--train_file"]).parent.name.removeprefix("train_")
        seed = int(arg.get("--seed", 0))
        self.calls.append((stage, seed, "--overwrite_perspective" in cmd))
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
    with pytest.raises(StageGateError, match=r"in 1 start\(s\)"):
        run_plan(
            tmp_path,
            tmp_path,
            tmp_path,
            PLAN[2:],
            gates={("fidelity", "all"): 0.9},
            tries=1,
            runner=FakeRecipe({("all", 0): 0.7}),
        )
