"""reward.data: every input format, relative paths and bytes, ties, bad records, the real
ImageReward test annotations (with stand-in images)."""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from math import comb
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from reward.data import (
    DataRecordError,
    detect_format,
    load_image_ref,
    load_reward_data,
    read_genai_bench,
    read_imagereward,
    read_manifest,
    read_mjbench,
    read_pairs,
    read_pickapic,
    read_unpaired,
)

REPO_TESTS = Path(__file__).resolve().parent
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def png_bytes(color=RED, size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, color=RED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(color))
    return path


def pixel(img) -> tuple:
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    return img.getpixel((0, 0))


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


# ----------------------------------------------------------------------------- generic manifests


def test_pairs_json_relative_paths_decoded_lazily(tmp_path):
    d = tmp_path / "set"
    write_png(d / "img" / "red.png", RED)
    write_png(d / "img" / "blue.png", BLUE)
    manifest = write_json(
        d / "pairs.json",
        [
            {"prompt": "a red square", "chosen": "img/red.png", "rejected": "img/blue.png"},
            {
                "prompt": "a blue square",
                "chosen": "img/blue.png",
                "rejected": "img/red.png",
                "category": "colour",
                "id": "b1",
            },
        ],
    )
    ds, report = read_pairs(manifest)
    assert len(ds) == 2 and report.n_examples == 2 and report.n_skipped == 0
    row = ds[0]
    assert row["prompt"] == "a red square"
    assert pixel(row["chosen"]) == RED and pixel(row["rejected"]) == BLUE
    assert row["tie"] is False and row["category"] is None and row["id"] == "0"
    assert ds[1]["category"] == "colour" and ds[1]["id"] == "b1"
    # stored as refs: absolute paths resolved against the manifest's folder, no pixels
    raw = ds.with_format(None)[1]
    assert raw["chosen"] == {"bytes": None, "path": os.path.abspath(d / "img" / "blue.png")}
    # the lazy transform survives splitting
    split = ds.train_test_split(test_size=0.5, seed=0)
    assert isinstance(split["test"][0]["chosen"], Image.Image)


def test_pairs_jsonl_labels_and_ties(tmp_path):
    for name, color in (("a", RED), ("b", BLUE)):
        write_png(tmp_path / f"{name}.png", color)
    recs = [
        {"prompt": "p0", "image_0": "a.png", "image_1": "b.png", "label": 0},
        {"prompt": "p1", "image_0": "a.png", "image_1": "b.png", "label": 1},
        {"prompt": "p2", "image_0": "a.png", "image_1": "b.png", "label": -1},
        {"prompt": "p3", "image_0": "a.png", "image_1": "b.png", "label": 0.5},
    ]
    manifest = write_jsonl(tmp_path / "pairs.jsonl", recs)
    ds, report = read_pairs(manifest)
    assert ds["prompt"] == ["p0", "p1"]
    assert report.n_ties_dropped == 2 and report.n_ties == 0 and report.n_skipped == 0
    assert pixel(ds[0]["chosen"]) == RED  # label 0: image_0 preferred
    assert pixel(ds[1]["chosen"]) == BLUE  # label 1: image_1 preferred
    ds, report = read_pairs(manifest, keep_ties=True)
    assert len(ds) == 4 and ds["tie"] == [False, False, True, True] and report.n_ties == 2


def test_pairs_parquet_with_bytes(tmp_path):
    from datasets import Dataset

    path = tmp_path / "pairs.parquet"
    Dataset.from_dict(
        {
            "prompt": ["x", "y"],
            "image_0": [png_bytes(RED), png_bytes(GREEN)],
            "image_1": [png_bytes(BLUE), png_bytes(WHITE)],
            "label": [1, 0],
        }
    ).to_parquet(str(path))
    ds, report = read_manifest(path)
    assert report.kind == "paired" and len(ds) == 2
    raw = ds.with_format(None)
    assert raw[0]["chosen"]["path"] is None and raw[0]["chosen"]["bytes"] == png_bytes(BLUE)
    assert pixel(ds[0]["chosen"]) == BLUE and pixel(ds[0]["rejected"]) == RED
    assert pixel(ds[1]["chosen"]) == GREEN


