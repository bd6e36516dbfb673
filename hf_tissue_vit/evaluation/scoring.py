"""Scores of a streamed evaluation: the package's one metric implementation (:mod:`hf_tissue_vit.metrics`)
over the true and predicted model classes, with percentile bootstrap 95% intervals.

Only the class ids of the scored images are kept (two integers per image and predictor), so memory
stays small whatever the number of images; probabilities go to the CSV as they come.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import metrics
from .sources import ScoredRow

HEADLINE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
MAX_LISTED_SKIPPED = 100  # eval_results.json lists this many unreadable files; the CSV lists them all


def score(y_true: Sequence[int], y_pred: Sequence[int], label_names: Sequence[str], n_bootstrap: int = 1000,
          seed: int = 0) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1 (each with ``<name>_ci95`` when ``n_bootstrap``), per-class
    precision/recall/F1/support and the confusion matrix (rows = true class)."""
    report = metrics.classification_report(y_true, y_pred, label_names)
    result: dict[str, Any] = {}
    for name in HEADLINE_METRICS:
        result[name] = float(report[name])
        if n_bootstrap:
            low, high = metrics.bootstrap_ci(y_true, y_pred, metric=name, n_boot=n_bootstrap, seed=seed)
            result[f"{name}_ci95"] = [low, high]
    result["per_class"] = report["per_class"]
    result["confusion_matrix"] = [list(map(int, row)) for row in report["confusion_matrix"]]
    return result


def classes_in_play(results: dict[str, Any], suffix: str = "") -> dict[str, dict[str, Any]]:
    """The per-class rows of the classes that occur in the data or in the predictions (a class with
    neither has no precision or recall to show)."""
    confusion = np.asarray(results[f"confusion_matrix{suffix}"])
    active = (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0
    return {name: row for (name, row), on in zip(results[f"per_class{suffix}"].items(), active) if on}


class ScoreCollector:
    """Collects the streamed rows: true class, the prediction of each predictor, unreadable files."""

    def __init__(self, n_predictors: int) -> None:
        self.y_true: list[int] = []
        self.y_pred: list[list[int]] = [[] for _ in range(n_predictors)]
        self.skipped: list[dict[str, str]] = []
        self.n_skipped = 0

    @classmethod
    def merged(cls, parts: Sequence[ScoreCollector]) -> ScoreCollector:
        """One collector of the rows of ``parts`` (one per process, in input order)."""
        out = cls(len(parts[0].y_pred))
        for part in parts:
            out.y_true += part.y_true
            for predictions, more in zip(out.y_pred, part.y_pred, strict=True):
                predictions += more
            out.skipped += part.skipped[: MAX_LISTED_SKIPPED - len(out.skipped)]
            out.n_skipped += part.n_skipped
        return out

    @property
    def n_scored(self) -> int:
        """Images with a prediction."""
        return len(self.y_true)

    def add(self, row: ScoredRow) -> None:
        """Count one row: scored when every predictor classified it, else skipped (unreadable)."""
        if row.error or any(p is None for p in row.probs):
            self.n_skipped += 1
            if len(self.skipped) < MAX_LISTED_SKIPPED:
                self.skipped.append({"file": row.file, "error": row.error or "unreadable"})
            return
        self.y_true.append(int(row.label))
        for predictions, probs in zip(self.y_pred, row.probs):
            predictions.append(int(np.argmax(probs)))

    def results(self, label_names: Sequence[str], n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
        """Scores of the plain predictions, then the same names with ``_tta`` for a second predictor."""
        if not self.n_scored:
            raise ValueError(f"no image could be scored: all {self.n_skipped} images are unreadable "
                             f"(e.g. {self.skipped[0]['file']}: {self.skipped[0]['error']})" if self.skipped
                             else "no image to score")
        out: dict[str, Any] = {}
        for i, predictions in enumerate(self.y_pred):
            suffix = "_tta" if i else ""
            scores = score(self.y_true, predictions, label_names, n_bootstrap, seed)
            out.update({f"{key}{suffix}": value for key, value in scores.items()})
        out.update(n_scored=self.n_scored, n_skipped=self.n_skipped, skipped=self.skipped)
        return out
