"""Self-supervised pretraining of a ViT on unlabelled tiles (a masked autoencoder, transformers'
``ViTMAEForPreTraining``), with Trainer + Accelerate; the output fine-tunes with finetune.py.

Examples::

    # the CPU recipe on the train split of a prepared dataset (labels ignored; validation and test never read),
    # then fine-tuning its encoder with the recipe made for it
    python scripts/pretrain.py --config scripts/recipes/pretrain_mae_cpu.yaml --dataset_dir data/kather6 \
        --output_dir outputs/vit-mae-cpu
    python scripts/finetune.py --config scripts/recipes/finetune_mae_cpu.yaml --dataset_dir data/kather6 \
        --model_name_or_path outputs/vit-mae-cpu --output_dir outputs/vit-mae-finetuned

    # more unlabelled tiles from folders of images (with or without --dataset_dir), two CPU processes
    accelerate launch --config_file accelerate_config.yaml --num_processes 2 scripts/pretrain.py --use_cpu true \
        --config scripts/recipes/pretrain_mae_cpu.yaml --dataset_dir data/kather6 --inputs /data/unlabelled_tiles

An interrupted run (even by SIGKILL) resumes from its last complete checkpoint when started again with the
same flags. Every TrainingArguments flag works too; flags override the recipe. ``--help`` lists all flags.
"""

from __future__ import annotations

import json
import logging
import sys

from hf_tissue_vit.cli import run_main

SUMMARY_KEYS = ("epochs", "steps", "mask_ratio", "norm_pix_loss", "train_loss", "train_runtime")


def _run(argv: list[str] | None) -> int:
    from hf_tissue_vit.pretraining import parse_pretrain_args, run_pretrain

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, training_args = parse_pretrain_args(argv)
    record = run_pretrain(model_args, data_args, training_args)
    if training_args.process_index == 0:
        print(json.dumps({"tiles": record["data"]["tiles"], **{k: record[k] for k in SUMMARY_KEYS}}, indent=2))
        print(f"pretrained model written to {training_args.output_dir}; fine-tune it with "
              f"scripts/finetune.py --model_name_or_path {training_args.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, pretrain and write the output dir; 2 on bad input."""
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
