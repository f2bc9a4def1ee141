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
* Generic manifests, ``.json`` (a list of objects), ``.jsonl`` or ``.parquet``
  (:func:`read_pairs`, :func:`read_unpaired`, :func:`read_manifest` picks one):

  - pairs ``{prompt, chosen, rejected}``;
  - pairs ``{prompt, image_0, image_1, label}`` with ``label`` the index of the preferred image:
    ``0`` = ``image_0``, ``1`` = ``image_1``, ``-1`` or ``0.5`` = tie;
  - single images ``{prompt, image, label}`` with ``label`` a number in ``[0, 1]`` or a bool;
  - an optional ``category`` field is kept. Image values are paths (relative ones are resolved
    against ``image_root``, default the manifest's folder), encoded bytes (parquet binary
    columns), or ``{"bytes", "path"}`` structs (``datasets`` image columns saved to parquet).
* ImageReward rankings ``[{id, prompt, generations: [paths], ranking: [ints]}]``, 1 = best, ties
  share a rank (:func:`read_imagereward`): expanded to every unordered pair of generations with
  different ranks, the better-ranked (smaller rank) one as ``chosen``. Pairs of equal rank are
  dropped unless ``keep_ties=True`` (evaluation), which keeps them with ``tie=True``.
* Pick-a-Pic v2 parquet ``caption, jpg_0, jpg_1 (bytes), label_0, label_1``
  (:func:`read_pickapic`): ``label_0 = 1`` -> ``jpg_0`` chosen, ``0`` -> ``jpg_1`` chosen,
  ``0.5`` -> tie (dropped unless ``keep_ties``).
* MJ-Bench records ``[{id, caption, image0, image1, label}]`` (:func:`read_mjbench`): ``label`` is
  the index of the preferred image (``-1`` / ``0.5`` = tie); image file names are relative to
  ``image_root``; a ``category`` field, or the ``category`` argument, is kept.
* GenAI-Bench ratings ``{id: {prompt, models: {name: [three 1-5 ratings]}}}``
  (:func:`read_genai_bench`): every pair of models for a prompt becomes a pair, the higher mean
  rating as ``chosen``; equal means are ties. Images are found at
  ``image_root / image_template.format(model=..., id=...)`` (default ``{model}/{id}.jpeg``).

Bad records
-----------
A record with a missing field, an unknown / out-of-range label, a missing image file or an image
whose header cannot be read (``verify_images=True``; pixels are decoded only later) is reported
with its 0-based index and the reason. ``on_error="skip"`` (default) skips it, logs a warning
(python ``logging``, logger ``reward.data``) and lists it in ``report.skipped``;
``on_error="raise"`` raises :class:`DataRecordError` at the first one. A file whose records are
*all* bad raises :class:`DataRecordError` either way (usually a wrong ``image_root``). An ImageReward or
GenAI-Bench record is skipped as a whole when any of its images is bad.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from reward.images import ImageInputError, load_image

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
PathMap = Mapping[str, PathLike] | Callable[[str], PathLike] | PathLike | None

_IMAGE_COLUMNS = ("chosen", "rejected", "image")
_MAX_LOGGED = 20
FORMATS = ("auto", "pairs", "unpaired", "imagereward", "pickapic", "mjbench", "genai_bench")


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
    """One skipped input record: its 0-based index in ``source`` and why it was skipped."""

    index: int
    reason: str
    source: str = ""


