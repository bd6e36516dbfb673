"""Resolution and window grid: which pyramid level windows are read from, where each window lies.

The model sees ``tile`` x ``tile`` pixel windows at its training resolution ``target_mpp`` (µm/px;
Kather tiles: 150 px at 0.495 µm/px). On a slide of ``slide_mpp`` µm/px at level 0 a window then
spans ``tile * target_mpp / slide_mpp`` level-0 pixels (``scale`` level-0 px per model px), so a
40x slide (0.25 µm/px) and a 20x one (0.5 µm/px) give the model the same tissue scale. Windows are
read from the coarsest level that is still at least as fine as the target (the level "nearest above
the target resolution") and resampled to ``tile`` px. A target finer than level 0 would need
upsampling: allowed only up to :data:`MAX_UPSAMPLING` (a 0.5 µm/px slide for a 0.495 µm/px model).

Plain images without a known µm/px keep the package's original behaviour: a window is ``tile``
image pixels (``scale`` 1). The grid cell ``(r, c)`` is the window whose top-left level-0 corner is
``(c * stride0, r * stride0)``; the right/bottom margin that no whole window covers is left out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .reader import SlideReader

# Upsampling invents detail the model never saw at training; beyond this factor --mpp (or the
# model's config.mpp) is taken to be a mistake for this slide.
MAX_UPSAMPLING = 1.25
_LEVEL_RTOL = 1e-3  # float noise in recorded µm/px and downsamples


@dataclass(frozen=True)
class WindowGeometry:
    """Where windows are read and how big they are (level-0 pixel units unless said otherwise)."""

    tile: int  # window side given to the model, px at target_mpp
    stride: int  # step between windows, px at target_mpp
    scale: float  # level-0 px per model px
    level: int  # pyramid level windows are read from
    downsample: float  # that level's downsample from level 0
    rows: int
    cols: int
    target_mpp: float | None
    slide_mpp: float | None

    @property
    def window0(self) -> float:
        """Window side in level-0 px."""
        return self.tile * self.scale

    @property
    def stride0(self) -> float:
        """Step between windows in level-0 px."""
        return self.stride * self.scale

    def cell_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """Level-0 (x0, y0, x1, y1) of cell (row, col): its window, or with ``stride < tile`` the
        ``stride0`` square at the window's centre (cells then tile the slide without overlap)."""
        offset = (self.window0 - self.stride0) / 2 if self.stride < self.tile else 0.0
        side = min(self.stride0, self.window0)
        x0, y0 = col * self.stride0 + offset, row * self.stride0 + offset
        return x0, y0, x0 + side, y0 + side

    @property
    def cell_area_mm2(self) -> float | None:
        """Slide area one grid cell stands for (None without a µm/px)."""
        if self.slide_mpp is None:
            return None
        side_um = min(self.stride0, self.window0) * self.slide_mpp
        return side_um * side_um / 1e6

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "window_px_level0": self.window0, "stride_px_level0": self.stride0,
                "cell_area_mm2": self.cell_area_mm2}


def choose_level(reader: SlideReader, target_mpp: float) -> int:
    """Coarsest level whose µm/px is at most ``target_mpp`` (level 0 when none is)."""
    best = 0
    for index in range(len(reader.levels)):
        mpp = reader.level_mpp(index)
        finer = mpp is not None and mpp <= target_mpp * (1 + _LEVEL_RTOL)
        if finer and reader.levels[index].downsample > reader.levels[best].downsample:
            best = index
    return best


def _check_mpps(reader: SlideReader, target_mpp: float | None) -> bool:
    """True when windows are placed by µm/px; raises ValueError for a slide that needs them and lacks them."""
    if reader.kind == "image" and (reader.mpp is None or target_mpp is None):
        return False  # a plain image without a scale: windows of `tile` image px, as before slides
    if target_mpp is None:
        raise ValueError("--model has no config.mpp (the µm/px it was trained at): pass --mpp "
                         "(Kather 2016 tiles: 0.495)")
    if reader.mpp is None:
        raise ValueError(f"--image {reader.path!r}: the slide records no µm/px (openslide.mpp-x/-y or TIFF "
                         "resolution): pass --slide_mpp (e.g. 0.25 for 40x, 0.5 for 20x)")
    upsampling = reader.mpp / target_mpp
    if upsampling > MAX_UPSAMPLING:
        raise ValueError(f"--mpp {target_mpp:g} is {upsampling:.2f}x finer than the finest level of "
                         f"{reader.path!r} ({reader.mpp:.4g} µm/px); windows may be upsampled at most "
                         f"{MAX_UPSAMPLING}x: check --mpp / --slide_mpp")
    return True


def plan_windows(reader: SlideReader, tile: int, stride: int, target_mpp: float | None) -> WindowGeometry:
    """The window grid of ``reader`` for a model of ``target_mpp`` µm/px (see the module docstring).

    Raises ValueError (naming the argument to fix) for a slide without µm/px, a target the slide
    cannot deliver, or a slide smaller than one window.
    """
    if tile < 1 or stride < 1:
        raise ValueError(f"--tile and --stride must be >= 1, got {tile} and {stride}")
    if target_mpp is not None and not target_mpp > 0:
        raise ValueError(f"--mpp must be a positive number of µm per pixel, got {target_mpp}")
    scaled = _check_mpps(reader, target_mpp)
    scale = target_mpp / reader.mpp if scaled else 1.0
    level = choose_level(reader, target_mpp) if scaled else 0
    width, height = reader.dimensions
    window0, stride0 = tile * scale, stride * scale
    if window0 > width + 1e-6 or window0 > height + 1e-6:
        unit = f" ({tile} px at {target_mpp:g} µm/px)" if scaled else ""
        raise ValueError(f"--image {reader.path!r} ({width}x{height} px) is smaller than one window of "
                         f"{window0:.0f} px{unit}; use a smaller --tile")
    rows = math.floor((height - window0) / stride0 + 1e-6) + 1
    cols = math.floor((width - window0) / stride0 + 1e-6) + 1
    return WindowGeometry(tile, stride, scale, level, reader.levels[level].downsample, rows, cols,
                          target_mpp if scaled else None, reader.mpp)
