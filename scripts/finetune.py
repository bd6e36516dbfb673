"""Train a tile classifier on H&E tissue tiles with Trainer + Accelerate: a ViT from scratch, or fine-tuned (fully,
its last N blocks, or a linear probe) from a ViT, DINOv2 (with or without registers) or timm checkpoint.

Examples::

    # a linear probe of a timm pathology backbone (gated: HF_TOKEN), see README section 9
    python scripts/finetune.py --config scripts/recipes/probe_uni.yaml --dataset_dir data/kather6 --output_dir OUT

    # the default recipe (scripts/recipes/scratch_cpu.yaml) on the default dataset source
    python scripts/finetune.py

    # from-scratch CPU recipe on a prepared dataset, two CPU processes (the torchrun-based launcher;
    # `accelerate launch --cpu --num_processes 2` would start only one)
    accelerate launch --multi_gpu --num_processes 2 scripts/finetune.py --use_cpu true \
        --config scripts/recipes/scratch_cpu.yaml --dataset_dir data/kather2016 --output_dir outputs/scratch

    # a Hub dataset: give the tiles' resolution (micrometres per pixel) for config.json
    python scripts/finetune.py --dataset_name user/kather6 --mpp 0.495 --output_dir outputs/hub-data

    # GPU fine-tuning of google/vit-base-patch16-224 at 160 px, multi-GPU bf16
    accelerate launch --config_file accelerate_config.yaml scripts/finetune.py \
        --config scripts/recipes/finetune_vit_base.yaml --dataset_dir data/kather2016 --output_dir outputs/vit-base

Every TrainingArguments flag works too (--max_steps, --num_train_epochs, --report_to, ...);
flags override the recipe. Run ``python scripts/finetune.py --help`` for all flags.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from hf_tissue_vit.cli import run_main
from hf_tissue_vit.hub import HubAuthError

DEFAULT_RECIPE = Path(__file__).resolve().parent / "recipes" / "scratch_cpu.yaml"
SUMMARY_KEYS = (
    "train_runtime", "train_samples_per_second", "eval_accuracy", "eval_macro_f1", "test_accuracy",
    "test_accuracy_ci95", "test_macro_f1", "test_macro_f1_ci95", "test_accuracy_tta", "test_macro_f1_tta",
)  # fmt: skip


def _run(argv: list[str] | None) -> int:
    from hf_tissue_vit.training import parse_args, run_finetune

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, training_args = parse_args(argv, default_config=str(DEFAULT_RECIPE))
    results = run_finetune(model_args, data_args, training_args)
    if training_args.process_index == 0:
        summary = {k: results[k] for k in SUMMARY_KEYS if k in results}
        print(json.dumps(summary, indent=2))
        print(f"outputs in {training_args.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train, evaluate and write the output dir; 2 on bad input."""
    # A refused push comes after training; the outputs are on disk and the message says how to retry.
    return run_main(_run, argv, exit_codes={HubAuthError: 1})


if __name__ == "__main__":
    sys.exit(main())
