"""Prompt sources: bundled sets, text, TSV and JSON files, category filters."""

from __future__ import annotations

import json

import pytest

from alignment.prompts import SHORT_PROMPTS, load_prompts, partiprompt_categories


def test_bundled_sets():
    assert load_prompts("short") == list(SHORT_PROMPTS)
    parti = load_prompts("parti")
    assert len(parti) == 1632
    assert "Animals" in partiprompt_categories()
    animals = load_prompts("parti", category="animals")
    both = load_prompts("partiprompts", category="Animals, Vehicles")
    assert 0 < len(animals) < len(both) < len(parti)
    assert set(animals) <= set(both)


def test_text_tsv_json_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\na cat\n\na dog\n")
    assert load_prompts(str(txt)) == ["a cat", "a dog"]

    tsv = tmp_path / "p.tsv"
    tsv.write_text("Prompt\tCategory\na cat\tAnimals\na car\tVehicles\n")
    assert load_prompts(str(tsv)) == ["a cat", "a car"]
    assert load_prompts(str(tsv), category="vehicles") == ["a car"]

    js = tmp_path / "p.json"
    js.write_text(json.dumps(["x", "y"]))
    assert load_prompts(str(js)) == ["x", "y"]
    rec = tmp_path / "r.json"
    rec.write_text(json.dumps([{"id": 1, "prompt": "p1"}, {"id": 2, "prompt": "p2"}]))
    assert load_prompts(str(rec)) == ["p1", "p2"]
    jl = tmp_path / "r.jsonl"
    jl.write_text('{"prompt": "a", "category": "A"}\n{"prompt": "b", "category": "B"}\n')
    assert load_prompts(str(jl), category="b") == ["b"]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="bundled"):
        load_prompts("no/such/file.txt")
    with pytest.raises(ValueError, match="categories"):
        load_prompts("parti", category="NoSuchCategory")
    bad = tmp_path / "bad.tsv"
    bad.write_text("Text\nhello\n")
    with pytest.raises(ValueError, match="'Prompt' column"):
        load_prompts(str(bad))
    txt = tmp_path / "p.txt"
    txt.write_text("a\n")
    with pytest.raises(ValueError, match="no category"):
        load_prompts(str(txt), category="x")
