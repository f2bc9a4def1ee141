"""Preference-data readers for reward training and evaluation, built on ``datasets``.

Every reader takes local files only (nothing is downloaded) and returns a :class:`ReadResult`
``(dataset, report)``: a ``datasets.Dataset`` in one of the two common schemas below and a
:class:`ReadReport` that counts records, examples, ties and the skipped bad records.

Common output schema
--------------------
Paired examples (:func:`paired_features`), one row per ordered pair::

    prompt    string        the caption both images were generated for
    chosen    image ref     the preferred image (when ``tie``: simply the first image)
    rejected  image ref     the other image
    tie       bool          True when the annotators did not prefer either image (only present
                            when the reader was asked to keep ties, i.e. for evaluation)
    category  string|None   e.g. an MJ-Bench subset ("spatial", "blur", ...); None when unknown
    id        string        the source record's id (or its 0-based index), shared by all pairs
                            expanded from one record

Unpaired examples (:func:`unpaired_features`), one row per image::

    prompt    string
    image     image ref
    label     float32       in [0, 1]; 1 = the positive class (e.g. safe = 1, unsafe = 0)
    category  string|None
    id        string

An *image ref* is stored as a ``datasets.Image(decode=False)`` value ``{"bytes": ..., "path":
...}``: an absolute path to a local file, or the encoded bytes (e.g. Pick-a-Pic's ``jpg_0``).
Nothing is decoded while reading. With ``decode=True`` (the default) the returned dataset carries a
lazy ``with_transform`` that turns ``chosen`` / ``rejected`` / ``image`` into RGB PIL images through
:func:`reward.images.load_image` when rows are accessed (``ds[i]``, ``ds[i:j]``, a DataLoader);
``ds.with_format(None)`` gives the raw refs back, :func:`decode_images` adds the transform to a raw
dataset and :func:`load_image_ref` decodes one ref (for a collator). ``select``, ``shuffle`` and
``train_test_split`` keep the transform. Reading ``ds["chosen"]`` decodes the whole column.

Input formats
-------------
One table, :data:`DATA_FORMATS`, says for each format what its records look like, how one record
becomes examples (its *handler*), the options it takes and how it is recognised;
:func:`read_format` is the one reading loop they all share, :func:`load_reward_data` picks the
format (``"auto"``: :func:`detect_format`) and ``read_<format>`` (:func:`read_pairs`, ...) are the
same loop with the format fixed. The formats:

* ``pairs`` (:func:`read_pairs`): generic manifests, ``.json`` (a list of objects), ``.jsonl`` or
  ``.parquet``, of ``{prompt, chosen, rejected}`` or ``{prompt, image_0, image_1, label}`` (label
  = index of the preferred image, ``-1`` / ``0.5`` = tie);
* ``unpaired`` (:func:`read_unpaired`): single images ``{prompt, image, label}``, label in
  ``[0, 1]`` or a bool (:func:`read_manifest` picks ``pairs`` or ``unpaired`` for a manifest);
  image values are paths (relative ones resolved against ``image_root``, default the file's
  folder), encoded bytes (parquet binary columns) or ``{"bytes", "path"}`` structs;
* ``imagereward`` (:func:`read_imagereward`): rankings ``[{id, prompt, generations, ranking}]``
  expanded to every pair of generations of different rank;
* ``pickapic`` (:func:`read_pickapic`): Pick-a-Pic v2 parquet ``caption, jpg_0, jpg_1, label_0,
  label_1``;
* ``mjbench`` (:func:`read_mjbench`): ``[{id, caption, image0, image1, label}]``;
* ``genai_bench`` (:func:`read_genai_bench`): ``{id: {prompt, models: {name: [1-5 ratings]}}}``;
* ``official_pairs`` / ``official_unpaired`` (:func:`read_official_pairs`,
  :func:`read_official_unpaired`): the training files of the official LLaVA-Reward repository
  (sjz5202/LLaVA-Reward; the paper's ImageReward and UnsafeBench training data is released in
  them), read as they are, JSON or JSONL: pairs ``{prompt_id, prompt: [p, p], chosen_path,
  c_rate, reject_path, r_rate}`` and single images ``{path, label, prompt}``. The official code
  trains ``chosen_path`` over ``reject_path`` always; ``c_rate`` / ``r_rate`` are the annotators'
  ratings of the two images, which it only prints at evaluation (0 when unknown): they are checked
  to be numbers and not used. ``prompt`` is ``[caption of chosen, caption of rejected]`` (the same
  caption twice in the released files; two different captions cannot make one pair of this
  schema and are a bad record). Paths: the official code opens them as written, relative to the
  directory it runs in (the repository root: ``data/sample_test/sample_img/0_c.jpg``), and ships
  absolute paths of the authors' machine that its ``data/re_path.py`` rewrites to
  ``NEW_BASE/<file name>``. Here a relative path is looked up in the data file's folder, the
  working directory, then the data file's parent folders (so the repository's files work from
  anywhere); with ``image_root`` a path is looked up as written, under ``image_root``, then as
  ``image_root/<file name>`` (the ``re_path.py`` rule, without rewriting the file).

Any record may carry a ``perspective`` field (``"alignment"``, ``"safety"``, ...): the distinct
values a file names are listed in ``report.perspectives`` (evaluation scores a file under the
perspective its data is for).

Bad records
-----------
A record with a missing field, an unknown / out-of-range label, a missing image file or an image
whose header cannot be read (``verify_images=True``; pixels are decoded only later) is reported
with its 0-based index and the reason. ``on_error="skip"`` (default) skips it, logs a warning
(python ``logging``, logger ``reward.data``) and lists it, with the record itself, in
``report.skipped`` (:func:`write_skipped` writes them to a JSONL file: the recipes write
``OUTPUT_DIR/skipped_<split>.jsonl``); ``on_error="raise"`` raises :class:`DataRecordError` at the
first one, naming the file, the record's index and the problem. A file whose records are *all* bad
raises :class:`DataRecordError` either way (usually a wrong ``image_root``). An ImageReward or
GenAI-Bench record is skipped as a whole when any of its images is bad.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from reward.files import atomic_write_text
from reward.images import ImageInputError, load_image

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
PathMap = Mapping[str, PathLike] | Callable[[str], PathLike] | PathLike | None

_IMAGE_COLUMNS = ("chosen", "rejected", "image")
_PAIR_FIELDS = frozenset({"chosen", "rejected", "image_0", "image_1"})
_MAX_LOGGED = 20


def _features(kind: str) -> datasets.Features:
    from datasets import Features, Image, Value

    if kind == "paired":
        return Features(
            {
                "prompt": Value("string"),
                "chosen": Image(decode=False),
                "rejected": Image(decode=False),
                "tie": Value("bool"),
                "category": Value("string"),
                "id": Value("string"),
            }
        )
    return Features(
        {
            "prompt": Value("string"),
            "image": Image(decode=False),
            "label": Value("float32"),
            "category": Value("string"),
            "id": Value("string"),
        }
    )


def paired_features() -> datasets.Features:
    """``datasets.Features`` of the paired schema (``datasets`` is imported on first use)."""
    return _features("paired")


def unpaired_features() -> datasets.Features:
    """``datasets.Features`` of the unpaired schema."""
    return _features("unpaired")


class DataRecordError(ValueError):
    """A bad record met with ``on_error="raise"``; the message names file, index and reason."""


@dataclass
class SkippedRecord:
    """One skipped input record: its 0-based index in ``source``, why it was skipped, and the
    record as read (a dict, or the raw text of a line that is not valid JSON)."""

    index: int
    reason: str
    source: str = ""
    record: Any = None


@dataclass
class ReadReport:
    """What a reader did. ``n_skipped`` is the number of bad records skipped; ``perspectives``
    the distinct ``perspective`` fields the records name (usually none)."""

    source: str
    kind: str = "paired"
    format: str = ""
    n_records: int = 0
    n_examples: int = 0
    n_ties: int = 0
    n_ties_dropped: int = 0
    skipped: list[SkippedRecord] = field(default_factory=list)
    perspectives: list[str] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def as_dict(self, max_skipped: int = 100) -> dict[str, Any]:
        """JSON-ready summary; lists at most ``max_skipped`` skipped records (without the
        records themselves: :func:`write_skipped` writes those)."""
        return {
            "source": self.source,
            "format": self.format,
            "kind": self.kind,
            "n_records": self.n_records,
            "n_examples": self.n_examples,
            "n_ties": self.n_ties,
            "n_ties_dropped": self.n_ties_dropped,
            "n_skipped": self.n_skipped,
            "perspectives": list(self.perspectives),
            "skipped": [
                {"index": s.index, "reason": s.reason, "source": s.source}
                for s in self.skipped[:max_skipped]
            ],
        }


class ReadResult(NamedTuple):
    """``(dataset, report)``; unpack as ``ds, report = read_pairs(...)``."""

    dataset: datasets.Dataset
    report: ReadReport


class _BadRecord(Exception):
    """Internal: the current record is bad for the given reason (``record``: the raw input when
    it could not be parsed into a record)."""

    def __init__(self, reason: str, record: Any = None):
        super().__init__(reason)
        self.record = record


# ----------------------------------------------------------------------------- images


def load_image_ref(ref: Any, *, name: str | None = None) -> PILImage.Image:
    """Decode one image ref (``{"bytes", "path"}`` dict, path, bytes or PIL) to RGB PIL."""
    if isinstance(ref, dict):
        src = ref.get("bytes") if ref.get("bytes") is not None else ref.get("path")
        if src is None:
            raise ImageInputError(f"image {name or ''}: the ref has neither bytes nor a path.")
        return load_image(src, name=name)
    return load_image(ref, name=name)


def _decode_batch(batch: dict[str, list]) -> dict[str, list]:
    out = dict(batch)
    ids = batch.get("id")
    for col in _IMAGE_COLUMNS:
        if col in out:
            out[col] = [
                load_image_ref(v, name=f"{col} of example id={ids[i] if ids else i}")
                for i, v in enumerate(out[col])
            ]
    return out


def decode_images(dataset: datasets.Dataset) -> datasets.Dataset:
    """Return ``dataset`` with a lazy transform that decodes its image columns to RGB PIL."""
    return dataset.with_transform(_decode_batch)


def _header_error(src: Any) -> str | None:
    """Open ``src`` (path or file object) as an image, reading only its header."""
    try:
        with PILImage.open(src) as img:
            if img.width == 0 or img.height == 0:
                return "zero-size image"
    except (UnidentifiedImageError, OSError, ValueError) as e:
        return f"unreadable image ({type(e).__name__}: {e})"
    return None


class _Images:
    """Resolves raw image values of one input file to ``{"bytes", "path"}`` refs.

    ``official_paths``: look relative paths up the way the official LLaVA-Reward files need (see
    the module docstring); otherwise a relative path is ``image_root / path`` only.
    """

    def __init__(
        self,
        data_file: Path,
        image_root: PathLike | None,
        path_map: PathMap,
        verify: bool,
        official_paths: bool = False,
    ):
        self.folder = data_file.parent
        self.user_root = image_root is not None
        self.root = Path(image_root) if image_root is not None else self.folder
        self.official = official_paths
        self.verify = verify
        self._checked: dict[str, str | None] = {}
        self._last_base: Path | None = None  # where the previous relative path was found
        if isinstance(path_map, (str, os.PathLike)):
            with open(path_map, encoding="utf-8") as f:
                path_map = json.load(f)
            if not isinstance(path_map, dict):
                raise ValueError("path_map file must hold a JSON object {original: local}.")
        self.path_map = path_map

    def _map(self, value: str) -> Path:
        if callable(self.path_map):
            try:
                mapped = self.path_map(value)
            except Exception as e:  # a user callable: report, do not crash the whole read
                raise _BadRecord(f"path_map failed on {value!r} ({type(e).__name__}: {e})") from e
        elif self.path_map is not None and value in self.path_map:
            mapped = self.path_map[value]
        else:
            mapped = value
        return Path(mapped).expanduser()

    def _bases(self) -> list[Path]:
        """Folders a relative official path is looked up in, the last successful one first."""
        bases = [self.folder, Path.cwd(), *self.folder.resolve().parents]
        if self._last_base is not None:
            bases.insert(0, self._last_base)
        unique: dict[Path, Path] = {}
        for base in bases:
            unique.setdefault(base.resolve(), base)
        return list(unique.values())

    def _locate(self, path: Path, what: str) -> Path:
        if not self.official:
            found = path if path.is_absolute() else self.root / path
            if not found.is_file():
                raise _BadRecord(f"image file not found for '{what}': {found}")
            return found
        if self.user_root:  # as written, under image_root, then image_root/<file name>
            candidates = [path] if path.is_absolute() else [self.root / path]
            candidates.append(self.root / path.name)
            for c in candidates:
                if c.is_file():
                    return c
            raise _BadRecord(
                f"image file not found for '{what}': {path} (looked for "
                f"{' and '.join(str(c) for c in candidates)}); check image_root or pass path_map"
            )
        if path.is_absolute():
            if path.is_file():
                return path
            raise _BadRecord(
                f"image file not found for '{what}': {path}. The official files name images on "
                "the authors' machine: pass image_root (--image_root), the folder that holds them "
                "(matched by file name, as the official data/re_path.py does), or path_map"
            )
        bases = self._bases()
        for base in bases:
            if (base / path).is_file():
                self._last_base = base
                return base / path
        raise _BadRecord(
            f"image file not found for '{what}': {path} (looked in {len(bases)} folders: the "
            "data file's, the working directory and the data file's parents); pass image_root "
            "or path_map"
        )

    def ref(self, value: Any, what: str) -> dict[str, Any]:
        if isinstance(value, dict) and ("bytes" in value or "path" in value):
            if value.get("bytes") is not None:
                return self.ref(value["bytes"], what)
            return self.ref(value.get("path"), what)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise _BadRecord(f"missing image for '{what}'")
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            if not data:
                raise _BadRecord(f"empty image bytes for '{what}'")
            if self.verify:
                err = _header_error(io.BytesIO(data))
                if err is not None:
                    raise _BadRecord(f"'{what}': {err}")
            return {"bytes": data, "path": None}
        if isinstance(value, (str, os.PathLike)):
            path = self._locate(self._map(os.fspath(value)), what)
            if self.verify:
                key = str(path)
                if key not in self._checked:  # an image shared by many pairs is checked once
                    self._checked[key] = _header_error(path)
                if self._checked[key] is not None:
                    raise _BadRecord(f"'{what}' {path}: {self._checked[key]}")
            return {"bytes": None, "path": os.path.abspath(path)}
        raise _BadRecord(
            f"'{what}' must be a path, bytes or {{bytes, path}}, got {type(value).__name__}"
        )


# ----------------------------------------------------------------------------- raw records


def _iter_records(path: Path, columns: Sequence[str] | None = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, record)`` from a .json list, .jsonl or .parquet file; a record that cannot
    be parsed is yielded as a ``_BadRecord``."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        cols = None if columns is None else [c for c in columns if c in names]
        index = 0
        for batch in pf.iter_batches(batch_size=256, columns=cols):
            for row in batch.to_pylist():
                yield index, row
                index += 1
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            index = 0
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield index, json.loads(line)
                except json.JSONDecodeError as e:
                    yield (
                        index,
                        _BadRecord(f"invalid JSON on line {lineno}: {e.msg}", line.rstrip()),
                    )
                index += 1
    elif suffix == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(
                f"{path}: expected a JSON list of records (or JSON lines in a .jsonl file), "
                f"got a JSON {type(data).__name__}."
            )
        yield from enumerate(data)
    else:
        raise ValueError(
            f"{path}: unsupported file type '{suffix}'. Use .json (a list of records), .jsonl "
            "or .parquet."
        )


def _as_paths(path: PathLike | Sequence[PathLike]) -> list[Path]:
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        raise ValueError("no data file given.")
    out = []
    for p in paths:
        p = Path(p).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"data file not found: {p}. Check the path.")
        out.append(p)
    return out


class _Builder:
    """Collects validated examples and bad records for one reader call."""

    def __init__(self, fmt: str, kind: str, sources: list[Path], on_error: str):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}.")
        self.kind = kind
        self.on_error = on_error
        self.report = ReadReport(source=", ".join(str(s) for s in sources), kind=kind, format=fmt)
        names = ("prompt", "chosen", "rejected", "tie", "category", "id")
        if kind != "paired":
            names = ("prompt", "image", "label", "category", "id")
        self.cols: dict[str, list] = {n: [] for n in names}

    def bad(self, source: Path, index: int, reason: str, record: Any = None) -> None:
        msg = f"{source}: record {index}: {reason}"
        if self.on_error == "raise":
            raise DataRecordError(
                f"{msg}. Fix the record, or skip bad records with on_error='skip' "
                "(--on_error skip in the recipes)."
            )
        if self.report.n_skipped < _MAX_LOGGED:
            logger.warning("skipping %s", msg)
        self.report.skipped.append(
            SkippedRecord(index=index, reason=reason, source=str(source), record=record)
        )

    def note_perspective(self, rec: Mapping) -> None:
        name = rec.get("perspective")
        if isinstance(name, str) and name and name not in self.report.perspectives:
            self.report.perspectives.append(name)

    def pair(self, prompt, chosen, rejected, tie, category, rid) -> None:
        for k, v in zip(self.cols, (prompt, chosen, rejected, bool(tie), category, str(rid))):
            self.cols[k].append(v)
        self.report.n_ties += int(bool(tie))

    def single(self, prompt, image, label, category, rid) -> None:
        for k, v in zip(self.cols, (prompt, image, float(label), category, str(rid))):
            self.cols[k].append(v)

    def finish(self, decode: bool) -> ReadResult:
        from datasets import Dataset

        r = self.report
        r.perspectives.sort()
        if r.n_records and r.n_records == r.n_skipped:
            raise DataRecordError(
                f"{r.source}: all {r.n_records} records are bad (first: record "
                f"{r.skipped[0].index}: {r.skipped[0].reason}). If images are not found, check "
                "image_root / path_map."
            )
        ds = Dataset.from_dict(self.cols, features=_features(self.kind))
        r.n_examples = len(ds)
        logger.info(
            "%s: %d records -> %d %s examples (%d ties kept, %d tie pairs dropped), "
            "%d bad records skipped",
            r.source,
            r.n_records,
            r.n_examples,
            r.kind,
            r.n_ties,
            r.n_ties_dropped,
            r.n_skipped,
        )
        if r.n_skipped:
            logger.warning("%s: skipped %d bad records of %d", r.source, r.n_skipped, r.n_records)
        return ReadResult(decode_images(ds) if decode else ds, r)


# ----------------------------------------------------------------------------- field parsing


def _field(rec: Mapping, name: str) -> Any:
    if name not in rec or rec[name] is None:
        raise _BadRecord(f"missing field '{name}'")
    return rec[name]


def _text(rec: Mapping, name: str) -> str:
    value = _field(rec, name)
    if not isinstance(value, str):
        raise _BadRecord(f"field '{name}' must be a string, got {type(value).__name__}")
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _preferred_index(value: Any, name: str = "label") -> int | None:
    """Index of the preferred image (0 or 1), or None for a tie (-1 or 0.5)."""
    if _is_number(value):
        if value in (0, 1):
            return int(value)
        if value in (-1, 0.5):
            return None
    raise _BadRecord(
        f"bad {name} {value!r}: expected 0 (first image preferred), 1 (second image preferred) "
        "or -1 / 0.5 (tie)"
    )


def _binary_label(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    if _is_number(value) and 0 <= value <= 1:
        return float(value)
    raise _BadRecord(f"bad label {value!r}: expected a number in [0, 1] or a bool (1 = positive)")


def _category(rec: Mapping, default: str | None) -> str | None:
    value = rec.get("category", default)
    return None if value is None else str(value)


def _add_pair(b: _Builder, prompt, first, second, preferred, keep_ties, category, rid) -> None:
    """Add one pair given the index of the preferred image (None = tie)."""
    if preferred is None:
        if keep_ties:
            b.pair(prompt, first, second, True, category, rid)
        else:
            b.report.n_ties_dropped += 1
    elif preferred == 0:
        b.pair(prompt, first, second, False, category, rid)
    else:
        b.pair(prompt, second, first, False, category, rid)


# ----------------------------------------------------------------------------- record handlers
# handler(builder, images, record, index, options): add the record's examples to the builder or
# raise _BadRecord; options holds the format's options (keep_ties, category, ...) with defaults.


def _handle_pairs(b: _Builder, images: _Images, rec: Mapping, index: int, o: Mapping) -> None:
    prompt = _text(rec, "prompt")
    cat = _category(rec, o["category"])
    rid = rec.get("id", index)
    if "chosen" in rec or "rejected" in rec:
        chosen = images.ref(_field(rec, "chosen"), "chosen")
        rejected = images.ref(_field(rec, "rejected"), "rejected")
        b.pair(prompt, chosen, rejected, False, cat, rid)
        return
    if "image_0" not in rec and "image_1" not in rec:
        raise _BadRecord(
            "missing fields: a pair needs {prompt, chosen, rejected} or "
            "{prompt, image_0, image_1, label}"
        )
    preferred = _preferred_index(_field(rec, "label"))
    first = images.ref(_field(rec, "image_0"), "image_0")
    second = images.ref(_field(rec, "image_1"), "image_1")
    _add_pair(b, prompt, first, second, preferred, o["keep_ties"], cat, rid)


def _handle_unpaired(b: _Builder, images: _Images, rec: Mapping, index: int, o: Mapping) -> None:
    prompt = _text(rec, "prompt")
    label = _binary_label(_field(rec, "label"))
    image = images.ref(_field(rec, "image"), "image")
    b.single(prompt, image, label, _category(rec, o["category"]), rec.get("id", index))


def _handle_imagereward(b: _Builder, images: _Images, rec: Mapping, index: int, o: Mapping) -> None:
    prompt = _text(rec, "prompt")
    gens = _field(rec, "generations")
    ranks = _field(rec, "ranking")
    if not isinstance(gens, list) or not isinstance(ranks, list):
        raise _BadRecord("'generations' and 'ranking' must be lists")
    if len(gens) != len(ranks):
        raise _BadRecord(f"'generations' has {len(gens)} entries but 'ranking' has {len(ranks)}")
    if len(gens) < 2:
        raise _BadRecord("fewer than 2 generations: no pair to compare")
    for r in ranks:
        if not (_is_number(r) and float(r).is_integer() and r >= 1):
            raise _BadRecord(f"bad rank {r!r}: ranks are integers >= 1 (1 = best)")
    refs = [images.ref(g, f"generations[{k}]") for k, g in enumerate(gens)]
    rid = rec.get("id", index)
    cat = _category(rec, None)
    for i in range(len(gens)):
        for j in range(i + 1, len(gens)):
            preferred = None if ranks[i] == ranks[j] else (0 if ranks[i] < ranks[j] else 1)
            _add_pair(b, prompt, refs[i], refs[j], preferred, o["keep_ties"], cat, rid)


_PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")


def _pickapic_records(p: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    if p.suffix.lower() != ".parquet":
        raise ValueError(f"{p}: Pick-a-Pic data must be parquet.")
    names = pq.ParquetFile(p).schema_arrow.names
    missing = [c for c in _PICKAPIC_COLUMNS[:4] if c not in names]
    if missing:
        raise ValueError(
            f"{p}: not a Pick-a-Pic v2 parquet file: columns {missing} are missing (found {names})."
        )
    return _iter_records(p, _PICKAPIC_COLUMNS)


def _handle_pickapic(b: _Builder, images: _Images, rec: Mapping, index: int, o: Mapping) -> None:
    prompt = _text(rec, "caption")
    label_0 = _field(rec, "label_0")
    if not _is_number(label_0) or label_0 not in (0, 0.5, 1):
        raise _BadRecord(f"bad label_0 {label_0!r}: expected 0, 0.5 (tie) or 1")
    label_1 = rec.get("label_1")
    if label_1 is not None and (not _is_number(label_1) or label_0 + label_1 != 1):
        raise _BadRecord(f"label_0 {label_0!r} and label_1 {label_1!r} do not sum to 1")
    first = images.ref(_field(rec, "jpg_0"), "jpg_0")
    second = images.ref(_field(rec, "jpg_1"), "jpg_1")
    preferred = None if label_0 == 0.5 else (0 if label_0 == 1 else 1)
    _add_pair(b, prompt, first, second, preferred, o["keep_ties"], None, index)


def _handle_mjbench(b: _Builder, images: _Images, rec: Mapping, index: int, o: Mapping) -> None:
    prompt = _text(rec, "caption")
    preferred = _preferred_index(_field(rec, "label"))
    first = images.ref(_field(rec, "image0"), "image0")
    second = images.ref(_field(rec, "image1"), "image1")
    cat = _category(rec, o["category"])
    _add_pair(b, prompt, first, second, preferred, o["keep_ties"], cat, rec.get("id", index))


def _genai_records(p: Path) -> Iterator[tuple[int, Any]]:
    with open(p, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(
            f"{p}: GenAI-Bench ratings are a JSON object {{id: {{prompt, models}}}}, "
            f"got a JSON {type(data).__name__}."
        )
    for index, (key, rec) in enumerate(data.items()):
        if isinstance(rec, dict) and "id" not in rec:
            rec = {**rec, "id": key}
        yield index, rec


def _handle_genai_bench(b: _Builder, images: _Images, rec: Mapping, index: int, o: Mapping) -> None:
    prompt = _text(rec, "prompt")
    ratings = _field(rec, "models")
    if not isinstance(ratings, Mapping) or not ratings:
        raise _BadRecord("'models' must be a non-empty object {model: [ratings]}")
    models = o["models"]
    names = [m for m in models if m in ratings] if models is not None else sorted(ratings)
    means: dict[str, float] = {}
    refs: dict[str, dict] = {}
    for m in names:
        r = ratings[m]
        if not isinstance(r, list) or not r or not all(_is_number(x) for x in r):
            raise _BadRecord(f"ratings of model '{m}' must be a non-empty list of numbers")
        if not all(1 <= x <= 5 for x in r):
            raise _BadRecord(f"ratings of model '{m}' must lie in [1, 5], got {r}")
        means[m] = sum(r) / len(r)
        rel = o["image_template"].format(model=m, id=rec["id"])
        refs[m] = images.ref(rel, f"image of model '{m}'")
    cat = _category(rec, None)
    for i, a in enumerate(names):
        for m_b in names[i + 1 :]:
            preferred = None if means[a] == means[m_b] else (0 if means[a] > means[m_b] else 1)
            _add_pair(b, prompt, refs[a], refs[m_b], preferred, o["keep_ties"], cat, rec["id"])


def _official_prompt(rec: Mapping) -> str:
    """The caption of an official pair: a string, or ``[caption of chosen, caption of rejected]``."""
    value = _field(rec, "prompt")
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        if value[0] != value[1]:
            raise _BadRecord(
                "'prompt' names two different captions for the chosen and rejected images; a "
                "pair is compared under one caption: write one caption (or the same one twice)"
            )
        return value[0]
    raise _BadRecord(f"'prompt' must be a caption or a list of two captions, got {value!r:.80}")


def _handle_official_pairs(
    b: _Builder, images: _Images, rec: Mapping, index: int, o: Mapping
) -> None:
    prompt = _official_prompt(rec)
    for name in ("c_rate", "r_rate"):
        if rec.get(name) is not None and not _is_number(rec[name]):
            raise _BadRecord(f"'{name}' must be a number (a rating), got {rec[name]!r}")
    chosen = images.ref(_field(rec, "chosen_path"), "chosen_path")
    rejected = images.ref(_field(rec, "reject_path"), "reject_path")
    rid = rec.get("prompt_id", rec.get("id", index))
    b.pair(prompt, chosen, rejected, False, _category(rec, o["category"]), rid)


def _handle_official_unpaired(
    b: _Builder, images: _Images, rec: Mapping, index: int, o: Mapping
) -> None:
    prompt = _text(rec, "prompt")
    label = _binary_label(_field(rec, "label"))
    image = images.ref(_field(rec, "path"), "path")
    b.single(prompt, image, label, _category(rec, o["category"]), rec.get("id", index))


# ----------------------------------------------------------------------------- the format table

#: Options every format takes, with their defaults.
COMMON_OPTIONS: dict[str, Any] = {
    "image_root": None,
    "path_map": None,
    "verify_images": True,
    "on_error": "skip",
    "decode": True,
}

#: Help of the recipes' ``--on_error`` option; ``{skipped}`` names the file(s) they write.
ON_ERROR_HELP = (
    "Bad data records: 'skip' (each is logged and written with its index and reason to "
    "OUTPUT_DIR/{skipped}) or 'raise' (stop at the first one, naming the file, the record index "
    "and the problem)."
)

_COMMON_DOC = """
    Common arguments: ``image_root`` resolves relative image paths (default: the data file's
    folder); ``path_map`` maps an image path as written in the file to a local file (a dict, a
    callable, or the path of a JSON object file; unmapped paths resolve as usual);
    ``verify_images`` opens each image's header while reading (pixels are decoded lazily);
    ``on_error`` is ``"skip"`` or ``"raise"`` for bad records; ``decode`` adds the lazy PIL
    decoding transform. Returns ``ReadResult(dataset, report)``.
