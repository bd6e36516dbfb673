"""Tissue maps: classify a large image window by window.

:func:`tissue_map` cuts row strips of windows with ``Tensor.unfold`` (a view), marks mostly-background
windows (near-white or black glass, see :func:`background_fraction`) ``BACKGROUND`` without
classifying them, and sends the rest through a :class:`~hf_tissue_vit.predict.TilePredictor` in
batches. The result is a *per-window* grid: cell ``(r, c)`` is the window whose top-left corner is
``(r * stride, c * stride)``. With ``stride < tile`` windows overlap and each cell is drawn as the
``stride x stride`` square at the centre of its window; the right/bottom margin that no full window
covers is left out.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..imaging import to_uint8
from .large_image import open_large_image

if TYPE_CHECKING:
    from .predictor import TilePredictor

logger = logging.getLogger(__name__)

BACKGROUND = -1
StripReader = Callable[[int, int], torch.Tensor]  # (y0, y1) -> uint8 [y1 - y0, W, 3]


def background_fraction(windows: torch.Tensor, saturation: int = 20, white: int = 200, black: int = 30) -> torch.Tensor:
    """Fraction of background pixels per window, uint8 [N,H,W,3] -> float [N].

    A pixel is background when it is grey (max-min over RGB < ``saturation``) and either bright
    (min >= ``white``: glass) or dark (max <= ``black``: scanner padding). H&E tissue is pink/purple,
    i.e. saturated, and even pale debris is darker than glass.
    """
    hi = windows.amax(dim=-1)
    lo = windows.amin(dim=-1)
    grey = (hi.int() - lo.int()) < saturation
    background = grey & ((lo >= white) | (hi <= black))
    return background.flatten(1).float().mean(dim=1)


@dataclass
class TissueMap:
    """Per-window classification of a large image (see the module docstring for the geometry)."""

    labels: np.ndarray  # int16 [rows, cols], BACKGROUND (-1) where not classified
    probs: np.ndarray  # float32 [rows, cols, K], NaN on background
    background: np.ndarray  # float32 [rows, cols], background pixel fraction per window
    label_names: list[str]
    tile: int
    stride: int
    image_size: tuple[int, int]  # (height, width) of the analysed image
    background_threshold: float = 0.8
    extra: dict[str, Any] = field(default_factory=dict)

    def area_fractions(self) -> dict[str, Any]:
        """Cells per class, their fraction of the tissue cells and of all cells (JSON-ready)."""
        total = int(self.labels.size)
        tissue = int((self.labels != BACKGROUND).sum())
        classes = {}
        for k, name in enumerate(self.label_names):
            n = int((self.labels == k).sum())
            classes[name] = {
                "cells": n,
                "fraction_of_tissue": n / tissue if tissue else 0.0,
                "fraction_of_grid": n / total if total else 0.0,
            }
        return {
            "tile": self.tile,
            "stride": self.stride,
            "image_height": self.image_size[0],
            "image_width": self.image_size[1],
            "grid_rows": int(self.labels.shape[0]),
            "grid_cols": int(self.labels.shape[1]),
            "cells": total,
            "tissue_cells": tissue,
            "background_cells": total - tissue,
            "background_fraction": (total - tissue) / total if total else 0.0,
            "background_threshold": self.background_threshold,
            "classes": classes,
        }

    def cell_origin(self) -> tuple[float, float]:
        """Top-left pixel (y, x) of cell (0, 0): the centred stride x stride square of window (0, 0)."""
        offset = (self.tile - self.stride) / 2 if self.stride < self.tile else 0.0
        return offset, offset


def _strip_reader(image: Image.Image | np.ndarray) -> tuple[int, int, StripReader]:
    """(height, width, read_strip) of a PIL image (strips converted one at a time: no full-size uint8
    copy next to PIL's own buffer) or of an HxWx3 uint8 array (strips are views)."""
    if isinstance(image, Image.Image):
        width, height = image.size
        return height, width, lambda y0, y1: torch.from_numpy(to_uint8(image.crop((0, y0, width, y1))))
    array = np.ascontiguousarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 RGB, got shape {array.shape}")
    pixels = torch.from_numpy(array)
    return array.shape[0], array.shape[1], lambda y0, y1: pixels[y0:y1]


def tissue_map(
    predictor: TilePredictor,
    image: str | os.PathLike | Image.Image | np.ndarray,
    tile: int = 150,
    stride: int = 150,
    background_threshold: float = 0.8,
    max_image_pixels: int | None = None,
    progress: bool = False,
) -> TissueMap:
    """Classify every ``tile`` x ``tile`` window at step ``stride``; windows whose background pixel
    fraction is >= ``background_threshold`` are marked BACKGROUND and not classified.

    Windows are cut strip by strip (a few window rows at a time) so memory beyond the decoded image
    stays at a few batches.
    """
    if tile < 1 or stride < 1:
        raise ValueError(f"tile and stride must be positive, got tile={tile}, stride={stride}")
    if not 0.0 < background_threshold <= 1.0:
        raise ValueError(f"background_threshold must be in (0, 1], got {background_threshold}")
    if isinstance(image, (str, os.PathLike)):
        with open_large_image(image, max_image_pixels) as pil_image:
            return tissue_map(predictor, pil_image, tile, stride, background_threshold, progress=progress)
    height, width, read_strip = _strip_reader(image)
    if height < tile or width < tile:
        raise ValueError(f"image {width}x{height} px is smaller than one {tile}x{tile} window; use a smaller --tile")
    rows, cols = (height - tile) // stride + 1, (width - tile) // stride + 1
    labels = np.full((rows, cols), BACKGROUND, dtype=np.int16)
    probs = np.full((rows, cols, len(predictor.label_names)), np.nan, dtype=np.float32)
    background = np.zeros((rows, cols), dtype=np.float32)
    rows_per_strip = max(1, math.ceil(4 * predictor.batch_size / cols))
    for r0 in tqdm(range(0, rows, rows_per_strip), desc="tissue map", unit="strip", disable=not progress):
        r1 = min(rows, r0 + rows_per_strip)
        strip = read_strip(r0 * stride, (r1 - 1) * stride + tile)  # [h, W, 3] uint8
        # unfold -> [nr, nc, 3, tile(y), tile(x)]; channels-last copy, one window per tile
        windows = strip.unfold(0, tile, stride).unfold(1, tile, stride)[:, :cols]
        windows = windows.permute(0, 1, 3, 4, 2).reshape(-1, tile, tile, 3)
        bg = background_fraction(windows)
        background[r0:r1] = bg.view(r1 - r0, cols).numpy()
        tissue = (bg < background_threshold).nonzero().flatten()
        if len(tissue):
            p = predictor.predict_tiles(windows[tissue]).numpy()
            rr, cc = np.divmod(tissue.numpy(), cols)
            probs[r0 + rr, cc] = p
            labels[r0 + rr, cc] = p.argmax(axis=1)
    logger.info("tissue map %dx%d windows, %d background", rows, cols, int((labels == BACKGROUND).sum()))
    return TissueMap(labels, probs, background, list(predictor.label_names), tile, stride, (height, width),
                     background_threshold)
