"""Throughput of `RewardScorer.score()` and the hidden-state reward vs a generative judge.

    python bench/score.py                 # tiny CPU config (runs anywhere, seconds)
    python bench/score.py --gpu           # Phi-3.5-vision-shaped random model, bf16, batch 16
    python bench/score.py --gpu --compile # the same with torch.compile on the backbone

The judge is the same backbone (with its LM head) writing 128 tokens with `generate()`; the
ratio is judge time / reward time for the same batch. Perspectives: four LoRA perspectives scored
by adapter switching vs one peft mixed-adapter batch. Figures go to bench/results/score_*.json
and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_name, timed, write_results  # noqa: E402

from reward import LlavaRewardModel, RewardScorer  # noqa: E402
from reward.testing import LLAVA_CHAT_TEMPLATE, phi35_vision_shaped_llava  # noqa: E402


def build_backbone(gpu: bool):
    """A random LLaVA-wired backbone: Phi-3.5-vision-shaped bf16 on CUDA, small fp32 on CPU."""
    if gpu:
        return phi35_vision_shaped_llava(device="cuda", dtype=torch.bfloat16)
    return phi35_vision_shaped_llava(tiny=True, tiny_image_size=112)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="Phi-3.5-vision-shaped model on CUDA")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=None, help="images per score() call")
    parser.add_argument("--gen-tokens", type=int, default=128)
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device")
    torch.manual_seed(0)
    n = args.images or (4 * args.batch_size if args.gpu else 2 * args.batch_size)
    full, tok, ip = build_backbone(args.gpu)
    words = [
        "a",
        "photo",
        "of",
        "a",
        "red",
        "circle",
        "on",
        "the",
        "left",
        "of",
        "a",
        "big",
        "blue",
        "square",
        "at",
        "night",
    ]
    prompts = [" ".join(words[: 6 + i % 8]) * (4 if args.gpu else 1) for i in range(n)]
    images = [Image.new("RGB", (512, 512), (i * 7 % 255, 90, 160)) for i in range(n)]

    with tempfile.TemporaryDirectory() as tmp:
        from transformers import LlavaProcessor

        proc = LlavaProcessor(image_processor=ip, tokenizer=tok, chat_template=LLAVA_CHAT_TEMPLATE)
        lora = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}
        model = LlavaRewardModel.from_backbone(
            full, processor=proc, perspectives=("overall",), lora_config=lora
        )
        model.save_pretrained(Path(tmp) / "rm")
        scorer = RewardScorer(model, dtype=torch.bfloat16 if args.gpu else torch.float32)
        if args.compile:
            scorer.model.backbone.get_base_model().forward = torch.compile(
                scorer.model.backbone.get_base_model().forward
            )
        res: dict = {
            "device": device_name(),
            "batch_size": args.batch_size,
            "images": n,
            "compile": args.compile,
        }
        inputs = scorer._inputs_to_device(
            scorer.processor(prompts[: args.batch_size], images[: args.batch_size])
        )
        res["tokens_per_sequence"] = int(inputs["input_ids"].shape[1])

        def forward_only():
            with torch.inference_mode():
                scorer.model(**inputs, perspective="overall")

        t_fwd = timed(forward_only, warmup=2, reps=5)
        res["reward_forward_ms"] = round(t_fwd * 1e3, 1)
        res["reward_forward_images_per_s"] = round(args.batch_size / t_fwd, 1)
        t_score = timed(lambda: scorer.score(prompts, images, batch_size=args.batch_size), 1, 3)
        res["score_images_per_s"] = round(n / t_score, 1)
        if torch.cuda.is_available():
            res["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)

        # the same backbone as a generative judge writing gen_tokens tokens
        full.model = scorer.model._base  # share weights (adapters disabled below)
        judge_inputs = {k: v for k, v in inputs.items()}

        def judge():
            with torch.inference_mode(), scorer.model.backbone.disable_adapter():
                full.generate(
                    **judge_inputs,
                    max_new_tokens=args.gen_tokens,
                    min_new_tokens=args.gen_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )

        t_judge = timed(judge, warmup=1, reps=1 if args.gpu else 2)
        res[f"judge_{args.gen_tokens}tok_s"] = round(t_judge, 3)
        res["judge_over_reward_time_ratio"] = round(t_judge / t_fwd, 1)

        # four perspectives: adapter switching vs one mixed-adapter batch
        multi = LlavaRewardModel.from_backbone(
            build_backbone(args.gpu)[0],
            processor=proc,
            perspectives=("alignment", "fidelity", "safety", "overall"),
            lora_config=lora,
            train_projector=False,
        )
        mscorer = RewardScorer(multi, dtype=scorer.dtype)
        names = multi.perspectives
        for mixed in (False, True):
            mscorer.mixed_adapters = mixed
            t = timed(
                lambda: mscorer.score_perspectives(prompts, images, names, args.batch_size), 1, 3
            )
            res[f"four_perspectives_{'mixed' if mixed else 'switch'}_images_per_s"] = round(
                n / t, 1
            )

    name = "score_gpu" + ("_compile" if args.compile else "") if args.gpu else "score_cpu"
    rows = "\n".join(f"| {k} | {v} |" for k, v in res.items())
    md = (
        f"### Reward scoring ({'GPU, Phi-3.5-vision-shaped' if args.gpu else 'tiny CPU config'}"
        f"{', compiled' if args.compile else ''})\n\n`python bench/score.py{' --gpu' if args.gpu else ''}"
        f"{' --compile' if args.compile else ''}` on {res['device']}:\n\n| figure | value |\n|---|---|\n{rows}"
    )
    write_results(name, res, md)
    print(md)


if __name__ == "__main__":
    main()
