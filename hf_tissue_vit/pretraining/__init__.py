"""Self-supervised pretraining of a ViT on unlabelled tiles: transformers' ``ViTMAEForPreTraining`` (a masked
autoencoder) trained with ``Trainer`` on the train split of a dataset and/or folders of images.

Modules: :mod:`.arguments` (dataclasses, YAML recipes through training's loader), :mod:`.data` (unlabelled tiles,
decoded once and cached; the batched augmentation), :mod:`.run` (:func:`run_pretrain`). The output fine-tunes with
``finetune.py --model_name_or_path OUTPUT_DIR`` into a plain ``ViTForImageClassification``.
"""

from ..modelfolder import PRETRAINING_FILE
from .arguments import (
    ARG_CLASSES,
    MAEModelArguments,
    PretrainingArguments,
    UnlabelledDataArguments,
    parse_pretrain_args,
)
from .data import PixelCollator, UnlabelledTiles, folder_tiles, load_unlabelled_tiles, unlabelled_dataset
from .run import PretrainPlan, build_mae, run_pretrain, validate_pretraining

__all__ = [
    "ARG_CLASSES", "PRETRAINING_FILE", "MAEModelArguments", "PixelCollator", "PretrainPlan", "PretrainingArguments",
    "UnlabelledDataArguments", "UnlabelledTiles", "build_mae", "folder_tiles", "load_unlabelled_tiles",
    "parse_pretrain_args", "run_pretrain", "unlabelled_dataset", "validate_pretraining",
]  # fmt: skip
