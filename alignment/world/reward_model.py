"""The tiny-world LLaVA-Reward: trained by ``recipes/train_reward.py`` on the world's pairs.

    python -m alignment.world.reward_model OUT [--pairs 2048 --unpaired 512]

writes the world's train / held-out manifests (``alignment.world.pairs``), saves a tiny LLaVA
backbone (hidden 64, 32-px images in 4-px patches: 64 visual tokens) pre-trained as a captioner
of the world (:func:`pretrain_world_backbone`) into ``OUT/tiny_backbone``,
runs the recipe once per stage of :data:`PLAN` into ``OUT`` (alignment: background-only pairs,
then every mismatch, continued; paired data for fidelity and overall; unpaired for safety) and
writes ``OUT/world_report.json``: each perspective's held-out accuracy against the oracle (and
per stage; a stage with a gate in :data:`STAGE_GATES` that stays below it is started again, see
:func:`run_plan`) (the world's pairs are ordered by the oracle, so the pairwise
accuracy on held-out captions is the agreement with it).

``--tower resnet`` builds the backbone as a FastVLM with transformers' ResNet as its tower (the
same LM, 64 visual tokens from an 8 x 8 feature map); ``--captioner_policy_frac 0.5`` pre-trains
the captioner on the world policy's own samples for half of each batch, captioned by the oracle;
``--tower_steps 3000`` first teaches the tower those samples' shapes and then freezes it
(:mod:`alignment.world.policy_samples`). alignment/world/weights/README.md ("Eleventh round")
measures them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_NEW = ("--overwrite_perspective", "true")  # (re)train from a fresh adapter and head
#: One recipe run per stage: (perspective, data folder, data kind, optimiser steps, extra flags).
#: The alignment perspective is a six-stage curriculum at constant learning rates:
#:
#: 1. background-only pairs, 2000 steps at 5e-4. Trained on all mismatches at once, the tiny model
#:    stays at chance on the background (the captioner's tokens after the background word predict
#:    nothing that depends on the image, so the read-out must learn that comparison from scratch,
#:    a long plateau); background-only pairs cross it after about 1000 steps (where exactly
#:    depends on the float reductions; one run in one thread never did);
#: 2. object-only pairs (colour, shape or position changed), 2000 steps at 5e-4: colour and
#:    position cross (the background is forgotten for now);
#: 3. every kind of mismatch, 1500 steps at 3e-4: the background comes back. These three stages
#:    never show a held-out colour-shape pair; on those unseen pairs the shape stays at chance
#:    (0.50-0.57), background, colour and position reach 0.89-1.0;
#: 4. shape-only pairs over *every* caption (the ``renders`` split: a real MLLM reward's data
#:    covers the concepts a policy is asked for; its held-out pairs are new renders), 3000 steps
#:    at 5e-4: the shape reaches 0.98 and the other kinds fall back (0.53-0.64);
#: 5-6. every kind of mismatch over every caption, 2000 steps at 2e-4 then 2000 at 1e-4: every
#:    kind comes back with the shape kept (held-out pairs 0.97 / 1.00 / 0.96 / 0.89).
#:
#: See alignment/world/weights/README.md for the per-stage numbers and the runs that failed.
_CONST = ("--lr_scheduler_type", "constant")
_MORE = ("--continue_perspective", "true")
PLAN = (
    ("alignment", "background", "pairs", 2000, ("--learning_rate", "5e-4", *_CONST, *_NEW)),
    ("alignment", "objects", "pairs", 2000, ("--learning_rate", "5e-4", *_CONST, *_MORE)),
    ("alignment", "all", "pairs", 1500, ("--learning_rate", "3e-4", *_CONST, *_MORE)),
    ("alignment", "shape_renders", "pairs", 3000, ("--learning_rate", "5e-4", *_CONST, *_MORE)),
    ("alignment", "all_renders", "pairs", 2000, ("--learning_rate", "2e-4", *_CONST, *_MORE)),
    ("alignment", "all_renders", "pairs", 2000, ("--learning_rate", "1e-4", *_CONST, *_MORE)),
    ("fidelity", "all", "pairs", 400, _NEW),
    ("safety", "all", "unpaired", 400, _NEW),
    ("overall", "all", "pairs", 1000, _NEW),
)
#: Held-out accuracy a stage that starts from a fresh adapter must reach, by (perspective, data
#: set). Stage 1 is a plateau that ends at a step set by the adapter's random start and the float
#: reductions: the same 2000 steps in one thread crossed it with ``--seed 0`` (held-out 1.000)
#: and not with ``--seed 1`` (0.516). A stage below its gate is started again from a fresh adapter
#: with the next seed, up to :data:`GATE_TRIES` starts; then the build stops with an error rather
#: than train five stages on a read-out that never learnt to compare.
STAGE_GATES: dict[tuple[str, str], float] = {("alignment", "background"): 0.9}
GATE_TRIES = 3
#: The build's record of finished stages in the output folder (:func:`run_plan` resumes from it).
PROGRESS_FILE = "build_progress.json"
_STAGE_START = ".stage_start"
#: The tiny LLaVA backbone: CLIP-style vision tower (``vision_layers`` layers of width
#: ``vision_hidden``, ``patch``-px patches of ``image_size``-px images), a Llama LM of ``layers``
#: layers of width ``hidden``, word-level tokenizer.
BACKBONE = {
    "hidden": 64,
    "layers": 2,
    "image_size": 32,
    "patch": 4,
    "vision_hidden": 64,
    "vision_layers": 2,
    "vision_heads": 2,
    "seed": 0,
}
#: How the backbone is pre-trained as a captioner (``blur``: the renders are blurred with a
#: Gaussian of sigma uniform in [0, blur] px, as the reward's pairs and a policy's samples are;
#: ``policy_frac``: the expected share of each batch that is the world policy's own samples
#: instead of renders, ``policy_per_caption`` of them per caption, captioned by the oracle;
#: ``tower_steps``: first teach the vision tower the shapes of those samples
#: (:func:`~alignment.world.policy_samples.train_tower_on_shapes`), then keep it frozen;
#: :mod:`alignment.world.policy_samples`).
CAPTIONER = {
    "steps": 3000,
    "batch_size": 32,
    "lr": 3e-3,
    "blur": 0.0,
    "seed": 0,
    "policy_frac": 0.0,
    "policy_per_caption": 48,
    "tower_steps": 0,
    "tower_batch_size": 64,
    "tower_lr": 1e-3,
}


def world_backbone(
    hidden: int = 64,
    layers: int = 2,
    image_size: int = 32,
    patch: int = 4,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 2,
    seed: int = 0,
    tower: str = "clip",
):
    """A randomly initialised tiny LLaVA for the world: ``(model, tokenizer, image_processor)``.

    ``tower="clip"``: :func:`reward.testing.tiny_llava` (word-level tokenizer, CLIP vision tower,
    Llama LM) with the vision tower's width, depth and heads set apart from the language model's;
    with the defaults it is that model exactly. ``tower="resnet"``: the same LM and tokenizer in a
    FastVLM (``FastVlmForConditionalGeneration``) whose tower is transformers' ``ResNetModel``
    (stem of 32 channels, one stage of 3 basic blocks of ``vision_hidden`` channels, stride 4: a
    32-px image is 8 x 8 = 64 visual tokens, as the CLIP tower's 4-px patches; pixels normalised
    to [-1, 1]); ``patch``, ``vision_layers`` and ``vision_heads`` are then unused.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    from reward.testing import tiny_llava

    if tower not in ("clip", "resnet"):
        raise ValueError(f"tower={tower!r}: use 'clip' (LLaVA) or 'resnet' (FastVLM).")
    model, tokenizer, image_processor = tiny_llava(hidden, layers, image_size, patch, seed)
    if tower == "resnet":
        from transformers import FastVlmConfig, FastVlmForConditionalGeneration

        from reward.testing import tiny_resnet_tower_config

        config = FastVlmConfig(
            vision_config=tiny_resnet_tower_config(vision_hidden, stem=32, depth=3).to_dict(),
            text_config=model.config.text_config.to_dict(),
            image_token_index=model.config.image_token_id,
            image_seq_length=(image_size // 4) ** 2,
        )
        torch.manual_seed(seed)
        fast = FastVlmForConditionalGeneration(config).eval()
        # the LM as tiny_llava draws it, so that only the vision differs between the towers
        fast.model.language_model.load_state_dict(model.model.language_model.state_dict())
        fast.lm_head.load_state_dict(model.lm_head.state_dict())
        # pixels to [-1, 1], as a convolutional tower trained from scratch expects
        image_processor.image_mean, image_processor.image_std = [0.5] * 3, [0.5] * 3
        return fast, tokenizer, image_processor
    vision = model.config.vision_config
    if (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) != (
        vision_hidden,
        vision_layers,
        vision_heads,
    ):
        vision.hidden_size, vision.intermediate_size = vision_hidden, 2 * vision_hidden
        vision.projection_dim = vision_hidden
        vision.num_hidden_layers, vision.num_attention_heads = vision_layers, vision_heads
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(model.config).eval()
    return model, tokenizer, image_processor


def _policy_captioner_data(policy: str | Path, per_caption: int, seed: int):
    """``(images [N, 3, H, W], p [N, C], captions [C], asked [N])``: the world policy's samples
    of every caption but the demo's evaluation captions (``asked``: each one's), with the
    oracle's caption distribution over all ``C`` captions of the world
    (:mod:`alignment.world.policy_samples`); samples the oracle can name nothing in are
    dropped."""
    from alignment.flow_policy import load_frozen_policy
    from alignment.world.grammar import all_scenes, scene_pool
    from alignment.world.policy_samples import draw_policy_samples, oracle_caption_distribution

    model = load_frozen_policy(policy)
    evaluated = {s.caption for s in scene_pool("held_out_layout_held")}
    captions = [s.caption for s in all_scenes()]
    asked = [c for c in captions if c not in evaluated]
    images, asked = draw_policy_samples(model, asked, per_caption, seed)
    p = oracle_caption_distribution(images, captions)
    keep = p.sum(1) > 0
    print(
        f"captioner data: {len(images)} policy samples of {len(set(asked))} captions, "
        f"{int(keep.sum())} the oracle can caption",
        flush=True,
    )
    return images[keep], p[keep], captions, [a for a, k in zip(asked, keep.tolist()) if k]


def pretrain_world_backbone(
    path: str | Path,
    backbone: dict | None = None,
    captioner: dict | None = None,
    policy: str | Path | None = None,
) -> Path:
    """Pre-train the tiny LLaVA backbone as a captioner of the world, then save it to ``path``.

    A reward model is read from a *pre-trained* multimodal LLM; a random tiny one cannot tell a
    square from a circle. This gives the tiny backbone what a real MLLM brings: next-token loss on
    ``USER: <image> caption </s>`` for renders of every world caption (the reward model is then
    trained on preference pairs of the train captions only and evaluated on held-out ones).
    ``backbone`` / ``captioner`` override :data:`BACKBONE` / :data:`CAPTIONER`. With
    ``captioner["policy_frac"] > 0``, each batch item is, with that probability, one of the world
    ``policy``'s own samples (a diffusers folder; every caption but the demo's evaluation ones)
    with a caption drawn from the oracle's distribution over the world's captions; with
    ``captioner["tower_steps"] > 0`` the vision tower first learns those samples' shapes
    (:func:`~alignment.world.policy_samples.train_tower_on_shapes`) and then stays frozen
    (weights and batch-norm statistics) while the captioner trains. Seeded.
    """
    import random

    import torch

    from alignment.world.grammar import all_scenes
    from alignment.world.pairs import gaussian_blur
    from alignment.world.render import render_scene
    from reward.images import to_pil
    from reward.processing import RewardProcessor

    arch = {**BACKBONE, **(backbone or {})}
    train = {**CAPTIONER, **(captioner or {})}
    steps, batch_size, lr = train["steps"], train["batch_size"], train["lr"]
    frac = float(train["policy_frac"])
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"captioner policy_frac={frac}: use a share in [0, 1].")
    samples = None
    if frac > 0 or train["tower_steps"] > 0:
        if policy is None:
            raise ValueError(
                f"captioner policy_frac={frac}, tower_steps={train['tower_steps']} needs the "
                "world policy whose samples it learns from: pass policy=<diffusers folder> "
                "(the demo's: alignment/world/weights/tiny-world-sd3)."
            )
        samples = _policy_captioner_data(policy, train["policy_per_caption"], train["seed"])
    torch.manual_seed(train["seed"])
    model, tokenizer, image_processor = world_backbone(**arch)
    tower = model.model.vision_tower
    if train["tower_steps"] > 0:
        from alignment.world.policy_samples import train_tower_on_shapes

        _, losses = train_tower_on_shapes(
            tower,
            samples[0],
            samples[3],
            image_processor.image_mean,
            image_processor.image_std,
            train["tower_steps"],
            train["tower_batch_size"],
            train["tower_lr"],
            train["seed"],
        )
        print(f"tower: shape loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)
        tower.requires_grad_(False)
        torch.manual_seed(train["seed"])
    proc = RewardProcessor(tokenizer, image_processor, model.config, tokenizer.chat_template)
    scenes, rng = all_scenes(), random.Random(train["seed"])
    labels_gen = torch.Generator().manual_seed(train["seed"])
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    model.train()
    if train["tower_steps"] > 0:
        tower.eval()  # frozen, batch norm statistics included

    def render(scene):
        image = render_scene(scene, arch["image_size"], rng=rng.randrange(1 << 30))
        if train["blur"] > 0:
            image = gaussian_blur(image, rng.uniform(0.0, train["blur"]))
        return to_pil(image)

    for step in range(steps):
        if samples is None:  # renders only
            chosen = [rng.choice(scenes) for _ in range(batch_size)]
            texts, images = [s.caption for s in chosen], [render(s) for s in chosen]
        else:
            texts, images = [], []
            x, p, captions, _ = samples
            for _ in range(batch_size):
                if rng.random() < frac:
                    j = rng.randrange(len(x))
                    texts.append(captions[int(torch.multinomial(p[j], 1, generator=labels_gen))])
                    images.append(to_pil(x[j]))
                else:
                    scene = rng.choice(scenes)
                    texts.append(scene.caption)
                    images.append(render(scene))
        inputs = proc(texts, images)
        labels = inputs["input_ids"].clone()
        labels[(labels == model.config.image_token_id) | (inputs["attention_mask"] == 0)] = -100
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"backbone step {step}: caption loss {loss.item():.4f}", flush=True)
    model.eval()
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    (path / "pretrain.json").write_text(
        json.dumps({**train, "final_caption_loss": loss.item(), **arch}, indent=2)
    )
    return path