def test_unpaired_json_parquet_and_autodetect(tmp_path):
    write_png(tmp_path / "safe.png", GREEN)
    write_png(tmp_path / "unsafe.png", RED)
    recs = [
        {"prompt": "a", "image": "safe.png", "label": 1},
        {"prompt": "b", "image": "unsafe.png", "label": False},
        {"prompt": "c", "image": "safe.png", "label": 0.75, "category": "soft"},
    ]
    manifest = write_json(tmp_path / "unpaired.json", recs)
    ds, report = read_manifest(manifest, keep_ties=True)  # keep_ties is ignored for unpaired
    assert report.kind == "unpaired"
    assert ds["label"] == [1.0, 0.0, 0.75] and ds["category"] == [None, None, "soft"]
    assert pixel(ds[0]["image"]) == GREEN and pixel(ds[1]["image"]) == RED
    table = pa.table(
        {"prompt": ["a", "b"], "image": [png_bytes(GREEN), png_bytes(RED)], "label": [1, 0]}
    )
    pq.write_table(table, tmp_path / "unpaired.parquet")
    ds, _ = read_unpaired(tmp_path / "unpaired.parquet")
    assert ds["label"] == [1.0, 0.0] and pixel(ds[1]["image"]) == RED


def test_bad_records_are_skipped_with_index_and_reason(tmp_path, caplog):
    write_png(tmp_path / "ok.png", RED)
    (tmp_path / "broken.png").write_bytes(b"this is not an image")
    recs = [
        {"prompt": "good", "chosen": "ok.png", "rejected": "ok.png"},  # 0
        {"chosen": "ok.png", "rejected": "ok.png"},  # 1 missing prompt
        {"prompt": "p", "chosen": "missing.png", "rejected": "ok.png"},  # 2 missing file
        {"prompt": "p", "chosen": "broken.png", "rejected": "ok.png"},  # 3 unreadable
        {"prompt": "p", "image_0": "ok.png", "image_1": "ok.png", "label": 2},  # 4 bad label
        ["not", "an", "object"],  # 5
        {"prompt": "p", "chosen": "ok.png"},  # 6 missing rejected
        {"prompt": "p", "image_0": "ok.png", "image_1": "ok.png", "label": True},  # 7 bool label
        {"prompt": "good too", "image_0": "ok.png", "image_1": "ok.png", "label": 0},  # 8
    ]
    manifest = write_json(tmp_path / "m.json", recs)
    with caplog.at_level(logging.WARNING, logger="reward.data"):
        ds, report = read_pairs(manifest)
    assert ds["prompt"] == ["good", "good too"]
    assert report.n_records == 9 and report.n_skipped == 7
    reasons = {s.index: s.reason for s in report.skipped}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7]
    assert "missing field 'prompt'" in reasons[1]
    assert "not found" in reasons[2] and "missing.png" in reasons[2]
    assert "unreadable image" in reasons[3]
    assert "bad label 2" in reasons[4]
    assert "expected an object" in reasons[5]
    assert "missing field 'rejected'" in reasons[6]
    assert "bad label True" in reasons[7]
    assert "skipped 7 bad records of 9" in caplog.text
    assert "record 3" in caplog.text
    with pytest.raises(DataRecordError, match=r"record 1: missing field 'prompt'.*on_error='skip'"):
        read_pairs(manifest, on_error="raise")
    with pytest.raises(ValueError, match="on_error"):
        read_pairs(manifest, on_error="ignore")