"""

Handler = Callable[[_Builder, _Images, Mapping, int, Mapping], None]


@dataclass(frozen=True)
class DataFormat:
    """One input format: what its records look like, how each becomes examples, its options.

    ``detect(container, fields)``: whether a file is in this format, from its container
    (``"list"`` of records, JSON ``"object"`` keyed by id, parquet ``"table"``) and the field
    names of its first record (parquet: its columns). ``records(path)``: the ``(index, record)``
    iterator (default: JSON list / JSONL / parquet rows). ``official_paths``: relative image paths
    are looked up as the official LLaVA-Reward files need.
    """

    name: str
    kind: str
    doc: str
    handle: Handler
    options: Mapping[str, Any] = field(default_factory=dict)
    detect: Callable[[str, frozenset[str]], bool] | None = None
    records: Callable[[Path], Iterable[tuple[int, Any]]] | None = None
    official_paths: bool = False


_FORMAT_LIST = (
    DataFormat(
        "genai_bench",
        "paired",
        """Read GenAI-Bench ratings ``{id: {prompt, models: {name: [1-5 ratings]}}}`` (one JSON object).

    For each prompt and each pair of models (in sorted name order, or the order of ``models``,
    which also restricts the set), the model with the higher mean rating gives ``chosen``; equal
    means are ties (kept by default: evaluation set). The image of model ``m`` for prompt ``id``
    is ``image_root / image_template.format(model=m, id=id)``.
    """,
        _handle_genai_bench,
        {"keep_ties": True, "image_template": "{model}/{id}.jpeg", "models": None},
        detect=lambda container, fields: container == "object" and "models" in fields,
        records=_genai_records,
    ),
    DataFormat(
        "pickapic",
        "paired",
        """Read Pick-a-Pic v2 parquet shards (``caption, jpg_0, jpg_1, label_0, label_1``).

    ``label_0 = 1``: ``jpg_0`` chosen; ``label_0 = 0``: ``jpg_1`` chosen; ``label_0 = 0.5``: tie
    (dropped unless ``keep_ties``). When ``label_1`` is present it must equal ``1 - label_0``.
    Only these columns are read, a record batch at a time; the image bytes of the kept pairs are
    held in memory, so read the full 300+ GB set shard by shard.
    """,
        _handle_pickapic,
        {"keep_ties": False},
        detect=lambda container, fields: {"jpg_0", "jpg_1", "label_0"} <= fields,
        records=_pickapic_records,
    ),
    DataFormat(
        "imagereward",
        "paired",
        """Read ImageReward rankings ``[{id, prompt, generations, ranking}]`` (1 = best, ties share a
    rank) and expand each record to all pairs of its generations.

    For generations ``i < j``: rank_i < rank_j -> (chosen i, rejected j); rank_i > rank_j ->
    (chosen j, rejected i); equal ranks -> a tie, kept as (i, j, tie=True) only with
    ``keep_ties=True`` (use for evaluation; train without). A record of ``n`` generations with
    rank multiplicities ``m_k`` gives ``C(n, 2) - sum_k C(m_k, 2)`` non-tie pairs.
    """,
        _handle_imagereward,
        {"keep_ties": False},
        detect=lambda container, fields: {"generations", "ranking"} <= fields,
    ),
    DataFormat(
        "mjbench",
        "paired",
        """Read MJ-Bench records ``[{id, caption, image0, image1, label}]`` (JSON / JSONL).

    ``label`` is the index of the preferred image (0 -> ``image0``, 1 -> ``image1``; -1 or 0.5 =
    tie). Image names are relative to ``image_root`` (default the file's folder). The record's
    ``category`` field, else the ``category`` argument (e.g. the subset name), is kept for
    per-category accuracy. Ties are kept by default: MJ-Bench is an evaluation set.
    """,
        _handle_mjbench,
        {"category": None, "keep_ties": True},
        detect=lambda container, fields: {"image0", "caption"} <= fields,
    ),
    DataFormat(
        "official_pairs",
        "paired",
        """Read the official LLaVA-Reward pair files
    ``[{prompt_id, prompt: [p, p], chosen_path, c_rate, reject_path, r_rate}]`` (JSON / JSONL), as
    released with the paper (ImageReward alignment / fidelity / overall training data).

    ``chosen_path`` is preferred; ``prompt`` is one caption or the same caption twice;
    ``c_rate`` / ``r_rate`` (annotator ratings, unused by the official loss) must be numbers when
    present; ``prompt_id`` becomes ``id``. Image paths: see the module docstring (the repository
    root, the working directory, or ``image_root`` / ``<file name>``).
    """,
        _handle_official_pairs,
        {"category": None},
        detect=lambda container, fields: {"chosen_path", "reject_path"} <= fields,
        official_paths=True,
    ),
    DataFormat(
        "official_unpaired",
        "unpaired",
        """Read the official LLaVA-Reward single-image files ``[{path, label, prompt}]`` (JSON /
    JSONL), as released with the paper (UnsafeBench: label 1 = safe, 0 = unsafe).

    A ``category`` field is kept (else the ``category`` argument); image paths are resolved as
    for :func:`read_official_pairs`.
    """,
        _handle_official_unpaired,
        {"category": None},
        detect=lambda container, fields: (
            {"path", "label"} <= fields and "image" not in fields and not _PAIR_FIELDS & fields
        ),
        official_paths=True,
    ),
    DataFormat(
        "unpaired",
        "unpaired",
        """Read single-image records ``{prompt, image, label}`` (label in [0, 1] or bool, 1 =
    positive, e.g. safe) into the unpaired schema.""",
        _handle_unpaired,
        {"category": None},
        detect=lambda container, fields: "image" in fields and not _PAIR_FIELDS & fields,
    ),
    DataFormat(
        "pairs",
        "paired",
        """Read a pair manifest (.json / .jsonl / .parquet) into the paired schema.

    Records are ``{prompt, chosen, rejected}`` or ``{prompt, image_0, image_1, label}`` (label 0 =
    ``image_0`` preferred, 1 = ``image_1``, -1 or 0.5 = tie; ties kept only with ``keep_ties``),
    with an optional ``category`` (else the ``category`` argument) and ``id``.
    """,
        _handle_pairs,
        {"keep_ties": False, "category": None},
        detect=None,  # the fallback: what no other format claims
    ),
)

#: Every format by name, in detection order (the first whose ``detect`` holds wins; ``pairs`` is
#: the fallback).
DATA_FORMATS: dict[str, DataFormat] = {f.name: f for f in _FORMAT_LIST}

#: The names :func:`load_reward_data` accepts.
FORMATS = ("auto", *DATA_FORMATS)


def _probe(path: Path) -> tuple[str, frozenset[str]]:
    """``(container, field names of the first record)`` of a data file (see ``DataFormat``)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return "table", frozenset(pq.ParquetFile(path).schema_arrow.names)
    if path.suffix.lower() == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict) and not isinstance(data.get("data"), list):
            first = next(iter(data.values()), None)
            return "object", frozenset(first) if isinstance(first, dict) else frozenset()
    for _, rec in _iter_records(path):
        if isinstance(rec, Mapping):
            return "list", frozenset(rec)
    return "list", frozenset()


