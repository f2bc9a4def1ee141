"""Command line: ``llava-reward score --model DIR --prompt "..." a.png b.png [--perspective P] [--json]``.

Prints a table of rewards (one row per image, one column per perspective), or JSON with
``--json``. ``--perspective all`` scores every perspective the folder holds; without
``--perspective`` the folder's only perspective, else ``overall``, else an error listing them.

``llava-reward import-official SRC --backbone ID_OR_FOLDER --perspective NAME --output OUT`` turns a
released LLaVA-Reward folder (``reward_config.yaml``, ``lora/``, ``pytorch_model.bin``) into a
perspective of the project folder OUT (:func:`reward.convert.import_official`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .images import ImageInputError
from .modeling import UnknownPerspectiveError


def _table(paths: Sequence[str], scores: dict[str, list[float]]) -> str:
    cols = list(scores)
    width = max([len("image"), *(len(p) for p in paths)])
    head = f"{'image':<{width}}  " + "  ".join(f"{c:>10}" for c in cols)
    rows = [head, "-" * len(head)]
    for i, p in enumerate(paths):
        rows.append(f"{p:<{width}}  " + "  ".join(f"{scores[c][i]:>10.4f}" for c in cols))
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-reward", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="score images against one prompt")
    score.add_argument("images", nargs="+", help="image files (PNG, JPEG, WebP, ...)")
    score.add_argument("--model", required=True, help="a LLaVA-Reward folder (save_pretrained)")
    score.add_argument("--prompt", required=True, help="the caption the images were made for")
    score.add_argument(
        "--perspective",
        action="append",
        help="perspective to score (repeatable; 'all' = every one; default: the folder's only "
        "perspective, else overall)",
    )
    score.add_argument("--batch-size", type=int, default=16)
    score.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)"
    )
    score.add_argument("--dtype", default=None, help="float32, bfloat16 ... (default: bf16 on GPU)")
    score.add_argument("--json", action="store_true", help="print JSON instead of a table")
    score.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="token budget per sequence; longer captions are cut from their end "
        "(default: the saved one, else the backbone's context)",
    )
    score.add_argument(
        "--min-pixels",
        type=int,
        default=None,
        help="Qwen2/2.5/3-VL: smallest image area in pixels (default: the saved processor's)",
    )
    score.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="Qwen2/2.5/3-VL: largest image area in pixels, i.e. the visual-token budget "
        "(default: the saved processor's)",
    )
    score.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the backbone's own code from its folder/hub repo (e.g. Phi-3.5-vision)",
    )
    imp = sub.add_parser(
        "import-official",
        help="import a released LLaVA-Reward folder (smz8599/LLaVA-Reward) as a perspective",
    )
    imp.add_argument(
        "src", help="the release folder (reward_config.yaml, lora/, pytorch_model.bin)"
    )
    imp.add_argument(
        "--backbone",
        required=True,
        help="hub id or folder of the release's backbone (e.g. microsoft/Phi-3.5-vision-instruct)",
    )
    imp.add_argument("--perspective", required=True, help="name of the imported perspective")
    imp.add_argument(
        "--output", required=True, help="project reward folder (created, or extended if it exists)"
    )
    return parser


def _import_official(args: argparse.Namespace) -> int:
    from .convert import ReleaseFormatError, import_official

    try:
        out = import_official(args.src, args.backbone, args.perspective, args.output)
    except (ReleaseFormatError, FileNotFoundError, ValueError, OSError) as err:
        print(f"llava-reward: error: {err}", file=sys.stderr)
        return 2
    print(f"imported {args.src} as perspective {args.perspective!r} into {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "import-official":
        return _import_official(args)
    from .scorer import RewardScorer  # heavy imports after argument parsing

    try:
        scorer = RewardScorer.from_pretrained(
            args.model,
            device=args.device,
            dtype=args.dtype,
            trust_remote_code=True if args.trust_remote_code else None,
            max_length=args.max_length,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
        )
        wanted = args.perspective or [scorer.default_perspective]
        if "all" in wanted:
            wanted = scorer.perspectives
        scores = scorer.score_perspectives(args.prompt, args.images, wanted, args.batch_size)
    except (ImageInputError, UnknownPerspectiveError, FileNotFoundError, ValueError) as err:
        print(f"llava-reward: error: {err}", file=sys.stderr)
        return 2
    values = {p: [float(x) for x in scores[p].reshape(len(args.images), -1)[:, 0]] for p in wanted}
    if args.json:
        print(
            json.dumps(
                {
                    "prompt": args.prompt,
                    "model": args.model,
                    "scores": [
                        {"image": img, **{p: values[p][i] for p in wanted}}
                        for i, img in enumerate(args.images)
                    ],
                },
                indent=2,
            )
        )
    else:
        print(f"prompt: {args.prompt}")
        print(_table(args.images, values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
