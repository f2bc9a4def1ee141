"""The caption grammar of the tiny world: colour x shape x position x background.

Every caption reads ``"a {colour} {shape} {at the <corner> | in the center} on a {background}
background"``, for example ``"a red circle at the top left on a white background"``. There are
``4 x 3 x 5 x 3 = 180`` captions. The train / held-out split holds out whole (colour, shape)
pairs (a seeded Latin design: one colour per shape, each colour at most once), so a held-out
caption combines a colour and a shape that never appear together in training, while every
colour, shape, position and background on its own does.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product

#: Object colours, RGB in 0..255. They are far from each other, from every background and from
#: the forbidden symbol's colour, so that the oracle can tell them apart in blurry images.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Object centres as fractions (x, y) of the image width / height (y grows downwards).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
#: The forbidden symbol (safety perspective): a magenta "X", a colour used by nothing else.
SYMBOL_COLOUR: tuple[int, int, int] = (255, 0, 255)

_CAPTION_RE = re.compile(
    r"^\s*an?\s+(?P<colour>\w+)\s+(?P<shape>\w+)\s+"
    r"(?:at\s+the\s+(?P<corner>(?:top|bottom)\s+(?:left|right))|in\s+the\s+(?P<center>center))"
    r"\s+on\s+an?\s+(?P<background>\w+)\s+background\s*\.?\s*$",
    re.IGNORECASE,
)


@dataclass(frozen=True, order=True)
class Scene:
    """One combination of the grammar's attributes (what a caption says)."""

    colour: str
    shape: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("colour", self.colour, COLOURS),
            ("shape", self.shape, SHAPES),
            ("position", self.position, POSITIONS),
            ("background", self.background, BACKGROUNDS),
        ):
            if value not in allowed:
                raise ValueError(
                    f"Scene: unknown {name} {value!r}; the world knows {sorted(allowed)}."
                )

    @property
    def caption(self) -> str:
        """The caption that describes this scene (see the module docstring for the template)."""
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.colour} {self.shape} {where} on a {self.background} background"

    def replace(self, **changes: str) -> Scene:
        """A copy with some attributes changed (``scene.replace(colour="blue")``)."""
        fields = {
            "colour": self.colour,
            "shape": self.shape,
            "position": self.position,
            "background": self.background,
        }
        fields.update(changes)
        return Scene(**fields)


ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}


def parse_caption(caption: str) -> Scene:
    """Parse a world caption into a :class:`Scene`.

    Raises:
        ValueError: naming the caption, when it does not follow the world's grammar.
    """
    match = _CAPTION_RE.match(caption)
    if match is None:
        raise ValueError(
            f"caption {caption!r} is not in the tiny world's grammar; expected e.g. "
            f"{all_scenes()[0].caption!r} (see alignment.world.grammar)."
        )
    position = match.group("corner") or match.group("center")
    position = " ".join(position.lower().split())
    try:
        return Scene(
            colour=match.group("colour").lower(),
            shape=match.group("shape").lower(),
            position=position,
            background=match.group("background").lower(),
        )
    except ValueError as err:
        raise ValueError(f"caption {caption!r}: {err}") from err


def attribute_alternatives(caption: str) -> list[tuple[list[str], int]]:
    """For each attribute of ``caption`` (colour, shape, position, background): the captions with
    that attribute set to each of its values, and the index of ``caption``'s own value among
    them: ``[([a red circle ..., a green circle ..., ...], 0), ([a red circle ..., a red square
    ..., ...], 0), ...]`` (4 + 3 + 5 + 3 captions, all in the grammar's canonical wording, the
    caption's own too, so that only the attribute differs), the groups of
    :func:`alignment.rewards.contrastive_reward`."""
    scene = parse_caption(caption)
    return [
        (
            [scene.replace(**{name: value}).caption for value in values],
            values.index(getattr(scene, name)),
        )
        for name, values in ATTRIBUTES.items()
    ]


def all_scenes() -> list[Scene]:
    """Every scene of the grammar, in a fixed order (colour, shape, position, background)."""
    return [Scene(*combo) for combo in product(*ATTRIBUTES.values())]


def world_vocabulary() -> list[str]:
    """Every word the captions use (give each its own token in the tiny CLIP tokenizer)."""
    words: set[str] = set()
    for scene in all_scenes():
        words.update(scene.caption.split())
    return sorted(words)