def _detect(path: Path, among: Iterable[str]) -> str:
    container, fields = _probe(path)
    for name in among:
        detect = DATA_FORMATS[name].detect
        if detect is None or detect(container, fields):
            return name
    return "pairs"


def detect_format(path: PathLike) -> str:
    """Guess a data file's format from its fields (one of :data:`FORMATS` except ``auto``): the
    first format of :data:`DATA_FORMATS` whose ``detect`` holds, else ``pairs``."""
    return _detect(Path(path), DATA_FORMATS)


def _options(fmt: DataFormat, given: Mapping[str, Any], caller: str) -> dict[str, Any]:
    allowed = {**COMMON_OPTIONS, **fmt.options}
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TypeError(
            f"{caller}() got unexpected keyword argument(s) {unknown}; format {fmt.name!r} "
            f"takes {sorted(allowed)}."
        )
    return {**allowed, **given}


def read_format(format: str, path: PathLike | Sequence[PathLike], **options: Any) -> ReadResult:
    """Read ``path`` (one file or several) in the named format of :data:`DATA_FORMATS`.

    The one reading loop of every format: each record of each file is parsed, checked and handed
    to the format's handler; bad records are skipped (``on_error="skip"``, listed with the record
    in the report) or raised. ``options``: :data:`COMMON_OPTIONS` and the format's own.
    """
    if format not in DATA_FORMATS:
        raise ValueError(f"unknown data format {format!r}; choose one of {FORMATS}.")
    fmt = DATA_FORMATS[format]
    o = _options(fmt, options, f"read_{format}")
    paths = _as_paths(path)
    b = _Builder(fmt.name, fmt.kind, paths, o["on_error"])
    for p in paths:
        images = _Images(p, o["image_root"], o["path_map"], o["verify_images"], fmt.official_paths)
        for index, rec in fmt.records(p) if fmt.records is not None else _iter_records(p):
            b.report.n_records += 1
            try:
                if isinstance(rec, _BadRecord):
                    raise rec
                if not isinstance(rec, Mapping):
                    raise _BadRecord(f"expected an object, got {type(rec).__name__}")
                b.note_perspective(rec)
                fmt.handle(b, images, rec, index, o)
            except _BadRecord as e:
                b.bad(p, index, str(e), e.record if isinstance(rec, _BadRecord) else rec)
    return b.finish(o["decode"])