#: The world's alignment mismatch kinds, each evaluated on its own (pairs that differ in that
#: attribute only).
MISMATCH_KINDS: tuple[str, ...] = ("background", "colour", "shape", "position")
#: Data sets of the build: name -> (attributes an alignment mismatch may change (None: any),
#: train pairs as a fraction of ``pairs``, held-out pairs, train seed, held-out seed, caption
#: split (:data:`CAPTION_SPLITS`)). Sets whose mismatch is None also hold the other
#: perspectives' data; the rest are alignment-only. ``pairs``-split sets never show a held-out
#: colour-shape pair; ``renders``-split sets draw every caption (their held-out pairs are new
#: renders).
DATA: dict[str, tuple[tuple[str, ...] | None, float, int, int, int, str]] = {
    "all": (None, 1.0, 512, 0, 1, "pairs"),
    "background": (("background",), 0.5, 128, 2, 3, "pairs"),
    "objects": (("colour", "shape", "position"), 1.0, 256, 4, 5, "pairs"),
    "all_renders": (None, 1.0, 512, 0, 1, "renders"),
    "shape_renders": (("shape",), 1.0, 256, 6, 7, "renders"),
}
#: Seed of the held-out pairs behind the per-kind accuracies (``mismatch_accuracy``).
KIND_EVAL_SEED = 3


