"""The ``data`` section: decode + augment + collate into a batch of ``pixel_values`` (images/s).

The package's pipeline is the one training uses (:func:`hf_tissue_vit.training.decode_tiles`,
:class:`~hf_tissue_vit.training.TileDataset`, :class:`~hf_tissue_vit.training.TileCollator` over a
batched :class:`~hf_tissue_vit.transforms.TileTransform`); the baseline is
:mod:`benchmarks.example_pipeline`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hf_tissue_vit.training import TileCollator, TileDataset, decode_tiles
from hf_tissue_vit.transforms import AugmentationConfig, TileTransform

from .config import GOALS, BenchmarkConfig
from .example_pipeline import example_collate_fn
from .sources import BenchData
from .timing import ratio, row, time_interleaved


@dataclass
class PackagePipeline:
    """Decoded tiles + collator of the package, and how long the one-time decode took."""

    dataset: TileDataset  # train=True: the collator augments
    collator: TileCollator
    decode_seconds: float


def package_pipeline(bench: BenchData, processor: Any, augmentation: AugmentationConfig, seed: int) -> PackagePipeline:
    """Decode the tiles once (as training does, without the on-disk cache) and build dataset + collator."""
    start = time.perf_counter()
    pixels = decode_tiles(bench.dataset, cache=False)
    decode_seconds = time.perf_counter() - start
    labels = torch.as_tensor(np.asarray(bench.dataset["label"]), dtype=torch.long)
    collator = TileCollator(
        TileTransform.from_processor(processor, augmentation), TileTransform.from_processor(processor), seed=seed
    )
    return PackagePipeline(TileDataset(pixels, labels, train=True), collator, decode_seconds)


def make_loader(
    dataset: Any, collate: Callable, batch_size: int, workers: int, seed: int
) -> torch.utils.data.DataLoader:
    """A shuffling DataLoader as Trainer builds one (persistent workers when there are any)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=workers > 0,
    )


def iterate_batches(loader: Any, n_batches: int) -> int:
    """Pull ``n_batches`` batches (starting new epochs as needed); returns the images seen."""
    seen, done = 0, 0
    while done < n_batches:
        for batch in loader:
            seen += batch["pixel_values"].shape[0]
            done += 1
            if done == n_batches:
                break
    return seen


def bench_data(config: BenchmarkConfig, package: PackagePipeline, baseline_ds: Any, workers: int) -> dict[str, Any]:
    """Data pipeline images/s: example (imagefolder + set_transform + collate_fn) vs the package."""
    batch, seed = config.batch_size, config.seed
    base_loader = make_loader(baseline_ds, example_collate_fn, batch, 0, seed)  # Trainer's default: no workers
    pkg_loader = make_loader(package.dataset, package.collator, batch, workers, seed)
    rates = time_interleaved(
        {
            "baseline": lambda: iterate_batches(base_loader, config.data_batches),
            "package": lambda: iterate_batches(pkg_loader, config.data_batches),
        },
        config.repeats,
    )
    rows = {
        "baseline": row("transformers example (imagefolder + per-sample PIL transforms)", rates["baseline"],
                        dataloader_num_workers=0),
        "package": row("package (decoded-once uint8 tiles + batched TileTransform collator)", rates["package"],
                       dataloader_num_workers=workers),
    }
    # One-time decode (the package decodes each tile once, then reuses the uint8 array every epoch).
    decode_rate = len(package.dataset) / max(package.decode_seconds, 1e-9)
    rows["package_first_epoch"] = row(
        "package first epoch incl. the one-time decode (derived per repeat: 1/(1/decode + 1/steady))",
        [1 / (1 / decode_rate + 1 / v) for v in rows["package"]["values"]],
        decode_tiles_per_s=decode_rate,
    )
    return {
        "title": "Data pipeline: decode + augment + collate into pixel_values",
        "unit": "images/s",
        "batch_size": batch,
        "batches_per_repeat": config.data_batches,
        "image_size": config.small_model["image_size"],
        "rows": rows,
        "ratios": [
            ratio("package / example", rows, "package", "baseline", GOALS["data"]),
            ratio("package first epoch / example", rows, "package_first_epoch", "baseline"),
        ],
    }
