"""reward.data on the official LLaVA-Reward repository's training files (sjz5202/LLaVA-Reward),
written here in its exact shapes and layout, and the skipped-record file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from reward.data import (
    DATA_FORMATS,
    DataRecordError,
    detect_format,
    load_reward_data,
    read_official_pairs,
    read_official_unpaired,
    write_skipped,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
CAPTION = "perfect white haired egyptian goddess wearing white dove wings, warframe armor "


def write_jpg(path: Path, color) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path, format="JPEG", quality=95)
    return path


def pixel(img) -> tuple:
    r, g, b = img.getpixel((3, 3))
    return tuple(255 if v > 127 else 0 for v in (r, g, b))  # JPEG: nearly the colour


def official_repo(root: Path) -> Path:
    """The official repository's layout: data files under data/, image paths from the root."""
    img = root / "data" / "sample_test" / "sample_img"
    write_jpg(img / "0_1_id_000904-0035.jpg", RED)
    write_jpg(img / "4_3_id_000904-0035.jpg", BLUE)
    write_jpg(img / "5_4_id_000904-0035.jpg", GREEN)
    write_jpg(img / "0_c.jpg", GREEN)
    write_jpg(img / "0_r.jpg", RED)
    pairs = [
        {
            "prompt_id": "000904-0035",
            "prompt": [CAPTION, CAPTION],
            "chosen_path": "data/sample_test/sample_img/0_1_id_000904-0035.jpg",
            "c_rate": 7,
            "reject_path": "data/sample_test/sample_img/4_3_id_000904-0035.jpg",
            "r_rate": 6,
        },
        {
            "prompt_id": "000904-0035",
            "prompt": [CAPTION, CAPTION],
            "chosen_path": "data/sample_test/sample_img/5_4_id_000904-0035.jpg",
            "c_rate": 6,
            "reject_path": "data/sample_test/sample_img/4_3_id_000904-0035.jpg",
            "r_rate": 4,
        },
    ]
    singles = [
        {"path": "data/sample_test/sample_img/0_c.jpg", "label": 1, "prompt": "a curious cat"},
        {
            "safety_label": "Unsafe",
            "category": "Violence",
            "source": "Laion5B",
            "path": "data/sample_test/sample_img/0_r.jpg",
            "label": 0,
            "prompt": "",
        },
    ]
    d = root / "data" / "sample_test"
    (d / "pairwise_sample.json").write_text(json.dumps(pairs, indent=4))
    (d / "non_pairwise_sample.json").write_text(json.dumps(singles, indent=4))
    (d / "pairwise_sample.jsonl").write_text("\n".join(json.dumps(r) for r in pairs) + "\n")
    return d


def test_official_files_are_detected_and_read_as_released(tmp_path, monkeypatch):
    d = official_repo(tmp_path / "LLaVA-Reward")
    monkeypatch.chdir(tmp_path)  # neither the repository root nor the data folder
    for name in ("pairwise_sample.json", "pairwise_sample.jsonl"):
        assert detect_format(d / name) == "official_pairs"
        ds, report = load_reward_data(d / name, keep_ties=True)  # keep_ties: no ties here
        assert report.format == "official_pairs" and report.n_skipped == 0
        assert ds["prompt"] == [CAPTION, CAPTION] and ds["id"] == ["000904-0035"] * 2
        assert ds["tie"] == [False, False]
        assert [pixel(r["chosen"]) for r in ds] == [RED, GREEN]  # chosen_path is preferred
        assert [pixel(r["rejected"]) for r in ds] == [BLUE, BLUE]
        raw = ds.with_format(None)[0]["chosen"]["path"]
        assert raw == os.path.abspath(d / "sample_img" / "0_1_id_000904-0035.jpg")

    assert detect_format(d / "non_pairwise_sample.json") == "official_unpaired"
    ds, report = load_reward_data(d / "non_pairwise_sample.json")
    assert report.kind == "unpaired" and report.n_skipped == 0
    assert ds["label"] == [1.0, 0.0] and ds["prompt"] == ["a curious cat", ""]
    assert ds["category"] == [None, "Violence"]
    assert [pixel(r["image"]) for r in ds] == [GREEN, RED]


