"""Evaluate a LLaVA-Reward folder on preference data (YAML config and/or command line).

    python recipes/eval_reward.py --model_dir outputs/reward_tiny \
        --data_file outputs/reward_tiny/toy_data/alignment_eval.jsonl --perspective alignment

Data files may be in any format that reward.data reads (generic pair / single-image manifests,
ImageReward rankings, Pick-a-Pic parquet, MJ-Bench, GenAI-Bench, the official LLaVA-Reward files),
detected per file; annotator ties are kept (pairwise accuracy is reported with and without them,
per category when the data has categories; unpaired data gets accuracy / precision / recall / F1).
Each file is scored under the perspective it is for: ``--perspective NAME`` (or ``all``), else the
records' ``perspective`` field, the folder's only perspective, or the one perspective of the data's
kind (safety for single images); an ambiguous case is an error that lists the perspectives. Reports
go to ``OUTPUT_DIR/eval_report_<perspective>.json`` (key ``accuracy``) and ``.md`` (default
OUTPUT_DIR: MODEL_DIR/eval); bad records are skipped into ``OUTPUT_DIR/skipped_eval.jsonl``
(``--on_error raise`` stops at the first). See reward.evaluate.EvalScriptArguments for every option.
"""

from __future__ import annotations

import json

from alignment.recipe_utils import parse_recipe_args
from reward.evaluate import EvalScriptArguments, evaluate_reward_folder


def main(argv: list[str] | None = None) -> dict:
    (script,) = parse_recipe_args(EvalScriptArguments, argv)
    results = evaluate_reward_folder(script)
    for name, metrics in results.items():
        files = ", ".join(metrics["data_files"])
        print(
            f"{name}: accuracy {metrics['accuracy']:.4f} on {metrics['n_examples']} examples ({files})"
        )
    print(json.dumps({n: m["accuracy"] for n, m in results.items()}))
    return results


if __name__ == "__main__":
    main()
