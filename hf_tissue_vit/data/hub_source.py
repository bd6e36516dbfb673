"""A Hub dataset as a tile source: its splits and columns mapped onto image / label / slide / filename."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset
from datasets import Image as ImageFeature
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..constants import ALL_CLASS_NAMES
from ..modelfolder import check_repo_id
from .report import BuildReport
from .schema import SPLITS, class_name_for, describe_columns, split_name_for
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


def _class_names_of_rows(ds: Dataset, where: str) -> list[str]:
    """Our class name of every row, from a ClassLabel or a string column of class names."""
    column = _pick_column(ds.features, _LABEL_COLUMNS, ClassLabel)
    if column is None:
        raise ValueError(
            f"{where}: no label column (label/labels/class...); columns: {describe_columns(ds.features)}"
        )
    feature = ds.features[column]
    values = list(ds[column])
    if isinstance(feature, ClassLabel):
        raw_names = [feature.int2str(int(v)) for v in values]
    elif isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        raw_names = [str(v) for v in values]
    else:
        raise ValueError(
            f"{where}: column {column!r} is {feature}, not a ClassLabel "
            f"or string class names, so its values cannot be mapped onto {ALL_CLASS_NAMES}"
        )
    mapped = {raw: class_name_for(raw) for raw in set(raw_names)}
    unknown = sorted(r for r, m in mapped.items() if m is None)
    if unknown:
        raise ValueError(
            f"{where}: label name(s) {unknown} match none of {ALL_CLASS_NAMES} "
            "(Kather folder names such as 01_TUMOR are understood too)"
        )
    return [mapped[raw] for raw in raw_names]


def _split_entries(
    ds: Dataset, split: str, where: str, class_names: Sequence[str], report: BuildReport, keep_split: bool
) -> list[Entry]:
    """Entries of one split; classes not asked for are counted in ``report.dropped_classes``."""
    image_col = _image_column(ds, where)
    row_classes = _class_names_of_rows(ds, where)
    name_col = _pick_column(ds.features, _NAME_COLUMNS, None)
    names = [str(n) for n in ds[name_col]] if name_col else None
    slides = [str(s or "") for s in ds["slide"]] if "slide" in ds.features else None
    images = list(ds.cast_column(image_col, ImageFeature(decode=False))[image_col])
    entries = []
    for i, (name, image) in enumerate(zip(row_classes, images)):
        if name not in class_names:
            report.drop_class_tile(name)
            continue
        filename = names[i] if names else (image.get("path") or f"{split}/{i:06d}.png")
        entries.append(Entry(filename, name, _hub_reader(image), split if keep_split else None,
                             slides[i] if slides else None))
    return entries


def hub_entries(source: str, class_names: Sequence[str], report: BuildReport) -> list[Entry]:
    """Entries of a Hub dataset; its split is kept only when it has all of train/validation/test."""
    splits = _load_splits(source)
    given = set(splits) == set(SPLITS)
    entries: list[Entry] = []
    for split, ds in splits.items():
        entries += _split_entries(ds, split, f"Hub dataset {source!r} split {split}", class_names, report, given)
    for name in class_names:
        if not any(e.class_name == name for e in entries):
            raise ValueError(f"Hub dataset {source!r} has no tiles of class {name}")
    report.n_image_files = len(entries) + sum(report.dropped_classes.values())
    report.source_kind = "hub" if given else "hub_resplit"
    return entries


def _hub_reader(image: dict[str, Any]) -> Callable[[], bytes]:
    def read() -> bytes:
        if image.get("bytes") is not None:
            return image["bytes"]
        if image.get("path") and os.path.isfile(image["path"]):
            return Path(image["path"]).read_bytes()
        raise ValueError(f"no image bytes and no readable file at {image.get('path')!r}")

    return read