@dataclass
class ReadReport:
    """What a reader did. ``n_skipped`` is the number of bad records skipped."""

    source: str
    kind: str = "paired"
    n_records: int = 0
    n_examples: int = 0
    n_ties: int = 0
    n_ties_dropped: int = 0
    skipped: list[SkippedRecord] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def as_dict(self, max_skipped: int = 100) -> dict[str, Any]:
        """JSON-ready summary; lists at most ``max_skipped`` skipped records."""
        return {
            "source": self.source,
            "kind": self.kind,
            "n_records": self.n_records,
            "n_examples": self.n_examples,
            "n_ties": self.n_ties,
            "n_ties_dropped": self.n_ties_dropped,
            "n_skipped": self.n_skipped,
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
    """Internal: the current record is bad for the given reason."""


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
    """Resolves raw image values of one input file to ``{"bytes", "path"}`` refs."""

    def __init__(
        self, base_dir: Path, image_root: PathLike | None, path_map: PathMap, verify: bool
    ):
        self.root = Path(image_root) if image_root is not None else base_dir
        self.verify = verify
        self._checked: dict[str, str | None] = {}
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
        path = Path(mapped).expanduser()
        return path if path.is_absolute() else self.root / path

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
            path = self._map(os.fspath(value))
            if not path.is_file():
                raise _BadRecord(f"image file not found for '{what}': {path}")
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
                    yield index, _BadRecord(f"invalid JSON on line {lineno}: {e.msg}")
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

    def __init__(self, kind: str, sources: list[Path], on_error: str):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}.")
        self.kind = kind
        self.on_error = on_error
        self.report = ReadReport(source=", ".join(str(s) for s in sources), kind=kind)
        names = ("prompt", "chosen", "rejected", "tie", "category", "id")
        if kind != "paired":
            names = ("prompt", "image", "label", "category", "id")
        self.cols: dict[str, list] = {n: [] for n in names}

    def bad(self, source: Path, index: int, reason: str) -> None:
        msg = f"{source}: record {index}: {reason}"
        if self.on_error == "raise":
            raise DataRecordError(
                f"{msg}. Fix the record, or pass on_error='skip' to skip bad records."
            )
        if self.report.n_skipped < _MAX_LOGGED:
            logger.warning("skipping %s", msg)
        self.report.skipped.append(SkippedRecord(index=index, reason=reason, source=str(source)))

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


def _run(
    kind: str,
    path: PathLike | Sequence[PathLike],
    handle: Callable[[_Builder, _Images, Any, int], None],
    *,
    image_root: PathLike | None,
    path_map: PathMap,
    verify_images: bool,
    on_error: str,
    decode: bool,
    columns: Sequence[str] | None = None,
    records: Callable[[Path], Iterator[tuple[int, Any]]] | None = None,
) -> ReadResult:
    paths = _as_paths(path)
    b = _Builder(kind, paths, on_error)
    for p in paths:
        images = _Images(p.parent, image_root, path_map, verify_images)
        it = records(p) if records is not None else _iter_records(p, columns)
        for index, rec in it:
            b.report.n_records += 1
            try:
                if isinstance(rec, _BadRecord):
                    raise rec
                if not isinstance(rec, Mapping):
                    raise _BadRecord(f"expected an object, got {type(rec).__name__}")
                handle(b, images, rec, index)
            except _BadRecord as e:
                b.bad(p, index, str(e))
    return b.finish(decode)


_COMMON_DOC = """
    Common arguments: ``image_root`` resolves relative image paths (default: the data file's
    folder); ``path_map`` maps an image path as written in the file to a local file (a dict, a
    callable, or the path of a JSON object file; unmapped paths resolve as usual);
    ``verify_images`` opens each image's header while reading (pixels are decoded lazily);
    ``on_error`` is ``"skip"`` or ``"raise"`` for bad records; ``decode`` adds the lazy PIL
    decoding transform. Returns ``ReadResult(dataset, report)``.
"""


# ----------------------------------------------------------------------------- readers


