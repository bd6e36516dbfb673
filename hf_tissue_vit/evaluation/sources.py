"""Labelled data to evaluate on: a folder of class folders, a saved dataset, or a Hub dataset.

Each source names its classes (folder names, or the ClassLabel names of a dataset) and counts its images
per class before anything is decoded, so the label mapping is checked first. :meth:`rows` then streams
one :class:`ScoredRow` per image of a scored class, in a fixed order (or those of one contiguous
shard of that order, ``rows(..., shard=range(a, b))``, one per process): files are read and classified
by :meth:`TilePredictor.predict_files` (exactly as ``predict.py`` does), dataset images are decoded
with :func:`imaging.decode_dataset_image` and classified with :meth:`TilePredictor.predict_tiles` (as
``finetune.py`` classifies its test split), one batch at a time.
"""

from __future__ import annotations

import logging
import os
import re
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..imaging import decode_dataset_image
from ..predict.inputs import iter_input_files
from .labels import LabelMapping, find_class_folders

logger = logging.getLogger(__name__)

_VALIDATION_NAMES = ("validation", "val", "valid", "dev")


@dataclass
class ScoredRow:
    """One image: its true class (data and model side) and the probabilities of each predictor."""

    file: str
    source_class: str
    label: int  # model label id of the true class
    probs: list[np.ndarray | None]  # one per predictor (plain, then TTA); None when unreadable
    error: str = ""


def slug(text: str) -> str:
    """File-name-safe form of a name (``CRC-VAL-HE-7K (test)`` -> ``crc-val-he-7k_test``)."""
    return re.sub(r"[^a-z0-9.-]+", "_", text.lower()).strip("_.") or "data"


class LabelledData:
    """What every source has: classes, image counts per class and identifiers."""

    kind: str
    class_names: list[str]
    counts: dict[str, int]
    split: str | None = None
    unlabelled: int = 0  # images in no class (files beside the class folders, rows without a label)

    def dataset_name(self) -> str:
        """The data's name for the card: a Hub id, or the folder's name."""
        raise NotImplementedError

    def default_name(self) -> str:
        """Name of the evaluation when --eval_name is not given: the data's name and split."""
        return f"{self.dataset_name()} ({self.split})" if self.split else self.dataset_name()

    def dataset_type(self) -> str:
        """model-index ``dataset.type``: a Hub dataset id when there is one, else a slug of the name."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """Identifiers of the data for eval_results.json."""
        raise NotImplementedError

    def n_scored_items(self, mapping: LabelMapping) -> int:
        """Images of the classes that are scored."""
        return sum(n for name, n in self.counts.items() if mapping.targets.get(name) is not None)

    def n_rows(self, mapping: LabelMapping) -> int:
        """Length of the order :meth:`rows` shards (a shard is a ``range`` of it)."""
        raise NotImplementedError

    def n_scored_in(self, mapping: LabelMapping, shard: range) -> int:
        """Images of scored classes in ``shard`` (a progress bar's total)."""
        raise NotImplementedError

    def rows(self, mapping: LabelMapping, predictors: Sequence[Any], shard: range | None = None) -> Iterator[ScoredRow]:
        """Stream the scored images (of ``shard`` only, when given) with every predictor's probabilities."""
        raise NotImplementedError


class FolderData(LabelledData):
    """``--inputs FOLDER``: one sub-folder per class (see :func:`labels.find_class_folders`), images at
    any depth inside each class folder."""

    kind = "folder"

    def __init__(self, folder: str | os.PathLike) -> None:
        found = find_class_folders(folder)
        self.root = found.root
        self.files = {name: list(iter_input_files([path])) for name, path in found.folders.items()}
        self.class_names = list(self.files)
        self.counts = {name: len(paths) for name, paths in self.files.items()}
        self.unlabelled = found.loose_files
        if not any(self.counts.values()):
            raise ValueError(f"--inputs {str(self.root)!r}: the class folders {self.class_names} hold no image files")
        if self.unlabelled:
            logger.warning("%d image(s) directly in %s are in no class folder: not scored", self.unlabelled, self.root)

    def dataset_name(self) -> str:
        return self.root.resolve().name

    def dataset_type(self) -> str:
        return slug(self.dataset_name())

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.root.resolve()), "images_per_class": dict(self.counts)}

    def _items(self, mapping: LabelMapping) -> list[tuple[str, str, int]]:
        return [(path, name, mapping.targets[name]) for name in self.class_names
                if mapping.targets[name] is not None for path in self.files[name]]

    def n_rows(self, mapping: LabelMapping) -> int:
        return self.n_scored_items(mapping)

    def n_scored_in(self, mapping: LabelMapping, shard: range) -> int:
        return len(shard)

    def rows(self, mapping: LabelMapping, predictors: Sequence[Any], shard: range | None = None) -> Iterator[ScoredRow]:
        items = self._items(mapping)
        if shard is not None:
            items = items[shard.start:shard.stop]
        streams = [predictor.predict_files(path for path, _, _ in items) for predictor in predictors]
        for (path, name, label), *predicted in zip(items, *streams):
            if predicted[0].file != path:  # predict_files keeps the input order; guard the pairing anyway
                raise RuntimeError(f"prediction for {predicted[0].file} paired with {path}")
            yield ScoredRow(path, name, label, [row.probs for row in predicted], predicted[0].error)


