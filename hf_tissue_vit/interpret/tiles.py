"""The tiles an attention-map run explains: image files, or a few tiles per class of a saved dataset.

An unreadable file or dataset row is reported (logged, and listed in :attr:`TileSet.skipped`) and
the others are still explained. Images larger than ``max_side`` are downscaled as they are read
(:func:`~hf_tissue_vit.predict.read_downscaled`): the model sees every image at its input size
anyway, and the figures stay small, so memory does not grow with the image.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import KATHER_FOLDERS
from ..imaging import decode_dataset_image
from ..predict.large_image import read_downscaled
from ..predict.predictor import error_text

logger = logging.getLogger(__name__)

DEFAULT_MAX_SIDE = 1024


@dataclass
class TileSet:
    """Decoded tiles with their names and true labels (None when unknown), and what was skipped."""

    tiles: list[np.ndarray] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    true_labels: list[str | None] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one line per unreadable file or row

    def add(self, tile: np.ndarray, name: str, true_label: str | None) -> None:
        self.tiles.append(tile)
        self.names.append(name)
        self.true_labels.append(true_label)

    def skip(self, message: str) -> None:
        logger.warning("skipped %s", message)
        self.skipped.append(message)


def label_from_path(path: str | os.PathLike, label_names: Sequence[str]) -> str | None:
    """Class of a tile from a parent folder named like a class (01_TUMOR, Tumor, tumor)."""
    lookup = {name.lower(): name for name in label_names}
    lookup.update({folder.lower(): name for folder, name in KATHER_FOLDERS.items() if name in label_names})
    return next((lookup[p.lower()] for p in reversed(Path(path).parts[:-1]) if p.lower() in lookup), None)


def tiles_from_images(
    paths: Sequence[str], label_names: Sequence[str], max_side: int = DEFAULT_MAX_SIDE,
    max_image_pixels: int | None = None, flag: str = "--images",
) -> TileSet:
    """Read ``paths`` (each at most ``max_side`` px a side); true labels from class-named parent folders."""
    result = TileSet()
    for path in paths:
        try:
            tile, (width, height) = read_downscaled(path, max_side, max_image_pixels, flag=flag)
        except (ValueError, FileNotFoundError) as err:
            result.skip(str(err))
            continue
        if tile.shape[:2] != (height, width):
            logger.warning("%s is %dx%d px: downscaled to %dx%d px as it was read (attention maps are computed "
                           "at the model's input size; --max_side %d bounds the image and its figures)",
                           path, width, height, tile.shape[1], tile.shape[0], max_side)
        result.add(tile, Path(path).stem, label_from_path(path, label_names))
    return result


def tiles_from_dataset(dataset_dir: str, split: str, n_per_class: int, seed: int = 0) -> TileSet:
    """``n_per_class`` tiles per class of ``split`` of a saved dataset (drawn with ``seed``)."""
    from ..data.storage import load_tissue_dataset

    dataset = load_tissue_dataset(dataset_dir=dataset_dir)
    if split not in dataset:
        raise ValueError(f"--split {split!r} not in --dataset_dir (splits: {list(dataset)})")
    rows = dataset[split]
    names = rows.features["label"].names
    order = np.random.default_rng(seed).permutation(len(rows))
    labels = np.asarray(rows["label"])
    picked = [int(i) for k in range(len(names)) for i in order[labels[order] == k][:n_per_class]]
    # decode=False: rows come as encoded bytes and are decoded here, so one broken row is reported by
    # its file name instead of stopping the run (datasets would raise while iterating).
    from datasets import Image as ImageFeature

    rows = rows.select(picked).cast_column("image", ImageFeature(decode=False))
    files = rows["filename"] if "filename" in rows.column_names else [f"{split}_{i}" for i in picked]
    result = TileSet()
    for row, file, index in zip(rows, files, picked):
        tile = _decode_row(row["image"], file, f"--dataset_dir {dataset_dir!r} split {split!r} row {index}", result)
        if tile is not None:
            result.add(tile, Path(file).stem, names[row["label"]])
    return result


def _decode_row(value: Any, name: str, where: str, result: TileSet) -> np.ndarray | None:
    try:
        return decode_dataset_image(value)
    except Exception as err:  # one bad row is reported; the others are still explained
        result.skip(f"{where} ({name}) cannot be decoded: {error_text(err, name)}")
        return None