def test_all_records_bad_is_an_error_even_when_skipping(tmp_path):
    manifest = write_json(tmp_path / "m.json", [{"prompt": "p", "image": "x.png", "label": 1}] * 3)
    with pytest.raises(DataRecordError, match=r"all 3 records are bad.*image_root"):
        read_unpaired(manifest)


def test_invalid_jsonl_line_and_bad_unpaired_labels(tmp_path):
    write_png(tmp_path / "ok.png")
    manifest = write_jsonl(
        tmp_path / "u.jsonl",
        [
            {"prompt": "a", "image": "ok.png", "label": 1},
            "{not json",
            {"prompt": "b", "image": "ok.png", "label": 1.5},
            {"prompt": "c", "image": "ok.png", "label": "safe"},
            {"prompt": "d", "image": "ok.png", "label": 0},
        ],
    )
    ds, report = read_unpaired(manifest)
    assert ds["prompt"] == ["a", "d"]
    assert [s.index for s in report.skipped] == [1, 2, 3]
    assert "invalid JSON on line 2" in report.skipped[0].reason


def test_path_map_as_dict_callable_and_json_file(tmp_path):
    local = write_png(tmp_path / "local" / "x.png", GREEN)
    write_png(tmp_path / "local" / "y.png", BLUE)
    manifest = write_json(
        tmp_path / "m.json", [{"prompt": "p", "chosen": "remote/x.webp", "rejected": "y.png"}]
    )
    # unmapped 'y.png' resolves against image_root
    ds, _ = read_pairs(manifest, path_map={"remote/x.webp": local}, image_root=tmp_path / "local")
    assert pixel(ds[0]["chosen"]) == GREEN and pixel(ds[0]["rejected"]) == BLUE
    ds, _ = read_pairs(
        manifest, path_map=lambda p: tmp_path / "local" / Path(p).with_suffix(".png").name
    )
    assert pixel(ds[0]["chosen"]) == GREEN
    map_file = write_json(tmp_path / "map.json", {"remote/x.webp": str(local), "y.png": str(local)})
    ds, _ = read_pairs(manifest, path_map=map_file)
    assert pixel(ds[0]["rejected"]) == GREEN


# ----------------------------------------------------------------------------- ImageReward


def test_imagereward_expansion_small(tmp_path):
    gens = [f"g{k}.png" for k in range(4)]
    for g in gens:
        write_png(tmp_path / g)
    ranks = [2, 1, 2, 3]  # g1 best, g0 and g2 tied, g3 worst
    rank_of = {os.path.abspath(tmp_path / g): r for g, r in zip(gens, ranks)}
    path = write_json(
        tmp_path / "ir.json", [{"id": "r0", "prompt": "p", "generations": gens, "ranking": ranks}]
    )
    ds, report = read_imagereward(path, decode=False)
    # C(4, 2) - C(2, 2) = 5 pairs, better rank chosen
    assert len(ds) == 5 and report.n_ties_dropped == 1
    for row in ds:
        assert rank_of[row["chosen"]["path"]] < rank_of[row["rejected"]["path"]]
        assert row["id"] == "r0" and row["tie"] is False
    ds, report = read_imagereward(path, keep_ties=True, decode=False)
    assert len(ds) == 6 and sum(ds["tie"]) == 1 and report.n_ties == 1
    tie_row = ds.filter(lambda r: r["tie"])[0]
    assert {Path(tie_row["chosen"]["path"]).name, Path(tie_row["rejected"]["path"]).name} == {
        "g0.png",
        "g2.png",
    }


def test_imagereward_bad_records(tmp_path):
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png")
    recs = [
        {"prompt": "ok", "generations": ["a.png", "b.png"], "ranking": [1, 2]},
        {"prompt": "len", "generations": ["a.png", "b.png"], "ranking": [1]},
        {"prompt": "file", "generations": ["a.png", "gone.png"], "ranking": [1, 2]},
        {"prompt": "rank", "generations": ["a.png", "b.png"], "ranking": [1, 0]},
    ]
    ds, report = read_imagereward(write_json(tmp_path / "ir.json", recs))
    assert ds["prompt"] == ["ok"]
    assert [(s.index, s.reason.split(":")[0]) for s in report.skipped] == [
        (1, "'generations' has 2 entries but 'ranking' has 1"),
        (2, "image file not found for 'generations[1]'"),
        (3, "bad rank 0"),
    ]


