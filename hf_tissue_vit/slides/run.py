"""Map one slide: detect tissue, stream its windows through the predictor in batches.

:func:`check_slide` opens a slide and plans its windows (readable, µm/px known where needed, at
least one window: bad input is a one-line error before any long work); :func:`map_slide` maps it.
Corrupt tiles inside a slide do not stop it (their windows are marked unreadable). Many slides, on
one or many processes: :mod:`.cohort`.

Example::

    predictor = TilePredictor.from_pretrained("outputs/vit-scratch-cpu", batch_size=64)
    result = map_slide(predictor, "slide.svs", SlideMapOptions(), model_mpp(predictor))
"""

from __future__ import annotations

import glob
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .geometry import WindowGeometry, plan_windows
from .outputs import (
    BACKGROUND,
    UNREADABLE,
    SlideMap,
)
from .reader import SLIDE_EXTENSIONS, SlideReader, open_slide
from .tissue import (
    mask_source,
    min_area_px,
    overview_downsample,
    read_overview,
    tissue_mask,
    window_tissue_fraction,
)
from .windows import block_size, group_cells, iter_blocks

logger = logging.getLogger(__name__)


@dataclass
class SlideMapOptions:
    """How slides are mapped (the flags of scripts/tissue_map.py)."""

    tile: int = 150  # window side in px at the model's µm/px
    stride: int = 150
    mpp: float | None = None  # model's µm/px; None: the model's config.mpp
    slide_mpp: float | None = None  # overrides the slides' own
    background_threshold: float = 0.8  # windows with at least this background fraction are skipped
    min_tissue_area: float = 0.25  # tissue pieces smaller than this many window areas are ignored
    workers: int = 2  # reading threads
    overlap: bool | None = None  # read while the model runs; None: unless the predictor runs on the CPU
    max_side: int = 1024  # longest side of the picture's overview
    max_image_pixels: int | None = None  # PIL's pixel limit for plain images
    progress: bool = True

    def __post_init__(self) -> None:
        if self.tile < 1 or self.stride < 1:
            raise ValueError(f"--tile and --stride must be >= 1, got {self.tile} and {self.stride}")
        if not 0 < self.background_threshold <= 1:
            raise ValueError(f"--background_threshold must be in (0, 1], got {self.background_threshold}")
        for name in ("mpp", "slide_mpp"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name} must be a positive number of µm per pixel, got {value}")
        if self.workers < 0 or self.max_side < 16 or self.min_tissue_area < 0:
            raise ValueError("--workers and --min_tissue_area must be >= 0 and --max_side >= 16")


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Files as given, folders (recursively) and globs expanded to slide/image files, sorted, no repeats."""
    if not inputs:
        raise ValueError("--image: give at least one slide file, folder or glob pattern")
    found: list[str] = []
    for item in map(os.fspath, inputs):
        if os.path.isfile(item):
            matches = [item]
        elif os.path.isdir(item):
            matches = sorted(str(p) for p in Path(item).rglob("*")
                             if p.is_file() and p.suffix.lower() in SLIDE_EXTENSIONS)
        else:
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"--image {item!r}: no such file, and no slide in it as a folder or glob")
        found.extend(m for m in matches if m not in found)
    return found


def model_mpp(predictor: Any, override: float | None = None) -> float | None:
    """The µm/px windows are read at: ``override`` (--mpp), else the model's ``config.mpp``."""
    value = getattr(getattr(getattr(predictor, "model", None), "config", None), "mpp", None)
    if override is not None:
        if value and abs(float(value) - override) > 0.01 * override:
            logger.warning("--mpp %g overrides the model's config.mpp %g", override, float(value))
        return float(override)
    return float(value) if value else None


def check_slide(path: str, options: SlideMapOptions, target_mpp: float | None) -> WindowGeometry:
    """Open ``path`` and plan its windows (raises the one-line errors of bad input); closes it again."""
    with open_slide(path, options.slide_mpp, options.max_image_pixels) as reader:
        return plan_windows(reader, options.tile, options.stride, target_mpp)


