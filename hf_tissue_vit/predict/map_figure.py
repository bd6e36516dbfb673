"""Saving a tissue map: label grid, probabilities, class fractions and the colour-coded picture."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..fileio import atomic_write, atomic_write_json, save_figure_atomic
from ..imaging import to_rgb8
from .large_image import open_large_image
from .maps import BACKGROUND, TissueMap

MAP_FILES = ("label_grid.npy", "probabilities.npy", "class_fractions.csv", "class_fractions.json", "tissue_map.png")


def class_colours(n: int) -> np.ndarray:
    """n distinct RGB colours in [0, 1], for any number of classes: tab10 up to 10, tab20 up to 20, then
    hues spread by the golden angle (alternating lightness) so that no two classes share a colour."""
    import colorsys

    import matplotlib

    if n <= 20:
        cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
        return np.array([cmap(i)[:3] for i in range(n)]).reshape(n, 3)
    return np.array([colorsys.hls_to_rgb((i * 0.618033988749895) % 1.0, 0.45 if i % 2 else 0.6, 0.75)
                     for i in range(n)])


def _thumbnail(image: str | os.PathLike | Image.Image | np.ndarray, max_side: int,
               max_image_pixels: int | None = None) -> Image.Image:
    """RGB copy at most ``max_side`` px: integer ``reduce`` first, so no full-size copy is made."""
    if isinstance(image, (str, os.PathLike)):
        with open_large_image(image, max_image_pixels) as pil_image:
            return _thumbnail(pil_image, max_side)
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    factor = max(1, max(image.size) // max_side)
    small = to_rgb8(image.reduce(factor) if factor > 1 else image.copy())
    small.thumbnail((max_side, max_side))
    return small


def _save_tables(result: TissueMap, paths: dict[str, Path]) -> dict:
    """label_grid.npy, probabilities.npy (float16), class_fractions.json/.csv; returns the fractions."""
    with atomic_write(paths["label_grid.npy"], "wb") as handle:
        np.save(handle, result.labels)
    with atomic_write(paths["probabilities.npy"], "wb") as handle:
        np.save(handle, result.probs.astype(np.float16))
    fractions = result.area_fractions()
    atomic_write_json(paths["class_fractions.json"], fractions)
    with atomic_write(paths["class_fractions.csv"], newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "cells", "fraction_of_tissue", "fraction_of_grid"])
        for name, v in fractions["classes"].items():
            writer.writerow([name, v["cells"], f"{v['fraction_of_tissue']:.6f}", f"{v['fraction_of_grid']:.6f}"])
        background = f"{fractions['background_fraction']:.6f}"
        writer.writerow(["Background", fractions["background_cells"], "", background])
    return fractions


def _draw_map(result: TissueMap, thumb: Image.Image, fractions: dict, path: Path, alpha: float) -> None:
    """Class colours over the thumbnail (cells at their image position), legend with area fractions."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    height, width = result.image_size
    colours = class_colours(len(result.label_names))
    y0, x0 = result.cell_origin()
    rows, cols = result.labels.shape
    masked = np.ma.masked_equal(result.labels.astype(np.int32), BACKGROUND)
    fig = Figure(figsize=(10, max(3.0, 10 * height / width)))  # no pyplot: no global figure state
    ax = fig.add_subplot()
    ax.imshow(np.asarray(thumb), extent=(0, width, height, 0))
    ax.imshow(masked, cmap=ListedColormap(colours), vmin=-0.5, vmax=len(colours) - 0.5, alpha=alpha,
              interpolation="nearest",
              extent=(x0, x0 + cols * result.stride, y0 + rows * result.stride, y0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    handles = [Patch(color=colours[k], label=f"{name} ({fractions['classes'][name]['fraction_of_tissue']:.1%})")
               for k, name in enumerate(result.label_names)]
    handles.append(Patch(facecolor="none", edgecolor="grey",
                         label=f"background ({fractions['background_fraction']:.1%} of windows)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    ax.set_title(f"tissue map: {result.tile} px windows, stride {result.stride} px")
    save_figure_atomic(fig, path, format="png")


def save_tissue_map(
    result: TissueMap,
    image: str | os.PathLike | Image.Image | np.ndarray,
    output_dir: str | os.PathLike,
    max_side: int = 1024,
    alpha: float = 0.45,
    max_image_pixels: int | None = None,
) -> dict[str, str]:
    """Write ``label_grid.npy`` (int16, -1 = background), ``probabilities.npy`` (float16),
    ``class_fractions.csv``/``.json`` and ``tissue_map.png`` (class colours over the image downscaled
    to ``max_side`` px, with a legend). Each file is written atomically. Returns name -> path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in MAP_FILES}
    fractions = _save_tables(result, paths)
    _draw_map(result, _thumbnail(image, max_side, max_image_pixels), fractions, paths["tissue_map.png"], alpha)
    return {name: str(path) for name, path in paths.items()}