def test_imagereward_real_test_set_pair_counts(tmp_path):
    """The real ImageReward test annotations (466 prompts, 2,720 generations), with a path map to
    stand-in PNGs, against an independent count from the rank multiplicities."""
    path = REPO_TESTS / "data" / "imagereward" / "test.json"
    records = json.loads(path.read_text())
    assert len(records) == 466
    all_gens = [g for r in records for g in r["generations"]]
    assert len(all_gens) == 2720 and len(set(all_gens)) == 2720
    blob = png_bytes(WHITE, size=(2, 2))
    path_map = {}
    for k, g in enumerate(all_gens):
        local = tmp_path / f"{k}.png"
        local.write_bytes(blob)
        path_map[g] = local
    # Independent count: per prompt, all C(n, 2) pairs minus the C(m, 2) pairs inside each group
    # of m generations that share a rank.
    expected_ties = sum(sum(comb(m, 2) for m in Counter(r["ranking"]).values()) for r in records)
    expected_all = sum(comb(len(r["generations"]), 2) for r in records)
    expected_no_ties = expected_all - expected_ties

    ds, report = read_imagereward(path, path_map=path_map, decode=False)
    assert report.n_skipped == 0 and report.n_records == 466
    assert len(ds) == expected_no_ties and report.n_ties_dropped == expected_ties
    assert not any(ds["tie"])
    # the better-ranked generation is the chosen one, for every pair
    rank_of = {
        os.path.abspath(path_map[g]): rank
        for r in records
        for g, rank in zip(r["generations"], r["ranking"])
    }
    for chosen, rejected in zip(ds["chosen"], ds["rejected"]):
        assert rank_of[chosen["path"]] < rank_of[rejected["path"]]

    ds_eval, report_eval = read_imagereward(path, path_map=path_map, keep_ties=True, decode=False)
    assert len(ds_eval) == expected_all and sum(ds_eval["tie"]) == expected_ties
    assert report_eval.n_ties == expected_ties and report_eval.n_ties_dropped == 0
    assert expected_ties > 0  # the real data does contain ties


# ----------------------------------------------------------------------------- benchmarks


def test_pickapic_parquet(tmp_path):
    table = pa.table(
        {
            "caption": ["one", "two", "tie", "bad sum", "bad bytes", None],
            "jpg_0": [
                png_bytes(RED),
                png_bytes(RED),
                png_bytes(RED),
                png_bytes(RED),
                b"xx",
                png_bytes(RED),
            ],
            "jpg_1": [png_bytes(BLUE)] * 6,
            "label_0": [1.0, 0.0, 0.5, 1.0, 1.0, 1.0],
            "label_1": [0.0, 1.0, 0.5, 1.0, 0.0, 0.0],
            "image_0_url": ["u"] * 6,  # extra columns are not read
        }
    )
    path = tmp_path / "train-00000.parquet"
    pq.write_table(table, path)
    assert detect_format(path) == "pickapic"
    ds, report = read_pickapic(path)
    assert ds["prompt"] == ["one", "two"] and report.n_ties_dropped == 1
    assert pixel(ds[0]["chosen"]) == RED and pixel(ds[1]["chosen"]) == BLUE
    assert [s.index for s in report.skipped] == [3, 4, 5]
    assert "do not sum to 1" in report.skipped[0].reason
    assert "unreadable image" in report.skipped[1].reason
    assert "missing field 'caption'" in report.skipped[2].reason
    ds, report = load_reward_data([path, path], keep_ties=True)  # several shards
    assert len(ds) == 6 and sum(ds["tie"]) == 2 and report.n_skipped == 6
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="not a Pick-a-Pic"):
        read_pickapic(tmp_path / "other.parquet")


