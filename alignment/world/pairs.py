"""Reward-model training data from the world, for the four perspectives.

For each perspective, :func:`write_world_dataset` writes

- ``{perspective}_pairs.jsonl``: ``{"prompt", "chosen", "rejected"}`` records;
- ``{perspective}_unpaired.jsonl``: ``{"prompt", "image", "label"}`` records (label 1 = good);

with PNG paths relative to the manifest. How the two images of a pair differ:

| perspective | chosen | rejected |
|---|---|---|
| alignment | render of the caption | render of the caption with 1-2 attributes changed |
|           | (both blurred alike, Gaussian sigma 0-1.2 px, like a small diffusion model's images) | |
| fidelity | clean render | same geometry with noise and/or blotches |
| safety | clean render | same geometry with the forbidden symbol |
| overall | the variant with the higher oracle ``overall`` (margin >= 0.2) | the other |

Overall variants mix a mismatch, defects and the symbol at random. In the ``train`` split no
image shows a held-out (colour, shape) pair, not even a rejected one: otherwise the held-out
combinations would only ever be seen as *rejected* images and a reward model would learn "an
unfamiliar combination is wrong" instead of checking the caption (its held-out accuracy was
0.40 that way). Every record is checked
against the oracle (a pair must be ordered by the oracle's score of its perspective, an
unpaired label must match ``score >= 0.5``) and redrawn otherwise, so the oracle's accuracy on
this data is 1 by construction and a reward model's accuracy against the oracle is measurable.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from alignment.world.grammar import ATTRIBUTES, Scene, perturb_scene, scene_pool, split_scenes
from alignment.world.oracle import PERSPECTIVES, oracle_scores
from alignment.world.render import render_scene

_MAX_TRIES = 50
_OVERALL_MARGIN = 0.2


@dataclass
class PairRecord:
    """One preference pair: images are ``Tensor[3, S, S]`` in [0, 1]."""

    prompt: str
    chosen: torch.Tensor
    rejected: torch.Tensor


@dataclass
class UnpairedRecord:
    """One labelled image (``label`` 1 = good for the perspective, 0 = bad)."""

    prompt: str
    image: torch.Tensor
    label: int


Pairs = frozenset[tuple[str, str]]


def _perturb(
    scene: Scene,
    rng: random.Random,
    n_changes: int,
    allowed: Pairs | None,
    attributes: Sequence[str] | None = None,
) -> Scene:
    """:func:`perturb_scene`, redrawn until its (colour, shape) pair is in ``allowed``."""
    for _ in range(_MAX_TRIES):
        shown = perturb_scene(scene, rng, n_changes, attributes)
        if allowed is None or (shown.colour, shown.shape) in allowed:
            return shown
    raise RuntimeError(f"no perturbation of {scene.caption!r} within the allowed pairs")


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur ``Tensor[3, S, S]`` with a Gaussian of ``sigma`` pixels (reflect padding).

    ``kernel[i] = exp(-i^2 / (2 sigma^2))``, ``i in -r..r``, ``r = ceil(2 sigma)``, normalised,
    applied separably; ``sigma <= 0`` returns the image unchanged.
    """
    if sigma <= 0:
        return image
    r = max(1, math.ceil(2 * sigma))
    i = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(i**2) / (2 * sigma**2))
    k = (k / k.sum()).to(image)
    x = F.pad(image[None], (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return x[0]


def _variant(
    scene: Scene,
    perspective: str,
    bad: bool,
    rng: random.Random,
    size: int,
    allowed: Pairs | None = None,
    mismatch: Sequence[str] | None = None,
):
    """Render a good (``bad=False``) or bad variant of ``scene`` for ``perspective``.

    Good and bad variants of the same call sequence share the object's geometry when the
    perspective is fidelity or safety, and the blur for alignment (same render seed). A
    mismatch's (colour, shape) pair is kept in ``allowed`` (all pairs when None); an alignment
    mismatch changes only attributes in ``mismatch`` (all when None).
    """
    render_seed = rng.randrange(2**31)
    if perspective == "alignment":
        n_changes = min(rng.choice((1, 1, 2)), len(mismatch or ATTRIBUTES))
        shown = _perturb(scene, rng, n_changes, allowed, mismatch) if bad else scene
        sigma = random.Random(render_seed).uniform(0.0, 1.2)
        return gaussian_blur(render_scene(shown, size, rng=render_seed), sigma)
    if perspective == "fidelity":
        defects = rng.choice((("noise",), ("blotches",), ("noise", "blotches"))) if bad else ()
        return render_scene(scene, size, rng=render_seed, defects=defects)
    if perspective == "safety":
        return render_scene(scene, size, rng=render_seed, symbol=bad)
    # overall: a random mix of the three failure kinds (``bad`` is decided by the oracle)
    shown = _perturb(scene, rng, 1, allowed) if rng.random() < 0.4 else scene
    defects = rng.choice((("noise",), ("blotches",))) if rng.random() < 0.3 else ()
    return render_scene(shown, size, rng=render_seed, defects=defects, symbol=rng.random() < 0.3)


def _score(image: torch.Tensor, prompt: str, perspective: str) -> float:
    return float(oracle_scores(image.unsqueeze(0), [prompt])[perspective][0])


def make_pair(
    scene: Scene,
    perspective: str,
    rng: random.Random,
    size: int = 32,
    allowed: Pairs | None = None,
    mismatch: Sequence[str] | None = None,
) -> PairRecord:
    """One oracle-checked pair for ``perspective`` (see the module docstring); mismatched
    images keep their (colour, shape) pair in ``allowed`` (any pair when None) and change only
    the attributes in ``mismatch`` (alignment; all when None)."""
    prompt = scene.caption
    for _ in range(_MAX_TRIES):
        if perspective == "overall":
            a, b = (_variant(scene, perspective, False, rng, size, allowed) for _ in range(2))
            sa, sb = _score(a, prompt, perspective), _score(b, prompt, perspective)
            if abs(sa - sb) >= _OVERALL_MARGIN:
                return PairRecord(prompt, a, b) if sa > sb else PairRecord(prompt, b, a)
            continue
        state = rng.getstate()
        chosen = _variant(scene, perspective, False, rng, size, allowed, mismatch)
        rng.setstate(state)  # the rejected image reuses the chosen one's render seed
        rejected = _variant(scene, perspective, True, rng, size, allowed, mismatch)
        if _score(chosen, prompt, perspective) > _score(rejected, prompt, perspective):
            return PairRecord(prompt, chosen, rejected)
    raise RuntimeError(f"no {perspective} pair ordered by the oracle for {prompt!r}")


def make_unpaired(
    scene: Scene,
    perspective: str,
    label: int,
    rng: random.Random,
    size: int = 32,
    allowed: Pairs | None = None,
) -> UnpairedRecord:
    """One oracle-checked labelled image for ``perspective`` (label 1: score >= 0.5)."""
    prompt = scene.caption
    for _ in range(_MAX_TRIES):
        image = _variant(scene, perspective, not label, rng, size, allowed)
        if (_score(image, prompt, perspective) >= 0.5) == bool(label):
            return UnpairedRecord(prompt, image, int(label))
    raise RuntimeError(f"no {perspective} image with label {label} for {prompt!r}")


def _save_png(image: torch.Tensor, path: Path) -> None:
    from reward.images import to_pil

    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image).save(path)


def write_world_dataset(
    out_dir: str | Path,
    n_pairs: int = 256,
    n_unpaired: int = 256,
    split: str = "train",
    seed: int = 0,
    size: int = 32,
    perspectives: Sequence[str] = PERSPECTIVES,
    mismatch: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write pair and unpaired manifests (+ PNGs) for each perspective into ``out_dir``.

    Args:
        out_dir: target folder (created); images go under ``out_dir/images/<perspective>/``.
        n_pairs, n_unpaired: records per perspective (unpaired labels alternate 1, 0).
        split: the captions (:func:`~.grammar.scene_pool`): ``"train"`` / ``"held_out"``
            (by colour-shape pair; in ``train`` no image, not even a rejected one, shows a
            held-out pair) or ``"layout_train"`` / ``"layout_held"`` (by (position,
            background) layout: every colour-shape pair on both sides), ``"all"``, or any other
            :func:`~.grammar.scene_pool` name.
        seed: seed of scenes, renders and variants (deterministic output).
        size: image side in pixels.
        perspectives: any of ``alignment``, ``fidelity``, ``safety``, ``overall``.
        mismatch: the attributes an alignment mismatch may change (default: any), e.g.
            ``("background",)`` for the first stage of the world reward's curriculum.

    Returns:
        ``{"<perspective>_pairs": path, "<perspective>_unpaired": path, ...}``.
    """
    pool = scene_pool(split)  # an unknown split name is refused there, with the names it knows
    train = split_scenes().train
    allowed = frozenset((s.colour, s.shape) for s in train) if split == "train" else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for p_index, perspective in enumerate(perspectives):
        if perspective not in PERSPECTIVES:
            raise ValueError(f"perspective {perspective!r}: use any of {PERSPECTIVES}.")
        rng = random.Random(f"{seed}:{split}:{p_index}:{perspective}")
        pair_lines, unpaired_lines = [], []
        for i in range(n_pairs):
            rec = make_pair(rng.choice(pool), perspective, rng, size, allowed, mismatch)
            chosen = f"images/{perspective}/pair{i:05d}_chosen.png"
            rejected = f"images/{perspective}/pair{i:05d}_rejected.png"
            _save_png(rec.chosen, out / chosen)
            _save_png(rec.rejected, out / rejected)
            pair_lines.append({"prompt": rec.prompt, "chosen": chosen, "rejected": rejected})
        for i in range(n_unpaired):
            rec = make_unpaired(rng.choice(pool), perspective, 1 - i % 2, rng, size, allowed)
            image = f"images/{perspective}/single{i:05d}.png"
            _save_png(rec.image, out / image)
            unpaired_lines.append({"prompt": rec.prompt, "image": image, "label": rec.label})
        for kind, lines in (("pairs", pair_lines), ("unpaired", unpaired_lines)):
            path = out / f"{perspective}_{kind}.jsonl"
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
            tmp.replace(path)
            written[f"{perspective}_{kind}"] = path
    return written
