"""reward.evaluate: metrics against hand-computed values, and the scoring plumbing end to end
with a fake scorer (mean brightness) on datasets read by reward.data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from reward.data import read_pairs, read_unpaired
from reward.evaluate import (
    binary_metrics,
    evaluate_scorer,
    format_markdown,
    pairwise_accuracy,
    write_report,
)


class BrightnessScorer:
    """Fake ``RewardScorer``: reward = mean pixel value in [0, 1] minus ``offset``."""

    def __init__(self, offset: float = 0.0):
        self.offset = offset
        self.calls: list[tuple[int, str, int]] = []

    def score(self, prompts, images, perspective="overall", batch_size=16) -> torch.Tensor:
        assert len(prompts) == len(images)
        assert all(isinstance(im, Image.Image) for im in images)
        self.calls.append((len(images), perspective, batch_size))
        return torch.tensor(
            [float(np.asarray(im, dtype=np.float64).mean()) / 255.0 - self.offset for im in images]
        )


def gray(tmp_path, level: int):
    path = tmp_path / f"gray{level}.png"
    if not path.exists():
        Image.new("RGB", (4, 4), (level, level, level)).save(path)
    return path.name


# (chosen level, rejected level, tie, category) -> hand-checked outcome
PAIRS = [
    (204, 51, False, "a"),  # correct
    (77, 153, False, "a"),  # wrong
    (128, 128, False, "b"),  # model tie: equal rewards -> wrong
    (230, 25, True, "b"),  # annotator tie: wrong with ties, excluded without ties
    (178, 102, False, "b"),  # correct
]


def test_pairwise_accuracy_hand_values():
    rc = torch.tensor([0.8, 0.3, 0.5, 0.9, 0.7])
    rr = torch.tensor([0.2, 0.6, 0.5, 0.1, 0.4])
    tie = [False, False, False, True, False]
    m = pairwise_accuracy(rc, rr, tie, categories=["a", "a", "b", "b", "b"])
    # correct: pairs 0 and 4 -> 2 / 5 with ties, 2 / 4 without
    assert m["accuracy"] == m["accuracy_with_ties"] == pytest.approx(0.4)
    assert m["accuracy_without_ties"] == pytest.approx(0.5)
    assert (m["n_pairs"], m["n_ties"], m["n_model_ties"], m["n_correct"]) == (5, 1, 1, 2)
    a, b = m["per_category"]["a"], m["per_category"]["b"]
    assert a["accuracy"] == pytest.approx(0.5) and a["accuracy_without_ties"] == pytest.approx(0.5)
    assert b["accuracy"] == pytest.approx(1 / 3) and b["accuracy_without_ties"] == pytest.approx(
        0.5
    )
    # no ties given, no categories: 2 correct of 5 (pair 3 now counts as correct)
    m = pairwise_accuracy(rc, rr)
    assert m["accuracy"] == pytest.approx(0.6) and "per_category" not in m
    # all pairs annotator ties: nothing to score without ties
    m = pairwise_accuracy(rc[:1], rr[:1], [True])
    assert m["accuracy"] == 0.0 and m["accuracy_without_ties"] is None


def test_pairwise_accuracy_gpm_rewards():
    # GPM logit c0*r1 - c1*r0: (1,0) vs (0,1) -> 1 > 0 correct; (0,1) vs (1,0) -> -1 wrong
    rc = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    rr = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert pairwise_accuracy(rc, rr)["accuracy"] == pytest.approx(0.5)


def test_binary_metrics_hand_values():
    r = torch.tensor([2.0, -1.0, 0.5, -3.0, 0.0])
    y = [1, 1, 0, 0, 1]
    # sigmoid(r) >= 0.5  <=>  r >= 0 : pred [1, 0, 1, 0, 1]; tp=2 (0, 4), fn=1, fp=1, tn=1
    m = binary_metrics(r, y)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(1 / 2)
    # threshold 0.7: sigmoid(2) = 0.881 only -> pred [1, 0, 0, 0, 0]: tp=1, fn=2, tn=2, fp=0
    m = binary_metrics(r, y, threshold=0.7, categories=["x", "x", "y", "y", None])
    assert m["accuracy"] == pytest.approx(3 / 5) and m["precision"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(1 / 3) and m["f1"] == pytest.approx(0.5)
    assert m["per_category"]["y"]["tn"] == 2 and m["per_category"]["x"]["recall"] == 0.5
    # no positive prediction: precision and F1 are 0.0, not an error
    m = binary_metrics(torch.tensor([-1.0, -2.0]), [1, 0])
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 0.5
    with pytest.raises(ValueError, match="GPM"):
        binary_metrics(torch.zeros(2, 2), [1, 0])


def test_evaluate_scorer_paired_end_to_end(tmp_path):
    records = [
        {"prompt": f"p{i}", "image_0": gray(tmp_path, c), "image_1": gray(tmp_path, r),
         "label": -1 if tie else 0, "category": cat}
        for i, (c, r, tie, cat) in enumerate(PAIRS)
    ]  # fmt: skip
    manifest = tmp_path / "pairs.json"
    manifest.write_text(json.dumps(records))
    ds, _ = read_pairs(manifest, keep_ties=True)
    scorer = BrightnessScorer()
    m = evaluate_scorer(scorer, ds, perspective="alignment", batch_size=2, chunk_size=3)
    assert m["perspective"] == "alignment" and m["kind"] == "paired" and m["n_examples"] == 5
    assert m["accuracy"] == pytest.approx(0.4) and m["accuracy_without_ties"] == pytest.approx(0.5)
    assert m["n_model_ties"] == 1
    assert m["per_category"]["b"]["accuracy"] == pytest.approx(1 / 3)
    # chunks of 3 then 2 pairs, chosen and rejected scored in one call each
    assert scorer.calls == [(6, "alignment", 2), (4, "alignment", 2)]
    # same numbers from raw refs (no decoding transform) and from a list of dicts
    m_raw = evaluate_scorer(BrightnessScorer(), ds.with_format(None), perspective="alignment")
    m_list = evaluate_scorer(BrightnessScorer(), [ds[i] for i in range(len(ds))])
    assert m_raw["accuracy"] == m_list["accuracy"] == m["accuracy"]


def test_evaluate_scorer_unpaired_and_report(tmp_path):
    # reward = brightness - 0.5: bright images predicted positive (safe)
    levels_labels = [(230, 1), (200, 0), (40, 0), (60, 1), (180, 1)]
    records = [{"prompt": "p", "image": gray(tmp_path, lv), "label": y} for lv, y in levels_labels]
    manifest = tmp_path / "u.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in records))
    ds, _ = read_unpaired(manifest)
    m = evaluate_scorer(BrightnessScorer(offset=0.5), ds, perspective="safety", batch_size=4)
    # pred [1, 1, 0, 0, 1] vs labels [1, 0, 0, 1, 1]: tp=2, fp=1, tn=1, fn=1
    assert m["kind"] == "unpaired" and (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(0.6) and m["recall"] == pytest.approx(2 / 3)

    json_path, md_path = write_report(m, tmp_path / "out", name="safety_eval")
    loaded = json.loads(json_path.read_text())
    assert loaded["accuracy"] == pytest.approx(0.6) and loaded["perspective"] == "safety"
    md = md_path.read_text()
    assert "| metric | value |" in md and "| accuracy | 0.6000 |" in md
    assert not list((tmp_path / "out").glob("*.tmp"))  # no temporary files left behind


def test_markdown_per_category_and_sections():
    rc = torch.tensor([1.0, 0.0, 1.0])
    rr = torch.tensor([0.0, 1.0, 0.0])
    m = pairwise_accuracy(rc, rr, categories=["blur", "blur", "spatial"])
    md = format_markdown(m)
    assert "| accuracy | 0.6667 |" in md
    assert "| category | accuracy | accuracy_with_ties | accuracy_without_ties |" in md
    assert "| blur | 0.5000 |" in md and "| spatial | 1.0000 |" in md
    md = format_markdown({"mjbench": m, "imagereward": pairwise_accuracy(rc, rr)})
    assert "## mjbench" in md and "## imagereward" in md
