"""Example tiles for the app: a few real tiles per class from the model's own **test** split.

Tiles are written as lossless PNG named ``<Class>_<n>_<original name>.png`` into a folder outside the
repository (a temp folder, or a Space being built); they are never committed. The Kather 2016 tiles
are CC-BY 4.0: wherever they are shown, :data:`ATTRIBUTION` goes with them.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..constants import IMAGE_EXTENSIONS, KATHER_FOLDERS
from ..imaging import decode_dataset_image, load_rgb8

logger = logging.getLogger(__name__)

ATTRIBUTION = ("Kather JN et al., Multi-class texture analysis in colorectal cancer histology, Sci Rep 6, 27988 "
               "(2016), doi:10.5281/zenodo.53169; CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/); "
               "pixels unchanged.")
MOSAIC_NAME = "mosaic.png"


@dataclass
class Example:
    """An example image and its true class (None when unknown)."""

    path: str
    label: str | None


def example_label(path: str | os.PathLike, label_names: Sequence[str]) -> str | None:
    """True class of an example from its name prefix (``Tumor_01_...``) or a parent folder (``01_TUMOR``)."""
    path = Path(path)
    prefix = path.name.split("_", 1)[0].lower()
    lookup = {name.lower(): name for name in label_names}
    if prefix in lookup:
        return lookup[prefix]
    for part in reversed(path.parts[:-1]):
        name = KATHER_FOLDERS.get(part.upper()) or lookup.get(part.lower())
        if name in label_names:
            return name
    return None


def examples_from_folder(folder: str | os.PathLike, label_names: Sequence[str]) -> list[Example]:
    """Image files under ``folder`` (sorted, recursive; the mosaic left out) with their classes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--examples {str(folder)!r}: no such folder")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and p.name != MOSAIC_NAME)
    return [Example(str(p), example_label(p, label_names)) for p in paths]


def pick_test_examples(dataset_dir: str | os.PathLike, out_dir: str | os.PathLike, label_names: Sequence[str],
                       n_per_class: int = 2, seed: int = 0) -> list[Example]:
    """Write ``n_per_class`` random test tiles per class of a saved dataset into ``out_dir`` as PNG."""
    from ..data.storage import load_tissue_dataset

    dataset = load_tissue_dataset(dataset_dir=dataset_dir)
    if "test" not in dataset:
        raise ValueError(f"dataset {str(dataset_dir)!r} has no test split (splits: {list(dataset)})")
    split = dataset["test"]
    names = split.features["label"].names
    labels = np.asarray(split["label"])
    order = np.random.default_rng(seed).permutation(len(split))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    examples = []
    for k, name in enumerate(names):
        if name not in label_names:
            continue
        for n, index in enumerate(order[labels[order] == k][:n_per_class]):
            row = split[int(index)]
            stem = Path(row["filename"]).stem if row.get("filename") else f"test_{int(index)}"
            path = out / f"{name}_{n + 1:02d}_{stem}.png"
            Image.fromarray(decode_dataset_image(row["image"])).save(path, format="PNG")
            examples.append(Example(str(path), name))
    logger.info("wrote %d example tiles from the test split of %s to %s", len(examples), dataset_dir, out)
    return examples


def make_mosaic(examples: Sequence[Example], path: str | os.PathLike, columns: int | None = None) -> str:
    """A larger image for the tissue-map tab: the example tiles side by side, in order, ``columns`` per row
    (default: about 4:3 landscape). Tiles are cropped to the smallest tile's size, so the grid is regular."""
    if not examples:
        raise ValueError("no example tiles to build a mosaic from")
    tiles = [load_rgb8(e.path) for e in examples]
    side = min(min(t.shape[:2]) for t in tiles)
    columns = columns or max(1, math.ceil(math.sqrt(len(tiles) * 4 / 3)))
    n_rows = math.ceil(len(tiles) / columns)
    canvas = np.full((side * n_rows, side * columns, 3), 255, dtype=np.uint8)  # white = glass: not classified
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        canvas[r * side:(r + 1) * side, c * side:(c + 1) * side] = tile[:side, :side]
    Image.fromarray(canvas).save(path, format="PNG")
    return os.fspath(path)


def find_examples(label_names: Sequence[str], out_dir: str | os.PathLike, examples_dir: str | None = None,
                  dataset_dir: str | None = None, n_per_class: int = 2) -> list[Example]:
    """Examples from ``examples_dir`` when given, else from the test split of ``dataset_dir`` when it
    exists (written into ``out_dir``); [] when neither is at hand."""
    if examples_dir:
        return examples_from_folder(examples_dir, label_names)
    if dataset_dir and Path(dataset_dir).is_dir():
        try:
            return pick_test_examples(dataset_dir, out_dir, label_names, n_per_class)
        except (FileNotFoundError, ValueError) as err:
            logger.warning("no example tiles from %s: %s", dataset_dir, err)
    return []
