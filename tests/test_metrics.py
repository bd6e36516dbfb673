"""Tests for hf_tissue_vit.metrics and the local `evaluate` module tissue_classification."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from hf_tissue_vit.metrics import (
    METRIC_MODULE_PATH,
    bootstrap_ci,
    classification_report,
    load_classification_metric,
    make_compute_metrics,
    plot_confusion_matrix,
    plot_training_curves,
)

NAMES = ["Tumor", "Stroma", "Complex"]
# Hand-computed: class 2 (Complex) is never predicted.
#   Tumor:  tp=1 fp=2 fn=1 -> P=1/3 R=1/2 F1=0.4
#   Stroma: tp=2 fp=1 fn=0 -> P=2/3 R=1   F1=0.8
#   Complex: tp=0 fp=0 fn=2 -> P=0   R=0   F1=0
Y_TRUE = [0, 0, 1, 1, 2, 2]
Y_PRED = [0, 1, 1, 1, 0, 0]


def test_classification_report_hand_computed():
    report = classification_report(Y_TRUE, Y_PRED, NAMES)
    assert report["accuracy"] == pytest.approx(0.5)
    assert report["macro_f1"] == pytest.approx(0.4)
    assert report["per_class"]["Tumor"] == pytest.approx({"precision": 1 / 3, "recall": 0.5, "f1": 0.4, "support": 2})
    assert report["per_class"]["Stroma"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert report["per_class"]["Complex"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2})
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [2, 0, 0]]
    json.dumps(report)  # plain Python types, ready for all_results.json


def test_class_absent_from_batch_is_still_counted():
    metric = load_classification_metric(num_classes=4)
    result = metric.compute(predictions=[0, 1], references=[0, 1])
    assert len(result["f1"]) == 4 and result["support"] == [1, 1, 0, 0]
    assert np.array(result["confusion_matrix"]).shape == (4, 4)
    assert result["macro_f1"] == pytest.approx(1.0)  # classes in neither list do not enter the mean
    report = classification_report([0, 0], [0, 0], NAMES)
    assert set(report["per_class"]) == set(NAMES) and report["per_class"]["Complex"]["support"] == 0


def test_metric_batches_and_label_names():
    metric = load_classification_metric(label_names=NAMES)
    metric.add_batch(predictions=Y_PRED[:3], references=Y_TRUE[:3])
    metric.add_batch(predictions=Y_PRED[3:], references=Y_TRUE[3:])
    result = metric.compute()
    assert result["label_names"] == NAMES and result["accuracy"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="out of range"):
        metric.compute(predictions=[3], references=[0])


def test_compute_metrics_for_trainer():
    from transformers import EvalPrediction

    logits = np.eye(3)[Y_PRED] * 5.0 + 0.1
    compute = make_compute_metrics(NAMES)
    result = compute(EvalPrediction(predictions=(logits, None), label_ids=np.array(Y_TRUE)))
    expected_keys = {"accuracy", "macro_f1"} | {f"{k}_{n}" for k in ("precision", "recall", "f1") for n in NAMES}
    assert set(result) == expected_keys
    assert all(isinstance(v, float) for v in result.values())
    assert result["macro_f1"] == pytest.approx(0.4) and result["f1_Stroma"] == pytest.approx(0.8)
    assert result["recall_Complex"] == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="length"):
        classification_report([0, 1], [0], NAMES)
    with pytest.raises(ValueError, match="class ids"):
        classification_report([0, 5], [0, 1], NAMES)
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([], [])
    with pytest.raises(ValueError, match="metric"):
        bootstrap_ci([0], [0], metric="auc")


def _noisy_labels(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 3, n)
    y_pred = np.where(rng.random(n) < 0.75, y_true, rng.integers(0, 3, n))
    return y_true, y_pred


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_bootstrap_ci_contains_estimate_and_narrows(metric):
    y_true, y_pred = _noisy_labels(2000, seed=0)
    point = classification_report(y_true, y_pred, NAMES)[metric]
    low, high = bootstrap_ci(y_true[:100], y_pred[:100], metric=metric, n_boot=500)
    point_small = classification_report(y_true[:100], y_pred[:100], NAMES)[metric]
    assert low <= point_small <= high
    low_big, high_big = bootstrap_ci(y_true, y_pred, metric=metric, n_boot=500)
    assert low_big <= point <= high_big
    assert high_big - low_big < (high - low) / 2  # ~1/sqrt(20) as wide
    assert bootstrap_ci(y_true, y_pred, metric=metric, n_boot=200, seed=3) == bootstrap_ci(
        y_true, y_pred, metric=metric, n_boot=200, seed=3
    )


def test_bootstrap_of_perfect_predictions_collapses():
    for metric in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert bootstrap_ci([0, 1, 2, 1], [0, 1, 2, 1], metric=metric, n_boot=50) == (1.0, 1.0)


def test_balanced_accuracy_is_mean_recall_of_present_classes():
    # class 0: 2/2 right, class 1: 1/3 right, class 2 never occurs in the references
    report = classification_report([0, 0, 1, 1, 1], [0, 0, 1, 2, 2], ["a", "b", "c"])
    assert report["balanced_accuracy"] == pytest.approx((1.0 + 1 / 3) / 2)
    assert report["accuracy"] == pytest.approx(3 / 5)


def test_plots_written_atomically(tmp_path):
    cm_path = plot_confusion_matrix([[5, 1, 0], [0, 3, 2], [1, 0, 4]], NAMES, tmp_path / "sub" / "confusion_matrix.png")
    assert cm_path.is_file() and Image.open(cm_path).size[0] > 100
    history = [
        {"loss": 1.2, "epoch": 0.5, "step": 5},
        {"loss": 0.9, "epoch": 1.0, "step": 10},
        {"eval_loss": 1.0, "eval_macro_f1": 0.5, "epoch": 1.0, "step": 10},
        {"loss": 0.6, "epoch": 1.5, "step": 15},
        {"eval_loss": 0.8, "eval_macro_f1": 0.7, "epoch": 2.0, "step": 20},
        {"train_runtime": 3.0, "epoch": 2.0, "step": 20},
    ]
    curves = plot_training_curves(history, tmp_path / "training_curves.png")
    assert curves.is_file()
    plot_training_curves([], tmp_path / "empty.png")  # nothing logged: still writes a figure
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "confusion_matrix.png",
        "empty.png",
        "training_curves.png",
    ]  # no temp files left behind
    with pytest.raises(ValueError, match="label_names"):
        plot_confusion_matrix([[1, 0], [0, 1]], NAMES, tmp_path / "bad.png")


def test_evaluate_load_by_path_offline(monkeypatch):
    import socket

    import evaluate

    def no_network(*args, **kwargs):
        raise AssertionError("evaluate.load of a local module tried to open a network connection")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    for path in (METRIC_MODULE_PATH, METRIC_MODULE_PATH / "tissue_classification.py"):
        metric = evaluate.load(str(path), num_classes=3)
        result = metric.compute(predictions=[0, 1, 1], references=[0, 1, 2])
        assert result["accuracy"] == pytest.approx(2 / 3) and result["support"] == [1, 1, 1]
