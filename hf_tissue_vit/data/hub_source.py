"""A Hub dataset as a tile source: its splits and columns mapped onto image / label / slide / filename."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset
from datasets import Image as ImageFeature
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..modelfolder import check_repo_id
from .classes import ClassChoice, ClassPlan, plan_classes
from .report import BuildReport
from .schema import SPLITS, describe_columns, split_name_for
from .sources import Entry

_IMAGE_COLUMNS = ("image", "img", "tile", "picture")
_LABEL_COLUMNS = ("label", "labels", "class", "tissue", "tissue_type", "category", "target")
_NAME_COLUMNS = ("filename", "file_name", "image_path", "path")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is a valid Hub repo id (``name`` or ``namespace/name``)."""
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def check_hub_id(repo_id: str, argument: str, namespace: bool = False) -> str:
    """``repo_id`` if it is a valid Hub repo id (with ``namespace/`` when asked), else a one-line error."""
    return check_repo_id(repo_id, argument, namespace=namespace)


def _load_splits(source: str) -> dict[str, Dataset]:
    """The Hub dataset's splits under our split names (one unsplit dataset becomes ``train``)."""
    try:
        loaded = load_dataset(source)
    except Exception as exc:
        raise ValueError(
            f"source {source!r} is not an existing local path, and loading it as a Hub dataset failed "
            f"({type(exc).__name__}: {exc}). Pass an existing folder or .zip, or check the dataset id and network."
        ) from exc
    if isinstance(loaded, Dataset):
        loaded = DatasetDict({"train": loaded})
    splits: dict[str, Dataset] = {}
    for split_name, ds in loaded.items():
        split = split_name_for(split_name)
        if split is None or split in splits:
            raise ValueError(f"Hub dataset {source!r}: split {split_name!r} is not train/validation/test (or twice)")
        splits[split] = ds
    return splits


def _pick_column(features: Features, names: Sequence[str], kind: type | None) -> str | None:
    """The first of ``names`` present, else the only column of type ``kind``."""
    for name in names:
        if name in features:
            return name
    if kind is not None:
        typed = [c for c, f in features.items() if isinstance(f, kind)]
        if len(typed) == 1:
            return typed[0]
    return None


def _image_column(ds: Dataset, where: str) -> str:
    column = _pick_column(ds.features, _IMAGE_COLUMNS, ImageFeature)
    if column is None or not isinstance(ds.features[column], ImageFeature):
        raise ValueError(f"{where}: no image column of type Image; columns: {describe_columns(ds.features)}")
    return column


def _raw_labels(ds: Dataset, where: str) -> tuple[list[str], list[str] | None]:
    """Every row's label name, from a ClassLabel or a string column, and the ClassLabel's own order."""
    column = _pick_column(ds.features, _LABEL_COLUMNS, ClassLabel)
    if column is None:
        raise ValueError(
            f"{where}: no label column (label/labels/class...); columns: {describe_columns(ds.features)}"
        )
    feature = ds.features[column]
    values = list(ds[column])
    if isinstance(feature, ClassLabel):
        return [feature.int2str(int(v)) for v in values], list(feature.names)
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        return [str(v) for v in values], None
    raise ValueError(f"{where}: column {column!r} is {feature}, not a ClassLabel or string class names")


class _RowReader:
    """Reads one row's encoded image from a split (picked lazily, so no split is held in memory)."""

    def __init__(self, raw: Dataset, column: str, index: int) -> None:
        self.raw, self.column, self.index = raw, column, index

    def __call__(self) -> bytes:
        image = self.raw[self.index][self.column]
        if image.get("bytes") is not None:
            return image["bytes"]
        if image.get("path") and os.path.isfile(image["path"]):
            return Path(image["path"]).read_bytes()
        raise ValueError(f"no image bytes and no readable file at {image.get('path')!r}")


def _split_entries(ds: Dataset, split: str, labels: Sequence[str], plan: ClassPlan, report: BuildReport,
                   keep_split: bool) -> list[Entry]:
    """Entries of one split; classes not asked for are counted in ``report.dropped_classes``."""
    image_col = _image_column(ds, f"Hub dataset split {split}")
    name_col = _pick_column(ds.features, _NAME_COLUMNS, None)
    names = [str(n) for n in ds[name_col]] if name_col else None
    slides = [str(s or "") for s in ds["slide"]] if "slide" in ds.features else None
    raw = ds.cast_column(image_col, ImageFeature(decode=False))
    entries = []
    for i, label in enumerate(labels):
        name = plan.mapping.get(label)
        if name not in plan.class_names:
            report.drop_class_tile(name or label)
            continue
        filename = names[i] if names else f"{split}/{i:06d}.png"
        entries.append(Entry(filename, name, _RowReader(raw, image_col, i), split if keep_split else None,
                             slides[i] if slides else None))
    return entries


def hub_entries(source: str, choice: ClassChoice, report: BuildReport) -> tuple[list[Entry], ClassPlan]:
    """Entries of a Hub dataset and its classes (a ClassLabel's order, else sorted names); its split is
    kept only when it has all of train/validation/test."""
    splits = _load_splits(source)
    given = set(splits) == set(SPLITS)
    labels = {split: _raw_labels(ds, f"Hub dataset {source!r} split {split}") for split, ds in splits.items()}
    ordered = next((order for _, order in labels.values() if order), None)
    raw_names = list(dict.fromkeys((ordered or []) + sorted({n for rows, _ in labels.values() for n in rows})))
    plan = plan_classes(raw_names, choice, f"Hub dataset {source!r}", given_order=ordered is not None)
    entries: list[Entry] = []
    for split, ds in splits.items():
        entries += _split_entries(ds, split, labels[split][0], plan, report, given)
    for name in plan.class_names:
        if not any(e.class_name == name for e in entries):
            raise ValueError(f"Hub dataset {source!r} has no tiles of class {name}")
    report.n_image_files = len(entries) + sum(report.dropped_classes.values())
    report.source_kind = "hub" if given else "hub_resplit"
    return entries, plan
