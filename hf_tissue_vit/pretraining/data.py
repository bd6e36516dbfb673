"""Unlabelled tiles for pretraining: the train split of a dataset (labels ignored; validation and test are never
read) and/or folders of images, decoded once into one uint8 tensor (cached like training's tiles), and a collator
that augments whole batches into ``pixel_values``."""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..imaging import load_rgb8
from ..predict.inputs import check_inputs, iter_input_files
from ..training.tiles import (
    TileCollator,
    TileDataset,
    decode_cache_file,
    decode_tiles,
    read_decode_cache,
    stack_at_common_size,
    write_decode_cache,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnlabelledTiles:
    """Decoded tiles and where they came from (for ``pretraining.json``)."""

    pixels: torch.Tensor  # uint8 [N,H,W,3]
    info: dict[str, Any]


def dataset_train_tiles(
    dataset_dir: str | None, dataset_name: str | None, seed: int, cache: bool = True, cache_dir: str | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The train split of a saved or Hub dataset, decoded (labels ignored).

    A dataset with only a train split is first split like finetune.py does (the package's stratified splitter
    with ``seed``), and only that train part is used, so the tiles fine-tuning validates and tests on stay unseen
    when finetune.py runs with the same ``--seed``.
    """
    from ..data.storage import complete_splits, load_tissue_dataset

    dataset = load_tissue_dataset(dataset_dir=dataset_dir, dataset_name=dataset_name, require_validation=False)
    dataset, made_splits = complete_splits(dataset, seed)
    info: dict[str, Any] = {"dataset_dir": dataset_dir, "dataset_name": dataset_name, "split": "train"}
    if made_splits:
        logger.info("the dataset has no validation split: pretraining on the train part of a seed-%d split", seed)
        info["split_seed"] = seed
    pixels = decode_tiles(dataset["train"], cache, cache_dir)
    info["dataset_tiles"] = len(pixels)
    return pixels, info


def _files_digest(paths: list[str]) -> str:
    """Identity of a list of files for the decode cache: names, sizes and modification times."""
    digest = hashlib.blake2b(digest_size=12)
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _try_load(path: str) -> np.ndarray | None:
    try:
        return load_rgb8(path)
    except (OSError, ValueError) as err:  # PIL's errors for unreadable or truncated files
        logger.warning("skipping %s: %s", path, err)
        return None


def folder_tiles(
    inputs: list[str], cache: bool = True, cache_dir: str | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Image files, folders (recursive) and globs (:func:`hf_tissue_vit.predict.iter_input_files`) decoded by
    :func:`hf_tissue_vit.imaging.load_rgb8` into one [N,H,W,3] tensor (tiles of another size resized to the most
    common one). Unreadable files are skipped with a warning."""
    check_inputs(inputs)
    paths = [p for p in iter_input_files(inputs) if os.path.isfile(p)]
    if not paths:
        raise FileNotFoundError(f"--inputs {' '.join(inputs)}: no image files found")
    cache_path = decode_cache_file(f"files-{_files_digest(paths)}", len(paths), cache_dir) if cache else None
    array = read_decode_cache(cache_path, len(paths)) if cache_path and cache_path.is_file() else None
    if array is None:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL decodes without the GIL
            decoded = [a for a in pool.map(_try_load, paths) if a is not None]
        if not decoded:
            raise ValueError(f"--inputs {' '.join(inputs)}: none of the {len(paths)} files could be read as images")
        array = stack_at_common_size(decoded)
        if cache_path is not None and len(decoded) == len(paths):
            write_decode_cache(cache_path, array)
    return torch.from_numpy(array), {"inputs": list(inputs), "input_files": len(paths), "input_tiles": len(array)}


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    if len({tuple(p.shape[1:]) for p in parts}) == 1:
        return torch.cat(parts)
    return torch.from_numpy(stack_at_common_size([t.numpy() for part in parts for t in part]))


def load_unlabelled_tiles(data_args: Any, seed: int) -> UnlabelledTiles:
    """The tiles of ``data_args`` (:class:`~.arguments.UnlabelledDataArguments`): the dataset's train split and/or
    ``--inputs``, at one common size."""
    parts, info = [], {}
    cache, cache_dir = data_args.cache_decoded, data_args.decode_cache_dir
    if data_args.dataset_dir or data_args.dataset_name:
        pixels, found = dataset_train_tiles(data_args.dataset_dir, data_args.dataset_name, seed, cache, cache_dir)
        parts.append(pixels)
        info.update(found)
    if data_args.inputs:
        pixels, found = folder_tiles(list(data_args.inputs), cache, cache_dir)
        parts.append(pixels)
        info.update(found)
    pixels = _concat(parts)
    info["tiles"] = len(pixels)
    info["tile_size"] = list(pixels.shape[1:3])
    return UnlabelledTiles(pixels, info)


def unlabelled_dataset(tiles: UnlabelledTiles) -> TileDataset:
    """A training :class:`TileDataset` over the tiles (its labels are placeholders that the collator drops)."""
    return TileDataset(tiles.pixels, torch.zeros(len(tiles.pixels), dtype=torch.long), train=True)


class PixelCollator(TileCollator):
    """:class:`TileCollator` for unlabelled tiles: ``{"pixel_values"}`` only (the MAE's own target is the image)."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"pixel_values": super().__call__(items)["pixel_values"]}