def load_reward_data(
    path: PathLike | Sequence[PathLike], format: str = "auto", **kwargs: Any
) -> ReadResult:
    """Read any supported file with the reader for ``format`` (``"auto"``: :func:`detect_format`
    on the first file). ``kwargs`` go to the reader, e.g. ``keep_ties``, ``image_root``;
    ``keep_ties`` is dropped for formats without ties (unpaired data, the official pairs)."""
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; choose one of {FORMATS}.")
    if format == "auto":
        format = detect_format(_as_paths(path)[0])
        logger.info("%s: detected format %r", path, format)
    if "keep_ties" not in DATA_FORMATS[format].options:
        kwargs.pop("keep_ties", None)
    return read_format(format, path, **kwargs)


def read_manifest(path: PathLike | Sequence[PathLike], **kwargs: Any) -> ReadResult:
    """Read a generic manifest, choosing :func:`read_unpaired` when its first record has an
    ``image`` field and no pair fields, else :func:`read_pairs`. ``kwargs`` go to the reader
    (``keep_ties`` is ignored for unpaired data)."""
    fmt = _detect(_as_paths(path)[0], ("unpaired", "pairs"))
    return load_reward_data(path, format=fmt, **kwargs)


def _reader(fmt: DataFormat) -> Callable[..., ReadResult]:
    """``read_<format>(path, **options)``: :func:`read_format` with the format fixed, with a
    signature listing the format's options (for ``help()`` and editors)."""

    def reader(path: PathLike | Sequence[PathLike], **options: Any) -> ReadResult:
        return read_format(fmt.name, path, **options)

    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("path", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(k, kw, default=v) for k, v in fmt.options.items()]
    params += [inspect.Parameter(k, kw, default=v) for k, v in COMMON_OPTIONS.items()]
    reader.__signature__ = inspect.Signature(params, return_annotation=ReadResult)  # type: ignore[attr-defined]
    reader.__name__ = reader.__qualname__ = f"read_{fmt.name}"
    reader.__doc__ = fmt.doc + _COMMON_DOC
    return reader