#: How the reward's captions are split into train and held-out (``split_by``): by colour-shape
#: pair (``"pairs"``: no training image shows a held-out pair), by (position, background)
#: layout (``"layout"``: every colour-shape pair is trained, at 8 of the 15 layouts), or not at
#: all (``"renders"``: every caption on both sides, held-out pairs are new renders).
CAPTION_SPLITS: dict[str, tuple[str, str]] = {
    "pairs": ("train", "held_out"),
    "layout": ("layout_train", "layout_held"),
    "renders": ("all", "all"),
}


def mismatch_pairs(
    kind: str, n: int = 128, seed: int = KIND_EVAL_SEED, size: int = 32, split: str = "held_out"
):
    """``n`` oracle-ordered alignment pairs of ``split``'s captions
    (:func:`~alignment.world.grammar.scene_pool`) whose images differ in ``kind`` only
    (``background``, ``colour``, ``shape`` or ``position``; both blurred alike), drawn as
    :func:`~alignment.world.pairs.write_world_dataset` draws them (that ``split`` and ``seed``,
    ``mismatch=(kind,)``): a list of :class:`~alignment.world.pairs.PairRecord`."""
    import random

    from alignment.world.grammar import scene_pool
    from alignment.world.pairs import make_pair

    if kind not in MISMATCH_KINDS:
        raise ValueError(f"kind {kind!r}: use one of {MISMATCH_KINDS}.")
    pool = scene_pool(split)
    rng = random.Random(f"{seed}:{split}:0:alignment")
    return [make_pair(rng.choice(pool), "alignment", rng, size, None, (kind,)) for _ in range(n)]


