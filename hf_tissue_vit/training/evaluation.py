"""The test split, evaluated once after training: plain and (``--tta``) dihedral-TTA predictions,
scored by :mod:`hf_tissue_vit.metrics`, with bootstrap confidence intervals."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .tiles import TileDataset
from .trainer import TissueTrainer


@dataclass(frozen=True)
class TestPredictions:
    """Per-tile test predictions, for ``test_predictions.csv``."""

    filenames: list[str]
    labels: np.ndarray  # true class ids
    probs: np.ndarray  # [N, classes] softmax probabilities


def _predict(trainer: TissueTrainer, tiles: TileDataset, tta: bool, prefix: str) -> tuple[np.ndarray, np.ndarray, Any]:
    """True labels, probabilities and loss of ``tiles``, gathered from every process."""
    trainer.tta = tta
    try:
        prediction = trainer.predict(tiles, metric_key_prefix=prefix)
    finally:
        trainer.tta = False
    logits = np.asarray(prediction.predictions, dtype=np.float64)
    if len(logits) != len(tiles):
        raise RuntimeError(f"test predictions {len(logits)} != test samples {len(tiles)}")
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return np.asarray(prediction.label_ids), probs, prediction.metrics.get(f"{prefix}_loss")


def _filenames(split: Any) -> list[str]:
    return list(split["filename"]) if "filename" in split.column_names else [str(i) for i in range(len(split))]


def evaluate_test(
    trainer: TissueTrainer,
    split: Any,
    tiles: TileDataset,
    label_names: Sequence[str],
    *,
    tta: bool = False,
    n_bootstrap: int = 0,
    seed: int | None = None,
) -> tuple[dict[str, Any], TestPredictions]:
    """``test_*`` results of the ``datasets`` test ``split`` (decoded as ``tiles``) and its predictions."""
    from .. import metrics

    labels, probs, loss = _predict(trainer, tiles, False, "test")
    predicted = probs.argmax(axis=1)
    report = metrics.classification_report(labels, predicted, label_names)
    out: dict[str, Any] = {
        "test_accuracy": float(report["accuracy"]),
        "test_macro_f1": float(report["macro_f1"]),
        "test_loss": loss,
        "test_samples": len(labels),
    }
    if n_bootstrap:
        for metric in ("accuracy", "macro_f1"):
            low, high = metrics.bootstrap_ci(labels, predicted, metric=metric, n_boot=n_bootstrap,
                                             seed=metrics.BOOTSTRAP_SEED if seed is None else seed)
            out[f"test_{metric}_ci95"] = [float(low), float(high)]
    out["test_per_class"] = report["per_class"]
    out["test_confusion_matrix"] = np.asarray(report["confusion_matrix"]).tolist()
    if tta:
        tta_labels, tta_probs, _ = _predict(trainer, tiles, True, "test_tta")
        tta_report = metrics.classification_report(tta_labels, tta_probs.argmax(axis=1), label_names)
        out["test_accuracy_tta"] = float(tta_report["accuracy"])
        out["test_macro_f1_tta"] = float(tta_report["macro_f1"])
    return out, TestPredictions(_filenames(split), labels, probs)