read_pairs = _reader(DATA_FORMATS["pairs"])
read_unpaired = _reader(DATA_FORMATS["unpaired"])
read_imagereward = _reader(DATA_FORMATS["imagereward"])
read_pickapic = _reader(DATA_FORMATS["pickapic"])
read_mjbench = _reader(DATA_FORMATS["mjbench"])
read_genai_bench = _reader(DATA_FORMATS["genai_bench"])
read_official_pairs = _reader(DATA_FORMATS["official_pairs"])
read_official_unpaired = _reader(DATA_FORMATS["official_unpaired"])


# ----------------------------------------------------------------------------- skipped records


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(bytes(value))} bytes>"
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def write_skipped(path: PathLike, reports: Iterable[ReadReport]) -> Path | None:
    """Write every skipped record of ``reports`` to ``path`` as JSON lines ``{source, index,
    reason, record}`` (image bytes are written as ``"<N bytes>"``), atomically. With nothing
    skipped no file is written and a stale one from an earlier run is removed; returns the path
    written, or None."""
    path = Path(path)
    lines = [
        json.dumps(
            {
                "source": s.source,
                "index": s.index,
                "reason": s.reason,
                "record": _jsonable(s.record),
            }
        )
        for r in reports
        for s in r.skipped
    ]
    if not lines:
        path.unlink(missing_ok=True)
        return None
    atomic_write_text(path, "\n".join(lines) + "\n")
    logger.warning("%d skipped records written to %s", len(lines), path)
    return path


__all__ = [
    "COMMON_OPTIONS",
    "ON_ERROR_HELP",
    "DATA_FORMATS",
    "FORMATS",
    "DataFormat",
    "paired_features",
    "unpaired_features",
    "DataRecordError",
    "ReadReport",
    "ReadResult",
    "SkippedRecord",
    "decode_images",
    "detect_format",
    "load_image_ref",
    "load_reward_data",
    "read_format",
    "read_genai_bench",
    "read_imagereward",
    "read_manifest",
    "read_mjbench",
    "read_official_pairs",
    "read_official_unpaired",
    "read_pairs",
    "read_pickapic",
    "read_unpaired",
    "write_skipped",
]