def mismatch_accuracy(
    scorer,
    perspective: str = "alignment",
    n: int = 128,
    seed: int = KIND_EVAL_SEED,
    split: str = "held_out",
) -> dict[str, float]:
    """Held-out pairwise accuracy of ``scorer`` (a :class:`~reward.scorer.RewardScorer`) against
    the oracle per kind of mismatch: ``{kind: mean(r(chosen) > r(rejected))}`` over
    :func:`mismatch_pairs` (a tie counts as wrong). Images go through 8-bit PNG-like rounding,
    as the manifests' images do."""
    import torch

    out = {}
    for kind in MISMATCH_KINDS:
        recs = mismatch_pairs(kind, n, seed, split=split)
        images = torch.stack([r.chosen for r in recs] + [r.rejected for r in recs])
        images = (images * 255).round() / 255
        r = scorer.score([rec.prompt for rec in recs] * 2, images, perspective, batch_size=64)
        out[kind] = round(float((r[:n] > r[n:]).float().mean()), 4)
    return out


#: Written beside each held-out data set once both halves are on disk: the sizes, caption split
#: and seeds it was written with, so that a build pointed at an old data folder reuses a set only
#: when it is the one it would write.
DATA_MANIFEST = "world_data.json"


def _data_spec(name: str, pairs: int, unpaired: int, split_by: str | None) -> dict:
    """What :func:`write_world_data` writes for the data set ``name`` with these options."""
    mismatch, frac, n_held, train_seed, held_seed, own = DATA[name]
    every = mismatch is None
    return {
        "train_pairs": int(pairs * frac),
        "held_pairs": n_held,
        "train_unpaired": unpaired if every else 0,
        "held_unpaired": unpaired // 2 if every else 0,
        "split": split_by or own,
        "seeds": [train_seed, held_seed],
    }


