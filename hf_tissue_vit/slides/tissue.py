"""Tissue detection on a low-resolution overview, so only windows with tissue are read and classified.

:func:`read_overview` reads a pyramid level (in strips, reduced by an integer factor) into an RGB
image of a few thousand pixels at most. :func:`tissue_mask` marks a pixel as tissue when it is
saturated (H&E stains pink/purple; the saturation threshold is Otsu's on the slide, clipped to
:data:`SATURATION_RANGE` so an all-glass slide does not split sensor noise and a strongly stained
one does not drop pale tissue) or darker than glass, and not black (scanner padding). Pieces of
tissue smaller than ``min_area_px`` (dust, debris on the glass) are dropped.
:func:`window_tissue_fraction` gives each grid window the fraction of its area that is tissue,
on the overview reduced to about :data:`MASK_PX_PER_WINDOW` px per window side (:func:`mask_source`).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from PIL import Image

from .geometry import WindowGeometry
from .reader import SlideReader

logger = logging.getLogger(__name__)

SATURATION_RANGE = (0.05, 0.10)  # clip of the Otsu threshold on (max - min) / max
GLASS_LEVEL = 200  # a pixel whose darkest channel is below this is darker than glass
BLACK_LEVEL = 30  # a pixel whose brightest channel is at most this is scanner padding
_STRIP_PIXELS = 4 << 20  # level pixels read at once for the overview
# Mask pixels per window side: a pixel that mixes glass and tissue counts as tissue, so a glass
# window beside tissue on two sides gains about 2 / MASK_PX_PER_WINDOW of tissue.
MASK_PX_PER_WINDOW = 16


def overview_downsample(reader: SlideReader, geometry: WindowGeometry, max_side: int) -> float:
    """Level-0 px per overview px: :data:`MASK_PX_PER_WINDOW` per window side or ``max_side`` on the
    longest side, whichever needs more (level 0 itself for small images)."""
    longest = max(reader.dimensions)
    return max(1.0, min(geometry.window0 / MASK_PX_PER_WINDOW, longest / max_side))


def read_overview(reader: SlideReader, downsample: float) -> tuple[np.ndarray, float]:
    """RGB uint8 overview at about ``downsample`` level-0 px per pixel, and its exact downsample.

    The coarsest level not coarser than asked is read strip by strip and box-reduced by an integer
    factor, so memory stays at one strip whatever the level's size.
    """
    level = max((i for i, lv in enumerate(reader.levels) if lv.downsample <= downsample * (1 + 1e-6)),
                key=lambda i: reader.levels[i].downsample, default=0)
    info = reader.levels[level]
    factor = max(1, int(downsample / info.downsample + 1e-6))
    rows_per_strip = max(factor, (_STRIP_PIXELS // max(1, info.width)) // factor * factor)
    strips = []
    for y in range(0, info.height, rows_per_strip):
        h = min(rows_per_strip, info.height - y)
        strip = reader.read_region(0, round(y * info.downsample), level, info.width, h)
        strips.append(np.asarray(strip.reduce(factor) if factor > 1 else strip))
    return np.concatenate(strips, axis=0), info.downsample * factor


def mask_source(overview: np.ndarray, downsample: float, geometry: WindowGeometry) -> tuple[np.ndarray, float]:
    """The overview box-reduced to about :data:`MASK_PX_PER_WINDOW` px per window side (all tissue
    detection needs; the picture keeps the full overview), and its downsample."""
    factor = max(1, int(geometry.window0 / MASK_PX_PER_WINDOW / downsample + 1e-6))
    if factor == 1:
        return overview, downsample
    return np.asarray(Image.fromarray(overview).reduce(factor)), downsample * factor


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in [0, 1] (the cut maximising the between-class variance)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    if hist.sum() == 0:
        return 0.5
    p = hist.astype(np.float64) / hist.sum()
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    mean = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean * w0 - m0) ** 2 / (w0 * (1 - w0))
    between = np.nan_to_num(between, nan=0.0, posinf=0.0)
    return float(edges[int(np.argmax(between)) + 1])


def tissue_mask(rgb: np.ndarray, min_area_px: float = 0.0) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 image (see the module docstring for the rule)."""
    hi = rgb.max(axis=-1)
    lo = rgb.min(axis=-1)
    saturation = (hi.astype(np.float32) - lo) / np.maximum(hi, 1)
    padding = hi <= BLACK_LEVEL
    threshold = otsu_threshold(saturation[~padding]) if (~padding).any() else SATURATION_RANGE[1]
    threshold = float(np.clip(threshold, *SATURATION_RANGE))
    mask = ((saturation >= threshold) | (lo < GLASS_LEVEL)) & ~padding
    logger.debug("tissue mask: saturation threshold %.3f, %.1f%% tissue", threshold, 100 * mask.mean())
    return remove_small_components(mask, min_area_px) if min_area_px > 1 else mask


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, start and (exclusive) end column of every horizontal run of True, in row-major order."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)
    return rows, starts, ends


def _run_components(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int) -> np.ndarray:
    """Component id per run: runs of neighbouring rows that touch (8-connectivity) are joined."""
    span = width + 2
    key_start = rows * span + starts
    key_end = rows * span + ends
    # runs j of row r+1 touching run i of row r: start_j <= end_i and end_j >= start_i
    first = np.searchsorted(key_end, (rows + 1) * span + starts, side="left")
    last = np.searchsorted(key_start, (rows + 1) * span + ends, side="right")
    counts = np.maximum(last - first, 0)
    a = np.repeat(np.arange(len(rows)), counts)
    b = np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
    labels = np.arange(len(rows))
    while True:  # min-label propagation with pointer jumping: a few passes
        low = np.minimum(labels[a], labels[b])
        new = labels.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        new = new[new]
        if np.array_equal(new, labels):
            return labels
        labels = new


def remove_small_components(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """``mask`` without its 8-connected components of fewer than ``min_area_px`` pixels."""
    rows, starts, ends = _runs(mask)
    if len(rows) == 0:
        return mask
    labels = _run_components(rows, starts, ends, mask.shape[1])
    sizes = np.bincount(labels, weights=ends - starts)
    keep = sizes[labels] >= min_area_px
    edges = np.zeros((mask.shape[0], mask.shape[1] + 1), np.int8)
    edges[rows[keep], starts[keep]] += 1
    edges[rows[keep], ends[keep]] -= 1
    return np.cumsum(edges, axis=1)[:, :-1] > 0


def window_tissue_fraction(mask: np.ndarray, mask_downsample: float, geometry: WindowGeometry) -> np.ndarray:
    """Fraction of tissue pixels of ``mask`` inside each grid window, float32 [rows, cols]."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)

    def bounds(count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        start = np.arange(count) * geometry.stride0 / mask_downsample
        lo = np.clip(np.floor(start + 0.5).astype(np.int64), 0, size - 1)
        hi = np.clip(np.floor(start + geometry.window0 / mask_downsample + 0.5).astype(np.int64), lo + 1, size)
        return lo, hi

    y0, y1 = bounds(geometry.rows, mask.shape[0])
    x0, x1 = bounds(geometry.cols, mask.shape[1])
    total = (integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0])
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    return (total / area).astype(np.float32)


def min_area_px(geometry: WindowGeometry, mask_downsample: float, min_tissue_area: float) -> float:
    """``min_tissue_area`` (in window areas) as overview pixels."""
    side = geometry.window0 / mask_downsample
    return max(0.0, min_tissue_area) * side * side if math.isfinite(side) else 0.0