def _columns(dataset: Any, where: str) -> tuple[str, str, str | None]:
    """(image column, ClassLabel column, file-name column or None) of a datasets.Dataset."""
    from datasets import ClassLabel, Image, Value

    features = dataset.features
    images = [c for c, f in features.items() if isinstance(f, Image)]
    labels = [c for c, f in features.items() if isinstance(f, ClassLabel)]
    described = ", ".join(f"{c} ({type(f).__name__})" for c, f in features.items())
    if not images:
        raise ValueError(f"{where} has no Image column; columns: {described}")
    label = "label" if "label" in labels else (labels[0] if len(labels) == 1 else None)
    if label is None:
        raise ValueError(f"{where} needs one ClassLabel column (or one named 'label'); columns: {described}")
    names = [c for c in ("filename", "file", "path") if isinstance(features.get(c), Value)
             and features[c].dtype in ("string", "large_string")]
    return ("image" if "image" in images else images[0]), label, (names[0] if names else None)


def _decode(value: Any) -> tuple[np.ndarray | None, str]:
    try:
        return decode_dataset_image(value), ""
    except Exception as err:  # any decode failure is a skipped row, the run goes on
        return None, f"{type(err).__name__}: {err}".replace("\n", " ")


class DatasetData(LabelledData):
    """One split of a ``datasets`` dataset (saved with ``save_to_disk``, or from the Hub)."""

    def __init__(self, dataset: Any, kind: str, source: str, split: str | None, hub_id: str | None = None) -> None:
        self.dataset, self.kind, self.source, self.split, self.hub_id = dataset, kind, source, split, hub_id
        where = f"{source!r}" + (f" split {split!r}" if split else "")
        self.image_column, self.label_column, self.file_column = _columns(dataset, where)
        self.class_names = list(dataset.features[self.label_column].names)
        labels = np.asarray(dataset.with_format("numpy")[self.label_column], dtype=np.int64).reshape(-1)
        self.labels = labels
        self.unlabelled = int((labels < 0).sum())
        counts = np.bincount(labels[labels >= 0], minlength=len(self.class_names))
        self.counts = {name: int(n) for name, n in zip(self.class_names, counts)}
        if not len(dataset):
            raise ValueError(f"{where} has no rows")

    def dataset_name(self) -> str:
        return self.hub_id or Path(self.source).resolve().name

    def dataset_type(self) -> str:
        return self.hub_id or slug(self.dataset_name())

    def info(self) -> dict[str, Any]:
        key = "path" if self.kind == "dataset_dir" else "dataset_name"
        source = str(Path(self.source).resolve()) if self.kind == "dataset_dir" else self.source
        info = {"kind": self.kind, key: source, "split": self.split, "hub_dataset_id": self.hub_id,
                "fingerprint": getattr(self.dataset, "_fingerprint", None), "images_per_class": dict(self.counts)}
        return {k: v for k, v in info.items() if v is not None}

    def n_rows(self, mapping: LabelMapping) -> int:
        return len(self.dataset)

    def n_scored_in(self, mapping: LabelMapping, shard: range) -> int:
        scored = np.array([mapping.targets[name] is not None for name in self.class_names] + [False])
        return int(scored[self.labels[shard.start:shard.stop]].sum())  # label -1 (unlabelled): the False

    def rows(self, mapping: LabelMapping, predictors: Sequence[Any], shard: range | None = None) -> Iterator[ScoredRow]:
        from datasets import Image

        targets = [mapping.targets[name] for name in self.class_names]
        columns = [c for c in (self.image_column, self.label_column, self.file_column) if c]
        raw = self.dataset.select_columns(columns).cast_column(self.image_column, Image(decode=False))
        start = 0 if shard is None else shard.start
        if shard is not None:
            raw = raw.select(shard)
        batch_size = predictors[0].batch_size
        # on a GPU (predictor.overlap) the next batch decodes while the model runs on this one
        ahead = 1 if getattr(predictors[0], "overlap", False) else 0
        with ThreadPoolExecutor(max(1, predictors[0].num_workers), thread_name_prefix="decode") as pool:
            pending: deque[tuple[dict[str, list], list[int], Iterator, int]] = deque()
            for batch in raw.iter(batch_size=batch_size):
                labels = batch[self.label_column]
                keep = [i for i, y in enumerate(labels) if y >= 0 and targets[y] is not None]
                pending.append((batch, keep, pool.map(_decode, [batch[self.image_column][i] for i in keep]), start))
                start += len(labels)
                if len(pending) > ahead:
                    yield from self._scored(*pending.popleft(), targets, predictors)
            while pending:
                yield from self._scored(*pending.popleft(), targets, predictors)

    def _scored(self, batch: dict[str, list], keep: list[int], decoded: Iterator, start: int,
                targets: list[int | None], predictors: Sequence[Any]) -> Iterator[ScoredRow]:
        """The rows of one decoded batch (``start``: the batch's first row number, for row names)."""
        labels = batch[self.label_column]
        decoded = list(decoded)
        ok = [j for j, (tile, _) in enumerate(decoded) if tile is not None]
        probs = [p.predict_tiles([decoded[j][0] for j in ok]).numpy() for p in predictors] if ok else []
        position = {j: k for k, j in enumerate(ok)}
        for j, i in enumerate(keep):
            name = batch[self.file_column][i] if self.file_column else f"{self.split or 'row'}[{start + i}]"
            row_probs = [p[position[j]] for p in probs] if j in position else [None] * len(predictors)
            yield ScoredRow(str(name), self.class_names[labels[i]], targets[labels[i]], row_probs, decoded[j][1])