def _lines(path: Path) -> int:
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def _check_data_set(data: Path, name: str, spec: dict) -> None:
    """Refuse a data set already under ``data`` that was written with other options than
    ``spec`` (its manifest, or for a set written before manifests its pair counts)."""
    manifest = data / f"held_{name}" / DATA_MANIFEST
    if manifest.is_file():
        found = json.loads(manifest.read_text())
    else:
        found = {
            **spec,
            "train_pairs": _lines(data / f"train_{name}" / "alignment_pairs.jsonl"),
            "held_pairs": _lines(data / f"held_{name}" / "alignment_pairs.jsonl"),
        }
    differ = {k: (found.get(k), v) for k, v in spec.items() if found.get(k) != v}
    if differ:
        what = ", ".join(f"{k} {old!r} (this build: {new!r})" for k, (old, new) in differ.items())
        raise ValueError(
            f"the data set {name!r} in {data} was written with other options: {what}. Use "
            f"another data folder, or delete {data / f'train_{name}'} and "
            f"{data / f'held_{name}'} to have them written again."
        )


def write_world_data(
    data: Path, pairs: int, unpaired: int, split_by: str | None = None, names=None
) -> None:
    """Write the data sets ``names`` of :data:`DATA` (default: all) under ``data/train_<name>``
    and ``data/held_<name>``, captions split as each set says or, with ``split_by``, all of them
    as :data:`CAPTION_SPLITS` ``[split_by]``. A set already there is reused when it was written
    with the same options (:data:`DATA_MANIFEST`) and refused with a ``ValueError`` otherwise."""
    from alignment.world.pairs import write_world_dataset
    from reward.files import atomic_write_text

    for name, (mismatch, *_) in DATA.items():
        if names is not None and name not in names:
            continue
        spec = _data_spec(name, pairs, unpaired, split_by)
        if (data / f"held_{name}" / "alignment_pairs.jsonl").is_file():
            _check_data_set(data, name, spec)
            continue
        for split, folder, n, m, seed in zip(
            CAPTION_SPLITS[spec["split"]],
            ("train", "held"),
            (spec["train_pairs"], spec["held_pairs"]),
            (spec["train_unpaired"], spec["held_unpaired"]),
            spec["seeds"],
        ):
            write_world_dataset(
                data / f"{folder}_{name}",
                n,
                m,
                split=split,
                seed=seed,
                **(
                    {}
                    if mismatch is None
                    else {"perspectives": ("alignment",), "mismatch": mismatch}
                ),
            )
        atomic_write_text(data / f"held_{name}" / DATA_MANIFEST, json.dumps(spec, indent=2) + "\n")


class StageGateError(RuntimeError):
    """A gated stage of the reward build (:data:`STAGE_GATES`) stayed below its held-out accuracy."""


def _stage_command(out: Path, backbone: Path, data: Path, stage: tuple, skipca: bool) -> list[str]:
    """The recipe's command line for one stage ``(perspective, data set, kind, steps, extra)``."""
    perspective, name, kind, steps, extra = stage
    return [
        sys.executable,
        str(ROOT / "recipes" / "train_reward.py"),
        "--config",
        str(ROOT / "recipes" / "configs" / "reward_tiny_world.yaml"),
        "--output_dir",
        str(out),
        "--backbone",
        str(backbone),
        "--perspective",
        perspective,
        "--max_steps",
        str(steps),
        "--train_file",
        str(data / f"train_{name}" / f"{perspective}_{kind}.jsonl"),
        "--eval_file",
        str(data / f"held_{name}" / f"{perspective}_{kind}.jsonl"),
        *(() if skipca else ("--skipca", "false")),
        *extra,
    ]


