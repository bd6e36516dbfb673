"""The prediction CSV: one row per file with its label, score, error and per-class probabilities."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm.auto import tqdm

from ..fileio import atomic_write

logger = logging.getLogger(__name__)

CSV_FIXED_COLUMNS = ("file", "label", "score", "error")


@dataclass
class PredictionRow:
    """Prediction for one file: class probabilities, or ``error`` when it could not be read."""

    file: str
    probs: np.ndarray | None = None
    error: str = ""


def probability_columns(label_names: Sequence[str], fixed_columns: Sequence[str]) -> list[str]:
    """CSV header of the per-class probabilities: the plain class names, in label-id order.

    Shared by predict.py's CSV and training's test_predictions.csv. A class named like one of the
    CSV's ``fixed_columns`` (or two classes with one name) would make a column ambiguous: refused.
    """
    names = [str(name) for name in label_names]
    clashes = sorted({n for n in names if n in fixed_columns or names.count(n) > 1})
    if clashes:
        raise ValueError(f"class names {clashes} clash with the CSV columns {list(fixed_columns)} or repeat; "
                         "rename the classes (config.json id2label)")
    return names


def csv_columns(label_names: Sequence[str], top_k: int = 1) -> list[str]:
    """``file, label, score, error``, one probability column per class, then top-2..k label/score."""
    extra = [f"top{k}_{kind}" for k in range(2, top_k + 1) for kind in ("label", "score")]
    return [*CSV_FIXED_COLUMNS, *probability_columns(label_names, (*CSV_FIXED_COLUMNS, *extra)), *extra]


def csv_row(row: PredictionRow, label_names: Sequence[str], top_k: int = 1) -> list[str]:
    """The CSV cells of one row (empty label/score/probabilities and ``error`` set when unreadable)."""
    n = len(label_names)
    if row.probs is None:
        return [row.file, "", "", row.error or "unreadable", *[""] * (n + 2 * (top_k - 1))]
    order = np.argsort(-row.probs, kind="stable")[:top_k]
    extra = [v for k in order[1:] for v in (label_names[k], f"{row.probs[k]:.6f}")]
    best = order[0]
    return [row.file, label_names[best], f"{row.probs[best]:.6f}", "", *[f"{p:.6f}" for p in row.probs], *extra]


def check_top_k(top_k: int, label_names: Sequence[str]) -> None:
    """ValueError unless 1 <= ``top_k`` <= number of classes."""
    if not 1 <= top_k <= len(label_names):
        raise ValueError(f"top_k must be in 1..{len(label_names)}, got {top_k}")


def write_predictions_csv(
    rows: Iterable[PredictionRow],
    output: str | os.PathLike,
    label_names: Sequence[str],
    top_k: int = 1,
    progress: bool = True,
    total: int | None = None,
) -> dict[str, Any]:
    """Write ``rows`` as they come (to a temp file in the same folder, moved into place at the end:
    a failed run leaves no partial CSV). Returns ``{"files", "errors", "output"}``."""
    check_top_k(top_k, label_names)
    header = csv_columns(label_names, top_k)
    with atomic_write(output, newline="") as handle:
        csv.writer(handle).writerow(header)
        counts = write_prediction_rows(rows, handle, label_names, top_k, progress, total)
    logger.info("wrote %d predictions (%d unreadable) to %s", counts["files"], counts["errors"], output)
    return {**counts, "output": str(Path(output))}


def write_prediction_rows(
    rows: Iterable[PredictionRow],
    handle: IO[str],
    label_names: Sequence[str],
    top_k: int = 1,
    progress: bool = True,
    total: int | None = None,
    desc: str = "predict",
) -> dict[str, int]:
    """The CSV rows (no header) of ``rows`` into ``handle`` as they come; ``{"files", "errors"}``."""
    check_top_k(top_k, label_names)
    writer = csv.writer(handle)
    n_files = n_errors = 0
    with tqdm(total=total, unit="tile", desc=desc, disable=not progress) as bar:
        for row in rows:
            writer.writerow(csv_row(row, label_names, top_k))
            n_files += 1
            n_errors += bool(row.error)
            bar.update(1)
    return {"files": n_files, "errors": n_errors}
