"""Score a trained tile classifier on labelled tiles: accuracy, balanced accuracy, macro-F1 (95% bootstrap
intervals), per class, a confusion matrix and per-image predictions; optionally added to the model's card.

    python scripts/evaluate_model.py --model outputs/vit-scratch-cpu --inputs CRC-VAL-HE-7K/ --output_dir eval_7k \
        --label_map '{"STR": "Stroma", "MUC": null, "MUS": null}' [--tta] [--batch_size 128] \
        [--update_card --eval_name CRC-VAL-HE-7K]
    python scripts/evaluate_model.py --model outputs/vit-scratch-cpu --dataset_dir data/kather2016 --split test \
        --output_dir eval_test
    HF_TOKEN=hf_xxx python scripts/evaluate_model.py --model USER/MODEL --dataset_name USER/DATASET --split test \
        --output_dir eval_hub --update_card --push

Exactly one of --inputs (a folder with one sub-folder per class, at any depth below it: Kather's
01_TUMOR ..., NCT-CRC-HE's TUM, STR, ..., an imagefolder), --dataset_dir or --dataset_name. Class folders
are matched to the model's classes by name and known aliases (see hf_tissue_vit/evaluation/labels.py);
a class that matches nothing, or could be several model classes (NCT's STR, MUS, MUC), must be mapped or
dropped (null) with --label_map. Classes of a known tissue the model lacks (e.g. ADI, BACK for the six
Kather classes) are left out and counted. Unreadable images are listed and not scored.
Writes eval_results.json, eval_predictions.csv and eval_confusion_matrix.png into --output_dir and prints
a Markdown summary. --update_card adds the result to the model folder's card (push it with
push_to_hub.py); for a Hub model the card's files are downloaded into OUTPUT_DIR/model_card and --push
uploads the change (a pull request when you do not own the repo). Exit status 2 on bad input.
Many GPUs: `accelerate launch [--num_processes N] scripts/evaluate.py ...` (add --device cpu for CPU
processes): each process classifies a contiguous shard of the images on its own device; the metrics
are computed over all of them together and the files are those of a one-process run.
"""

from __future__ import annotations

import sys

from hf_tissue_vit.cli import argument_parser, run_main
from hf_tissue_vit.distributed import is_main_rank
from hf_tissue_vit.evaluation import EvaluationArguments, markdown_summary, run_evaluation
from hf_tissue_vit.hub import HubAuthError


def _run(argv: list[str] | None) -> int:
    (args,) = argument_parser(EvaluationArguments).parse_args_into_dataclasses(args=argv)
    outcome = run_evaluation(args)
    if not is_main_rank():  # under accelerate launch the main process reports
        return 0
    print(markdown_summary(outcome.results))
    print()
    print(f"wrote {', '.join(str(p) for p in outcome.files.values())}")
    if outcome.card is not None:
        print(f"updated the model card {outcome.card}")
    if outcome.pushed:
        print(f"pushed the card: {outcome.pushed}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Evaluate; 2 on bad input, 1 when the Hub refuses the token."""
    return run_main(_run, argv, exit_codes={HubAuthError: 1})


if __name__ == "__main__":
    sys.exit(main())