def read_pairs(
    path: PathLike | Sequence[PathLike],
    *,
    keep_ties: bool = False,
    category: str | None = None,
    image_root: PathLike | None = None,
    path_map: PathMap = None,
    verify_images: bool = True,
    on_error: str = "skip",
    decode: bool = True,
) -> ReadResult:
    """Read a pair manifest (.json / .jsonl / .parquet) into the paired schema.

    Records are ``{prompt, chosen, rejected}`` or ``{prompt, image_0, image_1, label}`` (label 0 =
    ``image_0`` preferred, 1 = ``image_1``, -1 or 0.5 = tie; ties kept only with ``keep_ties``),
    with an optional ``category`` (else the ``category`` argument) and ``id``.
    """

    def handle(b: _Builder, images: _Images, rec: Mapping, index: int) -> None:
        prompt = _text(rec, "prompt")
        cat = _category(rec, category)
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
        _add_pair(b, prompt, first, second, preferred, keep_ties, cat, rid)

    return _run(
        "paired",
        path,
        handle,
        image_root=image_root,
        path_map=path_map,
        verify_images=verify_images,
        on_error=on_error,
        decode=decode,
    )


def read_unpaired(
    path: PathLike | Sequence[PathLike],
    *,
    category: str | None = None,
    image_root: PathLike | None = None,
    path_map: PathMap = None,
    verify_images: bool = True,
    on_error: str = "skip",
    decode: bool = True,
) -> ReadResult:
    """Read single-image records ``{prompt, image, label}`` (label in [0, 1] or bool, 1 =
    positive, e.g. safe) into the unpaired schema."""

    def handle(b: _Builder, images: _Images, rec: Mapping, index: int) -> None:
        prompt = _text(rec, "prompt")
        label = _binary_label(_field(rec, "label"))
        image = images.ref(_field(rec, "image"), "image")
        b.single(prompt, image, label, _category(rec, category), rec.get("id", index))

    return _run(
        "unpaired",
        path,
        handle,
        image_root=image_root,
        path_map=path_map,
        verify_images=verify_images,
        on_error=on_error,
        decode=decode,
    )


def _first_record(path: Path) -> Any:
    for _, rec in _iter_records(path):
        if isinstance(rec, Mapping):
            return rec
    return None


def read_manifest(path: PathLike | Sequence[PathLike], **kwargs: Any) -> ReadResult:
    """Read a generic manifest, choosing :func:`read_unpaired` when its first record has an
    ``image`` field and no pair fields, else :func:`read_pairs`. ``kwargs`` go to the reader
    (``keep_ties`` is ignored for unpaired data)."""
    first = _first_record(_as_paths(path)[0])
    pair_keys = {"chosen", "rejected", "image_0", "image_1"}
    if first is not None and "image" in first and not pair_keys & set(first):
        kwargs.pop("keep_ties", None)
        return read_unpaired(path, **kwargs)
    return read_pairs(path, **kwargs)


def read_imagereward(
    path: PathLike | Sequence[PathLike],
    *,
    keep_ties: bool = False,
    image_root: PathLike | None = None,
    path_map: PathMap = None,
    verify_images: bool = True,
    on_error: str = "skip",
    decode: bool = True,
) -> ReadResult:
    """Read ImageReward rankings ``[{id, prompt, generations, ranking}]`` (1 = best, ties share a
    rank) and expand each record to all pairs of its generations.

    For generations ``i < j``: rank_i < rank_j -> (chosen i, rejected j); rank_i > rank_j ->
    (chosen j, rejected i); equal ranks -> a tie, kept as (i, j, tie=True) only with
    ``keep_ties=True`` (use for evaluation; train without). A record of ``n`` generations with
    rank multiplicities ``m_k`` gives ``C(n, 2) - sum_k C(m_k, 2)`` non-tie pairs.
    """

    def handle(b: _Builder, images: _Images, rec: Mapping, index: int) -> None:
        prompt = _text(rec, "prompt")
        gens = _field(rec, "generations")
        ranks = _field(rec, "ranking")
        if not isinstance(gens, list) or not isinstance(ranks, list):
            raise _BadRecord("'generations' and 'ranking' must be lists")
        if len(gens) != len(ranks):
            raise _BadRecord(
                f"'generations' has {len(gens)} entries but 'ranking' has {len(ranks)}"
            )
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
                if ranks[i] == ranks[j]:
                    preferred = None
                else:
                    preferred = 0 if ranks[i] < ranks[j] else 1
                _add_pair(b, prompt, refs[i], refs[j], preferred, keep_ties, cat, rid)

    return _run(
        "paired",
        path,
        handle,
        image_root=image_root,
        path_map=path_map,
        verify_images=verify_images,
        on_error=on_error,
        decode=decode,
    )