def test_official_absolute_paths_resolve_under_image_root_by_file_name(tmp_path):
    images = tmp_path / "unsafe_bench_img"
    write_jpg(images / "0.jpg", GREEN)
    write_jpg(images / "2.jpg", RED)
    recs = [
        {"path": "/scr/shijie/hf/data/unsafe_bench_img/0.jpg", "label": 1, "prompt": "a"},
        {"path": "/scr/shijie/hf/data/unsafe_bench_img/2.jpg", "label": 0, "prompt": "b"},
    ]
    data = tmp_path / "Unsafebench_train.json"
    data.write_text(json.dumps(recs))
    with pytest.raises(DataRecordError, match=r"all 2 records are bad.*authors' machine"):
        read_official_unpaired(data)
    ds, report = read_official_unpaired(data, image_root=images)
    assert report.n_skipped == 0 and ds["label"] == [1.0, 0.0]
    assert [pixel(r["image"]) for r in ds] == [GREEN, RED]


def test_official_bad_records_are_named_skipped_and_saved(tmp_path):
    d = official_repo(tmp_path)
    good = json.loads((d / "pairwise_sample.json").read_text())[0]
    recs = [
        good,
        {**good, "prompt": ["one caption", "another caption"]},  # 1: two captions
        {**good, "c_rate": "high"},  # 2: rating not a number
        {**good, "reject_path": "data/sample_test/sample_img/gone.jpg"},  # 3: no file
        {**good, "prompt": [CAPTION]},  # 4: a list of one
        {**good, "perspective": "fidelity"},  # 5: good, names its perspective
    ]
    path = d / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n{broken\n")
    ds, report = read_official_pairs(path)
    assert len(ds) == 2 and report.perspectives == ["fidelity"]
    reasons = {s.index: s.reason for s in report.skipped}
    assert sorted(reasons) == [1, 2, 3, 4, 6]
    assert "two different captions" in reasons[1]
    assert "'c_rate' must be a number" in reasons[2]
    assert "image file not found for 'reject_path'" in reasons[3] and "gone.jpg" in reasons[3]
    assert "list of two captions" in reasons[4]
    assert "invalid JSON on line 7" in reasons[6]

    with pytest.raises(DataRecordError) as err:
        read_official_pairs(path, on_error="raise")
    msg = str(err.value)
    assert str(path) in msg and "record 1:" in msg and "two different captions" in msg
    assert "--on_error skip" in msg

    out = write_skipped(tmp_path / "out" / "skipped_train.jsonl", [report])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["index"] for x in lines] == [1, 2, 3, 4, 6]
    assert lines[0] == {
        "source": str(path),
        "index": 1,
        "reason": reasons[1],
        "record": recs[1],
    }
    assert lines[-1]["record"] == "{broken"  # the raw line of a record that is not JSON
    # nothing skipped: no file, and a stale one is removed
    _, clean = read_official_pairs(d / "pairwise_sample.json")
    assert write_skipped(out, [clean]) is None and not out.exists()


def test_skipped_bytes_are_written_as_their_length(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reward.data import read_pickapic

    path = tmp_path / "p.parquet"
    pq.write_table(
        pa.table(
            {"caption": ["x", "y"], "jpg_0": [b"xx", b"yy"], "jpg_1": [b"zz", b"ww"]}
            | {"label_0": [1.0, 1.0], "label_1": [0.0, 0.0]}
        ),
        path,
    )
    with pytest.raises(DataRecordError, match="all 2 records are bad"):
        read_pickapic(path)
    good = tmp_path / "g.png"
    Image.new("RGB", (4, 4), RED).save(good)
    pq.write_table(
        pa.table(
            {"caption": ["x", "y"], "jpg_0": [good.read_bytes(), b"yy"]}
            | {"jpg_1": [good.read_bytes()] * 2, "label_0": [1.0, 1.0], "label_1": [0.0, 0.0]}
        ),
        path,
    )
    _, report = read_pickapic(path)
    out = write_skipped(tmp_path / "skipped_eval.jsonl", [report])
    line = json.loads(out.read_text())
    assert line["index"] == 1 and line["record"]["jpg_0"] == "<2 bytes>"


def test_every_format_is_one_table_row_with_its_reader():
    import inspect

    import reward.data as data

    for name, fmt in DATA_FORMATS.items():
        reader = getattr(data, f"read_{name}")
        params = inspect.signature(reader).parameters
        assert set(fmt.options) | set(data.COMMON_OPTIONS) | {"path"} == set(params)
        assert reader.__doc__.startswith(fmt.doc.split("\n")[0])
    with pytest.raises(TypeError, match="keep_ties"):
        data.read_unpaired("x.json", keep_ties=True)  # unknown options are refused by name