def _tissue_cells(reader: SlideReader, geometry: WindowGeometry,
                  options: SlideMapOptions) -> tuple[np.ndarray, np.ndarray, float]:
    overview, downsample = read_overview(reader, overview_downsample(reader, geometry, options.max_side))
    source, mask_downsample = mask_source(overview, downsample, geometry)
    mask = tissue_mask(source, min_area_px(geometry, mask_downsample, options.min_tissue_area))
    return window_tissue_fraction(mask, mask_downsample, geometry), overview, downsample


def _classify_stream(predictor: Any, blocks: Iterator, labels: np.ndarray, probs: np.ndarray,
                     errors: list[str], bar: tqdm) -> None:
    """Batch the windows of ``blocks`` through ``predictor.predict_tiles`` and fill the grid."""
    batch_size = int(getattr(predictor, "batch_size", 64))
    cells: list[tuple[int, int]] = []
    tiles: list[np.ndarray] = []

    def flush() -> None:
        p = predictor.predict_tiles(list(tiles)).numpy()  # uint8 HxWx3 arrays: the predictor's processor
        rr, cc = np.array(cells).T
        probs[rr, cc] = p
        labels[rr, cc] = p.argmax(axis=1)
        bar.update(len(tiles))
        cells.clear()
        tiles.clear()

    for block in blocks:
        for (r, c), window, error in zip(block.cells.tolist(), block.windows, block.errors, strict=True):
            if window is None:
                labels[r, c] = UNREADABLE
                errors.append(f"window ({r}, {c}): {error}")
                bar.update(1)
                continue
            cells.append((r, c))
            tiles.append(window)
            if len(tiles) >= batch_size:
                flush()
    if tiles:
        flush()


def _overlap(predictor: Any, options: SlideMapOptions) -> bool:
    """Read ahead during the forward pass only when it does not run on the CPU the readers need."""
    if options.overlap is not None:
        return options.overlap
    device = getattr(predictor, "device", None)
    return getattr(device, "type", "cpu") != "cpu"


def map_slide(predictor: Any, path: str | SlideReader, options: SlideMapOptions,
              target_mpp: float | None) -> SlideMap:
    """Map one slide (a path, or a reader already open; see the module docstring). ValueError for
    bad input, OSError when the slide cannot be read."""
    if not isinstance(path, SlideReader):
        with open_slide(path, options.slide_mpp, options.max_image_pixels) as reader:
            return map_slide(predictor, reader, options, target_mpp)
    reader = path
    start = time.perf_counter()
    geometry = plan_windows(reader, options.tile, options.stride, target_mpp)
    fraction, overview, downsample = _tissue_cells(reader, geometry, options)
    n_classes = len(predictor.label_names)
    labels = np.full((geometry.rows, geometry.cols), BACKGROUND, np.int16)
    probs = np.full((geometry.rows, geometry.cols, n_classes), np.nan, np.float32)
    cells = np.argwhere(fraction > 1 - options.background_threshold)
    block = block_size(geometry)
    batch = int(getattr(predictor, "batch_size", 64))
    prefetch = max(2, math.ceil(2 * batch / (block * block))) + options.workers
    logger.info("%s: level %d (downsample %.3g), %dx%d windows of %.1f level-0 px, %d with tissue",
                reader.path, geometry.level, geometry.downsample, geometry.rows, geometry.cols, geometry.window0,
                len(cells))
    errors: list[str] = []
    with tqdm(total=len(cells), unit="window", desc=Path(reader.path).name, disable=not options.progress) as bar:
        blocks = iter_blocks(reader, geometry, group_cells(cells, block), options.workers, prefetch,
                             _overlap(predictor, options), chunk_windows=batch)
        _classify_stream(predictor, blocks, labels, probs, errors, bar)
    if errors:
        logger.warning("%s: %d windows could not be read (first: %s)", reader.path, len(errors), errors[0])
    return SlideMap(reader.path, geometry, labels, probs, fraction, list(predictor.label_names), reader.describe(),
                    overview, downsample, errors, time.perf_counter() - start)