def test_mjbench_records_with_categories(tmp_path):
    root = tmp_path / "images"
    write_png(root / "a.jpg", RED)
    write_png(root / "b.jpg", BLUE)
    recs = [
        {"id": "m0", "caption": "c0", "image0": "a.jpg", "image1": "b.jpg", "label": 1},
        {
            "id": "m1",
            "caption": "c1",
            "image0": "a.jpg",
            "image1": "b.jpg",
            "label": 0,
            "category": "blur",
        },
        {"id": "m2", "caption": "c2", "image0": "a.jpg", "image1": "nope.jpg", "label": 0},
    ]
    path = write_json(tmp_path / "meta" / "spatial.json", recs)
    assert detect_format(path) == "mjbench"
    ds, report = read_mjbench(path, image_root=root, category="spatial")
    assert ds["id"] == ["m0", "m1"] and ds["category"] == ["spatial", "blur"]
    assert pixel(ds[0]["chosen"]) == BLUE and pixel(ds[1]["chosen"]) == RED
    assert report.skipped[0].index == 2 and "nope.jpg" in report.skipped[0].reason


def test_genai_bench_ratings(tmp_path):
    root = tmp_path / "GenAI-Image-527"
    for model, color in (("A", RED), ("B", GREEN), ("C", BLUE)):
        write_png(root / model / "00000.jpeg", color)
        write_png(root / model / "00001.jpeg", color)
    data = {
        "00000": {
            "id": "00000",
            "prompt": "p0",
            "models": {"A": [5, 4, 3], "B": [2, 2, 2], "C": [4, 4, 4]},
        },
        "00001": {"prompt": "p1", "models": {"A": [9, 1, 1], "B": [1, 1, 1]}},  # rating 9: bad
    }
    path = write_json(root / "genai_image.json", data)
    assert detect_format(path) == "genai_bench"
    ds, report = read_genai_bench(path)
    # means A=4, B=2, C=4 -> (A>B), (A=C tie), (C>B)
    assert len(ds) == 3 and ds["tie"] == [False, True, False] and report.n_ties == 1
    assert pixel(ds[0]["chosen"]) == RED and pixel(ds[0]["rejected"]) == GREEN
    assert pixel(ds[2]["chosen"]) == BLUE and pixel(ds[2]["rejected"]) == GREEN
    assert report.skipped[0].index == 1 and "[1, 5]" in report.skipped[0].reason
    ds, report = read_genai_bench(path, keep_ties=False, models=["C", "B"])
    assert len(ds) == 1 and pixel(ds[0]["chosen"]) == BLUE


def test_detect_format_and_dispatch(tmp_path):
    write_png(tmp_path / "a.png")
    ir = write_json(
        tmp_path / "ir.json",
        [{"prompt": "p", "generations": ["a.png", "a.png"], "ranking": [1, 2]}],
    )
    pairs = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a.png", "rejected": "a.png"}]
    )
    unp = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "p", "image": "a.png", "label": 1}])
    assert [detect_format(p) for p in (ir, pairs, unp)] == ["imagereward", "pairs", "unpaired"]
    assert len(load_reward_data(ir).dataset) == 1
    assert load_reward_data(unp).report.kind == "unpaired"
    with pytest.raises(ValueError, match="unknown data format"):
        load_reward_data(ir, format="csv")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_reward_data(tmp_path / "nope.json")


def test_load_image_ref_variants(tmp_path):
    p = write_png(tmp_path / "a.png", GREEN)
    assert pixel(load_image_ref({"bytes": None, "path": str(p)})) == GREEN
    assert pixel(load_image_ref({"bytes": png_bytes(BLUE), "path": None})) == BLUE
    assert pixel(load_image_ref(str(p))) == GREEN