def read_pickapic(
    path: PathLike | Sequence[PathLike],
    *,
    keep_ties: bool = False,
    verify_images: bool = True,
    on_error: str = "skip",
    decode: bool = True,
) -> ReadResult:
    """Read Pick-a-Pic v2 parquet shards (``caption, jpg_0, jpg_1, label_0, label_1``).

    ``label_0 = 1``: ``jpg_0`` chosen; ``label_0 = 0``: ``jpg_1`` chosen; ``label_0 = 0.5``: tie
    (dropped unless ``keep_ties``). When ``label_1`` is present it must equal ``1 - label_0``.
    Only these columns are read, a record batch at a time; the image bytes of the kept pairs are
    held in memory, so read the full 300+ GB set shard by shard.
    """
    needed = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")

    def records(p: Path) -> Iterator[tuple[int, Any]]:
        import pyarrow.parquet as pq

        if p.suffix.lower() != ".parquet":
            raise ValueError(f"{p}: Pick-a-Pic data must be parquet.")
        names = pq.ParquetFile(p).schema_arrow.names
        missing = [c for c in needed[:4] if c not in names]
        if missing:
            raise ValueError(
                f"{p}: not a Pick-a-Pic v2 parquet file: columns {missing} are missing "
                f"(found {names})."
            )
        return _iter_records(p, needed)

    def handle(b: _Builder, images: _Images, rec: Mapping, index: int) -> None:
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
        _add_pair(b, prompt, first, second, preferred, keep_ties, None, index)

    return _run(
        "paired",
        path,
        handle,
        image_root=None,
        path_map=None,
        verify_images=verify_images,
        on_error=on_error,
        decode=decode,
        records=records,
    )


def read_mjbench(
    path: PathLike | Sequence[PathLike],
    *,
    category: str | None = None,
    keep_ties: bool = True,
    image_root: PathLike | None = None,
    path_map: PathMap = None,
    verify_images: bool = True,
    on_error: str = "skip",
    decode: bool = True,
) -> ReadResult:
    """Read MJ-Bench records ``[{id, caption, image0, image1, label}]`` (JSON / JSONL).

    ``label`` is the index of the preferred image (0 -> ``image0``, 1 -> ``image1``; -1 or 0.5 =
    tie). Image names are relative to ``image_root`` (default the file's folder). The record's
    ``category`` field, else the ``category`` argument (e.g. the subset name), is kept for
    per-category accuracy. Ties are kept by default: MJ-Bench is an evaluation set.
    """

    def handle(b: _Builder, images: _Images, rec: Mapping, index: int) -> None:
        prompt = _text(rec, "caption")
        preferred = _preferred_index(_field(rec, "label"))
        first = images.ref(_field(rec, "image0"), "image0")
        second = images.ref(_field(rec, "image1"), "image1")
        rid = rec.get("id", index)
        _add_pair(b, prompt, first, second, preferred, keep_ties, _category(rec, category), rid)

    return _run(
        "paired",
        path,
        handle,
        image_root=image_root,
        path_map=path_map,
        verify_images=verify_images,
        on_error=on_error,
        decode=decode,
    )


