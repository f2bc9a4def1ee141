"""Prompt sources for sampling and RL: files (text, TSV, JSON) and bundled sets.

``load_prompts(source, category=None)`` understands:

- ``"short"``: a bundled short list of simple prompts (:data:`SHORT_PROMPTS`);
- ``"parti"`` / ``"partiprompts"``: the bundled PartiPrompts (1,632 prompts, Apache-2.0, see
  ``alignment/data/NOTICE.md``), optionally filtered by ``category`` (e.g. ``"Animals"``);
- a ``.txt`` file: one prompt per line (blank lines and ``#`` comments skipped);
- a ``.tsv`` file with a ``Prompt`` column (and ``Category`` for the filter);
- a ``.json`` / ``.jsonl`` file: a list of strings, or records with a ``prompt`` key (and an
  optional ``category`` key).

``category`` may be one name or several separated by commas; matching ignores case.
"""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path

#: A short bundled list of simple, concrete prompts (DDPO's animal prompts and a few scenes).
SHORT_PROMPTS: tuple[str, ...] = (
    "a cat",
    "a dog",
    "a horse",
    "a bird",
    "a fish",
    "a cow",
    "a red circle",
    "a blue square",
    "a green tree",
    "a yellow sun in the sky",
    "a house next to a river",
    "a boat on the water",
)


def _categories(category: str | list[str] | None) -> set[str] | None:
    if category is None:
        return None
    items = category.split(",") if isinstance(category, str) else list(category)
    cats = {c.strip().lower() for c in items if c.strip()}
    return cats or None


def _filter(records: list[tuple[str, str | None]], cats: set[str] | None, where: str) -> list[str]:
    if cats is None:
        return [p for p, _ in records]
    if all(c is None for _, c in records):
        raise ValueError(f"{where} has no category column/key, so category= cannot filter it.")
    out = [p for p, c in records if c is not None and c.strip().lower() in cats]
    if not out:
        known = sorted({c for _, c in records if c})
        raise ValueError(f"No prompts of category {sorted(cats)} in {where}; categories: {known}")
    return out


def _read_tsv(text: str, where: str) -> list[tuple[str, str | None]]:
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    if not rows or "Prompt" not in rows[0]:
        raise ValueError(f"{where}: a TSV prompt file needs a header with a 'Prompt' column.")
    return [(r["Prompt"].strip(), r.get("Category")) for r in rows if r["Prompt"].strip()]


def _read_json(path: Path) -> list[tuple[str, str | None]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        data = json.loads(text)
    if isinstance(data, dict):
        data = list(data.values())
    out: list[tuple[str, str | None]] = []
    for item in data:
        if isinstance(item, str):
            out.append((item, None))
        elif isinstance(item, dict) and "prompt" in item:
            out.append((str(item["prompt"]), item.get("category")))
        else:
            raise ValueError(
                f"{path}: JSON prompts must be strings or records with a 'prompt' key; got {item!r}"
            )
    return out


def partiprompt_categories() -> list[str]:
    """The categories of the bundled PartiPrompts."""
    text = resources.files("alignment").joinpath("data/partiprompts.tsv").read_text("utf-8")
    return sorted({c for _, c in _read_tsv(text, "partiprompts.tsv") if c})


def load_prompts(source: str, category: str | list[str] | None = None) -> list[str]:
    """Load a list of prompts (see the module docstring for the accepted sources).

    Raises:
        FileNotFoundError: ``source`` is neither a bundled name nor an existing file.
        ValueError: an unreadable file, or a category that matches nothing.
    """
    key = source.strip().lower()
    if key == "short":
        if category is not None:
            raise ValueError("The 'short' prompt set has no categories; use 'parti' to filter.")
        return list(SHORT_PROMPTS)
    if key in ("parti", "partiprompts"):
        text = resources.files("alignment").joinpath("data/partiprompts.tsv").read_text("utf-8")
        return _filter(_read_tsv(text, "partiprompts.tsv"), _categories(category), "PartiPrompts")
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Prompt source {source!r} is not a file nor a bundled set ('short', 'parti')."
        )
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        records = _read_tsv(path.read_text(encoding="utf-8"), str(path))
    elif suffix in (".json", ".jsonl"):
        records = _read_json(path)
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        records = [(ln.strip(), None) for ln in lines if ln.strip() and not ln.startswith("#")]
    prompts = _filter(records, _categories(category), str(path))
    if not prompts:
        raise ValueError(f"{path} holds no prompts.")
    return prompts