def _perspective_files(out: Path, perspective: str) -> list[Path]:
    """A perspective's weights in a reward folder: its adapter folder and its head."""
    from reward.modeling import ADAPTERS_DIR, HEADS_DIR

    return [out / ADAPTERS_DIR / perspective, out / HEADS_DIR / f"{perspective}.safetensors"]


def _copy(src: Path, dst: Path) -> None:
    """Copy ``src`` (a file or a folder; nothing if it is absent) to ``dst``, replacing ``dst``."""
    if dst.is_dir():
        shutil.rmtree(dst)
    elif dst.exists():
        dst.unlink()
    if src.is_dir():
        shutil.copytree(src, dst)
    elif src.is_file():
        shutil.copy2(src, dst)


def _keep_stage_start(out: Path, perspective: str, restore: bool) -> None:
    """Copy ``perspective``'s weights to ``out/.stage_start/`` (``restore=False``), or put that
    copy back (``restore=True``), so that a continued stage cut short after its save is trained
    again from where it started, not twice."""
    from reward.modeling import finish_interrupted_save

    keep = out / _STAGE_START
    if not restore:
        shutil.rmtree(keep, ignore_errors=True)
        keep.mkdir(parents=True)
        for path in _perspective_files(out, perspective):
            _copy(path, keep / path.name)
        return
    if not keep.is_dir():
        raise FileNotFoundError(
            f"{keep} is missing: the copy of {perspective!r} taken before the stage that was cut "
            f"short is gone, so it cannot be trained again from its start. Build into a new "
            "folder."
        )
    finish_interrupted_save(out)  # a save committed before the cut completes first, then is undone
    for path in _perspective_files(out, perspective):
        _copy(keep / path.name, path)


