"""Training ViTs on tissue tiles with ``transformers.Trainer`` (works under ``accelerate launch``).

Modules, in the order a run uses them:

- :mod:`.arguments`: ``ModelArguments``, ``DataArguments``, ``TissueTrainingArguments``, YAML recipes,
  :func:`parse_args`.
- :mod:`.rundir`: the run signature that owns an output dir, resume from the last complete checkpoint,
  a finished run left as it is, a restarted run's old final files removed.
- :mod:`.progress`: runtime and loss of the whole run across resumes (a record in every checkpoint).
- :mod:`.tiles`: tiles decoded once into uint8 tensors (cached), :class:`TileDataset`,
  :class:`TileCollator` (batched augmentation in the DataLoader workers).
- :mod:`.ema`, :mod:`.trainer`: the weight average and :class:`TissueTrainer`.
- :mod:`.evaluation`: the test split, evaluated once (bootstrap CIs, optional dihedral TTA).
- :mod:`.outputs`: all_results.json, predictions CSV, figures, card, push.
- :mod:`.run`: :func:`run_finetune`, the phases of a run.
- :mod:`.recipe`: YAML recipes (``--config``) as flag defaults.
- :mod:`.teacher`, :mod:`.guidance`, :mod:`.initialisation`: a CNN teacher's stored maps guiding the ViT, and the
  structured initialisations of a from-scratch ViT (training only).
- :mod:`.backbone`, :mod:`.probe`: freezing the backbone or its position embeddings, the pretraining record of a
  ``scripts/pretrain.py`` checkpoint, and the ``--freeze_backbone`` linear probe on cached features.
"""

from .arguments import (
    ARG_CLASSES,
    DataArguments,
    ModelArguments,
    TissueTrainingArguments,
    parse_args,
)
from .ema import EMA_FILE, EMACallback, WeightEMA
from .evaluation import TestPredictions, evaluate_test
from .outputs import (
    PREDICTION_COLUMNS,
    RESULTS_FILE,
    write_json_atomic,
    write_predictions_csv,
)
from .progress import PROGRESS_FILE, TrainingProgress
from .recipe import load_recipe
from .run import (
    NO_DOWNLOAD_HINT,
    RunPlan,
    TrainingData,
    default_dataset_dir,
    load_dataset_for_training,
    load_training_data,
    run_finetune,
    validate_run,
)
from .rundir import (
    RUN_FILE,
    RUN_OUTPUT_FILES,
    check_output_dir,
    claim_output_dir,
    finished_run,
    last_complete_checkpoint,
    remove_run_outputs,
    run_signature,
)
from .tiles import (
    DECODE_CACHE_VERSION,
    EpochCallback,
    TileCollator,
    TileDataset,
    decode_tiles,
    default_decode_cache_dir,
    tile_dataset,
)
from .trainer import TissueTrainer, make_compute_metrics

__all__ = [
    "ARG_CLASSES", "DECODE_CACHE_VERSION", "EMA_FILE", "NO_DOWNLOAD_HINT", "PREDICTION_COLUMNS", "PROGRESS_FILE",
    "RESULTS_FILE", "RUN_FILE", "RUN_OUTPUT_FILES", "TrainingProgress", "finished_run", "remove_run_outputs",
    "DataArguments", "EMACallback", "EpochCallback", "ModelArguments", "RunPlan", "TestPredictions",
    "TileCollator", "TileDataset", "TissueTrainer", "TissueTrainingArguments", "TrainingData", "WeightEMA",
    "check_output_dir", "claim_output_dir", "decode_tiles", "default_dataset_dir", "default_decode_cache_dir",
    "evaluate_test", "last_complete_checkpoint", "load_dataset_for_training", "load_recipe", "load_training_data",
    "make_compute_metrics", "parse_args", "run_finetune", "run_signature", "tile_dataset", "validate_run",
    "write_json_atomic", "write_predictions_csv",
]  # fmt: skip

# The checkpoint's backbone: freezing, pretraining record, linear probe on cached features.
from .backbone import PRETRAINING_FILE, backbone_description, freeze_model_parts, read_pretraining_record
from .probe import FeatureDataset, compute_features, linear_probe, probe_features

__all__ += [
    "PRETRAINING_FILE", "FeatureDataset", "backbone_description", "compute_features", "freeze_model_parts",
    "linear_probe", "probe_features", "read_pretraining_record",
]  # fmt: skip
