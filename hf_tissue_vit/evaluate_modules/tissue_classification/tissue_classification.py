"""Tissue classification metric: accuracy, macro-F1, per-class precision/recall/F1/support, confusion matrix.

A local `evaluate` module (numpy only, works offline)::

    import evaluate
    metric = evaluate.load("hf_tissue_vit/evaluate_modules/tissue_classification", num_classes=6)
    metric.compute(predictions=[0, 1, 1], references=[0, 1, 2])

It is self-contained on purpose: `evaluate.load` copies this file into its modules cache, so it must
not import the hf_tissue_vit package.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Single-label multi-class classification metrics for tissue tiles. Returns accuracy, macro-averaged
F1, per-class precision, recall, F1 and support (lists indexed by class id) and the confusion
matrix (rows = true class, columns = predicted class). A class with no predictions has precision 0,
one with no true samples has recall 0 (scikit-learn's zero_division=0). Macro-F1 averages over the
classes that occur in the references or the predictions, like scikit-learn's default; classes that
occur in neither (possible in a small batch) are still reported, with zeros, when `num_classes` or
`label_names` is given.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): true class ids.
    num_classes (`int`, optional): number of classes; overrides the value given to `evaluate.load`.
    label_names (`list` of `str`, optional): class names; also fixes the number of classes.
Returns:
    accuracy (`float`), balanced_accuracy (`float`, mean recall of the classes present in the references),
    macro_f1 (`float`), precision, recall, f1 (`list` of `float`),
    support (`list` of `int`), confusion_matrix (`list` of `list` of `int`), label_names (`list` of `str`).
Examples:
    >>> metric = evaluate.load("path/to/tissue_classification", num_classes=3)
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 2])["accuracy"]
    0.6666666666666666
"""

_CITATION = """
@article{kather2016multi,
  title={Multi-class texture analysis in colorectal cancer histology},
  author={Kather, Jakob Nikolas and Weis, Cleo-Aron and Bianconi, Francesco and Melchers, Susanne M and
          Schad, Lothar R and Gaiser, Timo and Marx, Alexander and Z{\\"o}llner, Frank Gerrit},
  journal={Scientific Reports}, volume={6}, pages={27988}, year={2016}
}
"""


def scores_from_confusion(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1 and per-class scores from confusion matrices [..., K, K] (rows = true)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diagonal(confusion, axis1=-2, axis2=-1)
    support = confusion.sum(axis=-1)
    predicted = confusion.sum(axis=-2)
    total = support.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_positive / predicted, 0.0)
        recall = np.where(support > 0, true_positive / support, 0.0)
        denominator = precision + recall
        f1 = np.where(denominator > 0, 2 * precision * recall / denominator, 0.0)
        present = (support + predicted) > 0
        n_present = present.sum(axis=-1)
        macro_f1 = np.where(n_present > 0, (f1 * present).sum(axis=-1) / n_present, 0.0)
        accuracy = np.where(total > 0, true_positive.sum(axis=-1) / total, 0.0)
        # mean recall over the classes that occur in the references (scikit-learn's balanced_accuracy_score)
        occurring = support > 0
        balanced = np.where(occurring.sum(axis=-1) > 0, (recall * occurring).sum(axis=-1)
                            / np.maximum(occurring.sum(axis=-1), 1), 0.0)
    return {
        "accuracy": accuracy,
        "balanced_accuracy": balanced,
        "macro_f1": macro_f1,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support,
    }


def confusion_matrix(references: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, K] int64 counts, rows = true class, columns = predicted class."""
    codes = np.asarray(references, dtype=np.int64) * num_classes + np.asarray(predictions, dtype=np.int64)
    return np.bincount(codes, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TissueClassification(evaluate.Metric):
    """Accuracy, macro-F1, per-class precision/recall/F1/support and confusion matrix."""

    def __init__(self, num_classes: int | None = None, label_names: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.label_names = list(label_names) if label_names is not None else None

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://doi.org/10.1038/srep27988"],
        )

    def _compute(self, predictions, references, num_classes: int | None = None, label_names=None):
        predictions = np.asarray(predictions, dtype=np.int64).reshape(-1)
        references = np.asarray(references, dtype=np.int64).reshape(-1)
        label_names = list(label_names) if label_names is not None else self.label_names
        num_classes = num_classes if num_classes is not None else self.num_classes
        if label_names is not None:
            if num_classes is not None and num_classes != len(label_names):
                raise ValueError(f"num_classes={num_classes} but {len(label_names)} label_names were given")
            num_classes = len(label_names)
        if predictions.size and min(predictions.min(), references.min()) < 0:
            raise ValueError("class ids must be non-negative")
        observed = int(max(predictions.max(initial=-1), references.max(initial=-1))) + 1
        if num_classes is None:
            num_classes = max(observed, 1)
        elif observed > num_classes:
            raise ValueError(f"class id {observed - 1} is out of range for num_classes={num_classes}")
        if label_names is None:
            label_names = [str(i) for i in range(num_classes)]
        confusion = confusion_matrix(references, predictions, num_classes)
        scores = scores_from_confusion(confusion)
        return {
            "accuracy": float(scores["accuracy"]),
            "balanced_accuracy": float(scores["balanced_accuracy"]),
            "macro_f1": float(scores["macro_f1"]),
            "precision": scores["precision"].tolist(),
            "recall": scores["recall"].tolist(),
            "f1": scores["f1"].tolist(),
            "support": [int(v) for v in scores["support"]],
            "confusion_matrix": confusion.tolist(),
            "label_names": label_names,
        }
