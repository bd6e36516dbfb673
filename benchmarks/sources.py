"""The tiles every section runs on, the same ones two ways: an image folder of class subfolders
(what the transformers example and ``pipeline()`` read) and a package dataset (what training reads).

Source, in order: ``--dataset_dir`` (a prepared dataset), ``--data_dir`` (class subfolders), the real
Kather tiles in ``../shared`` when present, else synthetic tiles.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hf_tissue_vit.constants import CLASS_NAMES, IMAGE_EXTENSIONS, KATHER_FOLDERS

from .config import DEFAULT_REAL_DATA, BenchmarkConfig

logger = logging.getLogger(__name__)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class BenchData:
    """The same tiles two ways: ``folder`` (class subfolders of PNG/TIFF files) and ``dataset``."""

    folder: Path  # imagefolder root used by the baseline
    dataset: Any  # datasets.Dataset with image/label columns (package pipeline)
    files: list[Path]  # image files under ``folder`` (inference inputs)
    source: dict[str, Any]


def write_synthetic_tiles(root: str | os.PathLike, n_per_class: int, size: int = 150, seed: int = 0) -> list[Path]:
    """Write Kather-style PNG tiles (one colour + texture per class, random noise) into ``root/<folder>/``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    paths = []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for k, folder in enumerate(list(KATHER_FOLDERS)[: len(CLASS_NAMES)]):
        (root / folder).mkdir(parents=True, exist_ok=True)
        base = np.array([80 + 30 * k, 200 - 25 * k, 120 + 20 * (k % 3)], np.float32)
        for i in range(n_per_class):
            pattern = np.sin((xx * (k + 1) + yy * (6 - k)) / 4.0 + rng.uniform(0, 6.28))
            pixels = base + 30 * pattern[..., None] + rng.normal(0, 8, (size, size, 3))
            path = root / folder / f"synthetic_{k}_{i:04d}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(path)
            paths.append(path)
    return paths


def subset_folder(source: Path, target: Path, num_tiles: int, seed: int) -> list[Path]:
    """Copy ``num_tiles`` files (an equal share per class folder, seeded) into ``target`` (same layout)."""
    # the same file selection as predict.py
    from hf_tissue_vit.predict import iter_input_files

    folders = sorted(p for p in source.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"--data_dir {source}: expected class subfolders (e.g. 01_TUMOR/), found none")
    per_class = max(1, math.ceil(num_tiles / len(folders)))
    rng = random.Random(seed)
    copied = []
    for folder in folders:
        files = [Path(p) for p in iter_input_files([folder])]
        for path in sorted(rng.sample(files, min(per_class, len(files)))):
            dest = target / folder.name / path.relative_to(folder)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            copied.append(dest)
    if not copied:
        raise ValueError(f"--data_dir {source}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its subfolders")
    return copied


def flatten_splits(dataset_dict: Any) -> Any:
    """All splits of a ``DatasetDict`` as one ``Dataset`` (the benchmark does not train to evaluate)."""
    from datasets import concatenate_datasets

    return concatenate_datasets([dataset_dict[name] for name in dataset_dict])


def export_dataset(dataset: Any, target: Path) -> list[Path]:
    """Write a package dataset's tiles as ``target/<label name>/<n>.png`` (the baseline reads files)."""
    from datasets import Image as ImageFeature
    from PIL import Image

    from hf_tissue_vit.imaging import decode_dataset_image

    names = dataset.features["label"].names
    raw = dataset.cast_column("image", ImageFeature(decode=False))
    paths = []
    for i, item in enumerate(raw):
        folder = target / names[item["label"]]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.png"
        image = item["image"]
        if image.get("bytes") and image["bytes"][:8] == _PNG_MAGIC:
            path.write_bytes(image["bytes"])  # already PNG: the very bytes the dataset holds
        else:
            Image.fromarray(decode_dataset_image(image)).save(path)
        paths.append(path)
    return paths


def _from_dataset_dir(config: BenchmarkConfig, folder: Path) -> BenchData:
    from hf_tissue_vit.data import load_tissue_dataset

    full = flatten_splits(load_tissue_dataset(dataset_dir=config.dataset_dir))
    n = min(config.num_tiles, len(full))
    dataset = full.shuffle(seed=config.seed).select(range(n))
    files = export_dataset(dataset, folder)
    return BenchData(folder, dataset, files, {"kind": "dataset_dir", "path": str(config.dataset_dir), "tiles": n})


def prepare_data(config: BenchmarkConfig, workdir: Path) -> BenchData:
    """Resolve the tile source into the same ``num_tiles`` tiles as an image folder and a package dataset."""
    from hf_tissue_vit.data import build_dataset

    folder = workdir / "imagefolder"
    if config.dataset_dir:
        return _from_dataset_dir(config, folder)
    if config.data_dir:
        source, kind = Path(config.data_dir), "data_dir"
    elif DEFAULT_REAL_DATA.is_dir() and not config.synthetic:
        source, kind = DEFAULT_REAL_DATA, "real (default ../shared)"
    else:
        source, kind = None, "synthetic"
    if source is None:
        per_class = max(2, math.ceil(config.num_tiles / len(CLASS_NAMES)))
        files = write_synthetic_tiles(folder, per_class, size=48 if config.quick else 150, seed=config.seed)
    else:
        files = subset_folder(source, folder, config.num_tiles, config.seed)
    logger.info("building the package dataset from %d tiles in %s", len(files), folder)
    dataset = flatten_splits(build_dataset(folder, seed=config.seed))
    described = {"kind": kind, "path": str(source) if source else None, "tiles": len(files)}
    return BenchData(folder, dataset, files, described)
