"""recipes/eval_reward.py scores each data file under the perspective it is for, and the reward
recipes keep or refuse bad records (--on_error) and write the skipped ones beside the output; the
official LLaVA-Reward training files train through recipes/train_reward.py as they are."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch

from reward.data import DataRecordError, ReadReport
from reward.evaluate import assign_perspectives
from reward.modeling import LlavaRewardModel, UnknownPerspectiveError
from reward.testing import save_tiny_backbone
from reward.toy_data import write_toy_data
from reward.training import evaluate_model, read_reward_files

REPO = Path(__file__).resolve().parents[1]
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return {
        "alignment": write_toy_data(root, "alignment", n_train=64, n_eval=16, seed=0),
        "safety": write_toy_data(root, "safety", n_train=64, n_eval=16, seed=0),
    }


def _recipe(name: str):
    return runpy.run_path(str(REPO / "recipes" / name), run_name=name)["main"]


def _report(source, kind, perspectives=()):
    return ReadReport(source=source, kind=kind, perspectives=list(perspectives))


def test_assign_perspectives_by_name_field_kind_or_error():
    pairs, singles = _report("p.json", "paired"), _report("s.json", "unpaired")
    four = ["alignment", "fidelity", "safety", "overall"]
    # inferred: the only perspective; the one of the data's kind; the records' field
    assert assign_perspectives([pairs, singles], ["alignment"]) == {"alignment": [0, 1]}
    both = ["alignment", "safety"]
    assert assign_perspectives([pairs, singles], both) == {"alignment": [0], "safety": [1]}
    named = _report("f.jsonl", "paired", ["fidelity"])
    assert assign_perspectives([named, singles], four) == {"fidelity": [0], "safety": [1]}
    # asked for by name ('all' is explicit)
    assert assign_perspectives([pairs], four, ["overall"]) == {"overall": [0]}
    assert assign_perspectives([pairs], both, ["all"]) == {"alignment": [0], "safety": [0]}
    # ambiguous or impossible: an error that lists the perspectives and the fix
    with pytest.raises(ValueError, match=r"p\.json \(paired data\).*alignment, fidelity, safety"):
        assign_perspectives([pairs], four)
    with pytest.raises(ValueError, match=r"--perspective NAME"):
        assign_perspectives([singles], ["alignment", "overall"])
    with pytest.raises(ValueError, match=r"several perspectives \(alignment, safety\)"):
        assign_perspectives([_report("m.json", "paired", ["alignment", "safety"])], four)
    with pytest.raises(ValueError, match=r"'beauty'.*does not hold"):
        assign_perspectives([_report("b.json", "paired", ["beauty"])], four)
    with pytest.raises(UnknownPerspectiveError, match="beauty"):
        assign_perspectives([pairs], four, ["beauty"])


def test_eval_recipe_scores_each_file_under_its_perspective(toy, tmp_path):
    backbone = save_tiny_backbone("llava", tmp_path / "bb")
    torch.manual_seed(0)
    model = LlavaRewardModel.from_backbone(
        backbone, perspectives=("alignment", "safety", "overall"), lora_config=dict(LORA)
    )
    model.save_pretrained(tmp_path / "rm")
    pairs_file, singles_file = toy["alignment"][1], toy["safety"][1]
    # a copy of the safety file with one bad record, and one whose records name 'overall'
    bad = Path(singles_file).parent / "safety_bad.jsonl"  # beside the images it names
    lines = Path(singles_file).read_text().splitlines()
    records = [json.loads(x) for x in lines]
    bad.write_text("\n".join([*lines[:3], json.dumps({"prompt": "p", "label": 1})]) + "\n")
    bad_records = [json.loads(x) for x in bad.read_text().splitlines()]
    named = Path(singles_file).parent / "named.jsonl"
    named.write_text(
        "\n".join(json.dumps({**r, "perspective": "overall"}) for r in records[:4]) + "\n"
    )

    main = _recipe("eval_reward.py")
    out = tmp_path / "eval"
    base = ["--model_dir", str(tmp_path / "rm"), "--output_dir", str(out)]
    with pytest.raises(ValueError, match=r"alignment_eval\.jsonl \(paired data\)"):
        main([*base, "--data_file", str(pairs_file), str(pairs_file)])  # alignment or overall?
    results = main(
        [*base, "--data_file", str(singles_file), str(bad), str(named), "--perspective", "all"]
    )
    assert sorted(results) == ["alignment", "overall", "safety"]  # explicitly asked for
    results = main([*base, "--data_file", str(singles_file), str(bad), str(named)])
    assert sorted(results) == ["overall", "safety"]
    assert results["safety"]["data_files"] == [str(singles_file), str(bad)]
    assert results["overall"]["data_files"] == [str(named)]
    data, _ = read_reward_files([singles_file, bad], keep_ties=True)
    expected = evaluate_model(model, data, "safety")
    assert results["safety"]["accuracy"] == expected["accuracy"]
    assert results["safety"]["n_examples"] == 16 + 3 and results["safety"]["kind"] == "unpaired"
    assert results["safety"]["n_skipped_records"] == 1
    report = json.loads((out / "eval_report_overall.json").read_text())
    assert report["n_examples"] == 4 and report["perspective"] == "overall"
    skipped = [json.loads(x) for x in (out / "skipped_eval.jsonl").read_text().splitlines()]
    assert skipped == [
        {
            "source": str(bad),
            "index": 3,
            "reason": "missing field 'image'",
            "record": bad_records[3],
        }
    ]
    with pytest.raises(DataRecordError, match=rf"{bad}: record 3: missing field 'image'"):
        main([*base, "--data_file", str(bad), "--on_error", "raise"])


def _official_layout(toy, repo: Path) -> dict[str, Path]:
    """The toy data rewritten in the official repository's shapes and layout: JSON and JSONL
    files under data/, image paths relative to the repository root."""
    out = {}
    for task, (train, held_out) in toy.items():
        images_from_root = Path("data") / task
        (repo / images_from_root).mkdir(parents=True, exist_ok=True)
        for split, src in (("train", train), ("eval", held_out)):
            rows = []
            for line in Path(src).read_text().splitlines():
                r = json.loads(line)
                for key in ("chosen", "rejected", "image"):
                    if key in r:
                        name = Path(r[key]).name
                        (repo / images_from_root / name).write_bytes(
                            (Path(src).parent / r[key]).read_bytes()
                        )
                        r[key] = str(images_from_root / name)
                if task == "alignment":
                    rows.append(
                        {
                            "prompt_id": r["id"],
                            "prompt": [r["prompt"], r["prompt"]],
                            "chosen_path": r["chosen"],
                            "c_rate": 7,
                            "reject_path": r["rejected"],
                            "r_rate": 3,
                        }
                    )
                else:
                    rows.append(
                        {"path": r["image"], "label": int(r["label"]), "prompt": r["prompt"]}
                    )
            if split == "train":  # the released training files are JSON lists
                path = repo / "data" / task / f"{task}_train.json"
                path.write_text(json.dumps(rows, indent=4))
            else:
                path = repo / "data" / task / f"{task}_eval.jsonl"
                path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
            out[f"{task}_{split}"] = path
    return out


def test_official_files_train_through_the_recipe(toy, tmp_path, monkeypatch):
    files = _official_layout(toy, tmp_path / "LLaVA-Reward")
    # one bad record in the training file: a pair under two different captions
    rows = json.loads(files["alignment_train"].read_text())
    rows[5]["prompt"] = ["a red image", "a blue image"]
    files["alignment_train"].write_text(json.dumps(rows))
    monkeypatch.chdir(tmp_path)  # not the repository root: paths are found from the files
    out = tmp_path / "reward"
    common = [
        "--config",
        str(REPO / "recipes/configs/reward_tiny.yaml"),
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        "--use_cpu",
        "true",
        "--bf16",
        "false",
        "--save_strategy",
        "no",
        "--logging_steps",
        "5",
    ]
    train = _recipe("train_reward.py")

    def run(task: str, steps: int, *extra: str) -> dict:
        data = [
            "--train_file",
            str(files[f"{task}_train"]),
            "--eval_file",
            str(files[f"{task}_eval"]),
        ]
        return train([*common, "--perspective", task, *data, "--max_steps", str(steps), *extra])

    metrics = run("safety", 40)
    # learnt from the official single-image files, measured on the held-out official JSONL
    # against a fresh model of the same configuration (seed 0) before training
    torch.manual_seed(0)
    fresh = LlavaRewardModel.from_backbone(
        out / "tiny_backbone", perspectives=("safety",), lora_config={"r": 8, "lora_alpha": 16}
    )
    held_out, _ = read_reward_files(files["safety_eval"], keep_ties=True)
    before = evaluate_model(fresh, held_out, "safety")["accuracy"]
    print(f"\nofficial safety files, held-out accuracy: {before:.3f} -> {metrics['accuracy']:.3f}")
    assert metrics["kind"] == "unpaired" and metrics["n"] == 16
    assert before <= 0.75 and metrics["accuracy"] >= 0.9, (before, metrics)

    with pytest.raises(DataRecordError, match=r"alignment_train\.json: record 5: .*two different"):
        run("alignment", 2, "--on_error", "raise")
    metrics = run("alignment", 2)  # skip: the bad pair is left out and written down
    assert metrics["kind"] == "paired" and metrics["n_pairs"] == 16
    skipped = [json.loads(x) for x in (out / "skipped_train.jsonl").read_text().splitlines()]
    assert [(s["index"], s["record"]) for s in skipped] == [(5, rows[5])]
    assert "two different captions" in skipped[0]["reason"]
    assert not (out / "skipped_eval.jsonl").exists()

    from reward.scorer import RewardScorer

    scorer = RewardScorer.from_pretrained(out)
    assert sorted(scorer.perspectives) == ["alignment", "safety"]
    fixed = json.loads((out / "fixed_scores_alignment.json").read_text())["paired"]
    assert (
        fixed["images"][0].endswith(".png") and "LLaVA-Reward/data/alignment" in fixed["images"][0]
    )
    got = scorer.score(fixed["prompts"], fixed["images"], perspective="alignment")
    torch.testing.assert_close(got, torch.tensor(fixed["rewards"]), rtol=1e-4, atol=1e-5)
