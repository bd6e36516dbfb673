"""What an evaluation writes (each file atomically) and the Markdown summary it prints.

- ``eval_results.json``: scores, counts, label mapping, model and data identifiers (:data:`RESULTS_FILE`);
- ``eval_predictions.csv``: one row per image of a scored class (unreadable ones with ``error`` set);
- ``eval_confusion_matrix.png`` (and ``eval_confusion_matrix_tta.png`` with TTA).
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from ..distributed import ShardedCSV
from ..fileio import atomic_write_json
from ..metrics import plot_confusion_matrix
from ..predict.table import probability_columns
from .scoring import HEADLINE_METRICS, classes_in_play
from .sources import ScoredRow

RESULTS_FILE = "eval_results.json"
PREDICTIONS_FILE = "eval_predictions.csv"
CONFUSION_FILE = "eval_confusion_matrix.png"
CSV_FIXED_COLUMNS = ("file", "data_class", "label", "prediction", "score", "error")
_TTA_COLUMNS = ("prediction_tta", "score_tta")
_NAMES = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro-F1"}


def predictions_columns(label_names: Sequence[str], tta: bool) -> list[str]:
    """The header of eval_predictions.csv."""
    fixed = (*CSV_FIXED_COLUMNS, *(_TTA_COLUMNS if tta else ()))
    names = [*label_names, *([f"{n}_tta" for n in label_names] if tta else [])]
    return [*fixed, *probability_columns(names, fixed)]


class PredictionsWriter:
    """Rows of eval_predictions.csv: the true class (as in the data and as the model's class), the
    prediction and its probability, the per-class probabilities; with TTA the same again, ``_tta``."""

    def __init__(self, handle: IO[str], label_names: Sequence[str], tta: bool, header: bool = True) -> None:
        self.label_names, self.tta = list(label_names), tta
        self.writer = csv.writer(handle)
        if header:
            self.writer.writerow(predictions_columns(label_names, tta))

    def write(self, row: ScoredRow) -> None:
        """One CSV row."""
        label = self.label_names[row.label]
        if row.error or any(p is None for p in row.probs):
            n_empty = 2 * self.tta + len(self.label_names) * len(row.probs)
            self.writer.writerow([row.file, row.source_class, label, "", "", row.error or "unreadable",
                                  *[""] * n_empty])
            return
        best = [int(p.argmax()) for p in row.probs]
        head = [row.file, row.source_class, label, self.label_names[best[0]], f"{row.probs[0][best[0]]:.6f}", ""]
        if self.tta:
            head += [self.label_names[best[1]], f"{row.probs[1][best[1]]:.6f}"]
        self.writer.writerow([*head, *(f"{v:.6f}" for p in row.probs for v in p)])


@contextlib.contextmanager
def predictions_csv(state: Any, path: str | Path, label_names: Sequence[str], tta: bool) -> Iterator[PredictionsWriter]:
    """Write eval_predictions.csv row by row: this process's rows (see
    :class:`~hf_tissue_vit.distributed.ShardedCSV`), the whole file moved into place when the block ends."""
    with ShardedCSV(state, path, predictions_columns(label_names, tta)) as handle:
        yield PredictionsWriter(handle, label_names, tta, header=False)


def write_results(output_dir: str | Path, results: dict[str, Any]) -> Path:
    """eval_results.json."""
    return atomic_write_json(Path(output_dir) / RESULTS_FILE, results)


def write_confusion_matrices(output_dir: str | Path, results: dict[str, Any]) -> list[Path]:
    """eval_confusion_matrix.png (and _tta.png); returns the paths written."""
    out = Path(output_dir)
    paths = [plot_confusion_matrix(results["confusion_matrix"], results["label_names"], out / CONFUSION_FILE)]
    if "confusion_matrix_tta" in results:
        tta_path = out / CONFUSION_FILE.replace(".png", "_tta.png")
        paths.append(plot_confusion_matrix(results["confusion_matrix_tta"], results["label_names"], tta_path))
    return paths


def _ci(value: Any) -> str:
    return f"[{value[0]:.4f}, {value[1]:.4f}]" if value else ""


def markdown_summary(results: dict[str, Any]) -> str:
    """A short Markdown report: what was scored, the headline metrics with intervals, per-class rows."""
    tta = "accuracy_tta" in results
    data = results["data"]
    source = data.get("dataset_name") or data.get("path")
    lines = [f"## Evaluation on {results['name']}", "",
             f"Model `{results['model']['id']}` on `{source}`" + (f", split `{data['split']}`" if data.get("split")
                                                                    else "") + ".",
             f"{results['n_scored']} images scored, {results['n_skipped']} unreadable (skipped), "
             f"{results['n_left_out']} left out (class not scored).", ""]
    if results.get("label_map_text"):
        lines += [f"Labels: {results['label_map_text']}", ""]
    lines += ["| metric | value | 95% CI |" + (" with TTA | TTA 95% CI |" if tta else ""),
              "|---|---:|---|" + ("---:|---|" if tta else "")]
    for key in HEADLINE_METRICS:
        row = f"| {_NAMES[key]} | {results[key]:.4f} | {_ci(results.get(key + '_ci95'))} |"
        if tta:
            row += f" {results[key + '_tta']:.4f} | {_ci(results.get(key + '_ci95_tta'))} |"
        lines.append(row)
    lines += ["", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, v in classes_in_play(results).items():
        lines.append(f"| {name} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |")
    return "\n".join(lines)
