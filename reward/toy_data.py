"""Small synthetic preference data for tests, demos and the tiny recipe (rendered with PIL).

Two tasks whose answer is known by construction, so that a reward model's learning can be measured:

* **alignment** (paired): a solid-colour image (with a little colour jitter and pixel noise) and a
  caption that names a colour. A pair shares one caption; ``chosen`` is an image of the colour the
  caption names, ``rejected`` an image of another colour. Chance accuracy is 0.5.
* **safety** (unpaired): a solid background with a filled shape; an *unsafe* image (label 0)
  also carries the marked symbol, a thick black "X" over the middle; safe images (label 1) do
  not. Captions name the background colour only, so the label must be read from the pixels.

:func:`write_toy_data` renders the images as PNG files and writes JSON-lines manifests in the
generic formats that :mod:`reward.data` reads (``{prompt, chosen, rejected}`` and
``{prompt, image, label}``). Everything is seeded; nothing is downloaded. The colour words are in
the vocabulary of the tiny test backbones (:mod:`reward.testing`).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: Colour names and their RGB values (all words of the tiny backbones' vocabulary).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 50),
}
#: Caption templates; ``{c}`` is a colour name.
TEMPLATES = ("a {c} image", "a photo of {c}", "a {c} picture", "{c}", "a drawing of {c}")
TASKS = ("alignment", "safety")


def render_solid(colour: str, size: int = 32, rng: random.Random | None = None) -> Image.Image:
    """A ``size x size`` RGB image of one colour of :data:`COLOURS`, with jitter and noise."""
    rng = rng or random.Random(0)
    base = np.array(COLOURS[colour], dtype=np.float32) + [rng.uniform(-20, 20) for _ in range(3)]
    noise = np.random.default_rng(rng.randrange(2**31)).normal(0, 6, (size, size, 3))
    pixels = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def render_symbol_image(
    colour: str, marked: bool, size: int = 32, rng: random.Random | None = None
) -> Image.Image:
    """A background of ``colour`` with a white filled shape; ``marked`` adds a thick black X."""
    rng = rng or random.Random(0)
    img = render_solid(colour, size, rng)
    draw = ImageDraw.Draw(img)
    r = size // 5
    cx, cy = rng.randint(r, size - r - 1), rng.randint(r, size - r - 1)
    if rng.random() < 0.5:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(245, 245, 245))
    else:
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=(245, 245, 245))
    if marked:
        m, w = size // 6, max(2, size // 8)
        draw.line((m, m, size - m, size - m), fill=(0, 0, 0), width=w)
        draw.line((m, size - m, size - m, m), fill=(0, 0, 0), width=w)
    return img


def alignment_records(
    n: int, seed: int = 0, size: int = 32
) -> list[tuple[str, Image.Image, Image.Image]]:
    """``n`` (caption, chosen image, rejected image) triples; the caption names the chosen colour."""
    rng = random.Random(seed)
    names = list(COLOURS)
    out = []
    for i in range(n):
        colour = names[i % len(names)]
        other = rng.choice([c for c in names if c != colour])
        caption = rng.choice(TEMPLATES).format(c=colour)
        out.append((caption, render_solid(colour, size, rng), render_solid(other, size, rng)))
    rng.shuffle(out)
    return out


def safety_records(n: int, seed: int = 0, size: int = 32) -> list[tuple[str, Image.Image, float]]:
    """``n`` (caption, image, label) triples, half of them marked (unsafe, label 0.0)."""
    rng = random.Random(seed)
    names = list(COLOURS)
    out = []
    for i in range(n):
        colour = rng.choice(names)
        marked = i % 2 == 0
        caption = rng.choice(TEMPLATES).format(c=colour)
        out.append(
            (caption, render_symbol_image(colour, marked, size, rng), 0.0 if marked else 1.0)
        )
    rng.shuffle(out)
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def write_toy_data(
    out_dir: str | os.PathLike,
    task: str = "alignment",
    n_train: int = 64,
    n_eval: int = 32,
    seed: int = 0,
    size: int = 32,
) -> tuple[Path, Path]:
    """Render a toy ``task`` (``alignment`` or ``safety``) into ``out_dir``; return the
    ``(train.jsonl, eval.jsonl)`` manifest paths (image paths are relative to the manifests).

    Train and eval examples come from different seeds (held out). Alignment manifests hold
    ``{prompt, chosen, rejected, id}`` pairs; safety manifests ``{prompt, image, label, id}``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown toy task {task!r}; choose one of {TASKS}.")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n, split_seed in (("train", n_train, seed), ("eval", n_eval, seed + 10_000)):
        rows = []
        if task == "alignment":
            for i, (caption, chosen, rejected) in enumerate(alignment_records(n, split_seed, size)):
                c, r = f"images/{task}_{split}_{i}_c.png", f"images/{task}_{split}_{i}_r.png"
                chosen.save(out / c)
                rejected.save(out / r)
                rows.append({"prompt": caption, "chosen": c, "rejected": r, "id": f"{split}-{i}"})
        else:
            for i, (caption, image, label) in enumerate(safety_records(n, split_seed, size)):
                name = f"images/{task}_{split}_{i}.png"
                image.save(out / name)
                rows.append(
                    {"prompt": caption, "image": name, "label": label, "id": f"{split}-{i}"}
                )
        path = out / f"{task}_{split}.jsonl"
        _write_jsonl(path, rows)
        paths.append(path)
    return paths[0], paths[1]


def toy_task_for(perspective: str) -> str:
    """The toy task used for a perspective: ``safety`` -> unpaired safety, else paired alignment."""
    return "safety" if perspective == "safety" else "alignment"