def run_plan(
    out: Path,
    backbone: Path,
    data: Path,
    plan=PLAN,
    skipca: bool = True,
    gates: dict[tuple[str, str], float] | None = None,
    tries: int = GATE_TRIES,
    runner=subprocess.run,
    options: dict | None = None,
) -> dict:
    """Run the recipe once per stage of ``plan`` into ``out`` (the backbone ``backbone``, the data
    sets under ``data``); returns the report ``{perspective: {"kind", "steps", "accuracy",
    "stages": [{data set: held-out accuracy}, ...]}}`` (a gated stage's entry also holds the
    ``seed`` it passed with and the accuracy of each start, ``starts``).

    A stage that starts a fresh adapter (``--overwrite_perspective true``) and has a gate in
    ``gates`` (default :data:`STAGE_GATES`) is started again with seeds 1, 2, ... while its
    held-out accuracy is below the gate, ``tries`` starts in all; then :class:`StageGateError`.
    ``runner``: how a command is run (``subprocess.run``; tests pass a fake). ``options``: the
    build's other settings that a resume must share (``train_world_reward``: the data sizes and
    caption split), JSON values.

    Resumable: ``out/build_progress.json`` (written atomically) records the stages done, the
    report so far and the starts of the stage under way. Run again on the same folder with the
    same plan, data folder and SkipCA setting, the build goes on where it stopped: a finished
    stage is not run again; a continued stage cut short is trained again from the copy of its
    perspective taken when it began (``out/.stage_start``), never twice; a gated stage goes on
    with the next seed (so a larger ``tries`` resumes a build stopped by its gate). A folder
    whose progress records another build is refused (:class:`ValueError`).
    """
    from reward.files import atomic_write_text

    if tries < 1:
        raise ValueError(f"tries={tries}: a stage needs 1 or more starts.")
    gates = STAGE_GATES if gates is None else gates
    progress_file = out / PROGRESS_FILE
    signature = {
        "plan": [[*stage[:4], list(stage[4])] for stage in plan],
        "skipca": skipca,
        "data": str(Path(data).resolve()),
        **{key: options[key] for key in sorted(options or {})},
    }
    progress: dict = {"signature": signature, "done": 0, "report": {}, "running": None}
    if progress_file.is_file():
        recorded = json.loads(progress_file.read_text())
        differ = [
            key for key in signature if recorded.get("signature", {}).get(key) != signature[key]
        ]
        if differ:
            shown = [
                f"{key} {recorded.get('signature', {}).get(key)!r} there, {signature[key]!r} here"
                for key in differ
                if key != "plan"
            ]
            raise ValueError(
                f"{out} holds a reward build with another {' and '.join(differ)} than this one "
                f"({progress_file}{': ' + '; '.join(shown) if shown else ''}). Build into a new "
                "folder, or delete that file to start over."
            )
        progress = {**progress, **recorded}
        if progress["done"]:
            print(
                f"resuming the reward build in {out} after stage {progress['done']} of {len(plan)}"
            )

    def save_progress() -> None:
        atomic_write_text(progress_file, json.dumps(progress, indent=2))

    report = progress["report"]
    for number, spec in enumerate(plan, 1):
        if number <= progress["done"]:
            continue
        perspective, stage, kind, steps, extra = spec
        cmd = _stage_command(out, backbone, data, spec, skipca)
        fresh = "--overwrite_perspective" in extra
        gate = gates.get((perspective, stage)) if fresh else None
        running = progress.get("running") or {}
        starts: list[float] = (
            list(running.get("starts", [])) if running.get("stage") == number else []
        )
        finished = bool(starts) and (gate is None or starts[-1] >= gate)
        if not fresh and not finished:
            # a continued stage trains the folder's perspective further: keep where it began
            _keep_stage_start(out, perspective, restore=running.get("stage") == number)
        progress["running"] = {"stage": number, "starts": starts}
        save_progress()
        seeds = range(len(starts), tries) if gate is not None else range(1)
        report_file = out / f"eval_report_{perspective}.json"
        for seed in [] if finished else seeds:
            report_file.unlink(missing_ok=True)  # never read an earlier stage's verdict
            runner(cmd + (["--seed", str(seed)] if seed else []), check=True)
            if not report_file.is_file():
                raise FileNotFoundError(
                    f"stage {number} wrote no {report_file}: the recipe ran without a held-out "
                    f"evaluation ({' '.join(cmd[1:])}); check its --eval_file."
                )
            starts.append(json.loads(report_file.read_text())["accuracy"])
            save_progress()  # a start that failed its gate is not run again on resume
            if gate is None or starts[-1] >= gate:
                break
            if seed + 1 < tries:
                print(
                    f"stage {number} ({perspective} on {stage!r}): held-out accuracy "
                    f"{starts[-1]:.3f} < {gate} with seed {seed}; starting it again",
                    flush=True,
                )
        if gate is not None and (not starts or starts[-1] < gate):
            raise StageGateError(
                f"stage {number} of the reward build ({perspective} on the {stage!r} pairs) "
                f"stayed below its held-out accuracy gate {gate} in {len(starts)} start(s) "
                f"(seeds 0-{len(starts) - 1}: {', '.join(f'{a:.3f}' for a in starts)}): the "
                f"read-out never learnt to compare. Run the same build on {out} with more "
                f"starts (`--tries {len(starts) + GATE_TRIES}` of `python -m "
                "alignment.world.reward_model`, `tries=` of train_world_reward): it goes on "
                f"with seed {len(starts)}. Or give that stage more steps, in a new folder."
            )
        before = report.get(perspective, {})
        entry: dict = {stage: starts[-1]}
        if gate is not None:
            entry.update(seed=len(starts) - 1, starts=starts)
        report[perspective] = {
            "kind": kind,
            "steps": before.get("steps", 0) + steps,
            "accuracy": starts[-1],
            "stages": [*before.get("stages", []), entry],
        }
        progress.update(done=number, running=None)  # ``report`` is ``progress["report"]``
        save_progress()
    shutil.rmtree(out / _STAGE_START, ignore_errors=True)
    return report