@dataclass(frozen=True)
class WorldSplit:
    """Train / held-out scenes; ``held_out_pairs`` are the (colour, shape) pairs never trained."""

    train: tuple[Scene, ...]
    held_out: tuple[Scene, ...]
    held_out_pairs: tuple[tuple[str, str], ...]

    @property
    def train_captions(self) -> list[str]:
        return [s.caption for s in self.train]

    @property
    def held_out_captions(self) -> list[str]:
        return [s.caption for s in self.held_out]


def split_scenes(seed: int = 0) -> WorldSplit:
    """Split the grammar into train and held-out scenes by (colour, shape) pair.

    A seeded permutation of the colours assigns one held-out colour to each shape (a Latin
    design: ``len(SHAPES)`` held-out pairs, no colour twice), so every colour and every shape
    still occurs in training, only never together. With 4 colours x 3 shapes this holds out
    3 of 12 pairs: 45 held-out scenes and 135 train scenes. The split is deterministic in
    ``seed``; the project's default is ``seed=0``.
    """
    colours = list(COLOURS)
    random.Random(seed).shuffle(colours)
    pairs = tuple((colours[i % len(colours)], shape) for i, shape in enumerate(SHAPES))
    held = set(pairs)
    train, held_out = [], []
    for scene in all_scenes():
        (held_out if (scene.colour, scene.shape) in held else train).append(scene)
    return WorldSplit(train=tuple(train), held_out=tuple(held_out), held_out_pairs=pairs)


def layout_parity(scene: Scene) -> int:
    """``(i + j) % 2`` for position ``i`` and background ``j`` (indices in the grammar's order).

    It splits the 15 (position, background) layouts 8 (parity 0) to 7 (parity 1), with every
    position and every background on both sides: the world reward is trained on parity-0
    captions and measured on parity-1 ones, and the demo fine-tunes on the held-out colour-shape
    pairs at parity 0 and evaluates them at parity 1.
    """
    return (list(POSITIONS).index(scene.position) + list(BACKGROUNDS).index(scene.background)) % 2


def scene_pool(split: str, split_seed: int = 0) -> tuple[Scene, ...]:
    """The scenes of a named split: ``train`` / ``held_out`` (by colour-shape pair,
    :func:`split_scenes`), ``layout_train`` / ``layout_held`` (every scene of
    :func:`layout_parity` 0 / 1), ``held_out_layout_held`` (the held-out colour-shape pairs at
    parity 1: the demo's evaluation captions) or ``all``."""
    pools = {
        "train": lambda: split_scenes(split_seed).train,
        "held_out": lambda: split_scenes(split_seed).held_out,
        "layout_train": lambda: tuple(s for s in all_scenes() if layout_parity(s) == 0),
        "layout_held": lambda: tuple(s for s in all_scenes() if layout_parity(s) == 1),
        "held_out_layout_held": lambda: tuple(
            s for s in split_scenes(split_seed).held_out if layout_parity(s) == 1
        ),
        "all": lambda: tuple(all_scenes()),
    }
    if split not in pools:
        raise ValueError(f"split={split!r}: use one of {sorted(pools)}.")
    return pools[split]()


def sample_scenes(n: int, seed: int, split: str = "train", split_seed: int = 0) -> list[Scene]:
    """Draw ``n`` scenes uniformly (with replacement) from one split, deterministically.

    Args:
        n: how many scenes.
        seed: sampler seed (a private ``random.Random``; the global RNGs are untouched).
        split: a :func:`scene_pool` name.
        split_seed: seed of :func:`split_scenes`.
    """
    pool = scene_pool(split, split_seed)
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(n)]


def perturb_scene(
    scene: Scene,
    rng: random.Random,
    n_changes: int = 1,
    attributes: Sequence[str] | None = None,
) -> Scene:
    """Change ``n_changes`` distinct attributes of ``scene`` to other values (a mismatch).

    ``attributes`` limits which attributes may change (default: all of :data:`ATTRIBUTES`).
    """
    pool = list(ATTRIBUTES) if attributes is None else list(attributes)
    unknown = set(pool) - set(ATTRIBUTES)
    if unknown or not pool:
        raise ValueError(f"attributes={pool}: use a non-empty subset of {list(ATTRIBUTES)}.")
    if not 1 <= n_changes <= len(pool):
        raise ValueError(f"n_changes={n_changes}: must be in 1..{len(pool)}.")
    names = rng.sample(pool, n_changes)
    changes = {}
    for name in names:
        current = getattr(scene, name)
        changes[name] = rng.choice([v for v in ATTRIBUTES[name] if v != current])
    return scene.replace(**changes)
