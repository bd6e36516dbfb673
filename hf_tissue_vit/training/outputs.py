"""What a finished run writes beside the model: all_results.json (its description and metrics), the
test predictions CSV, figures, the model card, and the optional push to the Hub."""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_write, atomic_write_json
from ..hardware import hardware_info, resolve_device_augmentation, versions
from ..modelfolder import RESULTS_FILE
from ..predict.table import probability_columns
from .evaluation import TestPredictions
from .rundir import SIGNATURE_TRAINING_FIELDS, plain_values
from .trainer import TissueTrainer

logger = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("filename", "label", "prediction")  # then one probability column per class
# copied from the dataset folder's metadata
_METADATA_KEYS = ("source", "split_by", "seed", "hub_dataset_id", "made_splits", "preset", "citation")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to ``path`` atomically; numpy scalars/arrays and enums are converted."""
    atomic_write_json(path, data, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "value"):  # enums
        return value.value
    return str(value)


def write_predictions_csv(
    path: str | os.PathLike, filenames: list[str], labels: np.ndarray, probs: np.ndarray, label_names: list[str]
) -> None:
    """``filename,label,prediction,<prob per class>`` (names, not ids), written atomically."""
    with atomic_write(path, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*PREDICTION_COLUMNS, *probability_columns(label_names, PREDICTION_COLUMNS)])
        for name, label, row in zip(filenames, labels, probs):
            writer.writerow([name, label_names[int(label)], label_names[int(row.argmax())], *(f"{p:.6f}" for p in row)])


def dataset_info(
    dataset_dir: str | None, dataset_name: str | None, splits: Mapping[str, int], metadata: Mapping[str, Any],
    mpp: float | None,
) -> dict[str, Any]:
    """The ``dataset`` section of all_results.json (``splits``: tiles per split, read by the model card)."""
    info: dict[str, Any] = {"dataset_dir": dataset_dir, "dataset_name": dataset_name, "splits": dict(splits)}
    info.update({key: metadata[key] for key in _METADATA_KEYS if metadata.get(key) is not None})
    info["mpp"] = mpp
    tile_size = (metadata.get("checks") or {}).get("tile_size")
    if tile_size:
        info["tile_size"] = tile_size
    return info


def run_description(
    model_args: Any, data_args: Any, training_args: Any, *, model: Any, attn_implementation: str,
    label_names: Sequence[str], dataset: dict[str, Any],
) -> dict[str, Any]:
    """Labels, seed, hardware, versions, hyperparameters, dataset and model of a run, for all_results.json."""
    hyperparameters = plain_values(training_args, SIGNATURE_TRAINING_FIELDS + (
        "per_device_eval_batch_size", "bf16", "tta", "early_stopping_patience"))  # fmt: skip
    hyperparameters["total_train_batch_size"] = (
        training_args.per_device_train_batch_size * training_args.world_size * training_args.gradient_accumulation_steps
    )
    hyperparameters["augmentation"] = dataclasses.asdict(data_args.augmentation())
    hyperparameters["device_augmentation"] = resolve_device_augmentation(data_args.device_augmentation,
                                                                          training_args.device)
    hyperparameters["patch_keep"] = model_args.patch_keep
    config = model.config
    architecture = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size")  # fmt: skip
    return {
        "label_names": list(label_names),
        "seed": training_args.seed,
        "hardware": hardware_info(training_args),
        "versions": versions(),
        "hyperparameters": hyperparameters,
        "dataset": dataset,
        "model": {
            "from_scratch": model_args.from_scratch,
            "base_model": None if model_args.from_scratch else model_args.model_name_or_path,
            "preset": model_args.model_preset if model_args.from_scratch else None,
            "architecture": type(model).__name__,
            **{name: getattr(config, name, None) for name in architecture},  # a timm config has none but the size
            "num_parameters": model.num_parameters(),
            "attn_implementation": attn_implementation,
            "patch_keep": model_args.patch_keep,
        },
        "recipe": data_args.config,
    }


def _figure(path: Path, draw: Any, *args: Any, **kwargs: Any) -> None:
    """Call a metrics.plot_* function (it writes atomically); a failed figure must not cost the model."""
    try:
        draw(*args, str(path), **kwargs)
    except Exception as err:
        logger.warning("could not write %s: %s", path, err)


def write_outputs(
    trainer: TissueTrainer, results: dict[str, Any], predictions: TestPredictions | None, push: bool
) -> None:
    """Predictions CSV, figures, all_results.json, card, then the completion marker (the folder is a
    finished run from then on: :func:`hf_tissue_vit.modelfolder.mark_run_complete`), then the push."""
    from .. import metrics
    from ..cards.build import write_model_card
    from ..modelfolder import mark_run_complete

    out = Path(trainer.args.output_dir)
    label_names = results["label_names"]
    if predictions is not None:
        write_predictions_csv(
            out / "test_predictions.csv", predictions.filenames, predictions.labels, predictions.probs, label_names
        )
        _figure(out / "confusion_matrix.png", metrics.plot_confusion_matrix, results["test_confusion_matrix"],
                label_names)  # fmt: skip
    metric = trainer.args.metric_for_best_model or "macro_f1"
    _figure(out / "training_curves.png", metrics.plot_training_curves, trainer.state.log_history,
            metric=metric if metric.startswith("eval_") else f"eval_{metric}")  # fmt: skip
    write_json_atomic(out / RESULTS_FILE, results)
    write_model_card(out)
    mark_run_complete(out)
    if push:
        from .. import hub

        hub.push_output_dir(
            str(out),
            trainer.args.hub_model_id,  # checked to be USER/NAME when the arguments were parsed
            private=bool(trainer.args.hub_private_repo),
            revision=trainer.args.hub_revision,
        )