def train_world_reward(
    out: str | Path,
    pairs: int = 2048,
    unpaired: int = 512,
    plan=PLAN,
    backbone: str | Path | None = None,
    skipca: bool = True,
    data_dir: str | Path | None = None,
    split_by: str | None = None,
    tries: int = GATE_TRIES,
    pretrain: dict | None = None,
) -> Path:
    """Build the tiny-world reward folder ``out`` (see the module docstring); returns ``out``.

    ``plan``: the stages (default :data:`PLAN`); ``backbone``: a pre-trained backbone folder to
    copy instead of pre-training one; ``pretrain``: keyword arguments of
    :func:`pretrain_world_backbone` (``backbone``, ``captioner``, ``policy``) when it pre-trains
    one; ``skipca=False`` trains every stage without SkipCA (the ablation); ``data_dir``: where the data sets go (default: ``<out>_data`` beside ``out``);
    ``split_by``: one caption split for every data set (:data:`CAPTION_SPLITS`; default: each
    set's own); ``tries``: starts of a gated stage (:func:`run_plan`).
    """
    if split_by is not None and split_by not in CAPTION_SPLITS:
        raise ValueError(f"split_by={split_by!r}: use one of {sorted(CAPTION_SPLITS)}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(data_dir) if data_dir is not None else out.parent / f"{out.name}_data"
    write_world_data(data, pairs, unpaired, split_by, names={stage for _, stage, *_ in plan})
    local = out / "tiny_backbone"
    if not (local / "config.json").is_file():
        # into a temporary folder first: an interrupted copy or pre-training never leaves a
        # folder that a resumed build would take for a finished backbone
        partial = out / ".tiny_backbone.partial"
        shutil.rmtree(partial, ignore_errors=True)
        if backbone is not None:
            shutil.copytree(backbone, partial)
        else:
            pretrain_world_backbone(partial, **(pretrain or {}))
        shutil.rmtree(local, ignore_errors=True)
        partial.rename(local)
    report = run_plan(
        out,
        local,
        data,
        plan,
        skipca,
        tries=tries,
        options={"pairs": pairs, "unpaired": unpaired, "split_by": split_by},
    )
    # make the folder self-contained: the backbone reference is relative to it
    config = json.loads((out / "config.json").read_text())
    config["backbone"] = "tiny_backbone"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if "alignment" in report:
        from reward.scorer import RewardScorer

        scorer = RewardScorer.from_pretrained(out)
        report["alignment"]["split_by"] = split_by or "per data set"
        # held-out captions (colour-shape pairs the policy never saw); unseen by the reward too
        # unless a renders-split stage trained it
        report["alignment"]["per_mismatch"] = mismatch_accuracy(
            scorer, split=CAPTION_SPLITS[split_by or "pairs"][1]
        )
        # the captions the demo evaluates its policies on (held-out colour-shape pairs, parity-1
        # layouts): never a fine-tuning prompt of the policy; a renders-split stage trains the
        # reward on other renders of them
        report["alignment"]["per_mismatch_demo_captions"] = mismatch_accuracy(
            scorer, split="held_out_layout_held"
        )
    (out / "world_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "out", help="output folder (the bundled one: alignment/world/weights/tiny-world-reward)"
    )
    parser.add_argument("--pairs", type=int, default=2048, help="pairs per perspective")
    parser.add_argument("--unpaired", type=int, default=512, help="single images per perspective")
    parser.add_argument(
        "--no_skipca",
        action="store_true",
        help="the ablation: train the alignment perspective only, without SkipCA",
    )
    parser.add_argument(
        "--split_by",
        default=None,
        choices=sorted(CAPTION_SPLITS),
        help="one caption split for every data set (default: each set's own, see DATA)",
    )
    parser.add_argument(
        "--tries",
        type=int,
        default=GATE_TRIES,
        help="starts of a stage below its held-out accuracy gate (STAGE_GATES) before the build stops",
    )
    parser.add_argument(
        "--tower",
        default="clip",
        choices=("clip", "resnet"),
        help="the backbone's vision tower: CLIP (LLaVA) or transformers' ResNet (FastVLM)",
    )
    parser.add_argument(
        "--captioner_policy_frac",
        type=float,
        default=0.0,
        help="share of each captioner batch that is the world policy's own samples, captioned "
        "by the oracle (0: renders only)",
    )
    parser.add_argument(
        "--tower_steps",
        type=int,
        default=0,
        help="first teach the vision tower the shapes of the policy's samples for this many "
        "steps (the oracle's shape probabilities as targets), then freeze it",
    )
    parser.add_argument(
        "--policy",
        default=str(ROOT / "alignment" / "world" / "weights" / "tiny-world-sd3"),
        help="the world policy whose samples the captioner sees (with --captioner_policy_frac)",
    )
    args = parser.parse_args(argv)
    if args.tries < 1:
        parser.error(f"--tries {args.tries}: use 1 or more starts.")
    if not 0.0 <= args.captioner_policy_frac <= 1.0:
        parser.error(
            f"--captioner_policy_frac {args.captioner_policy_frac}: use a share in [0, 1]."
        )
    pretrain = {}
    if args.tower != "clip":
        pretrain["backbone"] = {"tower": args.tower}
    captioner = {"policy_frac": args.captioner_policy_frac, "tower_steps": args.tower_steps}
    captioner = {k: v for k, v in captioner.items() if v}
    if captioner:
        pretrain["captioner"] = captioner
        pretrain["policy"] = args.policy
    # the ablation trains the alignment perspective only, without SkipCA
    plan = tuple(stage for stage in PLAN if stage[0] == "alignment") if args.no_skipca else PLAN
    out = train_world_reward(
        args.out,
        args.pairs,
        args.unpaired,
        plan,
        skipca=not args.no_skipca,
        split_by=args.split_by,
        tries=args.tries,
        pretrain=pretrain,
    )
    print((out / "world_report.json").read_text())


if __name__ == "__main__":
    main()