def read_genai_bench(
    path: PathLike,
    *,
    keep_ties: bool = True,
    image_root: PathLike | None = None,
    image_template: str = "{model}/{id}.jpeg",
    models: Sequence[str] | None = None,
    path_map: PathMap = None,
    verify_images: bool = True,
    on_error: str = "skip",
    decode: bool = True,
) -> ReadResult:
    """Read GenAI-Bench ratings ``{id: {prompt, models: {name: [1-5 ratings]}}}`` (one JSON object).

    For each prompt and each pair of models (in sorted name order, or the order of ``models``,
    which also restricts the set), the model with the higher mean rating gives ``chosen``; equal
    means are ties (kept by default: evaluation set). The image of model ``m`` for prompt ``id``
    is ``image_root / image_template.format(model=m, id=id)``.
    """

    def records(p: Path) -> Iterator[tuple[int, Any]]:
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

    def handle(b: _Builder, images: _Images, rec: Mapping, index: int) -> None:
        prompt = _text(rec, "prompt")
        ratings = _field(rec, "models")
        if not isinstance(ratings, Mapping) or not ratings:
            raise _BadRecord("'models' must be a non-empty object {model: [ratings]}")
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
            rel = image_template.format(model=m, id=rec["id"])
            refs[m] = images.ref(rel, f"image of model '{m}'")
        cat = _category(rec, None)
        for i, a in enumerate(names):
            for m_b in names[i + 1 :]:
                preferred = None if means[a] == means[m_b] else (0 if means[a] > means[m_b] else 1)
                _add_pair(b, prompt, refs[a], refs[m_b], preferred, keep_ties, cat, rec["id"])

    return _run(
        "paired",
        path,
        handle,
        image_root=image_root,
        path_map=path_map,
        verify_images=verify_images,
        on_error=on_error,
        decode=decode,
        records=records,
    )


def detect_format(path: PathLike) -> str:
    """Guess a data file's format from its fields (one of :data:`FORMATS` except ``auto``)."""
    p = Path(path)
    if p.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        names = set(pq.ParquetFile(p).schema_arrow.names)
        if {"jpg_0", "jpg_1", "label_0"} <= names:
            return "pickapic"
        return "unpaired" if "image" in names and "image_0" not in names else "pairs"
    if p.suffix.lower() == ".json":
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict) and "data" not in data:
            first_value = next(iter(data.values()), None)
            if isinstance(first_value, dict) and "models" in first_value:
                return "genai_bench"
    first = _first_record(p) or {}
    if "generations" in first and "ranking" in first:
        return "imagereward"
    if "image0" in first and "caption" in first:
        return "mjbench"
    if "image" in first and not {"chosen", "image_0"} & set(first):
        return "unpaired"
    return "pairs"


_READERS: dict[str, Callable[..., ReadResult]] = {
    "pairs": read_pairs,
    "unpaired": read_unpaired,
    "imagereward": read_imagereward,
    "pickapic": read_pickapic,
    "mjbench": read_mjbench,
    "genai_bench": read_genai_bench,
}


def load_reward_data(
    path: PathLike | Sequence[PathLike], format: str = "auto", **kwargs: Any
) -> ReadResult:
    """Read any supported file with the reader for ``format`` (``"auto"``: :func:`detect_format`
    on the first file). ``kwargs`` go to the reader, e.g. ``keep_ties``, ``image_root``."""
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; choose one of {FORMATS}.")
    if format == "auto":
        format = detect_format(_as_paths(path)[0])
        logger.info("%s: detected format %r", path, format)
    return _READERS[format](path, **kwargs)


for _reader in (read_pairs, read_unpaired, read_imagereward, read_pickapic, read_mjbench):
    _reader.__doc__ = (_reader.__doc__ or "") + _COMMON_DOC
read_genai_bench.__doc__ = (read_genai_bench.__doc__ or "") + _COMMON_DOC

__all__ = [
    "FORMATS",
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
    "read_genai_bench",
    "read_imagereward",
    "read_manifest",
    "read_mjbench",
    "read_pairs",
    "read_pickapic",
    "read_unpaired",
]
