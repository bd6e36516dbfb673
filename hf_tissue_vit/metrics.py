"""Classification metrics for training and reporting, backed by the package's local `evaluate` module.

Example::

    compute_metrics = make_compute_metrics(CLASS_NAMES)        # for transformers.Trainer
    report = classification_report(y_true, y_pred, CLASS_NAMES)
    low, high = bootstrap_ci(y_true, y_pred, metric="macro_f1")
    plot_confusion_matrix(report["confusion_matrix"], CLASS_NAMES, "out/confusion_matrix.png")
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .fileio import save_figure_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "METRIC_MODULE_PATH",
    "load_classification_metric",
    "make_compute_metrics",
    "classification_report",
    "BOOTSTRAP_SEED",
    "bootstrap_ci",
    "plot_confusion_matrix",
    "plot_training_curves",
]

# Folder holding tissue_classification.py; evaluate.load(<folder>) needs script name == folder name.
METRIC_MODULE_PATH: Path = Path(__file__).resolve().parent / "evaluate_modules" / "tissue_classification"
_BOOTSTRAP_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
# One seed for every interval the package reports (finetune.py's test CIs, evaluate.py's), whatever the
# training seed: the same predictions then get the same interval from both.
BOOTSTRAP_SEED = 0
# Bootstrap resamples are drawn in chunks so that index arrays stay below ~8M entries (64 MB).
_BOOTSTRAP_CHUNK_ELEMENTS = 8_000_000


def load_classification_metric(**init_kwargs: Any) -> Any:
    """Load the local tissue_classification `evaluate` module (offline); kwargs go to evaluate.load,
    e.g. ``num_classes=6`` / ``label_names=[...]``, ``process_id``/``num_process``."""
    import evaluate  # the library (no script is named evaluate.py: it would shadow it when run as a program)

    if not (METRIC_MODULE_PATH / "tissue_classification.py").is_file():
        raise FileNotFoundError(
            f"metric script {METRIC_MODULE_PATH / 'tissue_classification.py'} is missing; reinstall hf_tissue_vit"
        )
    return evaluate.load(str(METRIC_MODULE_PATH), **init_kwargs)


def _as_labels(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of class ids, got shape {array.shape}")
    fractional = array.size and not np.issubdtype(array.dtype, np.integer) and not np.all(np.mod(array, 1) == 0)
    if fractional:
        raise ValueError(f"{name} must hold integer class ids, got dtype {array.dtype}")
    return array.astype(np.int64)


def _checked_pair(y_true: Any, y_pred: Any, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    true = _as_labels(y_true, "y_true")
    pred = _as_labels(y_pred, "y_pred")
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {len(true)} vs {len(pred)}")
    if true.size == 0:
        raise ValueError("y_true and y_pred are empty: nothing to score")
    low = min(true.min(), pred.min())
    high = max(true.max(), pred.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        raise ValueError(f"class ids must be in [0, {num_classes}), got values from {low} to {high}")
    return true, pred


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], label_names: Sequence[str]) -> dict:
    """Accuracy, macro_f1, balanced_accuracy, per_class {name: {precision, recall, f1, support}} and
    confusion_matrix (list of lists, rows = true class) for class ids indexing ``label_names``.

    balanced_accuracy is the mean per-class recall over the classes that occur in ``y_true`` (a class
    with no reference sample has no recall to average).
    """
    label_names = list(label_names)
    true, pred = _checked_pair(y_true, y_pred, len(label_names))
    result = load_classification_metric(label_names=label_names).compute(predictions=pred, references=true)
    return {
        "accuracy": result["accuracy"],
        "balanced_accuracy": result["balanced_accuracy"],
        "macro_f1": result["macro_f1"],
        "per_class": {
            name: {
                "precision": result["precision"][i],
                "recall": result["recall"][i],
                "f1": result["f1"][i],
                "support": result["support"][i],
            }
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": result["confusion_matrix"],
    }


def make_compute_metrics(label_names: Sequence[str]) -> Callable[[Any], dict[str, float]]:
    """`compute_metrics` for transformers.Trainer: logits -> argmax; returns flat floats accuracy,
    macro_f1, precision_<Class>, recall_<Class>, f1_<Class>."""
    label_names = list(label_names)
    if not label_names:
        raise ValueError("label_names is empty; pass the dataset's ClassLabel names")
    metric = load_classification_metric(label_names=label_names)

    def compute_metrics(eval_prediction: Any) -> dict[str, float]:
        logits, labels = eval_prediction.predictions, eval_prediction.label_ids
        if isinstance(logits, (tuple, list)):  # models that also return hidden states/attentions
            logits = logits[0]
        if isinstance(labels, (tuple, list)):
            labels = labels[0]
        predictions = np.asarray(logits).argmax(axis=-1).reshape(-1)
        true, pred = _checked_pair(np.asarray(labels).reshape(-1), predictions, len(label_names))
        result = metric.compute(predictions=pred, references=true)
        flat = {"accuracy": float(result["accuracy"]), "macro_f1": float(result["macro_f1"])}
        for key in ("precision", "recall", "f1"):
            flat.update({f"{key}_{name}": float(value) for name, value in zip(label_names, result[key])})
        return flat

    return compute_metrics


def _metric_module() -> Any:
    """The local evaluate module imported as a plain module: its ``scores_from_confusion`` is the one
    definition of every score (the bootstrap calls it on batches of confusion matrices)."""
    import importlib.util

    path = METRIC_MODULE_PATH / "tissue_classification.py"
    spec = importlib.util.spec_from_file_location("hf_tissue_vit_tissue_classification", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bootstrap_ci(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    metric: str = "accuracy",
    n_boot: int = 1000,
    seed: int = BOOTSTRAP_SEED,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) confidence interval of accuracy, balanced_accuracy or macro_f1.

    The interval depends only on the (true, predicted) pairs, not on their order, and on ``seed``: the
    test score of ``finetune.py`` and ``evaluate.py`` on the same split get the same interval."""
    if metric not in _BOOTSTRAP_METRICS:
        raise ValueError(f"metric must be one of {_BOOTSTRAP_METRICS}, got {metric!r}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    true, pred = _checked_pair(y_true, y_pred)
    num_classes = int(max(true.max(), pred.max())) + 1
    cells = num_classes * num_classes
    codes = np.sort(true * num_classes + pred)  # one confusion-matrix cell per sample; sorted: order-free
    rng = np.random.default_rng(seed)
    n = len(codes)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    stats = []
    scores_from_confusion = _metric_module().scores_from_confusion
    for start in range(0, int(n_boot), chunk):
        rows = min(chunk, int(n_boot) - start)
        sample = codes[rng.integers(0, n, size=(rows, n))]
        # One bincount for all resamples: shift each row's cells into its own block.
        sample += (np.arange(rows) * cells)[:, None]
        confusion = np.bincount(sample.ravel(), minlength=rows * cells).reshape(rows, num_classes, num_classes)
        stats.append(scores_from_confusion(confusion)[metric])
    low, high = np.quantile(np.concatenate(stats), [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _new_figure(width: float, height: float) -> Any:
    # Figure + Agg canvas directly: no pyplot, so no global backend switch and no figure registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def plot_confusion_matrix(cm: Sequence[Sequence[int]], label_names: Sequence[str], path: str | os.PathLike) -> Path:
    """Row-normalised confusion matrix heat map with counts, written atomically to ``path``."""
    counts = np.asarray(cm, dtype=np.int64)
    label_names = list(label_names)
    k = len(label_names)
    if counts.shape != (k, k):
        raise ValueError(f"confusion matrix shape {counts.shape} does not match {k} label_names")
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    figure = _new_figure(1.2 + 0.9 * k, 1.0 + 0.8 * k)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of true class")
    axes.set_xticks(range(k), label_names, rotation=45, ha="right")
    axes.set_yticks(range(k), label_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            colour = "white" if rates[i, j] > 0.5 else "black"
            axes.text(j, i, f"{counts[i, j]}", ha="center", va="center", color=colour, fontsize=8)
    axes.set_title(f"Confusion matrix (n={int(counts.sum())})")
    return save_figure_atomic(figure, path, dpi=120)


def plot_training_curves(
    log_history: Sequence[dict], path: str | os.PathLike, metric: str = "eval_macro_f1"
) -> Path:
    """Training/validation loss and a validation metric per epoch (Trainer ``state.log_history``)."""
    def series(key: str) -> tuple[list[float], list[float]]:
        points = [(e.get("epoch", e.get("step")), e[key]) for e in log_history if key in e]
        points = [(float(x), float(y)) for x, y in points if x is not None]
        return [x for x, _ in points], [y for _, y in points]

    figure = _new_figure(10, 4)
    loss_axes = figure.add_subplot(1, 2, 1)
    for key, label in (("loss", "train loss"), ("eval_loss", "validation loss")):
        xs, ys = series(key)
        if xs:
            loss_axes.plot(xs, ys, marker="o" if key == "eval_loss" else None, markersize=3, label=label)
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("loss")
    loss_axes.set_title("Loss")
    if loss_axes.has_data():
        loss_axes.legend()
    metric_axes = figure.add_subplot(1, 2, 2)
    xs, ys = series(metric)
    if xs:
        metric_axes.plot(xs, ys, marker="o", markersize=3, color="tab:green")
    else:
        logger.warning("log_history has no %r entries; the metric panel of %s is empty", metric, path)
        metric_axes.text(0.5, 0.5, f"no {metric} logged", ha="center", va="center", transform=metric_axes.transAxes)
    metric_axes.set_xlabel("epoch")
    metric_axes.set_ylabel(metric)
    metric_axes.set_title(f"Validation {metric.removeprefix('eval_')}")
    return save_figure_atomic(figure, path, dpi=120)