def _pick_split(splits: Sequence[str], split: str, where: str) -> str:
    """``split`` among ``splits``: exact, any case, or val/valid/dev for validation (and back)."""
    by_lower = {s.lower(): s for s in splits}
    wanted = [split.lower()] + (list(_VALIDATION_NAMES) if split.lower() in _VALIDATION_NAMES else [])
    for name in wanted:
        if name in by_lower:
            return by_lower[name]
    raise ValueError(f"{where} has no split {split!r}; its splits are {list(splits)} (pick one with --split)")


def load_dataset_dir(dataset_dir: str | os.PathLike, split: str = "test") -> DatasetData:
    """One split of a dataset saved with ``save_to_disk`` (e.g. by prepare_dataset.py)."""
    from datasets import DatasetDict, load_from_disk

    from ..data.storage import read_dataset_metadata

    path = Path(dataset_dir).expanduser()
    where = f"--dataset_dir {str(path)!r}"
    if not path.is_dir():
        raise FileNotFoundError(f"{where}: no such folder")
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise ValueError(f"{where} holds no dataset saved with save_to_disk (dataset_dict.json or state.json)")
    try:
        loaded = load_from_disk(str(path))
    except Exception as err:
        raise ValueError(f"{where} could not be loaded ({type(err).__name__}: {err})") from err
    if isinstance(loaded, DatasetDict):
        split = _pick_split(list(loaded), split, where)
        loaded = loaded[split]
    hub_id = read_dataset_metadata(path).get("hub_dataset_id")
    return DatasetData(loaded, "dataset_dir", str(path), split, hub_id=hub_id)


def load_hub_dataset(dataset_name: str, split: str = "test") -> DatasetData:
    """One split of a Hub dataset (``datasets.load_dataset``; downloaded into the HF cache once)."""
    import datasets

    where = f"--dataset_name {dataset_name!r}"
    try:
        splits = datasets.get_dataset_split_names(dataset_name)
    except Exception as err:
        raise ValueError(f"{where} could not be read from the Hub ({type(err).__name__}: {err}); check the id, "
                         "network and token, or pass --dataset_dir") from err
    split = _pick_split(splits, split, where)
    try:
        loaded = datasets.load_dataset(dataset_name, split=split)
    except Exception as err:
        raise ValueError(f"{where} split {split!r} could not be loaded ({type(err).__name__}: {err})") from err
    return DatasetData(loaded, "hub_dataset", dataset_name, split, hub_id=dataset_name)
